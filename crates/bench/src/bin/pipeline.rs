//! `pipeline`: drives N `tools/call` through the proxy's whole request
//! pipeline in one process, for `sentinel-bench callgrind`.
//!
//! The proxy's router (edge checks, authentication, session, authorization,
//! rate limit, audit attempt into a real spool, forward, audit outcome) is
//! called as a tower `Service`: no client socket, so what an instruction
//! counter sees is the proxy and its upstream, not an HTTP client. The
//! upstream is the demo MCP server, either in this process on a loopback
//! port or (`--upstream URL`) in another process, so its instructions can be
//! left out of the count.
//!
//! ```text
//! pipeline legacy 200                  # initialize once, 200 calls in the session
//! pipeline modern 1200 --upstream URL  # 2026-07-28, stateless
//! pipeline serve-upstream              # the demo upstream alone; prints its URL
//! ```
//!
//! Everything runs on one thread (the spool's writer thread aside) so an
//! instruction count is repeatable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops loudly

use std::io::BufRead;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use clap::{Parser, ValueEnum};
use http::Request;
use http_body_util::BodyExt;
use sentinel_proxy::audit::spool::SpoolSink;
use sentinel_proxy::clock::SystemClock;
use sentinel_proxy::config::Config;
use sentinel_proxy::policy::file::{ApiKeyEntry, PolicyFile, SessionKeyEntry};
use sentinel_proxy::policy::policy_channel;
use sentinel_shared::keys::{KeyKind, generate};
use sentinel_shared::spec::{BackendSpec, PolicySpec, RateLimitSpec, RoleSpec};
use sentinel_spool::{Durability, Spool, SpoolConfig};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The 2026-07-28 protocol version.
const MODERN: &str = "2026-07-28";
/// The legacy version the driver's session speaks.
const LEGACY: &str = "2025-06-18";
/// The tool as the proxy shows it (backend `demo`, prefixed).
const TOOL: &str = "demo__echo";

#[derive(Parser)]
#[command(
    name = "pipeline",
    about = "N tools/call through the proxy's pipeline, in process"
)]
struct Cli {
    /// Which era, or `serve-upstream` to run only the demo upstream.
    mode: Mode,
    /// How many tools/call to drive.
    #[arg(default_value_t = 100)]
    n: u64,
    /// An upstream already running elsewhere (e.g. `pipeline serve-upstream`);
    /// without it the demo upstream runs in this process.
    #[arg(long)]
    upstream: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Legacy,
    Modern,
    ServeUpstream,
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // One thread: repeatable counts, and no scheduler noise between runs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if cli.mode == Mode::ServeUpstream {
            return serve_upstream().await;
        }
        let (url, _upstream) = match cli.upstream {
            Some(u) => (u, None),
            None => {
                let (url, stop) = start_upstream().await?;
                (url, Some(stop))
            }
        };
        drive(cli.mode, cli.n, &url).await
    })
}

/// Serves the demo upstream and prints its URL; stops when stdin closes.
async fn serve_upstream() -> anyhow::Result<()> {
    let (url, stop) = start_upstream().await?;
    println!("{url}");
    tokio::task::spawn_blocking(|| {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if line.is_err() {
                break;
            }
        }
    })
    .await?;
    drop(stop);
    Ok(())
}

/// The demo upstream on a loopback port; dropping the sender stops it.
async fn start_upstream() -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sentinel_demo::upstream::serve(listener, async {
        let _ = rx.await;
    }));
    Ok((url, tx))
}

