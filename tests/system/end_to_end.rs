//! The path a security team relies on: a call through a proxy by a real
//! MCP client lands in Postgres with who, what, where and the decision; a
//! revoked key is refused fleet-wide; the fleet view shows the proxy.

use std::time::{Duration, Instant};

use sentinel_tests::peers::peers;
use sentinel_tests::{Cp, Proxy, modern_call};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_a_joined_proxy_are_audited_and_revocation_is_enforced() {
    let cp = Cp::start().await;
    let upstream = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .unwrap();
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &upstream.url()).await;
    admin.put_role("dev", &["py/*"], &["py/shout"]).await;
    let (key_id, key, _) = admin.create_key("dev", "alice").await;

    let proxy = Proxy::start("proxy-e2e", &cp).await;
    let url = proxy.url();

    // The Python SDK in the modern (stateless) era.
    let auth = format!("Bearer {key}");
    let (u, a) = (url.clone(), auth.clone());
    let modern = tokio::task::spawn_blocking(move || {
        peers().python_client(
            &u,
            "2026-07-28",
            &[("Authorization", &a)],
            "py__add",
            r#"{"a": 2, "b": 3}"#,
        )
    })
    .await
    .unwrap()
    .expect("python client through the proxy");
    let tools: Vec<&str> = modern["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert!(tools.contains(&"py__add"), "{tools:?}");
    assert!(
        !tools.contains(&"py__shout"),
        "a denied tool is not listed: {tools:?}"
    );
    assert!(modern["result"].to_string().contains('5'), "{modern}");

    // The TypeScript SDK in the legacy (session) era.
    let (u, a) = (url.clone(), auth.clone());
    let legacy = tokio::task::spawn_blocking(move || {
        peers().ts_client(
            &u,
            &[("Authorization", &a)],
            "py__add",
            r#"{"a": 20, "b": 22}"#,
        )
    })
    .await
    .unwrap()
    .expect("typescript client through the proxy");
    assert!(legacy["result"].to_string().contains("42"), "{legacy}");

    // A denied tool and a bad key: refused, and recorded as such.
    let (status, body) = modern_call(&url, &key, "py__shout", json!({"text": "hi"})).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = modern_call(&url, "sntl_notakey", "py__add", json!({"a": 1, "b": 1})).await;
    assert_eq!(status, 401);

    let n = cp
        .wait_count(
            "SELECT count(*) FROM audit_events WHERE mcp_method = 'tools/call'",
            4,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(n, 4, "one audit event per attempt");
    let row: (String, String, String, String, String, String, bool) = sqlx::query_as(
        "SELECT subject, role, api_key_id, tool, backend, proxy_id, chain_ok FROM audit_events \
         WHERE outcome = 'ok' ORDER BY ts LIMIT 1",
    )
    .fetch_one(&cp.db.pool)
    .await
    .unwrap();
    assert_eq!(row.1, "dev");
    assert_eq!(row.2, key_id);
    assert!(row.3.ends_with("add"), "{row:?}");
    assert_eq!(row.5, "proxy-e2e");
    assert!(row.6, "hash chain verified on ingest");
    assert_eq!(
        cp.count("SELECT count(*) FROM audit_events WHERE outcome = 'ok'")
            .await,
        2
    );
    assert_eq!(
        cp.count("SELECT count(*) FROM audit_events WHERE outcome = 'forbidden'")
            .await,
        1
    );
    assert_eq!(
        cp.count("SELECT count(*) FROM audit_events WHERE outcome = 'unauthenticated'")
            .await,
        1
    );
    // The client's credential is recorded by key id, never by value.
    assert_eq!(
        cp.count("SELECT count(*) FROM audit_events WHERE arguments LIKE '%sntl_%' OR decision LIKE '%sntl_%'")
            .await,
        0
    );

    // Revocation reaches the proxy: the next call is refused.
    admin.revoke(&key_id).await;
    let revoked = Instant::now();
    loop {
        let (status, _) = modern_call(&url, &key, "py__add", json!({"a": 1, "b": 1})).await;
        if status == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("revoke -> first 401 at the proxy: {:?}", revoked.elapsed());

    // The fleet view: connected, acked the current version, backlog drained.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let fleet = admin.proxies().await;
        let p = fleet
            .proxies
            .iter()
            .find(|p| p.proxy_id == "proxy-e2e")
            .cloned();
        if let Some(p) = &p
            && p.connected
            && p.acked_version == fleet.policy_version
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fleet view: {p:?} at version {}",
            fleet.policy_version
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(proxy);
}
