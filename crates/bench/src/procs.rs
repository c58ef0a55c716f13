//! Real processes for the overhead benchmark: the workspace's binaries,
//! nginx, and what `/proc` says about their CPU time and memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `release` for an optimised bench binary, `debug` otherwise: the
/// processes measured are built the same way as the harness.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => workspace().join("target"),
    }
}

/// Builds the three binaries the set-ups run, in this build's profile.
/// Selecting `sentinel-bench` with the two server packages keeps the
/// feature resolution of `cargo run -p sentinel-bench`, so nothing the
/// harness itself was built from is rebuilt.
pub fn build_binaries() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace()).args([
        "build",
        "--quiet",
        "-p",
        "sentinel-bench",
        "-p",
        "sentinel-proxy",
        "-p",
        "sentinel-control-plane",
        "--bin",
        "bench-upstream",
        "--bin",
        "sentinel-proxy",
        "--bin",
        "sentinel-control-plane",
    ]);
    if profile() == "release" {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    anyhow::ensure!(
        status.success(),
        "building the binaries failed: run `cargo build {}-p sentinel-bench -p sentinel-proxy -p sentinel-control-plane --bins`",
        if profile() == "release" {
            "--release "
        } else {
            ""
        }
    );
    Ok(())
}

pub fn bin(name: &str) -> PathBuf {
    target_dir().join(profile()).join(name)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Proc> {
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        Ok(Proc {
            name: name.into(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(Some(status)) = c.try_wait() {
            // It should have run until now: a crash would void the figures.
            println!("warning: {} had exited on its own ({status})", self.name);
            return;
        }
        // SIGTERM first: nginx's master then stops its workers too.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `bench-upstream`; returns it and the address it bound.
pub fn upstream(sse: bool) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bin("bench-upstream"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if sse {
        cmd.arg("--sse");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start bench-upstream: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("bench-upstream: no stdout"))?;
    let p = Proc {
        name: "bench-upstream".into(),
        child: Some(child),
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bench-upstream said {line:?}"))?;
    Ok((p, addr))
}

/// Waits for `url` (a plain-HTTP GET) to answer 2xx.
pub async fn wait_ready(url: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let client = reqwest::Client::new();
    loop {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nginx binary, installing the Debian package if it is missing and
/// `install` is set. `None`: not installed (and not installed now).
pub fn nginx(install: bool) -> Option<PathBuf> {
    let find = || {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    if !install {
        return None;
    }
    println!("nginx not found: installing it (apt-get install -y nginx-light)");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "nginx-light"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success())
        || (Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .is_ok_and(|s| s.success())
            && Command::new("apt-get")
                .args(["install", "-y", "-q", "nginx-light"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success()));
    if !ok {
        println!(
            "nginx: could not install it; run `sudo apt-get install -y nginx-light` (or `nginx`) and run again"
        );
    }
    find()
}

/// nginx in the foreground with a generated configuration in `dir`:
/// `/mcp` to the JSON upstream, `/sse/mcp` to the SSE one, keep-alive
/// connections upstream, no buffering, no access log.
pub fn start_nginx(
    nginx: &Path,
    dir: &Path,
    port: u16,
    json: SocketAddr,
    sse: SocketAddr,
) -> anyhow::Result<Proc> {
    for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 4m;
    client_body_buffer_size 64k;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream json_up {{ server {json}; keepalive 128; keepalive_requests 1000000; }}
    upstream sse_up {{ server {sse}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port};
        location = /mcp {{
            proxy_pass http://json_up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location = /sse/mcp {{
            proxy_pass http://sse_up/mcp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
        location = /healthz {{ return 200 "ok"; }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Proc::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    )
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Ticks per second of `cpu_ticks` (USER_HZ, 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// `pid` and its direct children (nginx's master and workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok()),
    );
    pids
}

/// CPU ticks of several processes together.
pub fn cpu_ticks_all(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// A `/proc/<pid>/status` field in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The sum of a `/proc/<pid>/status` field over several processes.
pub fn status_kb_all(pids: &[u32], field: &str) -> u64 {
    pids.iter().map(|p| status_kb(*p, field)).sum()
}
