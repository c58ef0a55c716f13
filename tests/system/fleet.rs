//! Proxies joined to a real control plane: every gate's outcome lands in
//! Postgres once, lists are filtered across federated upstreams, a session
//! moves between replicas, and a proxy rides out a control-plane outage on
//! its cached policy (and serves nothing without one).

use std::time::{Duration, Instant};

use sentinel_shared::proto::{self as pb};
use sentinel_tests::peers::peers;
use sentinel_tests::{Cp, MODERN, Proxy, admin_req, modern_call};
use serde_json::{Value, json};

/// A raw POST to `/mcp`; returns (status, session id header, JSON body).
async fn post(
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.json(&body).send().await.expect("post");
    let status = r.status().as_u16();
    let session = r
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("id").is_some())
            .unwrap_or(Value::String(text.clone()))
    });
    (status, session, value)
}

async fn modern_list(url: &str, key: &str) -> Vec<String> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                  "io.modelcontextprotocol/clientCapabilities": {}}}});
    let (status, _, v) = post(
        url,
        key,
        &[
            ("mcp-protocol-version", MODERN),
            ("mcp-method", "tools/list"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["result"]["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gate_outcome_is_one_row_and_lists_are_filtered_across_upstreams() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let ev = tokio::task::spawn_blocking(|| peers().everything_http())
        .await
        .expect("server-everything");
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_http_backend("ev", &ev.url()).await;
    // Nothing listens on port 1: calls to this backend fail upstream.
    admin
        .put_http_backend("dead", "http://127.0.0.1:1/mcp")
        .await;
    admin
        .0
        .put_role(admin_req(pb::PutRoleRequest {
            role: Some(pb::Role {
                name: "dev".into(),
                allow_tools: vec!["py/*".into(), "ev/echo".into(), "dead/*".into()],
                deny_tools: vec!["py/shout".into()],
                rate_limits: vec![pb::RateLimit {
                    scope: pb::rate_limit::Scope::PerKey as i32,
                    per_second: 0.01,
                    burst: 3,
                    tools: vec!["py/echo".into()],
                    methods: vec![],
                }],
                ..Default::default()
            }),
        }))
        .await
        .expect("role");
    let (key_id, key, _) = admin.create_key("dev", "carol").await;
    let proxy = Proxy::start("proxy-gates", &cp).await;
    let url = proxy.url();

    // Filtered across both upstreams: allowed names only, prefixed.
    let tools = modern_list(&url, &key).await;
    assert!(tools.contains(&"py__add".to_string()), "{tools:?}");
    assert!(tools.contains(&"ev__echo".to_string()), "{tools:?}");
    assert!(
        !tools.contains(&"py__shout".to_string()),
        "denied: {tools:?}"
    );
    assert!(
        !tools.iter().any(|t| t == "ev__get-sum"),
        "not allowed: {tools:?}"
    );

    // One call per outcome.
    let (s, v) = modern_call(&url, &key, "py__add", json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = modern_call(&url, &key, "ev__echo", json!({"message": "hi"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = modern_call(&url, &key, "py__shout", json!({"text": "x"})).await;
    assert_eq!(s, 403);
    let (s, _) = modern_call(&url, "sntl_bogus_key", "py__add", json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 401);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (s, _) = modern_call(&url, &key, "py__echo", json!({"message": i.to_string()})).await;
        statuses.push(s);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429], "burst 3, then limited");
    let (s, v) = modern_call(&url, &key, "dead__anything", json!({})).await;
    assert!(s == 502 || s == 200 || s == 404, "upstream down: {s} {v}");

    let expected: &[(&str, i64)] = &[
        ("ok", 5),
        ("forbidden", 1),
        ("unauthenticated", 1),
        ("rate_limited", 1),
        ("upstream_error", 1),
    ];
    let total: i64 = expected.iter().map(|(_, n)| n).sum();
    let got = cp
        .wait_count(
            "SELECT count(*) FROM audit_events WHERE mcp_method = 'tools/call'",
            total,
            Duration::from_secs(20),
        )
        .await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM audit_events WHERE mcp_method = 'tools/call' GROUP BY outcome ORDER BY outcome",
    )
    .fetch_all(&cp.db.pool)
    .await
    .expect("outcomes");
    println!("outcomes in Postgres: {rows:?}");
    assert_eq!(got, total, "one row per attempt: {rows:?}");
    for (outcome, n) in expected {
        let have = rows.iter().find(|(o, _)| o == outcome).map_or(0, |r| r.1);
        assert_eq!(have, *n, "{outcome}: {rows:?}");
    }
    // Each row says what was decided and why.
    let (undecided,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM audit_events WHERE mcp_method = 'tools/call' AND (decision = '' OR decision = '{}')",
    )
    .fetch_one(&cp.db.pool)
    .await
    .expect("decisions");
    assert_eq!(undecided, 0);
    let (limited_key,): (String,) =
        sqlx::query_as("SELECT api_key_id FROM audit_events WHERE outcome = 'rate_limited'")
            .fetch_one(&cp.db.pool)
            .await
            .expect("rate limited row");
    assert_eq!(limited_key, key_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_on_one_proxy_continues_on_another() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_role("dev", &["py/*"], &[]).await;
    let (_, key, _) = admin.create_key("dev", "dave").await;
    let (_, other_key, _) = admin.create_key("dev", "eve").await;
    let a = Proxy::start("proxy-a", &cp).await;
    let b = Proxy::start("proxy-b", &cp).await;

    let legacy = "2025-11-25";
    let (s, session, v) = post(
        &a.url(),
        &key,
        &[],
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": legacy, "capabilities": {},
            "clientInfo": {"name": "raw-test", "version": "1"}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let session = session.expect("a session id from proxy A");
    let hdrs = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", legacy),
    ];
    let (s, _, _) = post(
        &a.url(),
        &key,
        &hdrs,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(s, 202);
    // The same session, through proxy B.
    let (s, _, v) = post(
        &b.url(),
        &key,
        &hdrs,
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
               "params": {"name": "py__add", "arguments": {"a": 40, "b": 2}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v.to_string().contains("42"), "{v}");
    // Presented with another principal's key: refused.
    let (s, _, v) = post(
        &b.url(),
        &other_key,
        &hdrs,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
               "params": {"name": "py__add", "arguments": {"a": 1, "b": 1}}}),
    )
    .await;
    assert!(s == 403 || s == 404 || s == 401, "{s} {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_policy_rides_out_a_control_plane_outage_and_no_policy_serves_nothing() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_role("dev", &["py/*"], &[]).await;
    let (_, key, _) = admin.create_key("dev", "frank").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = Proxy::config("proxy-cache", &cp, dir.path());
    let first = Proxy::start_with(config.clone()).await;
    let (s, _) = modern_call(&first.url(), &key, "py__add", json!({"a": 1, "b": 1})).await;
    assert_eq!(s, 200);
    drop(first);
    drop(admin);
    drop(cp); // the control plane is gone

    // A proxy (re)started now enforces its cached policy.
    let second = Proxy::start_with(config).await;
    let (s, v) = modern_call(&second.url(), &key, "py__add", json!({"a": 2, "b": 2})).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = modern_call(&second.url(), "sntl_bogus", "py__add", json!({})).await;
    assert_eq!(s, 401);

    // A proxy that never had a policy serves nothing.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut fresh = sentinel_proxy::config::Config {
        proxy_id: "proxy-empty".into(),
        ..Default::default()
    };
    fresh.control_plane.url = "http://127.0.0.1:1".into();
    fresh.control_plane.join_token = sentinel_tests::JOIN.into();
    fresh.control_plane.cache_file = Some(dir2.path().join("policy.cache"));
    fresh.spool.dir = dir2.path().join("spool");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sentinel_proxy::boot::start(fresh, listener, async {
        let _ = rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (s, v) = loop {
        let r = modern_call(
            &format!("http://{addr}/mcp"),
            &key,
            "py__add",
            json!({"a": 1, "b": 1}),
        )
        .await;
        if r.0 != 0 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(s, 503, "{v}");
    let ready = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    let _ = tx.send(());
}
