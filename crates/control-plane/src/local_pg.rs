//! A throwaway Postgres cluster made with the locally installed binaries,
//! for the demo and for tests on a machine where no server runs.
//!
//! Postgres refuses to run as root. When we are root, the cluster is created
//! and run as the `postgres` system user (or `nobody`), which owns the data
//! directory; no `sudo` is needed because the child process's uid and gid
//! are set directly.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "no PostgreSQL server binaries found (looked in {}/*/bin and PATH; SENTINEL_PG_BIN names another directory). \
         Install them (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL to a running server, \
         e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/sentinel",
        .0.display()
    )]
    NoBinaries(PathBuf),
    /// `SENTINEL_PG_BIN` is set but does not hold the binaries: an explicit
    /// choice is not silently replaced by whatever else is installed.
    #[error(
        "SENTINEL_PG_BIN={0} does not hold the PostgreSQL server binaries (initdb and pg_ctl). \
         Point it at a PostgreSQL bin directory (Debian/Ubuntu: /usr/lib/postgresql/<version>/bin \
         after `apt-get install postgresql`), unset it to search /usr/lib/postgresql/*/bin and PATH, \
         or set DATABASE_URL to a running server"
    )]
    BadBinDir(PathBuf),
    #[error(
        "running as root and no unprivileged user (postgres or nobody) exists to run Postgres as"
    )]
    NoUser,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalPgError + '_ {
    move |source| LocalPgError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A local cluster: its data directory and port. Stopping is explicit
/// ([`LocalPg::stop`]): tests share one cluster across processes, so it must
/// outlive the process that started it.
#[derive(Debug, Clone)]
pub struct LocalPg {
    pub data_dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
}

impl LocalPg {
    /// The URL of the `postgres` database on this cluster.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of database `db` on this cluster.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates (if needed) and starts a cluster in `data_dir` on `port`.
    /// With `durable = false`, fsync is off: fine for tests, never for data
    /// anyone keeps. Returns once the server accepts connections.
    pub fn start(data_dir: &Path, port: u16, durable: bool) -> Result<LocalPg, LocalPgError> {
        let bin = find_bin_dir()?;
        let run_as = unprivileged_user()?;
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let pg = LocalPg {
            data_dir: data_dir.to_path_buf(),
            port,
            bin,
            run_as,
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(data_dir, Some(uid), Some(gid)).map_err(io(data_dir))?;
            // Postgres insists on 0700 (or 0750) for its data directory.
            set_mode(data_dir, 0o700)?;
        }
        if !data_dir.join("PG_VERSION").exists() {
            pg.run(
                "initdb",
                Command::new(pg.bin.join("initdb"))
                    .arg("-D")
                    .arg(data_dir)
                    .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
            )?;
        }
        if !pg.is_up() {
            let opts = format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300{}",
                if durable {
                    ""
                } else {
                    " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                }
            );
            pg.run(
                "pg_ctl start",
                Command::new(pg.bin.join("pg_ctl"))
                    .arg("-D")
                    .arg(data_dir)
                    .arg("-l")
                    .arg(data_dir.join("server.log"))
                    .args(["-o", &opts, "-w", "-t", "60", "start"]),
            )?;
        }
        pg.wait_up(Duration::from_secs(30))?;
        Ok(pg)
    }

    /// Whether something accepts TCP connections on the port.
    pub fn is_up(&self) -> bool {
        port_open(self.port)
    }

    fn wait_up(&self, limit: Duration) -> Result<(), LocalPgError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.is_up() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(LocalPgError::Step {
            step: "waiting for postgres",
            detail: format!("port {} not open", self.port),
        })
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn stop(&self) -> Result<(), LocalPgError> {
        self.run(
            "pg_ctl stop",
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "stop"]),
        )
    }

    /// Stops the server with an immediate shutdown, as a crash would.
    pub fn kill(&self) -> Result<(), LocalPgError> {
        self.run(
            "pg_ctl stop -m immediate",
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "stop"]),
        )
    }

    fn run(&self, step: &'static str, cmd: &mut Command) -> Result<(), LocalPgError> {
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        // `/` is readable by everyone; the server's own cwd must be.
        cmd.current_dir("/").stdin(Stdio::null());
        let out = cmd.output().map_err(|e| LocalPgError::Step {
            step,
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if detail.is_empty() {
                detail = String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            if !tail.is_empty() {
                detail.push_str(" | server.log: ");
                detail.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join(" / "));
            }
            return Err(LocalPgError::Step { step, detail });
        }
        Ok(())
    }
}

/// Whether a TCP port on 127.0.0.1 accepts connections.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Where versioned installs are looked for (`<root>/<version>/bin`), the
/// Debian and Ubuntu layout. `SENTINEL_PG_SEARCH_ROOT` replaces it.
pub const PG_SEARCH_ROOT: &str = "/usr/lib/postgresql";

