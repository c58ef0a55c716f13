//! Policy propagation: from an admin revoke returning to every one of N
//! sync streams having received it; and end to end, to the first 401 a
//! client of a real proxy sees.

use std::time::{Duration, Instant};

use sentinel_shared::proto::admin_client::AdminClient;
use sentinel_shared::proto::policy_sync_client::PolicySyncClient;
use sentinel_shared::proto::{self as pb, control_message, proxy_message};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::Channel;

use crate::{ADMIN, Cp, JOIN, quantile, spread};

/// Streams per HTTP/2 connection (servers cap concurrent streams).
const PER_CONN: usize = 100;

fn req<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

async fn channel(cp: &Cp) -> Channel {
    Channel::from_shared(format!("http://{}", cp.grpc))
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap()
}

async fn admin(cp: &Cp) -> AdminClient<Channel> {
    let mut a = AdminClient::new(channel(cp).await);
    a.put_role(req(pb::PutRoleRequest {
        role: Some(pb::Role {
            name: "bench".into(),
            allow_tools: vec!["*".into()],
            ..Default::default()
        }),
    }))
    .await
    .unwrap();
    a
}

async fn create_key(a: &mut AdminClient<Channel>) -> (String, String, u64) {
    let c = a
        .create_api_key(req(pb::CreateApiKeyRequest {
            role: "bench".into(),
            owner: "bench".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    (c.key.unwrap().id, c.secret, c.policy_version)
}

fn version(m: &control_message::Msg) -> u64 {
    match m {
        control_message::Msg::Snapshot(s) => s.version,
        control_message::Msg::Delta(d) => d.version,
    }
}

/// Opens `n` sync streams; each reports (version, when received).
async fn streams(cp: &Cp, n: usize) -> mpsc::UnboundedReceiver<(u64, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut chans = Vec::new();
    for _ in 0..n.div_ceil(PER_CONN) {
        chans.push(channel(cp).await);
    }
    for i in 0..n {
        let ch = chans[i / PER_CONN].clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let (out, out_rx) = mpsc::channel(4);
            out.send(pb::ProxyMessage {
                msg: Some(proxy_message::Msg::Hello(pb::Hello {
                    proxy_id: format!("bench-{i}"),
                    build_version: "bench".into(),
                    join_token: JOIN.into(),
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
            let mut inbound = PolicySyncClient::new(ch)
                .sync(ReceiverStream::new(out_rx))
                .await
                .unwrap()
                .into_inner();
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(m) = m.msg {
                    let _ = tx.send((version(&m), Instant::now()));
                }
            }
            drop(out);
        });
    }
    rx
}

/// Waits for `n` reports of a version >= `v`; returns their times.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    n: usize,
    v: u64,
) -> Vec<Instant> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((ver, at))) if ver >= v => got.push(at),
            Ok(Some(_)) => {}
            _ => panic!("only {} of {n} streams reached version {v}", got.len()),
        }
    }
    got
}

pub async fn run(quick: bool) -> Value {
    let sizes: &[usize] = if quick { &[10] } else { &[10, 100, 1000] };
    let rounds = if quick { 2 } else { 7 };
    println!(
        "\n== policy propagation: revoke returned -> received by every sync stream ({rounds} rounds)"
    );
    println!(
        "{:>6} {:>22} {:>22} {:>22}",
        "N", "p50 ms", "p99 ms", "last stream ms"
    );
    let mut rows = Vec::new();
    for &n in sizes {
        let cp = Cp::start().await;
        let mut a = admin(&cp).await;
        let mut rx = streams(&cp, n).await;
        let v0 = a
            .get_policy(req(pb::GetPolicyRequest {}))
            .await
            .unwrap()
            .into_inner()
            .version;
        collect(&mut rx, n, v0).await;
        let (mut p50s, mut p99s, mut maxs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (id, _, v1) = create_key(&mut a).await;
            collect(&mut rx, n, v1).await;
            a.revoke_api_key(req(pb::RevokeApiKeyRequest { id }))
                .await
                .unwrap();
            let returned = Instant::now();
            let at = collect(&mut rx, n, v1 + 1).await;
            // A stream can have it before the call's answer arrived: 0.
            let mut ms: Vec<f64> = at
                .iter()
                .map(|t| t.saturating_duration_since(returned).as_secs_f64() * 1e3)
                .collect();
            ms.sort_by(|a, b| a.total_cmp(b));
            p50s.push(quantile(&ms, 0.5));
            p99s.push(quantile(&ms, 0.99));
            maxs.push(ms.last().copied().unwrap_or(0.0));
        }
        let (p50, p50min, p50max) = spread(p50s);
        let (p99, p99min, p99max) = spread(p99s);
        let (mx, mxmin, mxmax) = spread(maxs);
        println!(
            "{n:>6} {:>22} {:>22} {:>22}",
            format!("{p50:.2} [{p50min:.2}..{p50max:.2}]"),
            format!("{p99:.2} [{p99min:.2}..{p99max:.2}]"),
            format!("{mx:.2} [{mxmin:.2}..{mxmax:.2}]"),
        );
        rows.push(json!({"streams": n, "p50_ms": p50, "p99_ms": p99, "p99_ms_min": p99min, "p99_ms_max": p99max, "last_ms": mx}));
    }
    let e2e = end_to_end(rounds).await;
    json!({"streams": rows, "revoke_to_first_401_ms": e2e})
}

/// Revoke -> first 401 seen by a client polling a real proxy.
async fn end_to_end(rounds: usize) -> Value {
    let cp = Cp::start().await;
    let mut a = admin(&cp).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sentinel_proxy::config::Config {
        proxy_id: "bench-proxy".into(),
        ..Default::default()
    };
    cfg.control_plane.url = format!("http://{}", cp.grpc);
    cfg.control_plane.join_token = JOIN.into();
    cfg.spool.dir = dir.path().join("spool");
    cfg.spool.durability = "os".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sentinel_proxy::boot::start(cfg, listener, async {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::new();
    let call = |key: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/list")
                .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let mut ms = Vec::new();
    for _ in 0..rounds {
        let (id, key, _) = create_key(&mut a).await;
        // Until the proxy accepts the key.
        let deadline = Instant::now() + Duration::from_secs(20);
        while call(key.clone()).await != 200 {
            assert!(Instant::now() < deadline, "proxy never accepted the key");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        a.revoke_api_key(req(pb::RevokeApiKeyRequest { id }))
            .await
            .unwrap();
        let returned = Instant::now();
        let deadline = returned + Duration::from_secs(20);
        while call(key.clone()).await != 401 {
            assert!(Instant::now() < deadline, "revoked key still accepted");
        }
        ms.push(returned.elapsed().as_secs_f64() * 1e3);
    }
    let _ = stop_tx.send(());
    let (m, lo, hi) = spread(ms);
    println!(
        "revoke returned -> first 401 at a real proxy: {m:.2} ms [{lo:.2}..{hi:.2}] over {rounds} rounds"
    );
    json!({"median": m, "min": lo, "max": hi})
}
