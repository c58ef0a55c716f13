//! What an MCP proxy must pass through untouched, proven against the real
//! control plane: progress notifications (with the client's `_meta`),
//! server-to-client requests mid-call in the legacy era (sampling,
//! elicitation), and the 2026-07-28 `input_required` round trip. Each
//! gated attempt leaves exactly one audit row in Postgres, attributed to
//! the key that made it. (crates/data-plane/tests/proxy.rs proves the same
//! with a local policy file; here the policy, the keys and the audit trail
//! go through the control plane.)

use std::time::Duration;

use sentinel_tests::peers::peers;
use sentinel_tests::{Cp, MODERN, Proxy};
use serde_json::{Value, json};

/// Legacy protocol version the raw client speaks.
const LEGACY: &str = "2025-11-25";

/// The audited tools/call attempts made with one key: (outcome, backend,
/// tool, http status, jsonrpc error code), oldest first.
async fn calls_by_key(cp: &Cp, key_id: &str, n: usize) -> Vec<(String, String, String, i32, i32)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows: Vec<(String, String, String, i32, i32)> = sqlx::query_as(
            "SELECT outcome, backend, tool, http_status, jsonrpc_error_code FROM audit_events \
             WHERE api_key_id = $1 AND mcp_method = 'tools/call' ORDER BY epoch, sequence",
        )
        .bind(key_id)
        .fetch_all(&cp.db.pool)
        .await
        .unwrap();
        if rows.len() >= n || tokio::time::Instant::now() > deadline {
            // Anything late would show up as a count above `n` here.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return sqlx::query_as(
                "SELECT outcome, backend, tool, http_status, jsonrpc_error_code FROM audit_events \
                 WHERE api_key_id = $1 AND mcp_method = 'tools/call' ORDER BY epoch, sequence",
            )
            .bind(key_id)
            .fetch_all(&cp.db.pool)
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn row(outcome: &str, backend: &str, tool: &str) -> (String, String, String, i32, i32) {
    (outcome.into(), backend.into(), tool.into(), 200, 0)
}

