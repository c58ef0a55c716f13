//! Fault tests of the audit guarantee, with real processes: a steady load of
//! tool calls goes through a proxy to an upstream that logs every call it
//! receives; something fails during the load; then the upstream's log is
//! compared with the audit table. Every call the upstream saw must be in
//! Postgres exactly once: lost 0, duplicates 0, unexplained gaps 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sentinel_control_plane::local_pg::LocalPg;
use sentinel_control_plane::testing::TestDb;
use sentinel_tests::peers::free_port;
use sentinel_tests::procs::{CpProc, Load, LoadReport, LoggingUpstream, ProxyProc, Relay, bin};
use sqlx::PgPool;

/// One fault scenario's processes and files.
struct Rig {
    dir: tempfile::TempDir,
    upstream: LoggingUpstream,
    cp: CpProc,
    key: String,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Control plane on `database_url`, logging upstream, policy and a key.
async fn rig(database_url: String) -> Rig {
    sentinel_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let upstream = blocking(move || LoggingUpstream::start(&d)).await;
    let d = dir.path().to_path_buf();
    let cp = blocking(move || CpProc::start(&database_url, &d)).await;
    let mut admin = cp.admin().await;
    admin.put_http_backend("logged", &upstream.url()).await;
    admin.put_role("loader", &["logged/*"], &[]).await;
    let (_, key, _) = admin.create_key("loader", "load-generator").await;
    Rig {
        dir,
        upstream,
        cp,
        key,
    }
}

impl Rig {
    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    async fn proxy(&self, cp_url: &str, extra: &str) -> ProxyProc {
        let (u, d, e) = (cp_url.to_string(), self.path(), extra.to_string());
        blocking(move || ProxyProc::start("proxy-f", &u, &d, &e)).await
    }

