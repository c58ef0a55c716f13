//! An operator's loop with the real CLI: apply a policy file, ask `can-i`,
//! and see the proxy enforce exactly that; change the file, apply again,
//! and see the change enforced.

use std::process::Command;
use std::time::{Duration, Instant};

use sentinel_tests::peers::peers;
use sentinel_tests::procs::bin;
use sentinel_tests::{ADMIN, Cp, Proxy, modern_call};
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