/// The directory holding `initdb` and `pg_ctl`: `$SENTINEL_PG_BIN` when set
/// (and then only there), else the newest `/usr/lib/postgresql/<version>/bin`
/// (`$SENTINEL_PG_SEARCH_ROOT` instead of `/usr/lib/postgresql`), else the
/// first `PATH` entry holding both.
pub fn find_bin_dir() -> Result<PathBuf, LocalPgError> {
    let explicit = std::env::var_os("SENTINEL_PG_BIN").filter(|v| !v.is_empty());
    let root = std::env::var_os("SENTINEL_PG_SEARCH_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(PG_SEARCH_ROOT), PathBuf::from);
    find_bin_dir_in(
        explicit.as_deref().map(Path::new),
        &root,
        std::env::var_os("PATH").as_deref(),
    )
}

/// [`find_bin_dir`] with its inputs given: the explicit directory, the root
/// of versioned installs, and a `PATH` value.
pub fn find_bin_dir_in(
    explicit: Option<&Path>,
    root: &Path,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, LocalPgError> {
    let has_binaries = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = explicit {
        return if has_binaries(dir) {
            Ok(dir.to_path_buf())
        } else {
            Err(LocalPgError::BadBinDir(dir.to_path_buf()))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_binaries(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    path.and_then(|paths| std::env::split_paths(paths).find(|p| has_binaries(p)))
        .ok_or_else(|| LocalPgError::NoBinaries(root.to_path_buf()))
}

/// `None` when we are not root; otherwise the uid/gid to run Postgres as.
fn unprivileged_user() -> Result<Option<(u32, u32)>, LocalPgError> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3
                && f[0] == wanted
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                return Ok(Some((uid, gid)));
            }
        }
    }
    Err(LocalPgError::NoUser)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LocalPgError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// Makes sure every directory above `path` can be traversed by the user
/// Postgres runs as (a data directory under a 0700 home would not be).
pub fn check_traversable(path: &Path) -> Result<(), LocalPgError> {
    let mut p = path.parent();
    while let Some(dir) = p {
        if let Ok(m) = std::fs::metadata(dir)
            && m.mode() & 0o001 == 0
        {
            return Err(LocalPgError::Step {
                step: "checking the data directory",
                detail: format!(
                    "{} is not traversable by other users; Postgres (run as an unprivileged user) could not reach {}",
                    dir.display(),
                    path.display()
                ),
            });
        }
        p = dir.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake install: `dir` with empty `initdb` and `pg_ctl` files.
    fn fake_bin(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        for b in ["initdb", "pg_ctl"] {
            std::fs::write(dir.join(b), "").unwrap();
        }
        dir.to_path_buf()
    }

    #[test]
    fn the_binaries_are_searched_in_order_and_an_explicit_choice_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let root = t.join("postgresql");
        let empty = t.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let on_path = fake_bin(&t.join("local/bin"));
        let path = std::env::join_paths([empty.clone(), on_path.clone()]).unwrap();

        // Nothing anywhere: the message says what to install and what to set.
        let err = find_bin_dir_in(None, &root, Some(empty.as_os_str())).unwrap_err();
        assert!(matches!(err, LocalPgError::NoBinaries(_)));
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
        assert!(msg.contains(&root.display().to_string()), "{msg}");
        assert!(matches!(
            find_bin_dir_in(None, &root, None),
            Err(LocalPgError::NoBinaries(_))
        ));

        // PATH, when nothing is installed under the root; an entry needs both.
        std::fs::write(empty.join("initdb"), "").unwrap();
        assert_eq!(
            find_bin_dir_in(None, &root, Some(&path)).ok(),
            Some(on_path.clone())
        );

        // The newest version under the root wins over PATH; a version
        // directory without the binaries and a non-version name are skipped.
        let v15 = fake_bin(&root.join("15/bin"));
        let v9 = fake_bin(&root.join("9/bin"));
        std::fs::create_dir_all(root.join("17/bin")).unwrap();
        fake_bin(&root.join("latest/bin"));
        assert_eq!(find_bin_dir_in(None, &root, Some(&path)).ok(), Some(v15));

        // An explicit directory is used, or is an error naming it: never
        // silently replaced by another install.
        assert_eq!(
            find_bin_dir_in(Some(&v9), &root, Some(&path)).ok(),
            Some(v9)
        );
        let err = find_bin_dir_in(Some(&empty), &root, Some(&path)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LocalPgError::BadBinDir(_)), "{msg}");
        assert!(msg.contains("SENTINEL_PG_BIN="), "{msg}");
        assert!(msg.contains(&empty.display().to_string()), "{msg}");
        assert!(msg.contains("DATABASE_URL"), "{msg}");
    }
}
