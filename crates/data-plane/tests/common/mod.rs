//! Test set-up: the real proxy on 127.0.0.1:0 with a policy loaded locally,
//! and builders for policies and raw MCP requests.

#![allow(dead_code)]

pub mod peers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sentinel_proxy::audit::MemorySink;
use sentinel_proxy::config::Config;
use sentinel_proxy::policy::file::{ApiKeyEntry, PolicyFile, SessionKeyEntry};
use sentinel_proxy::policy::{PolicyPublisher, policy_channel};
use sentinel_shared::keys::{KeyKind, generate};
use sentinel_shared::spec::{BackendSpec, PolicySpec, RateLimitSpec, RoleSpec};
use serde_json::{Value, json};

pub const MODERN: &str = "2026-07-28";

/// A running proxy. Dropping it stops the server.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub sink: Arc<MemorySink>,
    pub publisher: PolicyPublisher,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestProxy {
    pub fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn config() -> Config {
    Config {
        proxy_id: "test-proxy".into(),
        policy_file: Some("unused".into()),
        upstream_timeout_ms: 5_000,
        max_body_bytes: 64 * 1024,
        ..Default::default()
    }
}

/// Starts the real server with `policy` (or none).
pub async fn start(cfg: Config, policy: Option<PolicyFile>) -> TestProxy {
    let (publisher, reader) = policy_channel(&cfg);
    if let Some(p) = policy {
        publisher
            .publish(p.into_snapshot().expect("policy file"))
            .expect("policy applies");
    }
    let sink = MemorySink::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let s = sink.clone();
    tokio::spawn(async move {
        let _ = sentinel_proxy::server::run(cfg, listener, reader, s, async {
            let _ = rx.await;
        })
        .await;
    });
    TestProxy {
        addr,
        sink,
        publisher,
        stop: Some(tx),
    }
}

/// Keys of the standard policy, one per role.
pub struct Keys {
    pub admin: String,
    pub reader: String,
    pub limited: String,
    pub expired: String,
}

pub fn http_backend(name: &str, url: &str) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        url: Some(url.into()),
        ..Default::default()
    }
}

/// Roles: `admin` (everything), `reader` (`*/echo`, `py/add`; `py/shout`
/// denied), `limited` (everything, one call then 429).
pub fn policy(backends: Vec<BackendSpec>) -> (PolicyFile, Keys) {
    let k: Vec<_> = (0..4).map(|_| generate(KeyKind::Api)).collect();
    let entry = |i: usize, role: &str, exp: i64| ApiKeyEntry {
        key: k[i].secret.clone(),
        role: role.into(),
        owner: format!("owner-{role}"),
        expires_at_us: exp,
        ..Default::default()
    };
    let file = PolicyFile {
        version: 1,
        policy: PolicySpec {
            roles: vec![
                RoleSpec {
                    name: "admin".into(),
                    allow: vec!["*".into()],
                    ..Default::default()
                },
                RoleSpec {
                    name: "reader".into(),
                    allow: vec!["*/echo".into(), "py/add".into(), "py/shout".into()],
                    deny: vec!["py/shout".into()],
                    ..Default::default()
                },
                RoleSpec {
                    name: "limited".into(),
                    allow: vec!["*".into()],
                    rate_limits: vec![RateLimitSpec {
                        per_second: 0.01,
                        burst: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            backends,
            redaction_rules: vec![sentinel_shared::spec::RedactionRuleSpec {
                key_pattern: "*password*".into(),
                replacement: "[REDACTED]".into(),
            }],
            ..Default::default()
        },
        api_keys: vec![
            entry(0, "admin", 0),
            entry(1, "reader", 0),
            entry(2, "limited", 0),
            entry(3, "admin", 1_000_000),
        ],
        session_keys: vec![SessionKeyEntry {
            id: 1,
            key: hex::encode([42u8; 32]),
        }],
    };
    let keys = Keys {
        admin: k[0].secret.clone(),
        reader: k[1].secret.clone(),
        limited: k[2].secret.clone(),
        expired: k[3].secret.clone(),
    };
    (file, keys)
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider (the proxy names
    // its own); the test client uses ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A 2026-07-28 request with headers matching the body.
pub fn modern_body(id: u64, method: &str, mut params: Value) -> Value {
    params["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw-test", "version": "1"}
    });
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

pub fn modern_request(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::RequestBuilder {
    let method = body["method"].as_str().unwrap_or("").to_string();
    let mut r = c
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", &method);
    if let Some(n) = body["params"]["name"].as_str() {
        r = r.header("mcp-name", n);
    }
    if let Some(k) = key {
        r = r.header("authorization", format!("Bearer {k}"));
    }
    r.body(body.to_string())
}

/// A 2026-07-28 `tools/call` with `key`; the JSON-RPC response to it.
pub async fn modern_tool_call(
    c: &reqwest::Client,
    url: &str,
    key: &str,
    id: u64,
    params: Value,
) -> Value {
    let body = modern_body(id, "tools/call", params);
    let r = modern_request(c, url, Some(key), &body)
        .send()
        .await
        .expect("tools/call sent");
    rpc_answer(r).await
}

/// Serves `app` on an ephemeral 127.0.0.1 port for the rest of the test.
pub async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Reads a JSON or SSE answer and returns the JSON-RPC response in it.
pub async fn rpc_answer(resp: reqwest::Response) -> Value {
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let text = resp.text().await.expect("body");
    if !sse {
        return serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .rfind(|v| v.get("result").is_some() || v.get("error").is_some())
        .unwrap_or_else(|| panic!("no response in stream: {text}"))
}

/// Legacy initialize with `key`; returns the session id.
pub async fn legacy_initialize(c: &reqwest::Client, url: &str, key: &str, version: &str) -> String {
    let resp = c
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .body(
            json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{
                "protocolVersion": version, "capabilities": {}, "clientInfo": {"name":"raw-legacy","version":"1"}}})
            .to_string(),
        )
        .send()
        .await
        .expect("initialize");
    assert_eq!(resp.status(), 200);
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .expect("session id")
        .to_str()
        .expect("ascii")
        .to_string();
    let _ = resp.text().await;
    sid
}

pub fn legacy_request(
    c: &reqwest::Client,
    url: &str,
    key: &str,
    session: &str,
    body: &Value,
) -> reqwest::RequestBuilder {
    c.post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(body.to_string())
}
