//! `sentinelctl`, the real binary as a process, against the real control
//! plane started in-process on `127.0.0.1:0` over a fresh Postgres
//! database: key lifecycle, declarative policy (apply, diff, dry run,
//! export), audit (query, tail, export, verify, gaps), `can-i`, and the
//! failures an operator meets first (wrong token, nothing listening).

#![allow(clippy::unwrap_used)] // a test fails loudly on any surprise

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sentinel_control_plane::config::Config;
use sentinel_control_plane::server::{self, Listeners};
use sentinel_control_plane::testing::TestDb;
use sentinel_shared::audit::seal;
use sentinel_shared::proto::{AuditEvent, Outcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const ADMIN: &str = "admin-token-for-cli-tests-0123456789";

struct Cp {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Cp {
    /// Shuts the control plane down and waits until its ports are closed.
    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("control plane stopped within 20 s")
                .unwrap();
        }
    }
}

async fn start_cp(db: &TestDb) -> Cp {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_cp_on(db, grpc, http).await
}

async fn start_cp_on(
    db: &TestDb,
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
) -> Cp {
    let mut config = Config {
        database_url: db.url.clone(),
        instance_id: "cp-cli".into(),
        admin_tokens: vec![ADMIN.into()],
        join_tokens: vec!["join-token-for-cli-tests-0123456789".into()],
        ..Config::default()
    };
    config.sync.reload_interval_secs = 3600;
    config.finish().unwrap();
    let shutdown = CancellationToken::new();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = server::run(config, Listeners { grpc, http }, None, stop).await {
            panic!("control plane failed: {e}");
        }
    });
    let cp = Cp {
        grpc: grpc_addr,
        http: http_addr,
        shutdown,
        task: Some(task),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{}", cp.grpc))
            .unwrap()
            .connect()
            .await
        {
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            if h.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "control plane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp
}

/// Binds `addr` again once the previous owner has let it go.
async fn rebind(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => assert!(Instant::now() < deadline, "cannot rebind {addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one run of the binary did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self
    }

    #[track_caller]
    fn failed(self, code: i32) -> Run {
        assert_eq!(self.code, code, "expected exit {code}: {self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap()
    }
}

fn command(cp: &Cp, token: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinelctl"));
    c.env("SENTINEL_ADDR", format!("http://{}", cp.grpc))
        .env("SENTINEL_HTTP", format!("http://{}", cp.http))
        .env("SENTINEL_TOKEN", token)
        .env_remove("SENTINEL_CA_CERT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run_with(mut c: tokio::process::Command, args: &[&str]) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(60), c.args(args).output())
        .await
        .expect("sentinelctl finished within 60 s")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

async fn ctl(cp: &Cp, args: &[&str]) -> Run {
    run_with(command(cp, ADMIN), args).await
}

const POLICY: &str = r#"
roles:
  - name: ops
    allow: ["everything/*"]
    deny: ["everything/trigger-*"]
    rate_limits:
      - per_second: 5.0
        burst: 10
backends:
  - name: everything
    url: http://127.0.0.1:3001/mcp
    headers:
      Authorization: Bearer upstream-secret-value
"#;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// The value after `name:` in `key: value` output.
fn field<'a>(stdout: &'a str, name: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no '{name}:' in {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_lifecycle_shows_the_secret_only_on_create_and_rotate() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policy.yaml", POLICY);
    ctl(&cp, &["policy", "apply", "-f", &file]).await.ok();

    let created = ctl(
        &cp,
        &[
            "keys",
            "create",
            "--role",
            "ops",
            "--owner",
            "alice",
            "--description",
            "ci bot",
            "--expires-in",
            "30d",
        ],
    )
    .await
    .ok();
    let id = field(&created.stdout, "id").to_string();
    let secret = field(&created.stdout, "secret").to_string();
    assert!(secret.starts_with("sntl_"), "{created:#?}");
    assert!(
        created.stderr.contains("only time the secret is shown"),
        "{created:#?}"
    );
    assert_eq!(field(&created.stdout, "status"), "active");
    assert_ne!(field(&created.stdout, "expires"), "never");

    let list = ctl(&cp, &["keys", "list"]).await.ok();
    assert!(list.stdout.starts_with("ID "), "{list:#?}");
    assert!(list.stdout.contains(&id) && list.stdout.contains("alice"));
    let got = ctl(&cp, &["keys", "get", &id, "-o", "json"]).await.ok();
    let v = got.json();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["role"], "ops");
    assert_eq!(v["description"], "ci bot");
    assert!(v.get("secret").is_none());

    let rotated = ctl(
        &cp,
        &["keys", "rotate", &id, "--grace", "60s", "-o", "json"],
    )
    .await
    .ok();
    let r = rotated.json();
    let new_id = r["key"]["id"].as_str().unwrap().to_string();
    let new_secret = r["secret"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    assert_ne!(new_secret, secret);
    assert_eq!(r["key"]["rotated_from"], id.as_str());
    assert!(rotated.stderr.contains("only time the secret is shown"));

    let revoked = ctl(&cp, &["keys", "revoke", &new_id]).await.ok();
    assert!(revoked.stdout.contains("revoked key"), "{revoked:#?}");
    let active = ctl(&cp, &["keys", "list", "-o", "json"]).await.ok();
    let ids: Vec<String> = active
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.contains(&new_id), "{active:#?}");
    let all = ctl(&cp, &["keys", "list", "--all"]).await.ok();
    let line = all.stdout.lines().find(|l| l.starts_with(&new_id)).unwrap();
    assert!(line.contains("revoked"), "{all:#?}");

    // The secrets appear nowhere but in the create and rotate answers.
    for run in [&list, &got, &revoked, &active, &all] {
        for s in [&secret, &new_secret] {
            assert!(!run.stdout.contains(s.as_str()), "secret leaked: {run:#?}");
            assert!(!run.stderr.contains(s.as_str()), "secret leaked: {run:#?}");
        }
    }

    let missing = ctl(&cp, &["keys", "get", "nope"]).await.failed(1);
    assert!(missing.stderr.contains("not found"), "{missing:#?}");
    let bad = ctl(
        &cp,
        &["keys", "create", "--role", "ops", "--expires-in", "soon"],
    )
    .await
    .failed(1);
    assert!(bad.stderr.contains("--expires-in"), "{bad:#?}");
    let ghost = ctl(&cp, &["keys", "create", "--role", "ghost"])
        .await
        .failed(1);
    assert!(ghost.stderr.contains("ghost"), "{ghost:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_apply_diff_dry_run_and_export_round_trip() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policy.yaml", POLICY);

    let applied = ctl(&cp, &["policy", "apply", "-f", &file]).await.ok();
    assert!(applied.stdout.contains("+ role ops"), "{applied:#?}");
    assert!(
        applied.stdout.contains("+ backend everything"),
        "{applied:#?}"
    );
    assert!(
        applied.stderr.contains("applied: policy version"),
        "{applied:#?}"
    );

    let same = ctl(&cp, &["policy", "diff", "-f", &file]).await.ok();
    assert_eq!(same.stdout, "", "{same:#?}");
    assert!(same.stderr.contains("no changes"), "{same:#?}");
    let version = ctl(&cp, &["policy", "get", "-o", "json"]).await.ok().json()["version"]
        .as_u64()
        .unwrap();

    // A changed file: diff and dry run show the change and change nothing.
    let changed = POLICY.to_string() + "  - name: docs\n    url: http://127.0.0.1:3002/mcp\n";
    let changed = changed.replace(
        "backends:",
        "  - name: reader\n    allow: [\"everything/echo\"]\nbackends:",
    );
    let file2 = write(dir.path(), "policy2.yml", &changed);
    let diff = ctl(&cp, &["policy", "diff", "-f", &file2]).await.ok();
    assert_eq!(diff.stdout, "+ role reader\n+ backend docs\n", "{diff:#?}");
    ctl(&cp, &["policy", "diff", "-f", &file2, "--exit-code"])
        .await
        .failed(1);
    let dry = ctl(&cp, &["policy", "apply", "-f", &file2, "--dry-run"])
        .await
        .ok();
    assert!(dry.stdout.contains("+ role reader"), "{dry:#?}");
    assert!(dry.stderr.contains("dry run"), "{dry:#?}");
    let after = ctl(&cp, &["policy", "get", "-o", "json"]).await.ok().json();
    assert_eq!(after["version"].as_u64().unwrap(), version);
    assert_eq!(after["spec"]["roles"].as_array().unwrap().len(), 1);
    ctl(&cp, &["policy", "diff", "-f", &file2]).await.ok();
    let table = ctl(&cp, &["policy", "get"]).await.ok();
    assert!(table.stdout.contains("everything/*"), "{table:#?}");
    assert!(
        !table.stdout.contains("upstream-secret-value"),
        "{table:#?}"
    );

    // An invalid file is refused, naming the field; nothing changes.
    let bad = POLICY.replace("allow: [\"everything/*\"]", "allow: [\"[\"]");
    let bad = write(dir.path(), "bad.yaml", &bad);
    let refused = ctl(&cp, &["policy", "apply", "-f", &bad]).await.failed(1);
    assert!(refused.stderr.contains("roles[0].allow[0]"), "{refused:#?}");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:#?}");
    let typo = write(
        dir.path(),
        "typo.toml",
        "[[roles]]\nname = 'ops'\nalow = []\n",
    );
    let refused = ctl(&cp, &["policy", "diff", "-f", &typo]).await.failed(1);
    assert!(
        refused.stderr.contains("alow") && refused.stderr.contains("typo.toml"),
        "{refused:#?}"
    );
    // `-f -` reads YAML from stdin.
    let mut c = command(&cp, ADMIN);
    c.args(["policy", "diff", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, changed.as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let piped = child.wait_with_output().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&piped.stdout),
        "+ role reader\n+ backend docs\n"
    );
    let unknown = write(dir.path(), "policy.txt", POLICY);
    let refused = ctl(&cp, &["policy", "apply", "-f", &unknown])
        .await
        .failed(1);
    assert!(refused.stderr.contains("format"), "{refused:#?}");

    // Export round-trips through apply with no change, in both formats;
    // the backend's secret header stays redacted and stays stored.
    ctl(&cp, &["policy", "apply", "-f", &file2]).await.ok();
    for name in ["export.yaml", "export.toml"] {
        let path = dir.path().join(name);
        let path = path.to_str().unwrap();
        ctl(&cp, &["policy", "export", "-f", path]).await.ok();
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains("upstream-secret-value"), "{text}");
        let back = ctl(&cp, &["policy", "apply", "-f", path]).await.ok();
        assert_eq!(back.stdout, "", "{name}: {back:#?}");
        assert!(back.stderr.contains("no changes"), "{back:#?}");
    }
    let stdout = ctl(&cp, &["policy", "export", "--format", "toml"])
        .await
        .ok();
    assert!(stdout.stdout.contains("[[roles]]"), "{stdout:#?}");
    let stored = db.store.policy_spec().await.unwrap();
    let everything = stored
        .backends
        .iter()
        .find(|b| b.name == "everything")
        .unwrap();
    assert_eq!(
        everything.headers["Authorization"],
        "Bearer upstream-secret-value"
    );
}

/// A sealed hash chain of `n` events from `proxy`, every third forbidden.
fn chain(proxy: &str, epoch: u64, n: u64) -> Vec<AuditEvent> {
    let mut prev = Vec::new();
    (1..=n)
        .map(|seq| {
            let id = uuid::Uuid::now_v7();
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            let mut ev = AuditEvent {
                event_id: id.to_string(),
                request_id: format!("{proxy}-req-{seq}"),
                timestamp_us: secs as i64 * 1_000_000 + (nanos / 1000) as i64,
                proxy_id: proxy.into(),
                epoch,
                sequence: seq,
                subject: "alice".into(),
                role: "ops".into(),
                api_key_id: "key1".into(),
                auth_method: "api_key".into(),
                mcp_method: "tools/call".into(),
                tool: if seq % 2 == 0 { "echo" } else { "get-sum" }.into(),
                backend: "everything".into(),
                arguments: r#"{"message":"hi"}"#.into(),
                outcome: if seq % 3 == 0 {
                    Outcome::Forbidden
                } else {
                    Outcome::Ok
                } as i32,
                http_status: if seq % 3 == 0 { 403 } else { 200 },
                latency_us: 1234,
                decision: "{}".into(),
                ..Default::default()
            };
            seal(&mut ev, &prev);
            prev = ev.hash.clone();
            ev
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_tail_export_verify_and_gaps() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    db.store
        .ingest_batch("proxy-1", chain("proxy-1", 1, 6))
        .await
        .unwrap();

    let all = ctl(&cp, &["audit", "query"]).await.ok();
    let lines: Vec<&str> = all.stdout.lines().collect();
    assert!(lines[0].starts_with("TIME "), "{all:#?}");
    assert_eq!(lines.len(), 7, "{all:#?}");
    // Newest first.
    assert!(lines[1].contains("proxy-1-req-6"), "{all:#?}");
    assert!(lines[1].contains("everything/echo"), "{all:#?}");

    let forbidden = ctl(
        &cp,
        &["audit", "query", "--outcome", "forbidden", "-o", "json"],
    )
    .await
    .ok()
    .json();
    let events = forbidden["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e["outcome"] == "forbidden"));
    let by_tool = ctl(
        &cp,
        &[
            "audit",
            "query",
            "--tool",
            "everything/echo",
            "--since",
            "1h",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(by_tool["events"].as_array().unwrap().len(), 3);
    let none = ctl(&cp, &["audit", "query", "--subject", "mallory"])
        .await
        .ok();
    assert_eq!(none.stdout, "");
    assert!(none.stderr.contains("no events"));

    let page = ctl(&cp, &["audit", "query", "--limit", "2", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["more"], true);
    let hint = ctl(&cp, &["audit", "query", "--limit", "2"]).await.ok();
    assert!(hint.stderr.contains("--all"), "{hint:#?}");
    let everything = ctl(&cp, &["audit", "query", "--all", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(everything["events"].as_array().unwrap().len(), 6);
    assert_eq!(everything["more"], false);
    let range = ctl(
        &cp,
        &[
            "audit",
            "query",
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2000-01-02T00:00:00Z",
        ],
    )
    .await
    .ok();
    assert_eq!(range.stdout, "");
    let bad = ctl(&cp, &["audit", "query", "--from", "yesterday"])
        .await
        .failed(1);
    assert!(bad.stderr.contains("--from"), "{bad:#?}");

    let ndjson = ctl(&cp, &["audit", "export", "--format", "ndjson"])
        .await
        .ok();
    let rows: Vec<serde_json::Value> = ndjson
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0]["request_id"], "proxy-1-req-6");
    let csv = ctl(
        &cp,
        &["audit", "export", "--format", "csv", "--outcome", "ok"],
    )
    .await
    .ok();
    let csv_lines: Vec<&str> = csv.stdout.lines().collect();
    assert!(csv_lines[0].starts_with("event_id,"), "{csv:#?}");
    assert_eq!(csv_lines.len(), 1 + 4, "{csv:#?}");

    let tail = ctl(&cp, &["audit", "tail", "-n", "3"]).await.ok();
    let tail_lines: Vec<&str> = tail.stdout.lines().collect();
    assert_eq!(tail_lines.len(), 3, "{tail:#?}");
    // Oldest first, like tail(1).
    assert!(tail_lines[2].contains("proxy-1-req-6"), "{tail:#?}");

    // Following: the recent events, then new ones as they are committed.
    let mut c = command(&cp, ADMIN);
    c.args(["audit", "tail", "--follow", "-n", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), out.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.contains("proxy-1-req-6"), "{first}");
    db.store
        .ingest_batch("proxy-2", chain("proxy-2", 1, 2))
        .await
        .unwrap();
    for want in ["proxy-2-req-1", "proxy-2-req-2"] {
        let l = tokio::time::timeout(Duration::from_secs(20), out.next_line())
            .await
            .expect("a live event within 20 s")
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["request_id"], want, "{l}");
    }
    child.start_kill().unwrap();
    let _ = child.wait().await;

    let verified = ctl(&cp, &["audit", "verify"]).await.ok();
    assert!(
        verified.stdout.contains("ok: 2 chain(s), 8 event(s)"),
        "{verified:#?}"
    );
    let gaps = ctl(&cp, &["audit", "gaps"]).await.ok();
    assert!(gaps.stderr.contains("no gaps"), "{gaps:#?}");

    // A chain with a hole and a forged link: gaps lists the hole, verify
    // reports the tampering and exits 2.
    let mut forged = chain("proxy-3", 1, 4);
    forged.remove(1);
    forged[2].prev_hash = vec![7; 32];
    let prev = forged[2].prev_hash.clone();
    seal(&mut forged[2], &prev);
    db.store.ingest_batch("proxy-3", forged).await.unwrap();
    let gaps = ctl(&cp, &["audit", "gaps", "--proxy", "proxy-3"])
        .await
        .ok();
    assert!(gaps.stdout.contains("proxy-3"), "{gaps:#?}");
    let tampered = ctl(&cp, &["audit", "verify"]).await.failed(2);
    assert!(tampered.stdout.contains("TAMPERING"), "{tampered:#?}");
    let json = ctl(&cp, &["audit", "verify", "-o", "json"]).await.failed(2);
    assert_eq!(json.json()["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_near_gap_shows_what_surrounds_missing_records() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let evs = chain("proxy-7", 4, 6);
    // 1, 2 and 5 arrive; 3 and 4 are missing.
    db.store
        .ingest_batch(
            "proxy-7",
            vec![evs[0].clone(), evs[1].clone(), evs[4].clone()],
        )
        .await
        .unwrap();
    db.store
        .ingest_batch("proxy-8", chain("proxy-8", 1, 3))
        .await
        .unwrap();

    let near = ctl(&cp, &["audit", "query", "--near-gap"]).await.ok();
    let lines: Vec<&str> = near.stdout.lines().collect();
    assert!(lines[0].starts_with("TIME "), "{near:#?}");
    assert_eq!(lines.len(), 3, "{near:#?}");
    // Newest first: the event after the hole, then the one before it.
    assert!(lines[1].contains("proxy-7-req-5"), "{near:#?}");
    assert!(lines[1].contains("(after missing 3-4)"), "{near:#?}");
    assert!(lines[2].contains("proxy-7-req-2"), "{near:#?}");
    assert!(lines[2].contains("(then missing 3-4)"), "{near:#?}");
    let json = ctl(&cp, &["audit", "query", "--near-gap", "-o", "json"])
        .await
        .ok()
        .json();
    let events = json["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0]["borders_gaps"],
        serde_json::json!([{"from_seq": 3, "to_seq": 4}])
    );
    // With other filters, paging one event at a time.
    let paged = ctl(
        &cp,
        &[
            "audit",
            "query",
            "--near-gap",
            "--proxy",
            "proxy-7",
            "--limit",
            "1",
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(paged["events"].as_array().unwrap().len(), 1);
    assert_eq!(paged["more"], true);
    let ndjson = ctl(&cp, &["audit", "export", "--near-gap"]).await.ok();
    assert_eq!(ndjson.stdout.lines().count(), 2, "{ndjson:#?}");
    // The plain query marks the same events.
    let all = ctl(&cp, &["audit", "query", "--proxy", "proxy-7"])
        .await
        .ok();
    assert_eq!(all.stdout.matches("missing 3-4").count(), 2, "{all:#?}");
    let help = ctl(&cp, &["audit", "query", "--help"]).await.ok();
    assert!(help.stdout.contains("--near-gap"), "{help:#?}");

    // The records arrive: the gap closes and the filter finds nothing.
    db.store
        .ingest_batch("proxy-7", vec![evs[2].clone(), evs[3].clone()])
        .await
        .unwrap();
    let none = ctl(&cp, &["audit", "query", "--near-gap"]).await.ok();
    assert_eq!(none.stdout, "", "{none:#?}");
    assert!(none.stderr.contains("no events"), "{none:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn can_i_answers_with_the_reason_and_exit_code() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policy.yaml", POLICY);
    ctl(&cp, &["policy", "apply", "-f", &file]).await.ok();
    let key = ctl(&cp, &["keys", "create", "--role", "ops", "-o", "json"])
        .await
        .ok()
        .json()["key"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let yes = ctl(&cp, &["can-i", "--role", "ops", "everything/echo"])
        .await
        .ok();
    assert!(yes.stdout.starts_with("yes:"), "{yes:#?}");
    assert!(
        yes.stdout.contains("allowed by pattern 'everything/*'"),
        "{yes:#?}"
    );
    let no = ctl(&cp, &["can-i", "--role", "ops", "everything/trigger-long"])
        .await
        .failed(1);
    assert!(no.stdout.starts_with("no:"), "{no:#?}");
    assert!(
        no.stdout
            .contains("denied by pattern 'everything/trigger-*'"),
        "{no:#?}"
    );
    let other = ctl(&cp, &["can-i", "--role", "ops", "git/log"])
        .await
        .failed(1);
    assert!(other.stdout.contains("default deny"), "{other:#?}");
    assert!(other.stderr.contains("not in the policy"), "{other:#?}");
    let ghost = ctl(&cp, &["can-i", "--role", "ghost", "everything/echo"])
        .await
        .failed(1);
    assert!(ghost.stdout.contains("does not exist"), "{ghost:#?}");

    // By key, with the federated name agents see.
    let by_key = ctl(
        &cp,
        &["can-i", "--key", &key, "everything__echo", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(by_key["allowed"], true);
    assert_eq!(by_key["role"], "ops");
    assert_eq!(by_key["decisions"][0]["pattern"], "everything/*");
    let unknown = ctl(&cp, &["can-i", "--key", "nokey", "everything/echo"])
        .await
        .failed(1);
    assert!(unknown.stdout.contains("unknown"), "{unknown:#?}");
    ctl(&cp, &["keys", "revoke", &key]).await.ok();
    let revoked = ctl(&cp, &["can-i", "--key", &key, "everything/echo"])
        .await
        .failed(1);
    assert!(revoked.stdout.contains("revoked"), "{revoked:#?}");

    // A policy change is seen at once.
    let wider = POLICY.replace("deny: [\"everything/trigger-*\"]", "deny: []");
    let wider = write(dir.path(), "wider.yaml", &wider);
    ctl(&cp, &["policy", "apply", "-f", &wider]).await.ok();
    ctl(&cp, &["can-i", "--role", "ops", "everything/trigger-long"])
        .await
        .ok();

    let usage = ctl(&cp, &["can-i", "everything/echo"]).await.failed(64);
    assert!(usage.stderr.contains("--key"), "{usage:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_unreachable_server_fail_with_one_clear_line() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    for args in [
        &["keys", "list"][..],
        &["audit", "verify"][..],
        &["audit", "export"][..],
        &["fleet", "list"][..],
    ] {
        let r = run_with(command(&cp, "wrong-token-0123456789abcdef"), args)
            .await
            .failed(1);
        assert!(
            r.stderr.contains("invalid admin credential") && r.stderr.contains("SENTINEL_TOKEN"),
            "{args:?}: {r:#?}"
        );
        assert_eq!(r.stderr.lines().count(), 1, "{r:#?}");
        assert_eq!(r.stdout, "");
        assert!(!r.stderr.contains("wrong-token"), "token echoed: {r:#?}");
    }
    let mut c = command(&cp, "");
    c.env_remove("SENTINEL_TOKEN");
    let r = run_with(c, &["keys", "list"]).await.failed(1);
    assert!(r.stderr.contains("no admin token"), "{r:#?}");

    // Nothing listening: a port that was just free.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = free.local_addr().unwrap();
    drop(free);
    let grpc = format!("http://{dead}");
    let r = ctl(&cp, &["--addr", &grpc, "keys", "list"]).await.failed(1);
    assert!(
        r.stderr.contains("cannot reach the control plane") && r.stderr.contains(&grpc),
        "{r:#?}"
    );
    assert_eq!(r.stderr.lines().count(), 1, "{r:#?}");
    let r = ctl(&cp, &["--http", &grpc, "audit", "export"])
        .await
        .failed(1);
    assert!(r.stderr.contains("cannot reach"), "{r:#?}");
    let r = ctl(&cp, &["--addr", "not a url", "keys", "list"])
        .await
        .failed(1);
    assert!(r.stderr.contains("--addr"), "{r:#?}");

    // Join tokens are shown once.
    let jt = ctl(&cp, &["join-tokens", "create", "--description", "edge"])
        .await
        .ok();
    assert!(!field(&jt.stdout, "token").is_empty(), "{jt:#?}");
    assert!(jt.stderr.contains("only time"), "{jt:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_lists_proxies_with_versions_heartbeats_and_backlog() {
    use sentinel_shared::proto::policy_sync_client::PolicySyncClient;
    use sentinel_shared::proto::{self as pb, proxy_message};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::ReceiverStream;

    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let empty = ctl(&cp, &["fleet", "list"]).await.ok();
    assert!(empty.stdout.contains("no proxies"), "{empty:#?}");

    // A proxy's end of the sync stream: hello, the snapshot, ack, heartbeat.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let send = |m| pb::ProxyMessage { msg: Some(m) };
    tx.send(send(proxy_message::Msg::Hello(pb::Hello {
        proxy_id: "edge-1".into(),
        build_version: "9.9.9".into(),
        join_token: "join-token-for-cli-tests-0123456789".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let ch = Channel::from_shared(format!("http://{}", cp.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut stream = PolicySyncClient::new(ch)
        .sync(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let Some(pb::control_message::Msg::Snapshot(snap)) = first.msg else {
        panic!("a snapshot first")
    };
    tx.send(send(proxy_message::Msg::Ack(pb::PolicyAck {
        version: snap.version,
    })))
    .await
    .unwrap();
    tx.send(send(proxy_message::Msg::Heartbeat(pb::Heartbeat {
        stats: Some(pb::ProxyStats {
            audit_backlog: 42,
            policy_version: snap.version,
            ..Default::default()
        }),
    })))
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let proxy = loop {
        let v = ctl(&cp, &["fleet", "list", "-o", "json"]).await.ok().json();
        let p = v["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["proxy_id"] == "edge-1")
            .cloned();
        if let Some(p) = p
            && p["audit_backlog"] == 42
            && p["acked_version"] == snap.version
        {
            break p;
        }
        assert!(Instant::now() < deadline, "fleet never showed edge-1: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(proxy["connected"], true);
    assert_eq!(proxy["in_sync"], true);
    assert_eq!(proxy["build_version"], "9.9.9");

    let table = ctl(&cp, &["fleet", "list"]).await.ok();
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("edge-1"))
        .unwrap_or_else(|| panic!("{table:#?}"));
    let v = snap.version;
    assert!(row.contains("yes") && row.contains("9.9.9"), "{row}");
    assert!(
        row.contains(&format!("{v}/{v}")) && row.contains("42"),
        "{row}"
    );
    assert!(row.contains("ago"), "{row}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_resumes_across_a_control_plane_restart() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    let mut events = chain("proxy-1", 1, 4);
    let down = events.split_off(2);
    let live = events.split_off(1);
    db.store.ingest_batch("proxy-1", events).await.unwrap();

    let mut c = command(&cp, ADMIN);
    c.args(["audit", "tail", "--follow", "-n", "1", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        let l = tokio::time::timeout(Duration::from_secs(30), out.next_line())
            .await
            .expect("a live event within 30 s")
            .unwrap()
            .expect("the tail is still running");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        v["request_id"].as_str().unwrap().to_string()
    };
    // The recent event is read after the live stream opened: once it is
    // shown, the stream is there to see the next.
    assert_eq!(next().await, "proxy-1-req-1");
    db.store.ingest_batch("proxy-1", live).await.unwrap();
    assert_eq!(next().await, "proxy-1-req-2");

    // The control plane goes away; events are committed while it is down
    // (through another instance, say); it comes back on the same ports.
    let (grpc, http) = (cp.grpc, cp.http);
    cp.stop().await;
    db.store.ingest_batch("proxy-1", down).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _cp = start_cp_on(&db, rebind(grpc).await, rebind(http).await).await;
    assert_eq!(next().await, "proxy-1-req-3");
    assert_eq!(next().await, "proxy-1-req-4");
    child.start_kill().unwrap();
    let done = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(stderr.contains("reconnecting"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pages_too_big_for_one_grpc_message_are_read_in_halves() {
    let db = TestDb::new().await;
    let cp = start_cp(&db).await;
    // 80 events of a megabyte of arguments each: more than the CLI accepts
    // in one message.
    let blob = format!("{{\"blob\":\"{}\"}}", "x".repeat(1_000_000));
    let mut events = chain("big", 1, 80);
    let mut prev = Vec::new();
    for ev in &mut events {
        ev.arguments = blob.clone();
        seal(ev, &prev);
        prev = ev.hash.clone();
    }
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(10));
        db.store.ingest_batch("big", events).await.unwrap();
        events = rest;
    }
    let r = ctl(&cp, &["audit", "query", "--limit", "80"]).await.ok();
    assert_eq!(r.stdout.lines().count(), 1 + 80, "{}", r.stderr);
    assert!(r.stdout.lines().nth(1).unwrap().contains("big-req-80"));
}
