//! The proxy end to end: the real server on 127.0.0.1:0 with a local
//! policy, real upstream MCP servers and real MCP clients.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::peers::peers;
use common::*;
use sentinel_shared::proto::{AuditEvent, Outcome};
use sentinel_shared::spec::{BackendSpec, PrefixMode};
use serde_json::{Value, json};

fn outcome(e: &AuditEvent) -> Outcome {
    Outcome::try_from(e.outcome).unwrap_or(Outcome::Unspecified)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_client_legacy_era_through_proxy_to_server_everything() {
    let p = peers();
    let every = p.everything_http();
    let (policy, keys) = policy(vec![http_backend("everything", &every.url())]);
    let proxy = start(config(), Some(policy)).await;
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().ts_client(
            &url,
            &[("Authorization", &format!("Bearer {key}"))],
            "everything__echo",
            r#"{"message":"hi from ts"}"#,
        )
    })
    .await
    .expect("ts client");
    let tools: Vec<&str> = out["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(tools.contains(&"everything__echo"), "{tools:?}");
    assert!(
        tools.iter().all(|t| t.starts_with("everything__")),
        "{tools:?}"
    );
    assert!(out["result"].to_string().contains("hi from ts"), "{out}");
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(outcome(e), Outcome::Ok);
    assert_eq!(
        (e.tool.as_str(), e.backend.as_str()),
        ("echo", "everything")
    );
    assert_eq!(e.auth_method, "api_key");
    assert_eq!(e.role, "admin");
    assert_eq!(e.client_name, "ts-test-client");
    assert!(!e.session_id.is_empty());
    assert!(uuid::Uuid::parse_str(&e.event_id).is_ok());
    assert!(e.arguments.contains("hi from ts"));
    let d: Value = serde_json::from_str(&e.decision).unwrap();
    for gate in ["authenticate", "authorize", "rate_limit", "forward"] {
        assert_eq!(d[gate]["verdict"], "allow", "{gate}: {d}");
    }
    assert_eq!(proxy.sink.attempts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_modern_era_through_proxy_to_python_upstream() {
    let p = peers();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![http_backend("py", &py.url())]);
    let proxy = start(config(), Some(policy)).await;
    let url = proxy.url();
    let key = keys.reader.clone();
    let out = blocking(move || {
        peers().python_client(
            &url,
            MODERN,
            &[("X-API-Key", &key)],
            "py__add",
            r#"{"a":2,"b":40}"#,
        )
    })
    .await
    .expect("python client, 2026-07-28");
    // The reader may call py/add and py/echo but not py/shout (denied).
    let mut tools: Vec<String> = serde_json::from_value(out["tools"].clone()).unwrap();
    tools.sort();
    assert_eq!(tools, vec!["py__add", "py__echo"]);
    assert!(out["result"].to_string().contains("42"), "{out}");
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(outcome(&events[0]), Outcome::Ok);
    assert_eq!(events[0].protocol_version, MODERN);
    assert!(events[0].session_id.is_empty());
    // A tool whose schema mirrors an argument in a header (`x-mcp-header`):
    // the client's Mcp-Param-Region reaches the upstream, which checks it.
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().python_client(
            &url,
            MODERN,
            &[("X-API-Key", &key)],
            "py__region",
            r#"{"region":"eu-west"}"#,
        )
    })
    .await
    .expect("python client, x-mcp-header tool");
    assert!(
        out["result"].to_string().contains("region eu-west"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_legacy_era_across_two_federated_upstreams() {
    let p = peers();
    let every = p.everything_http();
    let py = p.python_upstream();
    let (mut policy, keys) = policy(vec![
        http_backend("everything", &every.url()),
        http_backend("py", &py.url()),
    ]);
    policy.policy.federation.prefix_mode = PrefixMode::OnCollision;
    let proxy = start(config(), Some(policy)).await;
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().python_client(
            &url,
            "legacy",
            &[("X-API-Key", &key)],
            "shout",
            r#"{"text":"quiet"}"#,
        )
    })
    .await
    .expect("python client, legacy");
    let tools: Vec<String> = serde_json::from_value(out["tools"].clone()).unwrap();
    // `echo` exists on both: prefixed. `shout` and `add` are unique: bare.
    for want in ["everything__echo", "py__echo", "shout", "add", "get-sum"] {
        assert!(
            tools.iter().any(|t| t == want),
            "{want} missing from {tools:?}"
        );
    }
    assert!(!tools.iter().any(|t| t == "echo"), "{tools:?}");
    assert!(out["result"].to_string().contains("QUIET"), "{out}");
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(events[0].backend, "py");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_401_403_429_have_their_headers_and_one_audit_event_each() {
    let p = peers();
    let every = p.everything_http();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![
        http_backend("everything", &every.url()),
        http_backend("py", &py.url()),
    ]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let url = proxy.url();
    let call = |id: u64, name: &str| {
        modern_body(
            id,
            "tools/call",
            json!({"name": name, "arguments": {"text": "x", "password": "hunter2"}}),
        )
    };

    // 401: no credential.
    let r = modern_request(&c, &url, None, &call(1, "py__shout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        www.contains("resource_metadata=\"http://127.0.0.1:"),
        "{www}"
    );
    assert!(
        www.contains("/.well-known/oauth-protected-resource/mcp"),
        "{www}"
    );
    assert!(r.headers().contains_key("x-request-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], 1);
    assert!(body["error"]["code"].is_i64());
    // 401: expired key, and the metadata document it points at.
    let r = modern_request(&c, &url, Some(&keys.expired), &call(2, "py__shout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let meta: Value = c
        .get(format!(
            "http://{}/.well-known/oauth-protected-resource/mcp",
            proxy.addr
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["resource"], url);

    // 403: the reader may not call py/shout (deny wins over allow).
    let r = modern_request(&c, &url, Some(&keys.reader), &call(3, "py__shout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], -32003);

    // 429: the limited role gets one call, then waits.
    let r = modern_request(&c, &url, Some(&keys.limited), &call(4, "py__shout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ok = rpc_answer(r).await;
    assert!(ok["result"].to_string().contains('X'), "{ok}");
    let r = modern_request(&c, &url, Some(&keys.limited), &call(5, "py__shout"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);

    proxy.sink.wait_for(5, Duration::from_secs(5)).await;
    // Nothing more arrives: exactly one event per attempt.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = proxy.sink.events();
    assert_eq!(events.len(), 5, "{events:?}");
    let outcomes: Vec<Outcome> = events.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Unauthenticated,
            Outcome::Unauthenticated,
            Outcome::Forbidden,
            Outcome::Ok,
            Outcome::RateLimited
        ]
    );
    let statuses: Vec<u32> = events.iter().map(|e| e.http_status).collect();
    assert_eq!(statuses, vec![401, 401, 403, 200, 429]);
    let forbidden = &events[2];
    assert_eq!(forbidden.request_id, rid);
    assert_eq!(
        (forbidden.backend.as_str(), forbidden.tool.as_str()),
        ("py", "shout")
    );
    assert!(
        forbidden.decision.contains("denied by pattern 'py/shout'"),
        "{}",
        forbidden.decision
    );
    assert!(forbidden.arguments.contains("[REDACTED]") && !forbidden.arguments.contains("hunter2"));
    assert_eq!(forbidden.jsonrpc_error_code, -32003);
    // Only the forwarded call was attempted.
    assert_eq!(proxy.sink.attempts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_prefixes_and_filters_per_role() {
    let p = peers();
    let every = p.everything_http();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![
        http_backend("everything", &every.url()),
        http_backend("py", &py.url()),
    ]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let list = |key: String| {
        let c = c.clone();
        let url = proxy.url();
        async move {
            let r = modern_request(
                &c,
                &url,
                Some(&key),
                &modern_body(1, "tools/list", json!({})),
            )
            .send()
            .await
            .unwrap();
            let v = rpc_answer(r).await;
            let mut names: Vec<String> = v["result"]["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect();
            names.sort();
            names
        }
    };
    let admin = list(keys.admin.clone()).await;
    for want in [
        "everything__echo",
        "everything__get-sum",
        "py__add",
        "py__echo",
        "py__shout",
    ] {
        assert!(
            admin.iter().any(|t| t == want),
            "{want} missing from {admin:?}"
        );
    }
    let reader = list(keys.reader.clone()).await;
    assert_eq!(reader, vec!["everything__echo", "py__add", "py__echo"]);
    // Calls are routed by prefix to the right upstream.
    let v = modern_tool_call(
        &c,
        &proxy.url(),
        &keys.admin,
        2,
        json!({"name":"everything__get-sum","arguments":{"a":1,"b":2}}),
    )
    .await;
    assert!(v["result"].to_string().contains('3'), "{v}");
    assert_eq!(
        v["result"]["resultType"], "complete",
        "legacy upstream, modern client: {v}"
    );
    let r = modern_request(
        &c,
        &proxy.url(),
        Some(&keys.admin),
        &modern_body(
            3,
            "tools/call",
            json!({"name":"py__echo","arguments":{"message":"m"}}),
        ),
    )
    .send()
    .await
    .unwrap();
    assert!(rpc_answer(r).await["result"].to_string().contains("py:m"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_session_continues_on_another_replica_and_is_bound_to_its_principal() {
    let p = peers();
    let every = p.everything_http();
    let (policy, keys) = policy(vec![http_backend("everything", &every.url())]);
    let a = start(config(), Some(policy.clone())).await;
    let b = start(config(), Some(policy)).await;
    let c = client();
    let sid = legacy_initialize(&c, &a.url(), &keys.admin, "2025-06-18").await;
    assert!(sid.starts_with("s1.1."), "{sid}");
    assert!(!sid.contains(&every.port.to_string()));
    let call = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"everything__echo","arguments":{"message":"via b"}}});
    let r = legacy_request(&c, &b.url(), &keys.admin, &sid, &call)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = rpc_answer(r).await;
    assert_eq!(v["id"], 7);
    assert!(v["result"].to_string().contains("via b"), "{v}");
    // Another principal presenting the session is refused.
    let r = legacy_request(&c, &b.url(), &keys.reader, &sid, &call)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // A forged or unknown session id is 404.
    let r = legacy_request(
        &c,
        &b.url(),
        &keys.admin,
        "s1.1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &call,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    // Notifications are accepted with 202.
    let note = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
    let r = legacy_request(&c, &a.url(), &keys.admin, &sid, &note)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Batches are refused outside 2025-03-26 ...
    let r = legacy_request(&c, &a.url(), &keys.admin, &sid, &json!([call.clone()]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // ... and in a 2025-03-26 session each element is answered.
    let old = legacy_initialize(&c, &a.url(), &keys.admin, "2025-03-26").await;
    let batch = json!([call, {"jsonrpc":"2.0","id":8,"method":"ping"}]);
    let r = legacy_request(&c, &a.url(), &keys.admin, &old, &batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");
    // DELETE ends it: the upstream session is gone, so the next call is 404.
    let r = c
        .delete(a.url())
        .header("x-api-key", &keys.admin)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let call2 = json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"everything__echo","arguments":{"message":"after"}}});
    let r = legacy_request(&c, &b.url(), &keys.admin, &sid, &call2)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_requests_are_refused_at_the_edge() {
    let (policy, keys) = policy(vec![http_backend("nowhere", "http://127.0.0.1:9/mcp")]);
    let mut cfg = config();
    cfg.max_body_bytes = 2048;
    let proxy = start(cfg, Some(policy)).await;
    let c = client();
    let url = proxy.url();
    // Mcp-Name disagrees with the body: 400, -32020, before any policy
    // (no credential is even presented).
    let body = modern_body(1, "tools/call", json!({"name":"nowhere__a"}));
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "tools/call")
        .header("mcp-name", "nowhere__b")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32020);
    // Bad JSON.
    let r = c
        .post(&url)
        .header("x-api-key", &keys.admin)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32700);
    // Not JSON-RPC.
    let r = c
        .post(&url)
        .header("x-api-key", &keys.admin)
        .body(r#"{"id":1,"method":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], -32600);
    // Too large.
    let big = json!({"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"a".repeat(4096)}});
    let r = c
        .post(&url)
        .header("x-api-key", &keys.admin)
        .body(big.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Origin and Host.
    let ping = modern_body(2, "ping", json!({}));
    let r = modern_request(&c, &url, Some(&keys.admin), &ping)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = modern_request(&c, &url, Some(&keys.admin), &ping)
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let r = modern_request(&c, &url, Some(&keys.admin), &ping)
        .header("origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An unsupported protocol version.
    let r = c
        .post(&url)
        .header("x-api-key", &keys.admin)
        .header("mcp-protocol-version", "1999-01-01")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Legacy request without a session.
    let r = c
        .post(&url)
        .header("x-api-key", &keys.admin)
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Health.
    let r = c
        .get(format!("http://{}/readyz", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{}/metrics", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_the_proxy_serves_nothing() {
    let proxy = start(config(), None).await;
    let c = client();
    let r = modern_request(
        &c,
        &proxy.url(),
        None,
        &modern_body(1, "tools/list", json!({})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
    let r = c
        .get(format!("http://{}/readyz", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = c
        .get(format!("http://{}/healthz", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_jsonrpc_error_and_an_upstream_error_event() {
    let port = peers::free_port();
    let (policy, keys) = policy(vec![http_backend(
        "down",
        &format!("http://127.0.0.1:{port}/mcp"),
    )]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let r = modern_request(
        &c,
        &proxy.url(),
        Some(&keys.admin),
        &modern_body(1, "tools/call", json!({"name":"down__echo","arguments":{}})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], -32050, "{v}");
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(outcome(&events[0]), Outcome::UpstreamError);
    assert_eq!(events[0].backend, "down");
    // And the proxy is still up.
    let r = c
        .get(format!("http://{}/healthz", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Audit unavailable: the call is refused with 503 and not forwarded.
    proxy.sink.set_failing(true);
    let r = modern_request(
        &c,
        &proxy.url(),
        Some(&keys.admin),
        &modern_body(2, "tools/call", json!({"name":"down__echo","arguments":{}})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_never_reach_the_upstream() {
    use axum::routing::post;
    let seen: Arc<std::sync::Mutex<Vec<http::HeaderMap>>> = Default::default();
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        post(move |headers: http::HeaderMap, body: String| {
            let seen = s2.clone();
            async move {
                seen.lock().unwrap().push(headers);
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let id = v["id"].clone();
                let result = match v["method"].as_str() {
                    Some("initialize") => json!({"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"recorder","version":"1"}}),
                    Some("tools/list") => json!({"tools":[{"name":"rec","inputSchema":{"type":"object"}}]}),
                    Some("tools/call") => json!({"content":[{"type":"text","text":"recorded"}]}),
                    _ => return (http::StatusCode::ACCEPTED, String::new()),
                };
                (http::StatusCode::OK, json!({"jsonrpc":"2.0","id":id,"result":result}).to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rec_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut backend = http_backend("rec", &format!("http://{rec_addr}/mcp"));
    backend
        .headers
        .insert("x-upstream-token".into(), "from-policy".into());
    let (policy, keys) = policy(vec![backend]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let sid = legacy_initialize(&c, &proxy.url(), &keys.admin, "2025-06-18").await;
    let call = json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"rec__rec","arguments":{}}});
    let r = legacy_request(&c, &proxy.url(), &keys.admin, &sid, &call)
        .header("authorization", format!("Bearer {}", keys.admin))
        .header("cookie", "c=1")
        .header("proxy-authorization", "Basic eA==")
        .send()
        .await
        .unwrap();
    assert!(
        rpc_answer(r).await["result"]
            .to_string()
            .contains("recorded")
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() >= 3,
        "initialize, initialized, call: {}",
        seen.len()
    );
    for h in seen.iter() {
        for banned in [
            "authorization",
            "x-api-key",
            "cookie",
            "proxy-authorization",
        ] {
            assert!(!h.contains_key(banned), "{banned} forwarded: {h:?}");
        }
        assert_eq!(h["x-upstream-token"], "from-policy");
        assert_eq!(h["host"], rec_addr.to_string().as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_upstream_declared_in_local_config() {
    let p = peers();
    let mut cfg = config();
    cfg.stdio.insert(
        "everything".into(),
        sentinel_proxy::config::StdioCommand {
            command: "node".into(),
            args: vec![p.everything_js().display().to_string(), "stdio".into()],
            ..Default::default()
        },
    );
    let backend = BackendSpec {
        name: "local".into(),
        stdio: Some("everything".into()),
        ..Default::default()
    };
    let unknown = BackendSpec {
        name: "ghost".into(),
        stdio: Some("not-declared".into()),
        ..Default::default()
    };
    let (policy, keys) = policy(vec![backend, unknown]);
    let proxy = start(cfg, Some(policy)).await;
    let c = client();
    let v = modern_tool_call(
        &c,
        &proxy.url(),
        &keys.admin,
        1,
        json!({"name":"local__echo","arguments":{"message":"over stdio"}}),
    )
    .await;
    assert!(v["result"].to_string().contains("over stdio"), "{v}");
    assert_eq!(v["id"], 1);
    // A command the proxy's config does not declare never runs.
    let v = modern_tool_call(
        &c,
        &proxy.url(),
        &keys.admin,
        2,
        json!({"name":"ghost__echo","arguments":{}}),
    )
    .await;
    assert_eq!(v["error"]["code"], -32050, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_round_trip_and_progress_pass_through_in_a_legacy_session() {
    let p = peers();
    let every = p.everything_http();
    let py = p.python_upstream();
    // Two upstreams share the client session: the sampling request's id is
    // rewritten and the client's answer routed back to the right one.
    let (policy, keys) = policy(vec![
        http_backend("everything", &every.url()),
        http_backend("py", &py.url()),
    ]);
    let proxy = start(config(), Some(policy)).await;
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().ts_sampling_and_progress(&url, &[("X-API-Key", &key)], "everything__")
    })
    .await
    .expect("ts sampling client");
    assert_eq!(out["sampled"], 1, "{out}");
    assert!(
        out["sampling"]
            .to_string()
            .contains("sampled by the client"),
        "{out}"
    );
    let progress = out["progress"].as_array().expect("progress");
    assert!(progress.len() >= 2, "{out}");
    assert!(out["long"]["content"].is_array(), "{out}");
    let events = proxy.sink.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| outcome(e) == Outcome::Ok),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elicitation_passes_through_in_both_eras() {
    let p = peers();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![http_backend("py", &py.url())]);
    let proxy = start(config(), Some(policy)).await;
    // 2026-07-28: the upstream answers `input_required`; the client retries
    // with `inputResponses` and the opaque `requestState`, untouched.
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().python_client(&url, MODERN, &[("X-API-Key", &key)], "py__greet", "{}")
    })
    .await
    .expect("modern elicitation");
    assert!(out["result"].to_string().contains("hello Ada"), "{out}");
    // Legacy: the upstream sends elicitation/create mid-call on the stream;
    // the client's answer is routed back through the proxy.
    let url = proxy.url();
    let key = keys.admin.clone();
    let out = blocking(move || {
        peers().python_client(&url, "legacy", &[("X-API-Key", &key)], "py__greet", "{}")
    })
    .await
    .expect("legacy elicitation");
    assert!(out["result"].to_string().contains("hello Ada"), "{out}");
    // The modern round trip is two gated attempts (the call and its retry),
    // the legacy one a single call.
    let events = proxy.sink.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(
        events.iter().all(|e| outcome(e) == Outcome::Ok),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_are_audited_and_limited_only_when_the_policy_says() {
    let port = peers::free_port();
    let (mut policy, keys) = policy(vec![http_backend(
        "down",
        &format!("http://127.0.0.1:{port}/mcp"),
    )]);
    policy.policy.audit.extra_methods = vec!["tools/list".into()];
    // The limited role's one-token bucket now also counts tools/list.
    policy.policy.roles[2].rate_limits[0].methods = vec!["tools/list".into()];
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let list = modern_body(1, "tools/list", json!({}));
    let r = modern_request(&c, &proxy.url(), Some(&keys.admin), &list)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // ping is neither audited nor limited.
    let r = modern_request(
        &c,
        &proxy.url(),
        Some(&keys.limited),
        &modern_body(2, "ping", json!({})),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let r = modern_request(&c, &proxy.url(), Some(&keys.limited), &list)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = modern_request(&c, &proxy.url(), Some(&keys.limited), &list)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let events = proxy.sink.wait_for(3, Duration::from_secs(5)).await;
    let seen: Vec<(&str, Outcome)> = events
        .iter()
        .map(|e| (e.mcp_method.as_str(), outcome(e)))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("tools/list", Outcome::Ok),
            ("tools/list", Outcome::Ok),
            ("tools/list", Outcome::RateLimited)
        ]
    );
}

const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgOiQ2ZRj1rVsQmzj2
j74kZ3/GyEU26bvoCzyKiuLvB8ehRANCAASvS45Y+CdGrC6B7W2l9r/a70o0rzMa
0tbbY7dWUzd+Fs8qOl8KufRg/N91833uQ/4BdaoqGuxcMvnOLnRJMjno
-----END PRIVATE KEY-----
";
const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEr0uOWPgnRqwuge1tpfa/2u9KNK8z
GtLW22O3VlM3fhbPKjpfCrn0YPzfdfN97kP+AXWqKhrsXDL5zi50STI56A==
-----END PUBLIC KEY-----
";
const EC_X: &str = "r0uOWPgnRqwuge1tpfa_2u9KNK8zGtLW22O3VlM3fhY";
const EC_Y: &str = "zyo6Xwq59GD833Xzfe5D_gF1qioa7Fwy-c4udEkyOeg";
const HS_SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!!";

fn jwt(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    kid: Option<&str>,
    iss: &str,
    sub: &str,
    role: &str,
) -> String {
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = kid.map(str::to_string);
    let exp = jsonwebtoken::get_current_timestamp() + 300;
    jsonwebtoken::encode(
        &h,
        &json!({"iss": iss, "aud": "sentinel", "sub": sub, "role": role, "exp": exp}),
        key,
    )
    .expect("encode jwt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_principals_from_hmac_pem_and_jwks_issuers() {
    use axum::routing::get;
    use sentinel_shared::spec::JwtIssuerSpec;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A JWKS endpoint that starts with an unrelated key and, after the first
    // fetch, also publishes the signing key (a rotation).
    let fetches = Arc::new(AtomicUsize::new(0));
    let f2 = fetches.clone();
    let app = axum::Router::new().route(
        "/jwks",
        get(move || {
            let n = f2.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut keys = vec![json!({"kty":"EC","crv":"P-256","kid":"old","alg":"ES256","use":"sig",
                    "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})];
                if n >= 1 {
                    keys.push(json!({"kty":"EC","crv":"P-256","kid":"new","alg":"ES256","use":"sig","x":EC_X,"y":EC_Y}));
                }
                axum::Json(json!({"keys": keys}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (mut policy, _keys) = policy(vec![http_backend("down", "http://127.0.0.1:9/mcp")]);
    let issuer = |name: &str, iss: &str| JwtIssuerSpec {
        name: name.into(),
        issuer: iss.into(),
        audiences: vec!["sentinel".into()],
        ..Default::default()
    };
    policy.policy.jwt_issuers = vec![
        JwtIssuerSpec {
            algorithms: vec!["HS256".into()],
            hmac_secret: HS_SECRET.into(),
            ..issuer("hs", "https://hs.test")
        },
        JwtIssuerSpec {
            algorithms: vec!["ES256".into()],
            public_keys_pem: vec![EC_PUBLIC_PEM.into()],
            ..issuer("pem", "https://pem.test")
        },
        JwtIssuerSpec {
            algorithms: vec!["ES256".into()],
            jwks_url: format!("http://{jwks_addr}/jwks"),
            ..issuer("jwks", "https://jwks.test")
        },
    ];
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let hs = jsonwebtoken::EncodingKey::from_secret(HS_SECRET.as_bytes());
    let ec = jsonwebtoken::EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).unwrap();
    let ping = modern_body(1, "ping", json!({}));
    let status = |token: String| {
        let c = c.clone();
        let url = proxy.url();
        let ping = ping.clone();
        async move {
            modern_request(&c, &url, Some(&token), &ping)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    use jsonwebtoken::Algorithm::{ES256, HS256};
    assert_eq!(
        status(jwt(HS256, &hs, None, "https://hs.test", "alice", "admin")).await,
        200
    );
    assert_eq!(
        status(jwt(ES256, &ec, None, "https://pem.test", "bob", "admin")).await,
        200
    );
    // Wrong issuer for the key, wrong secret: refused.
    assert_eq!(
        status(jwt(ES256, &ec, None, "https://hs.test", "bob", "admin")).await,
        401
    );
    let wrong = jsonwebtoken::EncodingKey::from_secret(b"another-secret-that-is-long-enough-xx");
    assert_eq!(
        status(jwt(HS256, &wrong, None, "https://hs.test", "eve", "admin")).await,
        401
    );
    // JWKS: a token naming `old` makes the first fetch (and fails: not its
    // key). The issuer then rotates; the unknown kid `new` triggers one
    // refresh once the minimum interval has passed.
    assert_eq!(
        status(jwt(
            ES256,
            &ec,
            Some("old"),
            "https://jwks.test",
            "carol",
            "admin"
        ))
        .await,
        401
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        status(jwt(
            ES256,
            &ec,
            Some("new"),
            "https://jwks.test",
            "carol",
            "admin"
        ))
        .await,
        200
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // Cached now: no further fetch.
    assert_eq!(
        status(jwt(
            ES256,
            &ec,
            Some("new"),
            "https://jwks.test",
            "carol",
            "admin"
        ))
        .await,
        200
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // An unknown kid right after a fetch does not make the proxy fetch again.
    assert_eq!(
        status(jwt(
            ES256,
            &ec,
            Some("nope"),
            "https://jwks.test",
            "carol",
            "admin"
        ))
        .await,
        401
    );
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // A JWT principal's tool call is audited as such.
    let call = modern_body(2, "tools/call", json!({"name":"down__x","arguments":{}}));
    let token = jwt(HS256, &hs, None, "https://hs.test", "alice", "admin");
    let _ = modern_request(&c, &proxy.url(), Some(&token), &call)
        .send()
        .await
        .unwrap();
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(
        (
            events[0].auth_method.as_str(),
            events[0].subject.as_str(),
            events[0].role.as_str()
        ),
        ("jwt", "alice", "admin")
    );
    assert!(events[0].api_key_id.is_empty());
}

/// Drives the stdio front in process over a pipe: one JSON line out, the
/// answer line with `id` back (other lines, e.g. notifications, skipped).
struct StdioClient {
    write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
}

impl StdioClient {
    async fn send(&mut self, v: Value) {
        use tokio::io::AsyncWriteExt;
        self.write
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write");
    }
    async fn answer(&mut self, id: u64) -> Value {
        for _ in 0..1000 {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .expect("answer in time")
                .expect("read")
                .expect("line");
            let v: Value = serde_json::from_str(&line).expect("json line");
            if v["id"] == id && v.get("method").is_none() {
                return v;
            }
        }
        panic!("no answer to {id}");
    }
}

fn stdio_client(proxy: &TestProxy, credential: &str) -> StdioClient {
    use sentinel_proxy::clock::SystemClock;
    use sentinel_proxy::mcp::front::AppState;
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (r, w) = tokio::io::split(theirs);
    let st = Arc::new(AppState::new(
        &config(),
        proxy.publisher.reader(),
        proxy.sink.clone(),
        Arc::new(SystemClock::default()),
    ));
    let credential = credential.to_string();
    tokio::spawn(async move {
        let _ = sentinel_proxy::mcp::stdio_front::serve(st, &credential, r, w).await;
    });
    let (read, write) = tokio::io::split(ours);
    use tokio::io::AsyncBufReadExt;
    StdioClient {
        write,
        lines: tokio::io::BufReader::new(read).lines(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_front_applies_the_same_gates_federation_and_audit() {
    let p = peers();
    let every = p.everything_http();
    let (policy, keys) = policy(vec![http_backend("everything", &every.url())]);
    // The HTTP server is not used here: its policy channel and sink are.
    let proxy = start(config(), Some(policy)).await;
    let mut c = stdio_client(&proxy, &keys.reader);
    c.send(json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"stdio-test","version":"1"}}})).await;
    let init = c.answer(1).await;
    assert_eq!(init["result"]["serverInfo"]["name"], "sentinel", "{init}");
    c.send(json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
        .await;
    c.send(json!({"jsonrpc":"2.0","id":2,"method":"tools/list"}))
        .await;
    let list = c.answer(2).await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, vec!["everything__echo"], "the reader sees only echo");
    c.send(json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"everything__echo","arguments":{"message":"over stdio front"}}})).await;
    assert!(
        c.answer(3).await["result"]
            .to_string()
            .contains("over stdio front")
    );
    c.send(json!({"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"everything__get-sum","arguments":{"a":1,"b":2}}})).await;
    assert_eq!(c.answer(4).await["error"]["code"], -32003);
    c.send(json!("not a message")).await;
    assert_eq!(c.answer_null().await["error"]["code"], -32600);
    // 2026-07-28 messages are served statelessly on the same pipe.
    c.send(modern_body(
        5,
        "tools/call",
        json!({"name":"everything__echo","arguments":{"message":"modern"}}),
    ))
    .await;
    assert!(c.answer(5).await["result"].to_string().contains("modern"));
    let events = proxy.sink.wait_for(3, Duration::from_secs(5)).await;
    let outcomes: Vec<Outcome> = events.iter().map(outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Ok, Outcome::Forbidden, Outcome::Ok]);
    assert!(events[0].session_id.starts_with("stdio:"));
    // A bad credential in the environment: every call is refused and audited.
    let mut bad = stdio_client(&proxy, "sntl_not-a-key");
    bad.send(modern_body(
        9,
        "tools/call",
        json!({"name":"everything__echo","arguments":{}}),
    ))
    .await;
    assert_eq!(bad.answer(9).await["error"]["code"], -32001);
    let events = proxy.sink.wait_for(4, Duration::from_secs(5)).await;
    assert_eq!(outcome(&events[3]), Outcome::Unauthenticated);
}

impl StdioClient {
    async fn answer_null(&mut self) -> Value {
        for _ in 0..1000 {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .expect("answer in time")
                .expect("read")
                .expect("line");
            let v: Value = serde_json::from_str(&line).expect("json line");
            if v["id"].is_null() && v.get("error").is_some() {
                return v;
            }
        }
        panic!("no error answer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_notifications_reach_the_client_on_the_listen_stream() {
    use futures::StreamExt;
    let p = peers();
    let every = p.everything_http();
    let (policy, keys) = policy(vec![http_backend("everything", &every.url())]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let sid = legacy_initialize(&c, &proxy.url(), &keys.admin, "2025-06-18").await;
    let level =
        json!({"jsonrpc":"2.0","id":2,"method":"logging/setLevel","params":{"level":"debug"}});
    let r = legacy_request(&c, &proxy.url(), &keys.admin, &sid, &level)
        .send()
        .await
        .unwrap();
    assert_eq!(rpc_answer(r).await["result"], json!({}));
    let toggle = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"everything__toggle-simulated-logging","arguments":{}}});
    let r = legacy_request(&c, &proxy.url(), &keys.admin, &sid, &toggle)
        .send()
        .await
        .unwrap();
    assert!(rpc_answer(r).await.get("result").is_some());
    let listen = c
        .get(proxy.url())
        .header("accept", "text/event-stream")
        .header("x-api-key", &keys.admin)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(listen.status(), 200);
    assert_eq!(listen.headers()["x-accel-buffering"], "no");
    let mut body = listen.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("notifications/message") {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no notification on the listen stream: {other:?} after {seen}"),
        }
    }
    // A listen stream with another principal's credential is refused.
    let r = c
        .get(proxy.url())
        .header("x-api-key", &keys.reader)
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_garbage_upstreams_are_upstream_errors() {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "{}"
            }),
        )
        .route("/garbage", post(|| async { "<html>not mcp</html>" }))
        .route(
            "/nullid",
            post(|body: String| async move {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let answer = match v["method"].as_str() {
                    Some("initialize") => json!({"jsonrpc":"2.0","id":v["id"],"result":{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"n","version":"1"}}}),
                    Some("tools/call") => json!({"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"boom"}}),
                    _ => return (http::StatusCode::ACCEPTED, String::new()),
                };
                (http::StatusCode::OK, answer.to_string())
            }),
        );
    let addr = serve(app).await;
    let mut slow = http_backend("slow", &format!("http://{addr}/slow"));
    slow.timeout_ms = 300;
    let garbage = http_backend("garbage", &format!("http://{addr}/garbage"));
    let nullid = http_backend("nullid", &format!("http://{addr}/nullid"));
    let (policy, keys) = policy(vec![slow, garbage, nullid]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    for (i, name) in ["slow__x", "garbage__x"].iter().enumerate() {
        let started = std::time::Instant::now();
        let r = modern_request(
            &c,
            &proxy.url(),
            Some(&keys.admin),
            &modern_body(
                i as u64,
                "tools/call",
                json!({"name": name, "arguments": {}}),
            ),
        )
        .send()
        .await
        .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], -32050, "{name}: {v}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    // An error answered with a null id is still this call's answer.
    let r = modern_request(
        &c,
        &proxy.url(),
        Some(&keys.admin),
        &modern_body(
            7,
            "tools/call",
            json!({"name": "nullid__x", "arguments": {}}),
        ),
    )
    .send()
    .await
    .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["id"].clone(), v["error"]["message"].clone()),
        (json!(7), json!("boom")),
        "{v}"
    );
    let events = proxy.sink.wait_for(3, Duration::from_secs(5)).await;
    assert!(
        events.iter().all(|e| outcome(e) == Outcome::UpstreamError),
        "{events:?}"
    );
    assert!(
        events[0].decision.contains("timed out"),
        "{}",
        events[0].decision
    );
    assert_eq!(events[2].jsonrpc_error_message, "boom");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_subscription_stream_is_relayed() {
    use futures::StreamExt;
    let p = peers();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![http_backend("py", &py.url())]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let listen = modern_body(
        1,
        "subscriptions/listen",
        json!({"notifications": {"toolsListChanged": true}}),
    );
    let r = modern_request(&c, &proxy.url(), Some(&keys.admin), &listen)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = r.bytes_stream();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains("notifications/subscriptions/acknowledged") {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("no acknowledgment: {other:?} after {seen}"),
        }
    }
    // Dropping the stream closes it toward the upstream as well.
    drop(body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_resources_are_federated_and_routed() {
    let p = peers();
    let every = p.everything_http();
    let py = p.python_upstream();
    let (policy, keys) = policy(vec![
        http_backend("everything", &every.url()),
        http_backend("py", &py.url()),
    ]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let url = proxy.url();
    let sid = legacy_initialize(&c, &url, &keys.admin, "2025-06-18").await;
    let rpc = |id: u64, method: &str, params: Value| {
        let c = c.clone();
        let url = url.clone();
        let sid = sid.clone();
        let key = keys.admin.clone();
        let body = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params});
        async move {
            rpc_answer(
                legacy_request(&c, &url, &key, &sid, &body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let prompts = rpc(1, "prompts/list", json!({})).await;
    let list = prompts["result"]["prompts"].as_array().expect("prompts");
    let simple = list
        .iter()
        .find(|p| p["arguments"].as_array().is_none_or(|a| a.is_empty()))
        .expect("a prompt without arguments");
    let name = simple["name"].as_str().unwrap();
    assert!(name.starts_with("everything__"), "{name}");
    let got = rpc(2, "prompts/get", json!({"name": name})).await;
    assert!(got["result"]["messages"].is_array(), "{got}");
    let resources = rpc(3, "resources/list", json!({})).await;
    let uri = resources["result"]["resources"][0]["uri"]
        .as_str()
        .expect("a resource")
        .to_string();
    let read = rpc(4, "resources/read", json!({"uri": uri})).await;
    assert_eq!(read["result"]["contents"][0]["uri"], uri.as_str(), "{read}");
    // A URI that no list showed is found by asking the upstreams in turn.
    let templates = rpc(5, "resources/templates/list", json!({})).await;
    assert!(
        templates["result"]["resourceTemplates"].is_array(),
        "{templates}"
    );
    let dynamic = rpc(
        7,
        "resources/read",
        json!({"uri": "demo://resource/dynamic/text/7"}),
    )
    .await;
    assert_eq!(
        dynamic["result"]["contents"][0]["uri"], "demo://resource/dynamic/text/7",
        "{dynamic}"
    );
    let unknown = rpc(6, "resources/read", json!({"uri": "nothing://here"})).await;
    assert!(unknown.get("error").is_some(), "{unknown}");
}

/// Plain answers pass through as the upstream wrote them (the client's id
/// put on, the result text unchanged in the answer and the audit record);
/// answers with more than JSON-RPC's members, invalid ones, and answers a
/// 2026-07-28 client needs `resultType` added to take the general path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_upstream_answers_pass_through_unchanged() {
    use axum::routing::post;
    // Members out of sorted order: a tree written out again would sort them.
    const SSE_RESULT: &str = r#"{"isError":false,"content":[{"type":"text","text":"streamed"}]}"#;
    const SPACED: &str = "{ \"content\" : [ {\"type\":\"text\", \"text\":\"say \\\"hi\\\" \\u00e9\"} ],\n \"isError\": false }";
    let app = axum::Router::new().route(
        "/mcp",
        post(|body: String| async move {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let id = v["id"].to_string();
            let answer = match (v["method"].as_str(), v["params"]["name"].as_str()) {
                (Some("initialize"), _) => json!({"jsonrpc":"2.0","id":v["id"],"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"plain","version":"1"}}}).to_string(),
                // Another id than the one asked with, and spaced out.
                (Some("tools/call"), Some("spaced")) => format!("\n{{\"result\": {SPACED}, \"id\": 4242 ,\"jsonrpc\":\"2.0\"}}\n"),
                (Some("tools/call"), Some("extra")) => format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"a\":1}},\"x-extra\":true}}"),
                (Some("tools/call"), Some("broken")) => format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"a\":"),
                // SSE: progress, then the plain answer on one line.
                (Some("tools/call"), Some("sse")) => {
                    let progress = json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}});
                    let body = format!("event: message\ndata: {progress}\n\nevent: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{SSE_RESULT}}}\n\n");
                    return (http::StatusCode::OK, [("content-type", "text/event-stream")], body);
                }
                // SSE: the answer spread over several data lines.
                (Some("tools/call"), Some("sse-lines")) => {
                    let body = format!("event: message\ndata: {{\"jsonrpc\":\"2.0\",\ndata:  \"id\":{id},\ndata:  \"result\":{{\"b\":2}}}}\n\n");
                    return (http::StatusCode::OK, [("content-type", "text/event-stream")], body);
                }
                (Some("tools/call"), Some("sse-broken")) => {
                    let body = format!("event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":\n\n");
                    return (http::StatusCode::OK, [("content-type", "text/event-stream")], body);
                }
                _ => return (http::StatusCode::ACCEPTED, [("content-type", "application/json")], String::new()),
            };
            (http::StatusCode::OK, [("content-type", "application/json")], answer)
        }),
    );
    let addr = serve(app).await;
    let (policy, keys) = policy(vec![http_backend("plain", &format!("http://{addr}/mcp"))]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let sid = legacy_initialize(&c, &proxy.url(), &keys.admin, "2025-06-18").await;
    let call = |id: &str, name: &str| json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":format!("plain__{name}"),"arguments":{}}});
    let mut answers = Vec::new();
    for (id, name) in [
        ("c-1", "spaced"),
        ("c-2", "extra"),
        ("c-3", "broken"),
        ("c-4", "sse"),
        ("c-5", "sse-lines"),
        ("c-6", "sse-broken"),
    ] {
        let r = legacy_request(&c, &proxy.url(), &keys.admin, &sid, &call(id, name))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        answers.push(rpc_answer(r).await);
    }
    let spaced: Value = serde_json::from_str(SPACED).unwrap();
    assert_eq!(
        answers[0],
        json!({"jsonrpc":"2.0","id":"c-1","result":spaced}),
        "{}",
        answers[0]
    );
    assert_eq!(
        answers[1],
        json!({"jsonrpc":"2.0","id":"c-2","result":{"a":1},"x-extra":true})
    );
    assert_eq!(
        (
            answers[2]["id"].clone(),
            answers[2]["error"]["code"].clone()
        ),
        (json!("c-3"), json!(-32050)),
        "{}",
        answers[2]
    );
    let sse: Value = serde_json::from_str(SSE_RESULT).unwrap();
    assert_eq!(answers[3], json!({"jsonrpc":"2.0","id":"c-4","result":sse}));
    assert_eq!(
        answers[4],
        json!({"jsonrpc":"2.0","id":"c-5","result":{"b":2}})
    );
    assert_eq!(
        (
            answers[5]["id"].clone(),
            answers[5]["error"]["code"].clone()
        ),
        (json!("c-6"), json!(-32050)),
        "{}",
        answers[5]
    );
    // A 2026-07-28 client of this legacy upstream gets `resultType` added.
    let modern = modern_tool_call(
        &c,
        &proxy.url(),
        &keys.admin,
        9,
        json!({"name": "plain__spaced", "arguments": {}}),
    )
    .await;
    assert_eq!(
        (
            modern["id"].clone(),
            modern["result"]["resultType"].clone(),
            modern["result"]["content"].clone()
        ),
        (json!(9), json!("complete"), spaced["content"].clone()),
        "{modern}"
    );
    let mut events = proxy.sink.wait_for(7, Duration::from_secs(5)).await;
    events.sort_by_key(|e| e.timestamp_us);
    let by_tool = |t: &str| events.iter().filter(|e| e.tool == t).collect::<Vec<_>>();
    let spaced_events = by_tool("spaced");
    assert_eq!(spaced_events.len(), 2, "{events:?}");
    // The pass-through records the upstream's own text.
    assert_eq!(outcome(spaced_events[0]), Outcome::Ok);
    assert_eq!(spaced_events[0].response, SPACED);
    assert_eq!(outcome(spaced_events[1]), Outcome::Ok);
    let extra = by_tool("extra");
    assert_eq!(
        (outcome(extra[0]), extra[0].response.as_str()),
        (Outcome::Ok, r#"{"a":1}"#)
    );
    let broken = by_tool("broken");
    assert_eq!(outcome(broken[0]), Outcome::UpstreamError, "{broken:?}");
    let streamed = by_tool("sse");
    assert_eq!(
        (outcome(streamed[0]), streamed[0].response.as_str()),
        (Outcome::Ok, SSE_RESULT)
    );
    let lines = by_tool("sse-lines");
    assert_eq!(
        (outcome(lines[0]), lines[0].response.as_str()),
        (Outcome::Ok, r#"{"b":2}"#)
    );
    assert_eq!(outcome(by_tool("sse-broken")[0]), Outcome::UpstreamError);
    assert_eq!(proxy.sink.attempts().len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_call_cancels_it_upstream_and_leaves_an_unknown_event() {
    use axum::body::Body;
    use axum::routing::post;
    use futures::StreamExt;
    let seen: Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        post(move |body: String| {
            let seen = s2.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                seen.lock().unwrap().push(v.clone());
                let id = v["id"].clone();
                match v["method"].as_str() {
                    Some("initialize") => axum::response::Response::builder()
                        .header("content-type", "application/json")
                        .header("mcp-session-id", "up-1")
                        .body(Body::from(json!({"jsonrpc":"2.0","id":id,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{}},"serverInfo":{"name":"hang","version":"1"}}}).to_string()))
                        .unwrap(),
                    // A tool call that reports progress once and never ends.
                    Some("tools/call") => {
                        let first = format!("event: message\ndata: {}\n\n", json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"p","progress":1}}));
                        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(futures::stream::pending());
                        axum::response::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Body::from_stream(body))
                            .unwrap()
                    }
                    _ => axum::response::Response::builder().status(202).body(Body::empty()).unwrap(),
                }
            }
        }),
    );
    let addr = serve(app).await;
    let mut backend = http_backend("hang", &format!("http://{addr}/mcp"));
    backend.timeout_ms = 60_000;
    let (policy, keys) = policy(vec![backend]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let sid = legacy_initialize(&c, &proxy.url(), &keys.admin, "2025-06-18").await;
    let call = json!({"jsonrpc":"2.0","id":"call-1","method":"tools/call","params":{"name":"hang__forever","arguments":{},"_meta":{"progressToken":"p"}}});
    let r = legacy_request(&c, &proxy.url(), &keys.admin, &sid, &call)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("progress in time");
    assert!(String::from_utf8_lossy(&first.unwrap().unwrap()).contains("notifications/progress"));
    drop(body);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cancelled = seen.lock().unwrap().iter().any(|m| {
            m["method"] == "notifications/cancelled" && m["params"]["requestId"] == "call-1"
        });
        if cancelled {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cancellation reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = proxy.sink.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(outcome(&events[0]), Outcome::Unknown);
    assert_eq!(proxy.sink.attempts().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_never_crash_the_proxy() {
    let port = peers::free_port();
    let (policy, keys) = policy(vec![http_backend(
        "down",
        &format!("http://127.0.0.1:{port}/mcp"),
    )]);
    let proxy = start(config(), Some(policy)).await;
    let c = client();
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let bodies: Vec<String> = vec![
        "".into(),
        "null".into(),
        "\"text\"".into(),
        "[]".into(),
        "[1,2]".into(),
        deep,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"down__x","arguments":"nope"}}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":5,"clientInfo":"x"}}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":[]}"#.into(),
        r#"{"jsonrpc":"2.0","id":"sntl~down~{","result":{}}"#.into(),
        r#"{"jsonrpc":"2.0","id":"sntl~ghost~1","result":{}}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":{"a":1}}}"#.into(),
        r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":null}}"#.into(),
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#.into(),
        "\u{0}\u{1}".into(),
    ];
    for (i, b) in bodies.iter().enumerate() {
        for modern in [false, true] {
            let mut r = c
                .post(proxy.url())
                .header("content-type", "application/json")
                .header("x-api-key", &keys.admin)
                .body(b.clone());
            if modern {
                r = r.header("mcp-protocol-version", MODERN);
            }
            let resp = r.send().await.unwrap_or_else(|e| panic!("body {i}: {e}"));
            assert!(
                resp.status().as_u16() < 500,
                "body {i} ({modern}): {}",
                resp.status()
            );
        }
    }
    // A session header that is garbage, and one with bad bytes.
    for sid in ["s1.1.", "s1.99.AAAA", "x", "s1.1.////"] {
        let r = c
            .post(proxy.url())
            .header("x-api-key", &keys.admin)
            .header("mcp-session-id", sid)
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{sid}");
    }
    let r = c
        .get(format!("http://{}/healthz", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
