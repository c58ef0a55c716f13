//! Real processes for fault tests: the two binaries, a Postgres cluster of
//! the test's own (so it can be restarted), an upstream that logs every call
//! it receives, a TCP relay that can cut connections, and a load driver.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::peers::{Running, free_port, peers};
use crate::{ADMIN, JOIN, modern_call};

/// The workspace's target directory.
pub fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Path of a workspace binary, built (once per test process) so it is
/// never stale. `cargo test --workspace --no-run` is the same build as the
/// README's test command (same features), so under it this is a no-op;
/// a plain `cargo build` would resolve features differently and rebuild
/// half the dependency tree.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["test", "--workspace", "--no-run", "--quiet"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    let p = target_dir().join("debug").join(name);
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Option<Child>,
}

impl Proc {
    /// SIGTERM, then waits (bounded) for a graceful exit; SIGKILL past it.
    pub fn term(&mut self, limit: Duration) {
        let Some(c) = &mut self.child else { return };
        // The child is not reaped yet, so its pid cannot have been reused.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_http_ok(url: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let ok = std::net::TcpStream::connect_timeout(&url_addr(url), Duration::from_millis(200))
            .is_ok()
            && http_get_ok(url);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} not ready within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn url_addr(url: &str) -> SocketAddr {
    let rest = url.trim_start_matches("http://");
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport.parse().expect("host:port")
}

/// A minimal blocking HTTP GET: 2xx or not.
fn http_get_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let addr = url_addr(url);
    let path = url
        .trim_start_matches("http://")
        .split_once('/')
        .map(|(_, p)| format!("/{p}"))
        .unwrap_or_else(|| "/".into());
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..10] == b"2")
}

/// The control plane as a process.
pub struct CpProc {
    pub proc: Proc,
    pub database_url: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub log: PathBuf,
}

impl CpProc {
    pub fn start(database_url: &str, log_dir: &Path) -> CpProc {
        let mut cp = CpProc {
            proc: Proc { child: None },
            database_url: database_url.into(),
            grpc_port: free_port(),
            http_port: free_port(),
            log: log_dir.join("control-plane.log"),
        };
        cp.restart();
        cp
    }