/// Every JSON-RPC message of a JSON or SSE body, in order.
fn messages(text: &str) -> Vec<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        return vec![v];
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str(d.trim()).ok())
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A raw legacy session through the proxy: initialize (returns the
/// session id), then requests on it.
async fn legacy_session(url: &str, key: &str) -> String {
    let c = client();
    let resp = c
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .body(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": LEGACY, "capabilities": {},
                "clientInfo": {"name": "raw-legacy", "version": "1"}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sid = resp.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = resp.text().await;
    let r = legacy_post(
        url,
        key,
        &sid,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert!(r.0 < 300, "{r:?}");
    sid
}

async fn legacy_post(url: &str, key: &str, sid: &str, body: &Value) -> (u16, String) {
    let r = client()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("x-api-key", key)
        .header("mcp-session-id", sid)
        .header("mcp-protocol-version", LEGACY)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// One 2026-07-28 tools/call with extra params (`inputResponses`,
/// `requestState`): (status, the JSON-RPC response).
async fn modern_tools_call(url: &str, key: &str, tool: &str, extra: Value) -> (u16, Value) {
    let mut params = json!({
        "name": tool,
        "arguments": {},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {}},
            "io.modelcontextprotocol/clientInfo": {"name": "raw-modern", "version": "1"}
        }
    });
    if let (Some(p), Value::Object(extra)) = (params.as_object_mut(), extra) {
        p.extend(extra);
    }
    let r = client()
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .body(
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let answer = messages(&text)
        .into_iter()
        .rfind(|m| m.get("result").is_some() || m.get("error").is_some())
        .unwrap_or(Value::String(text));
    (status, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_progress_sampling_and_elicitation_pass_through_a_joined_proxy() {
    let cp = Cp::start().await;
    let (every, py) =
        tokio::task::spawn_blocking(|| (peers().everything_http(), peers().python_upstream()))
            .await
            .unwrap();
    let mut admin = cp.admin().await;
    admin.put_http_backend("everything", &every.url()).await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_role("dev", &["everything/*", "py/*"], &[]).await;
    // One key per case: each case's audit rows are told apart by key id.
    let (ts_id, ts_key, _) = admin.create_key("dev", "ts-sdk").await;
    let (raw_id, raw_key, _) = admin.create_key("dev", "raw").await;
    let (py_id, py_key, _) = admin.create_key("dev", "py-sdk").await;
    let proxy = Proxy::start("proxy-passthrough", &cp).await;
    let url = proxy.url();

    // The TypeScript SDK: server-everything asks the client to sample
    // mid-call (a server-to-client request on the call's stream), the
    // client's answer goes back through the proxy, and the tool result
    // carries it; then a long-running tool reports progress.
    let (u, k) = (url.clone(), ts_key.clone());
    let out = tokio::task::spawn_blocking(move || {
        peers().ts_sampling_and_progress(&u, &[("X-API-Key", &k)], "everything__")
    })
    .await
    .unwrap()
    .expect("ts sampling and progress client");
    assert_eq!(
        out["sampled"], 1,
        "the client answered one sampling request: {out}"
    );
    assert!(
        out["sampling"]
            .to_string()
            .contains("sampled by the client"),
        "the tool result reflects the client's answer: {out}"
    );
    let progress = out["progress"].as_array().expect("progress");
    assert!(
        progress.len() >= 2,
        "progress notifications reached the client: {out}"
    );
    assert!(out["long"]["content"].is_array(), "{out}");
    assert_eq!(
        calls_by_key(&cp, &ts_id, 2).await,
        vec![
            row("ok", "everything", "trigger-sampling-request"),
            row("ok", "everything", "trigger-long-running-operation"),
        ],
        "one audit row per call, sampling answer and progress included"
    );

    // Raw: the client's `_meta` (its progress token, and a key of its own)
    // reaches the upstream unchanged, so the progress notifications carry
    // the very token the client chose, in order, before the result.
    let sid = legacy_session(&url, &raw_key).await;
    let token = "client-token-\u{e9}-42";
    let (status, body) = legacy_post(
        &url,
        &raw_key,
        &sid,
        &json!({"jsonrpc": "2.0", "id": "call-1", "method": "tools/call", "params": {
            "name": "everything__trigger-long-running-operation",
            "arguments": {"duration": 1, "steps": 3},
            "_meta": {"progressToken": token, "example.com/trace": "t-1"}}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let msgs = messages(&body);
    let notes: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(notes.len(), 3, "one notification per step: {body}");
    for (i, n) in notes.iter().enumerate() {
        assert_eq!(n["params"]["progressToken"], token, "{n}");
        assert_eq!(n["params"]["progress"], i as u64 + 1, "{n}");
    }
    let last = msgs.last().expect("a response");
    assert_eq!(
        last["id"], "call-1",
        "the result comes last, with the client's id: {body}"
    );
    assert!(last["result"]["content"].is_array(), "{body}");
    // A numeric token too: JSON types are not rewritten.
    let (status, body) = legacy_post(
        &url,
        &raw_key,
        &sid,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "everything__trigger-long-running-operation",
            "arguments": {"duration": 1, "steps": 2},
            "_meta": {"progressToken": 9007199254740991u64}}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let msgs = messages(&body);
    assert!(
        msgs.iter()
            .filter(|m| m["method"] == "notifications/progress")
            .all(|n| n["params"]["progressToken"] == json!(9007199254740991u64)),
        "{body}"
    );
    assert_eq!(
        msgs.iter()
            .filter(|m| m["method"] == "notifications/progress")
            .count(),
        2,
        "{body}"
    );
    assert_eq!(
        calls_by_key(&cp, &raw_id, 2).await,
        vec![
            row("ok", "everything", "trigger-long-running-operation"),
            row("ok", "everything", "trigger-long-running-operation"),
        ]
    );

    // The Python SDK in the legacy era: the upstream elicits the user's
    // name mid-call (elicitation/create on the call's stream); the
    // client's answer comes back through the proxy into the result.
    let (u, k) = (url.clone(), py_key.clone());
    let out = tokio::task::spawn_blocking(move || {
        peers().python_client(&u, "legacy", &[("X-API-Key", &k)], "py__greet", "{}")
    })
    .await
    .unwrap()
    .expect("python legacy elicitation");
    assert!(out["result"].to_string().contains("hello Ada"), "{out}");
    assert_eq!(
        calls_by_key(&cp, &py_id, 1).await,
        vec![row("ok", "py", "greet")],
        "a legacy elicitation is one call, one row"
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_input_required_round_trip_is_two_gated_attempts() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .unwrap();
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_role("dev", &["py/*"], &[]).await;
    admin.put_role("nogreet", &["py/*"], &["py/greet"]).await;
    let (raw_id, raw_key, _) = admin.create_key("dev", "raw").await;
    let (py_id, py_key, _) = admin.create_key("dev", "py-sdk").await;
    let (denied_id, denied_key, _) = admin.create_key("nogreet", "mallory").await;
    let proxy = Proxy::start("proxy-modern", &cp).await;
    let url = proxy.url();

    // Raw: the first call answers `input_required` with the upstream's
    // elicitation and its opaque state...
    let (status, first) = modern_tools_call(&url, &raw_key, "py__greet", json!({})).await;
    assert_eq!(status, 200, "{first}");
    let result = &first["result"];
    assert_eq!(result["resultType"], "input_required", "{first}");
    let requests = result["inputRequests"].as_object().expect("inputRequests");
    assert_eq!(requests.len(), 1, "{first}");
    let (req_key, req) = requests.iter().next().unwrap();
    assert_eq!(req["method"], "elicitation/create", "{first}");
    // ...and the retry, carrying the answer and the state back verbatim,
    // passes through and completes.
    let mut extra = json!({
        "inputResponses": {req_key: {"action": "accept", "content": {"name": "Grace"}}}
    });
    if let Some(state) = result.get("requestState") {
        extra["requestState"] = state.clone();
    }
    let (status, second) = modern_tools_call(&url, &raw_key, "py__greet", extra).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["result"]["resultType"], "input_required", "{second}");
    assert!(
        second["result"].to_string().contains("hello Grace"),
        "{second}"
    );
    // Both attempts went through the gates: one row each, both ok.
    assert_eq!(
        calls_by_key(&cp, &raw_id, 2).await,
        vec![row("ok", "py", "greet"), row("ok", "py", "greet")]
    );
    let modern: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE api_key_id = $1 AND protocol_version = $2 \
         AND session_id = ''",
    )
    .bind(&raw_id)
    .bind(MODERN)
    .fetch_one(&cp.db.pool)
    .await
    .unwrap();
    assert_eq!(
        modern, 2,
        "both attempts recorded as stateless 2026-07-28 calls"
    );

    // The retry is gated like any call: a key whose role denies the tool
    // is refused on the retry too, not only on the first attempt.
    let (status, refused) = modern_tools_call(
        &url,
        &denied_key,
        "py__greet",
        json!({"inputResponses": {req_key: {"action": "accept", "content": {"name": "Mallory"}}}}),
    )
    .await;
    assert_eq!(status, 403, "{refused}");
    let rows = calls_by_key(&cp, &denied_id, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].2.as_str()),
        ("forbidden", "greet")
    );

    // The Python SDK drives the same round trip on its own.
    let (u, k) = (url.clone(), py_key.clone());
    let out = tokio::task::spawn_blocking(move || {
        peers().python_client(&u, MODERN, &[("X-API-Key", &k)], "py__greet", "{}")
    })
    .await
    .unwrap()
    .expect("python modern elicitation");
    assert!(out["result"].to_string().contains("hello Ada"), "{out}");
    assert_eq!(
        calls_by_key(&cp, &py_id, 2).await,
        vec![row("ok", "py", "greet"), row("ok", "py", "greet")],
        "the call and its retry: two gated attempts, one row each"
    );
    drop(proxy);
}
