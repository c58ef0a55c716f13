//! An operator's loop with the real CLI: apply a policy file, ask `can-i`,
//! and see the proxy enforce exactly that; change the file, apply again,
//! and see the change enforced.

use std::process::Command;
use std::time::{Duration, Instant};

use sentinel_tests::peers::peers;
use sentinel_tests::procs::{Proc, ProxyProc, bin};
use sentinel_tests::{ADMIN, Cp, JOIN, Proxy, modern_call};
use serde_json::json;

fn ctl(cp: &Cp, args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("sentinelctl"))
        .arg("--addr")
        .arg(format!("http://{}", cp.grpc))
        .arg("--http")
        .arg(format!("http://{}", cp.http))
        .arg("--token")
        .arg(ADMIN)
        .args(args)
        .output()
        .expect("run sentinelctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn policy(upstream: &str, allow: &[&str]) -> String {
    let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "roles:\n  - name: dev\n    allow: [{}]\nbackends:\n  - name: py\n    url: {upstream}\n    timeout_ms: 10000\n",
        allow.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_applied_with_the_cli_is_what_can_i_says_and_the_proxy_enforces() {
    let cp = Cp::start().await;
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy(&py.url(), &["py/add"])).expect("write policy");
    let f = file.to_string_lossy().to_string();

    let (code, out) = tokio::task::block_in_place(|| ctl(&cp, &["policy", "apply", "-f", &f]));
    assert_eq!(code, 0, "{out}");
    let mut admin = cp.admin().await;
    let (key_id, key, _) = admin.create_key("dev", "heidi").await;
    let (code, out) =
        tokio::task::block_in_place(|| ctl(&cp, &["can-i", "--key", &key_id, "py/add"]));
    assert_eq!(code, 0, "allowed: {out}");
    let (code, out) =
        tokio::task::block_in_place(|| ctl(&cp, &["can-i", "--key", &key_id, "py/shout"]));
    assert_eq!(code, 1, "denied (default deny): {out}");

    let proxy = Proxy::start("proxy-policy-file", &cp).await;
    let url = proxy.url();
    let (s, v) = modern_call(&url, &key, "py__add", json!({"a": 1, "b": 2})).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = modern_call(&url, &key, "py__shout", json!({"text": "x"})).await;
    assert_eq!(s, 403);

    // The file changes: the diff shows it, apply makes it so.
    std::fs::write(&file, policy(&py.url(), &["py/add", "py/shout"])).expect("rewrite policy");
    let (code, out) = tokio::task::block_in_place(|| ctl(&cp, &["policy", "diff", "-f", &f]));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("role dev"),
        "diff names the changed role: {out}"
    );
    let (code, out) = tokio::task::block_in_place(|| ctl(&cp, &["policy", "apply", "-f", &f]));
    assert_eq!(code, 0, "{out}");
    let (code, out) =
        tokio::task::block_in_place(|| ctl(&cp, &["can-i", "--key", &key_id, "py/shout"]));
    assert_eq!(code, 0, "now allowed: {out}");
    let applied = Instant::now();
    loop {
        let (s, v) = modern_call(&url, &key, "py__shout", json!({"text": "x"})).await;
        if s == 200 {
            assert!(v.to_string().contains('X'), "{v}");
            break;
        }
        assert!(
            applied.elapsed() < Duration::from_secs(5),
            "the proxy never enforced the new file: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("apply -> enforced by the proxy in {:?}", applied.elapsed());
}

/// A proxy with only a local policy file and no control plane still records
/// every call on disk (bounded by the spool, not by memory); joined to a
/// control plane later, it ships what it recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_proxy_spools_its_audit_and_ships_it_once_joined() {
    sentinel_tests::init();
    let py = tokio::task::spawn_blocking(|| peers().python_upstream())
        .await
        .expect("python upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = sentinel_shared::keys::generate(sentinel_shared::keys::KeyKind::Api).secret;
    let file = dir.path().join("local-policy.json");
    let local = json!({
        "version": 1,
        "policy": {
            "roles": [{"name": "dev", "allow": ["py/add"]}],
            "backends": [{"name": "py", "url": py.url(), "timeout_ms": 10000}],
        },
        "api_keys": [{"key": key, "role": "dev", "owner": "ivan"}],
        "session_keys": [{"id": 1, "key": "07".repeat(32)}],
    });
    std::fs::write(&file, local.to_string()).expect("write local policy");
    let port = sentinel_tests::peers::free_port();
    let config = dir.path().join("proxy.toml");
    let write_config = |top: &str, cp_url: &str| {
        std::fs::write(
            &config,
            format!(
                "proxy_id = \"proxy-standalone\"\nlisten = \"127.0.0.1:{port}\"\n{top}\n\
                 [control_plane]\nurl = \"{cp_url}\"\njoin_token = \"{JOIN}\"\n\
                 [spool]\ndir = \"{}\"\n",
                dir.path().join("spool").display()
            ),
        )
        .expect("write proxy config")
    };
    write_config(&format!("policy_file = \"{}\"", file.display()), "");
    let mut proxy = ProxyProc {
        proc: Proc { child: None },
        port,
        config: config.clone(),
        log: dir.path().join("proxy.log"),
    };
    tokio::task::block_in_place(|| proxy.restart());
    for n in 0..3 {
        let (s, v) = modern_call(&proxy.url(), &key, "py__add", json!({"a": n, "b": 1})).await;
        assert_eq!(s, 200, "{v}");
    }
    let spooled: u64 = std::fs::read_dir(dir.path().join("spool"))
        .expect("spool dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(spooled > 0, "nothing spooled on disk");
    // A graceful stop: outcomes are appended without waiting, and a stop
    // writes them before the exit (a crash would leave the last call's
    // outcome `unknown`, which the fault tests cover).
    tokio::task::block_in_place(|| proxy.proc.term(Duration::from_secs(10)));

    // Joined to a control plane, the same proxy (same spool) ships it.
    let cp = Cp::start().await;
    write_config("", &format!("http://{}", cp.grpc));
    tokio::task::block_in_place(|| proxy.restart());
    let deadline = Instant::now() + Duration::from_secs(20);
    while cp
        .count("SELECT count(*) FROM audit_events WHERE proxy_id = 'proxy-standalone' AND backend = 'py' AND tool = 'add' AND outcome = 'ok'")
        .await
        < 3
    {
        if Instant::now() >= deadline {
            // What reached Postgres, and what the proxy's shipper says: a
            // failure here must tell which side lost the events.
            let rows: Vec<(i64, i64, String)> = sqlx::query_as(
                "SELECT epoch, sequence, outcome FROM audit_events WHERE proxy_id = 'proxy-standalone' ORDER BY epoch, sequence",
            )
            .fetch_all(&cp.db.pool)
            .await
            .unwrap_or_default();
            let dead: Vec<(String,)> =
                sqlx::query_as("SELECT reason FROM audit_dead_letters WHERE proxy_id = 'proxy-standalone'")
                    .fetch_all(&cp.db.pool)
                    .await
                    .unwrap_or_default();
            let metrics = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            let audit_metrics: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("sentinel_audit"))
                .collect();
            panic!(
                "the standalone proxy's audit never reached Postgres\nrows: {rows:?}\ndead letters: {dead:?}\nproxy metrics: {audit_metrics:#?}\nproxy log:\n{}",
                std::fs::read_to_string(&proxy.log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cp.count("SELECT count(*) FROM audit_events WHERE proxy_id = 'proxy-standalone'")
            .await,
        3
    );
}