    fn load(&self, proxy: &ProxyProc, rate: u64, max_time: Duration) -> Load {
        let url = proxy.url();
        Load::start(
            Arc::new(move || url.clone()),
            &self.key,
            rate,
            4,
            100_000,
            max_time,
        )
    }
}

/// What the comparison found.
#[derive(Debug)]
struct Figures {
    upstream_saw: usize,
    audited: usize,
    unknown: i64,
    lost: usize,
    duplicates: usize,
    gaps: i64,
}

/// Waits until every call the upstream saw is audited (bounded), then
/// compares and prints.
async fn compare(
    name: &str,
    pool: &PgPool,
    upstream: &LoggingUpstream,
    report: &LoadReport,
    logs: &[&PathBuf],
) -> Figures {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen: BTreeSet<u64> = upstream.seen().into_iter().collect();
        let audited = audited_ns(pool).await;
        let missing = seen.iter().filter(|n| !audited.contains_key(n)).count();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen_list = upstream.seen();
    let seen: BTreeSet<u64> = seen_list.iter().copied().collect();
    assert_eq!(seen.len(), seen_list.len(), "the load sends each n once");
    let audited = audited_ns(pool).await;
    let (unknown,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM audit_events WHERE outcome = 'unknown'")
            .fetch_one(pool)
            .await
            .expect("count unknown");
    let (gaps,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_gaps")
        .fetch_one(pool)
        .await
        .expect("count gaps");
    let f = Figures {
        upstream_saw: seen.len(),
        audited: audited.len(),
        unknown,
        lost: seen.iter().filter(|n| !audited.contains_key(n)).count(),
        duplicates: audited.values().filter(|&&c| c > 1).count(),
        gaps,
    };
    println!(
        "[{name}] sent {} ok {} refused(503) {} other {} | upstream saw {} audited {} (unknown {}) | lost {} duplicates {} gaps {}",
        report.sent,
        report.ok.len(),
        report.refused_503.len(),
        report.other,
        f.upstream_saw,
        f.audited,
        f.unknown,
        f.lost,
        f.duplicates,
        f.gaps
    );
    if f.lost > 0 || f.gaps > 0 {
        for log in logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("policy applied"))
                .collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            println!("--- {} (last lines)\n{tail}", log.display());
        }
    }
    assert!(
        report.ok.iter().all(|n| seen.contains(n)),
        "an answered call the upstream never saw"
    );
    assert!(f.upstream_saw > 0, "the load reached the upstream");
    assert_eq!(
        f.lost, 0,
        "calls the upstream saw but Postgres does not have"
    );
    assert_eq!(f.duplicates, 0);
    assert_eq!(f.gaps, 0, "unexplained sequence gaps");
    f
}

/// n -> number of tools/call audit rows carrying it.
async fn audited_ns(pool: &PgPool) -> BTreeMap<u64, usize> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT arguments FROM audit_events WHERE mcp_method = 'tools/call'")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let mut m = BTreeMap::new();
    for (args,) in rows {
        if let Some(n) = serde_json::from_str::<serde_json::Value>(&args)
            .ok()
            .and_then(|v| v.get("n").and_then(|n| n.as_u64()))
        {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_during_load_and_back_30s_later() {
    let db = TestDb::new().await;
    let mut rig = rig(db.url.clone()).await;
    let proxy = rig.proxy(&rig.cp.grpc_url(), "").await;
    let load = rig.load(&proxy, 20, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.cp.proc.kill9();
    let killed_at = load.sent();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = load.sent() - killed_at;
    let cp = std::mem::replace(&mut rig.cp, placeholder_cp());
    rig.cp = blocking(move || {
        let mut cp = cp;
        cp.restart();
        cp
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    println!("calls while the control plane was down: {during}");
    assert!(
        during > 100,
        "the proxy kept serving while the control plane was down"
    );
    compare(
        "control plane killed 30 s",
        &db.pool,
        &rig.upstream,
        &report,
        &[&proxy.log, &rig.cp.log],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_load() {
    // A cluster of this test's own, so restarting it disturbs no one else.
    let pg_dir = sentinel_tests::procs::target_dir()
        .join(format!("fault-pg-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let d = pg_dir.clone();
    let pg = blocking(move || LocalPg::start(&d, port, false).expect("start postgres")).await;
    let url = pg.url();
    let rig = rig(url.clone()).await;
    let pool = PgPool::connect(&url).await.expect("connect");
    let proxy = rig.proxy(&rig.cp.grpc_url(), "").await;
    let load = rig.load(&proxy, 20, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(4)).await;
    pool.close().await;
    let p = pg.clone();
    blocking(move || p.stop().expect("stop postgres")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = pg_dir.clone();
    let pg = blocking(move || LocalPg::start(&d, port, false).expect("restart postgres")).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    let pool = PgPool::connect(&url).await.expect("reconnect");
    compare(
        "postgres restarted",
        &pool,
        &rig.upstream,
        &report,
        &[&proxy.log, &rig.cp.log],
    )
    .await;
    pool.close().await;
    drop(proxy);
    drop(rig);
    let _ = blocking(move || pg.stop()).await;
    let _ = std::fs::remove_dir_all(&pg_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sigkilled_during_load_and_restarted() {
    let db = TestDb::new().await;
    let rig = rig(db.url.clone()).await;
    let mut proxy = rig.proxy(&rig.cp.grpc_url(), "").await;
    let load = rig.load(&proxy, 30, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.proc.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let proxy = blocking(move || {
        proxy.restart();
        proxy
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    let f = compare(
        "proxy SIGKILL",
        &db.pool,
        &rig.upstream,
        &report,
        &[&proxy.log, &rig.cp.log],
    )
    .await;
    // Both boots' chains arrived and verify.
    let (epochs,): (i64,) = sqlx::query_as("SELECT count(DISTINCT epoch) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .expect("epochs");
    assert_eq!(epochs, 2);
    assert!(f.audited >= f.upstream_saw);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_between_commit_and_ack() {
    let db = TestDb::new().await;
    let rig = rig(db.url.clone()).await;
    let target = format!("127.0.0.1:{}", rig.cp.grpc_port)
        .parse()
        .expect("addr");
    let relay = Relay::start(target).await;
    let proxy = rig.proxy(&format!("http://{}", relay.addr), "").await;
    let load = rig.load(&proxy, 40, Duration::from_secs(60));
    // Cut every connection to the control plane again and again: some cuts
    // fall after a batch was committed and before its ack was read.
    let mut cuts = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(120)).await;
        relay.cut();
        cuts += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    println!("connections cut {cuts} times");
    compare(
        "connection cut before ack",
        &db.pool,
        &rig.upstream,
        &report,
        &[&proxy.log, &rig.cp.log],
    )
    .await;
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_calls_and_forwards_nothing_unrecorded() {
    let db = TestDb::new().await;
    let mut rig = rig(db.url.clone()).await;
    let proxy = rig
        .proxy(
            &rig.cp.grpc_url(),
            "max_bytes = 65536\non_full = \"reject\"",
        )
        .await;
    rig.cp.proc.kill9();
    let load = rig.load(&proxy, 40, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if load.sent() > 400 || Instant::now() > deadline {
            break;
        }
    }
    // Still alive and answering what does not need the spool.
    let health = reqwest::get(format!("http://127.0.0.1:{}/healthz", proxy.port))
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    let report = load.finish().await;
    assert!(
        !report.refused_503.is_empty(),
        "the spool filled up: {report:?}"
    );
    let seen: BTreeSet<u64> = rig.upstream.seen().into_iter().collect();
    let forwarded_refused = report
        .refused_503
        .iter()
        .filter(|n| seen.contains(n))
        .count();
    assert_eq!(forwarded_refused, 0, "a refused call reached the upstream");
    let cp = std::mem::replace(&mut rig.cp, placeholder_cp());
    rig.cp = blocking(move || {
        let mut cp = cp;
        cp.restart();
        cp
    })
    .await;
    compare(
        "spool full, reject",
        &db.pool,
        &rig.upstream,
        &report,
        &[&proxy.log, &rig.cp.log],
    )
    .await;
    drop(proxy);
}

#[tokio::test]
async fn verify_reports_a_flipped_audit_row() {
    let db = TestDb::new().await;
    let mut prev = Vec::new();
    let events: Vec<_> = (1..=5)
        .map(|seq| {
            let mut ev = sentinel_shared::proto::AuditEvent {
                event_id: String::new(),
                timestamp_us: sentinel_shared::now_us(),
                proxy_id: "proxy-v".into(),
                epoch: 1,
                sequence: seq,
                mcp_method: "tools/call".into(),
                tool: "echo".into(),
                arguments: "{\"message\":\"hi\"}".into(),
                outcome: sentinel_shared::proto::Outcome::Ok as i32,
                ..Default::default()
            };
            ev.event_id = sentinel_shared::audit::event_id_at(ev.timestamp_us);
            sentinel_shared::audit::seal(&mut ev, &prev);
            prev = ev.hash.clone();
            ev
        })
        .collect();
    db.store
        .ingest_batch("proxy-v", events)
        .await
        .expect("ingest");
    let run = |url: String| {
        std::process::Command::new(bin("sentinel-control-plane"))
            .arg("verify")
            .env("DATABASE_URL", url)
            .env(
                "SENTINEL_CP_ADMIN_TOKENS",
                "[\"admin-token-for-verify-0123456\"]",
            )
            .output()
            .expect("run verify")
    };
    let u = db.url.clone();
    let clean = blocking(move || run(u)).await;
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    // Someone with superuser rights edits a row behind the triggers.
    let mut tx = db.pool.begin().await.expect("tx");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("replica role");
    sqlx::query("UPDATE audit_events SET arguments = '{\"message\":\"bye\"}' WHERE sequence = 3")
        .execute(&mut *tx)
        .await
        .expect("flip");
    tx.commit().await.expect("commit");
    let u = db.url.clone();
    let out = blocking(move || run(u)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("sequence 3"), "{stdout}");
}

/// A stand-in while the real one is moved into a blocking task.
fn placeholder_cp() -> CpProc {
    CpProc {
        proc: sentinel_tests::procs::Proc { child: None },
        database_url: String::new(),
        grpc_port: 0,
        http_port: 0,
        log: Path::new("/dev/null").to_path_buf(),
    }
}

/// Gaps are a metric of the running control plane, and a filled gap clears
/// it: `sentinel_audit_gaps_open` and `sentinel_audit_gap_events_missing`
/// on `/metrics` of the real binary.
#[tokio::test]
async fn open_gaps_are_a_metric_that_clears_when_filled() {
    sentinel_tests::init();
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, d) = (db.url.clone(), dir.path().to_path_buf());
    let cp = blocking(move || CpProc::start(&url, &d)).await;
    let mut prev = Vec::new();
    let mut events: BTreeMap<u64, sentinel_shared::proto::AuditEvent> = (1..=5)
        .map(|seq| {
            let mut ev = sentinel_shared::proto::AuditEvent {
                timestamp_us: sentinel_shared::now_us(),
                proxy_id: "proxy-g".into(),
                epoch: 1,
                sequence: seq,
                mcp_method: "tools/call".into(),
                tool: "echo".into(),
                outcome: sentinel_shared::proto::Outcome::Ok as i32,
                ..Default::default()
            };
            ev.event_id = sentinel_shared::audit::event_id_at(ev.timestamp_us);
            sentinel_shared::audit::seal(&mut ev, &prev);
            prev = ev.hash.clone();
            (seq, ev)
        })
        .collect();
    let metrics_url = format!("http://127.0.0.1:{}/metrics", cp.http_port);
    for (seqs, want) in [
        (&[1u64, 2, 5][..], (1.0, 2.0)),
        (&[4], (1.0, 1.0)),
        (&[3], (0.0, 0.0)),
    ] {
        let batch = seqs.iter().filter_map(|s| events.remove(s)).collect();
        db.store
            .ingest_batch("proxy-g", batch)
            .await
            .expect("ingest");
        let text = reqwest::get(&metrics_url)
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        };
        let got = (
            value("sentinel_audit_gaps_open"),
            value("sentinel_audit_gap_events_missing"),
        );
        assert_eq!(got, want, "after ingesting {seqs:?}");
    }
    drop(cp);
}
