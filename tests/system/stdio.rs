//! The proxy binary as a local MCP server on stdin/stdout, joined to a real
//! control plane: the same gates, federation and audit as over HTTP.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use sentinel_tests::peers::peers;
use sentinel_tests::procs::bin;
use sentinel_tests::{Cp, JOIN};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdio_front_gates_and_audits_like_http() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let mut admin = cp.admin().await;
    admin.put_http_backend("py", &py.url()).await;
    admin.put_role("dev", &["py/add"], &[]).await;
    let (key_id, key, _) = admin.create_key("dev", "grace").await;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "proxy_id = \"proxy-stdio\"\n[control_plane]\nurl = \"http://{}\"\njoin_token = \"{JOIN}\"\n\
             cache_file = \"{}\"\n[spool]\ndir = \"{}\"\n",
            cp.grpc,
            dir.path().join("policy.cache").display(),
            dir.path().join("spool").display()
        ),
    )
    .expect("config");
    let proxy = bin("sentinel-proxy");
    let answers = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(proxy)
            .arg("--stdio")
            .arg("--config")
            .arg(&config)
            .env("SENTINEL_API_KEY", &key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn proxy --stdio");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        // The policy arrives over the sync stream: give it a moment.
        std::thread::sleep(Duration::from_millis(1500));
        let mut answers = Vec::new();
        let mut ask = |msg: Value, answers: &mut Vec<Value>| {
            writeln!(stdin, "{msg}").expect("write");
            stdin.flush().expect("flush");
            if msg.get("id").is_none() {
                return;
            }
            let mut line = String::new();
            loop {
                line.clear();
                if out.read_line(&mut line).expect("read") == 0 {
                    panic!("proxy closed stdout");
                }
                let v: Value = serde_json::from_str(line.trim()).expect("json line");
                if v.get("id") == msg.get("id") {
                    answers.push(v);
                    return;
                }
            }
        };
        ask(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "stdio-test", "version": "1"}}}),
            &mut answers,
        );
        ask(
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            &mut answers,
        );
        ask(
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            &mut answers,
        );
        ask(
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                   "params": {"name": "py__add", "arguments": {"a": 20, "b": 22}}}),
            &mut answers,
        );
        ask(
            json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                   "params": {"name": "py__shout", "arguments": {"text": "no"}}}),
            &mut answers,
        );
        drop(stdin); // EOF: the proxy drains its spool and exits
        let status = child.wait().expect("wait");
        assert!(status.success(), "{status}");
        answers
    })
    .await
    .expect("stdio session");

    assert!(
        answers[0]["result"]["serverInfo"].is_object(),
        "{}",
        answers[0]
    );
    let tools = answers[1]["result"]["tools"].to_string();
    assert!(
        tools.contains("py__add") && !tools.contains("py__shout"),
        "{tools}"
    );
    assert!(answers[2].to_string().contains("42"), "{}", answers[2]);
    assert!(answers[3]["error"].is_object(), "denied: {}", answers[3]);

    let n = cp
        .wait_count(
            "SELECT count(*) FROM audit_events WHERE mcp_method = 'tools/call'",
            2,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(n, 2, "both calls audited");
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT outcome, api_key_id FROM audit_events WHERE mcp_method = 'tools/call' ORDER BY outcome",
    )
    .fetch_all(&cp.db.pool)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        vec![("forbidden".into(), key_id.clone()), ("ok".into(), key_id)]
    );
}