    /// (Re)starts on the same ports and database.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("sentinel-control-plane"))
            .env("DATABASE_URL", &self.database_url)
            .env(
                "SENTINEL_CP_GRPC__LISTEN",
                format!("127.0.0.1:{}", self.grpc_port),
            )
            .env(
                "SENTINEL_CP_HTTP__LISTEN",
                format!("127.0.0.1:{}", self.http_port),
            )
            .env("SENTINEL_CP_ADMIN_TOKENS", format!("[\"{ADMIN}\"]"))
            .env("SENTINEL_CP_JOIN_TOKENS", format!("[\"{JOIN}\"]"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn control plane");
        self.proc.child = Some(child);
        wait_http_ok(
            &format!("http://127.0.0.1:{}/readyz", self.http_port),
            Duration::from_secs(30),
        );
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub async fn admin(&self) -> crate::Admin {
        let ch = tonic::transport::Channel::from_shared(self.grpc_url())
            .expect("url")
            .connect()
            .await
            .expect("connect admin");
        crate::Admin(sentinel_shared::proto::admin_client::AdminClient::new(ch))
    }
}

/// The proxy as a process, with its spool in `dir`.
pub struct ProxyProc {
    pub proc: Proc,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl ProxyProc {
    /// `extra` is appended to the TOML configuration.
    pub fn start(proxy_id: &str, cp_url: &str, dir: &Path, extra: &str) -> ProxyProc {
        let port = free_port();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "proxy_id = \"{proxy_id}\"\nlisten = \"127.0.0.1:{port}\"\nupstream_timeout_ms = 10000\n\
                 [control_plane]\nurl = \"{cp_url}\"\njoin_token = \"{JOIN}\"\ncache_file = \"{}\"\n\
                 [spool]\ndir = \"{}\"\n{extra}\n",
                dir.join("policy.cache").display(),
                dir.join("spool").display(),
            ),
        )
        .expect("write proxy config");
        let mut p = ProxyProc {
            proc: Proc { child: None },
            port,
            config,
            log: dir.join("proxy.log"),
        };
        p.restart();
        p
    }

    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("sentinel-proxy"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn proxy");
        self.proc.child = Some(child);
        wait_http_ok(
            &format!("http://127.0.0.1:{}/readyz", self.port),
            Duration::from_secs(30),
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

/// A Python `mcp` upstream whose tool `record(n)` appends `n` to a log
/// file before answering: the ground truth of what was forwarded.
pub struct LoggingUpstream {
    pub running: Running,
    pub log: PathBuf,
}

impl LoggingUpstream {
    pub fn start(dir: &Path) -> LoggingUpstream {
        let p = peers();
        let script = dir.join("logging_upstream.py");
        let log = dir.join("upstream-calls.log");
        std::fs::write(
            &script,
            r#"import sys, os
from mcp.server.mcpserver import MCPServer

LOG = sys.argv[2]
mcp = MCPServer("logging-upstream")

@mcp.tool()
def record(n: int) -> str:
    """Records n, then answers."""
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{n}\n".encode())
    os.close(fd)
    return f"recorded {n}"

mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"#,
        )
        .expect("write upstream script");
        let port = free_port();
        let child = Command::new(p.python())
            .arg(&script)
            .arg(port.to_string())
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn logging upstream");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "upstream did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        LoggingUpstream {
            running: Running { child, port },
            log,
        }
    }

    pub fn url(&self) -> String {
        self.running.url()
    }

    /// Every n the upstream saw (with how many times).
    pub fn seen(&self) -> Vec<u64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// Client-side results of a load run.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    /// n of calls answered with a tool result.
    pub ok: BTreeSet<u64>,
    /// n of calls refused with 503 (audit unavailable).
    pub refused_503: BTreeSet<u64>,
    /// Everything else (connection errors while a proxy was down, ...).
    pub other: u64,
}

/// Drives `tools/call record(n)` at about `rate` calls/s with `conns`
/// concurrent callers until stopped, bounded by `max_calls` and `max_time`.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    report: Arc<Mutex<LoadReport>>,
}

impl Load {
    pub fn start(
        url_of: Arc<dyn Fn() -> String + Send + Sync>,
        key: &str,
        rate: u64,
        conns: u64,
        max_calls: u64,
        max_time: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(1));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let started = Instant::now();
        let per_conn = Duration::from_micros(1_000_000 * conns / rate.max(1));
        let handles = (0..conns)
            .map(|_| {
                let (stop, next, report, key, url_of) = (
                    stop.clone(),
                    next.clone(),
                    report.clone(),
                    key.to_string(),
                    url_of.clone(),
                );
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(per_conn);
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < max_time {
                        tick.tick().await;
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n > max_calls {
                            break;
                        }
                        let url = url_of();
                        let r = tokio::time::timeout(
                            Duration::from_secs(15),
                            modern_call(&url, &key, "logged__record", json!({ "n": n })),
                        )
                        .await;
                        let mut rep = report.lock().unwrap_or_else(|p| p.into_inner());
                        rep.sent += 1;
                        match r {
                            Ok((200, body)) if body.get("result").is_some() => {
                                rep.ok.insert(n);
                            }
                            Ok((503, _)) => {
                                rep.refused_503.insert(n);
                            }
                            _ => rep.other += 1,
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            handles,
            report,
        }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.await;
        }
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *r)
    }

    pub fn sent(&self) -> u64 {
        self.report.lock().unwrap_or_else(|p| p.into_inner()).sent
    }
}

/// A TCP relay in front of an address; `cut()` drops every open
/// connection at once (new ones are accepted).
pub struct Relay {
    pub addr: SocketAddr,
    generation: Arc<AtomicU64>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let generation = Arc::new(AtomicU64::new(0));
        let g = generation.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mine = g.load(Ordering::SeqCst);
                let g = g.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let cut = async {
                        while g.load(Ordering::SeqCst) == mine {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Relay { addr, generation }
    }

    pub fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}
