//! Builders for whole-system tests: a control plane on a fresh Postgres
//! database, proxies joined to it, real MCP peers, admin and raw MCP
//! clients. Everything binds 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test set-up fails loudly

#[path = "../../crates/data-plane/tests/common/peers.rs"]
pub mod peers;
pub mod procs;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sentinel_control_plane::config::Config as CpConfig;
use sentinel_control_plane::server::{self, Listeners};
use sentinel_control_plane::testing::TestDb;
use sentinel_proxy::config::Config as ProxyConfig;
use sentinel_shared::proto::admin_client::AdminClient;
use sentinel_shared::proto::{self as pb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

pub const ADMIN: &str = "admin-token-for-system-tests-0123";
pub const JOIN: &str = "join-token-for-system-tests-01234";
pub const MODERN: &str = "2026-07-28";

/// A control plane serving a fresh database. Stops when dropped.
pub struct Cp {
    pub db: TestDb,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Process-wide set-up every test needs: the TLS provider reqwest uses.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Cp {
    pub async fn start() -> Cp {
        init();
        let db = TestDb::new().await;
        let mut config = CpConfig {
            database_url: db.url.clone(),
            instance_id: "cp-test".into(),
            admin_tokens: vec![ADMIN.into()],
            join_tokens: vec![JOIN.into()],
            ..CpConfig::default()
        };
        config.finish().unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (g, h) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = server::run(config, Listeners { grpc, http }, None, s).await {
                eprintln!("control plane stopped: {e}");
            }
        });
        let cp = Cp {
            db,
            grpc: g,
            http: h,
            stop,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        while !client
            .get(format!("http://{}/readyz", cp.http))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "control plane not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cp
    }

    pub async fn admin(&self) -> Admin {
        let ch = Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Admin(AdminClient::new(ch))
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&self.db.pool).await.unwrap();
        n
    }

    /// Waits until `sql` (a count) reaches `n`; returns the last count.
    pub async fn wait_count(&self, sql: &'static str, n: i64, limit: Duration) -> i64 {
        let deadline = Instant::now() + limit;
        loop {
            let c = self.count(sql).await;
            if c >= n || Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The admin gRPC client with the admin credential on every call.
pub struct Admin(pub AdminClient<Channel>);

pub fn admin_req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

impl Admin {
    pub async fn put_http_backend(&mut self, name: &str, url: &str) -> u64 {
        self.0
            .put_backend(admin_req(pb::PutBackendRequest {
                backend: Some(pb::Backend {
                    name: name.into(),
                    timeout_ms: 10_000,
                    transport: Some(pb::backend::Transport::Http(pb::HttpBackend {
                        url: url.into(),
                        headers: vec![],
                    })),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap()
            .into_inner()
            .version
    }

    pub async fn put_role(&mut self, name: &str, allow: &[&str], deny: &[&str]) -> u64 {
        self.0
            .put_role(admin_req(pb::PutRoleRequest {
                role: Some(pb::Role {
                    name: name.into(),
                    allow_tools: allow.iter().map(|s| s.to_string()).collect(),
                    deny_tools: deny.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap()
            .into_inner()
            .version
    }

    /// Creates a key; returns (id, secret, policy version).
    pub async fn create_key(&mut self, role: &str, owner: &str) -> (String, String, u64) {
        let c = self
            .0
            .create_api_key(admin_req(pb::CreateApiKeyRequest {
                role: role.into(),
                owner: owner.into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        (c.key.unwrap().id, c.secret, c.policy_version)
    }

    pub async fn revoke(&mut self, id: &str) {
        self.0
            .revoke_api_key(admin_req(pb::RevokeApiKeyRequest { id: id.into() }))
            .await
            .unwrap();
    }

    pub async fn proxies(&mut self) -> pb::ListProxiesResponse {
        self.0
            .list_proxies(admin_req(pb::ListProxiesRequest {}))
            .await
            .unwrap()
            .into_inner()
    }
}

/// A proxy joined to a control plane, in this process. Stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Proxy {
    pub fn config(proxy_id: &str, cp: &Cp, dir: &std::path::Path) -> ProxyConfig {
        let mut c = ProxyConfig {
            proxy_id: proxy_id.into(),
            upstream_timeout_ms: 10_000,
            ..ProxyConfig::default()
        };
        c.control_plane.url = format!("http://{}", cp.grpc);
        c.control_plane.join_token = JOIN.into();
        c.control_plane.cache_file = Some(dir.join("policy.cache"));
        c.spool.dir = dir.join("spool");
        c
    }

    /// Starts a proxy joined to `cp`, and waits until it enforces a policy.
    pub async fn start(proxy_id: &str, cp: &Cp) -> Proxy {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut p = Self::start_with(Self::config(proxy_id, cp, &dir)).await;
        p._tmp = Some(tmp);
        p
    }

    pub async fn start_with(config: ProxyConfig) -> Proxy {
        let dir = config.spool.dir.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let r = sentinel_proxy::boot::start(config, listener, async {
                let _ = rx.await;
            })
            .await;
            if let Err(e) = r {
                eprintln!("proxy stopped: {e}");
            }
        });
        let p = Proxy {
            addr,
            dir,
            _tmp: None,
            stop: Some(tx),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        while !client
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "proxy never got a policy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
}

/// One modern (2026-07-28, stateless) tools/call over raw HTTP: (status,
/// body as JSON, or the text when it is not JSON).
pub async fn modern_call(url: &str, key: &str, tool: &str, args: Value) -> (u16, Value) {
    let body = json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": tool,
            "arguments": args,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientCapabilities": {}
            }
        }
    });
    let r = reqwest::Client::new()
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body)
        .send()
        .await;
    let r = match r {
        Ok(r) => r,
        // The proxy is down (a fault test): status 0.
        Err(e) => return (0, Value::String(e.to_string())),
    };
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text)
        .or_else(|_| {
            // An SSE answer: the last `data:` line holds the response.
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .next_back()
                .map(|d| serde_json::from_str(d.trim()))
                .unwrap_or(Ok(Value::String(text.clone())))
        })
        .unwrap_or(Value::String(text));
    (status, value)
}