/// Builds the proxy's router on a local policy and a real spool, then sends
/// `n` calls through it and checks each answer.
async fn drive(mode: Mode, n: u64, upstream: &str) -> anyhow::Result<()> {
    let key = generate(KeyKind::Api).secret;
    let file = PolicyFile {
        version: 1,
        policy: PolicySpec {
            roles: vec![RoleSpec {
                name: "agent".into(),
                allow: vec!["demo/echo".into()],
                // Counted on every call, never reached.
                rate_limits: vec![RateLimitSpec {
                    per_second: 1_000_000.0,
                    burst: 1_000_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            backends: vec![BackendSpec {
                name: "demo".into(),
                url: Some(upstream.into()),
                ..Default::default()
            }],
            ..Default::default()
        },
        api_keys: vec![ApiKeyEntry {
            key: key.clone(),
            role: "agent".into(),
            owner: "bench".into(),
            ..Default::default()
        }],
        // Legacy session ids are sealed with this key.
        session_keys: vec![SessionKeyEntry {
            id: 1,
            key: "07".repeat(32),
        }],
    };
    let config = Config {
        proxy_id: "pipeline-bench".into(),
        upstream_timeout_ms: 30_000,
        ..Default::default()
    };
    let (publisher, reader) = policy_channel(&config);
    publisher.publish(file.into_snapshot()?)?;

    // The spool lives under target/, next to this binary, and goes with it.
    let target = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("pipeline-spool-")
        .tempdir_in(target)?;
    let mut sc = SpoolConfig::new(dir.path(), config.proxy_id.clone());
    sc.durability = Durability::Os;
    let spool = Spool::open(sc)?;
    let sink = Arc::new(SpoolSink(spool.clone()));
    let app =
        sentinel_proxy::server::router(&config, reader, sink, Arc::new(SystemClock::default()));

    let session = match mode {
        Mode::Legacy => Some(initialize(&app, &key).await?),
        _ => None,
    };
    // Requests are written up front, by hand, so the driver's own work per
    // call (what the count should not include) stays small.
    let message = "x".repeat(1024);
    let auth = http::HeaderValue::from_str(&format!("Bearer {key}"))?;
    let meta = match session {
        Some(_) => String::new(),
        None => format!(
            r#","_meta":{{"io.modelcontextprotocol/protocolVersion":"{MODERN}","io.modelcontextprotocol/clientCapabilities":{{}},"io.modelcontextprotocol/clientInfo":{{"name":"pipeline","version":"1"}}}}"#
        ),
    };
    for i in 0..n {
        let body = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"tools/call","params":{{"name":"{TOOL}","arguments":{{"message":"{message}"}}{meta}}}}}"#,
            i + 10
        );
        let mut req = Request::post("/mcp")
            .header("host", "127.0.0.1:8080")
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("authorization", auth.clone());
        req = match &session {
            Some(sid) => req
                .header("mcp-session-id", sid.as_str())
                .header("mcp-protocol-version", LEGACY),
            None => req
                .header("mcp-protocol-version", MODERN)
                .header("mcp-method", "tools/call")
                .header("mcp-name", TOOL),
        };
        let resp = app.clone().oneshot(req.body(Body::from(body))?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::ensure!(status.is_success(), "call {i}: {status}");
        // The first and last answers are read through; the rest only by
        // status, to keep the driver out of the count.
        if i == 0 || i + 1 == n {
            let v: Value = serde_json::from_slice(&bytes)?;
            anyhow::ensure!(
                v["result"].to_string().contains(&message),
                "call {i}: {status} {v}"
            );
        }
    }
    // Every outcome is spooled; wait until the writer has them all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while spool.stats().backlog < n && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!(
        "pipeline: {n} tools/call ({}), spool backlog {}",
        if session.is_some() {
            "legacy"
        } else {
            "modern"
        },
        spool.stats().backlog
    );
    Ok(())
}

/// Legacy `initialize`; returns the session id.
async fn initialize(app: &Router, key: &str) -> anyhow::Result<String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": LEGACY,
        "capabilities": {},
        "clientInfo": {"name": "pipeline", "version": "1"}
    }});
    let req = Request::post("/mcp")
        .header("host", "127.0.0.1:8080")
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_string()))?;
    let resp = app.clone().oneshot(req).await?;
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = resp.into_body().collect().await?.to_bytes();
    let sid = sid.ok_or_else(|| {
        anyhow::anyhow!(
            "initialize gave no session: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    anyhow::ensure!(v.get("result").is_some(), "initialize: {v}");
    Ok(sid)
}
