//! The demo's Postgres: the server `DATABASE_URL` names, or a throwaway
//! cluster made from the installed PostgreSQL binaries in the data
//! directory, which later runs reuse. Either way the database is created if
//! it does not exist.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow};
use sentinel_control_plane::local_pg::{self, LocalPg, LocalPgError};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Database used on the demo's own cluster.
pub const DEMO_DB: &str = "sentinel_demo";

/// Where the demo's data lives.
pub struct Postgres {
    /// URL of the demo database.
    pub url: String,
    /// The cluster this run started or reused; `None` with `DATABASE_URL`.
    pub local: Option<LocalPg>,
    /// Something worth telling the user about how the cluster was found.
    pub notes: Vec<String>,
}

/// Why Postgres could not be had; `NoBinaries` has its own exit code and
/// message (what to install, or which `DATABASE_URL` to set).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    Local(#[from] LocalPgError),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// Uses `DATABASE_URL` when set, else starts (or reuses) the cluster under
/// `data_dir`, on `port` (0: a free one, or the port a still-running
/// cluster of an earlier run listens on).
pub async fn provision(data_dir: &Path, port: u16) -> Result<Postgres, PgError> {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.trim().is_empty()
    {
        ensure_database(url.trim()).await?;
        return Ok(Postgres {
            url: url.trim().to_string(),
            local: None,
            notes: Vec::new(),
        });
    }
    let mut notes = Vec::new();
    let dir = cluster_dir(data_dir, &mut notes)?;
    let mut port = port;
    match leftover_server(&dir) {
        Leftover::Running(p) => {
            notes.push(format!(
                "reusing the Postgres server an earlier run left running on port {p}"
            ));
            port = p;
        }
        Leftover::Stale(pid) => {
            // A server that died without cleaning up (the machine rebooted,
            // or it was killed): its lock file would make the next start
            // hesitate, or fail if the pid now belongs to another process.
            std::fs::remove_file(dir.join("postmaster.pid"))
                .with_context(|| format!("removing the stale {}/postmaster.pid", dir.display()))?;
            notes.push(format!(
                "removed a stale postmaster.pid (process {pid} is gone) from an earlier run"
            ));
        }
        Leftover::None => {}
    }
    if port == 0 {
        port = free_port().context("finding a free port for Postgres")?;
    }
    let start_dir = dir.clone();
    let pg = tokio::task::spawn_blocking(move || LocalPg::start(&start_dir, port, true))
        .await
        .map_err(|e| anyhow!("postgres start task: {e}"))??;
    let url = pg.url_for(DEMO_DB);
    if let Err(e) = ensure_database(&url).await {
        let _ = stop(&pg).await;
        return Err(e.into());
    }
    Ok(Postgres {
        url,
        local: Some(pg),
        notes,
    })
}

/// Stops a cluster the demo runs.
pub async fn stop(pg: &LocalPg) -> Result<()> {
    let pg = pg.clone();
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .map_err(|e| anyhow!("postgres stop task: {e}"))?
        .map_err(Into::into)
}

/// The cluster's directory: `<data_dir>/pg`. Postgres refuses to run as
/// root, so as root it runs as the `postgres` user, which must be able to
/// walk down to it; a data directory under a private home (e.g. `/root`)
/// gets its cluster under the system temporary directory instead, at a path
/// derived from the data directory so the next run finds it again.
fn cluster_dir(data_dir: &Path, notes: &mut Vec<String>) -> Result<PathBuf> {
    let dir = data_dir.join("pg");
    if !running_as_root() || local_pg::check_traversable(&dir).is_ok() {
        return Ok(dir);
    }
    let alt = std::env::temp_dir()
        .join(format!(
            "sentinel-demo-{:016x}",
            fnv1a(data_dir.as_os_str().as_encoded_bytes())
        ))
        .join("pg");
    if let Some(parent) = alt.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        set_mode(parent, 0o755)?;
    }
    notes.push(format!(
        "{} is not reachable by the postgres user; the cluster lives in {} instead",
        data_dir.display(),
        alt.display()
    ));
    Ok(alt)
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// FNV-1a, 64 bits: a stable short name for a path, not a security measure.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

enum Leftover {
    None,
    /// A server of this cluster is still running, on this port.
    Running(u16),
    /// The lock file of a server that is gone, by its pid.
    Stale(u32),
}

/// Reads `postmaster.pid`: line 1 is the pid, line 4 the port.
fn leftover_server(dir: &Path) -> Leftover {
    let Ok(text) = std::fs::read_to_string(dir.join("postmaster.pid")) else {
        return Leftover::None;
    };
    let mut lines = text.lines();
    let pid: Option<u32> = lines.next().and_then(|l| l.trim().parse().ok());
    let port: Option<u16> = lines.nth(2).and_then(|l| l.trim().parse().ok());
    let Some(pid) = pid else {
        return Leftover::Stale(0);
    };
    let alive = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim().starts_with("postgres"));
    match (alive, port) {
        (true, Some(p)) if local_pg::port_open(p) => Leftover::Running(p),
        (true, _) => Leftover::None,
        (false, _) => Leftover::Stale(pid),
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Connects to `url`'s database, creating it (through the server's
/// `postgres` database) when it does not exist yet.
async fn ensure_database(url: &str) -> Result<()> {
    let opts = PgConnectOptions::from_str(url).context("DATABASE_URL is not a postgres URL")?;
    match opts.connect().await {
        Ok(c) => {
            let _ = c.close().await;
            return Ok(());
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
        Err(e) => {
            return Err(anyhow!(
                "cannot connect to Postgres at {}: {e}",
                redact(url)
            ));
        }
    }
    let name = opts.get_database().unwrap_or(DEMO_DB).to_string();
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(anyhow!(
            "database {name:?} does not exist; create it, or name one made of letters, digits and '_'"
        ));
    }
    let mut admin = opts
        .clone()
        .database("postgres")
        .connect()
        .await
        .with_context(|| format!("connecting to {} to create database {name}", redact(url)))?;
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await;
    let _ = admin.close().await;
    match created {
        Ok(_) => Ok(()),
        // Another process created it in the meantime: just as good.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        Err(e) => Err(anyhow!("creating database {name}: {e}")),
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn leftover_lock_files_are_classified() {
        let dir = std::env::temp_dir().join(format!("sentinel-demo-pid-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        assert!(matches!(leftover_server(&dir), Leftover::None));
        // pid 0 never names a live process in /proc.
        std::fs::write(dir.join("postmaster.pid"), "999999999\n/x\n1\n5999\n").unwrap_or_default();
        assert!(matches!(
            leftover_server(&dir),
            Leftover::Stale(999_999_999)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
