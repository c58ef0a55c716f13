//! The spool and its shipper against the real control plane and Postgres:
//! everything appended reaches the audit table exactly once, through
//! restarts of either side, with orphaned attempts delivered as `unknown`.

#![allow(clippy::unwrap_used)] // a test fails loudly on any surprise

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sentinel_control_plane::config::Config;
use sentinel_control_plane::server::{self, Listeners};
use sentinel_control_plane::testing::TestDb;
use sentinel_shared::proto::{AuditEvent, Outcome};
use sentinel_spool::shipper::{self, ShipperConfig};
use sentinel_spool::{Spool, SpoolConfig};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const JOIN: &str = "join-token-for-tests-0123456789";

/// Starts a control plane on `grpc` (a fixed address, so it can come back
/// on the same one); the token stops it.
async fn start_cp(db: &TestDb, grpc: SocketAddr) -> CancellationToken {
    let mut config = Config {
        database_url: db.url.clone(),
        admin_tokens: vec!["admin-token-for-tests-0123456789".into()],
        join_tokens: vec![JOIN.into()],
        ..Config::default()
    };
    config.finish().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let grpc = loop {
        match tokio::net::TcpListener::bind(grpc).await {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {grpc}: {e}"),
        }
    };
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = server::run(config, Listeners { grpc, http }, None, s).await;
    });
    stop
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn event(n: u64) -> AuditEvent {
    let ts = sentinel_shared::now_us();
    AuditEvent {
        event_id: sentinel_shared::audit::event_id_at(ts),
        request_id: format!("req-{n}"),
        timestamp_us: ts,
        subject: "alice".into(),
        role: "dev".into(),
        mcp_method: "tools/call".into(),
        tool: "echo".into(),
        backend: "everything".into(),
        arguments: format!("{{\"n\":{n}}}"),
        ..Default::default()
    }
}

fn done(mut ev: AuditEvent) -> AuditEvent {
    ev.outcome = Outcome::Ok as i32;
    ev.http_status = 200;
    ev
}

async fn count(db: &TestDb, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&db.pool).await.unwrap();
    n
}

/// `n` events stored, each once, and no gap in any chain.
async fn assert_stored_once(db: &TestDb, n: i64) {
    assert_eq!(count(db, "SELECT count(*) FROM audit_events").await, n);
    assert_eq!(
        count(db, "SELECT count(DISTINCT event_id) FROM audit_events").await,
        n
    );
    assert_eq!(count(db, "SELECT count(*) FROM audit_gaps").await, 0);
}

async fn wait_drained(spool: &Spool, limit: Duration) {
    let deadline = Instant::now() + limit;
    while spool.stats().backlog > 0 {
        assert!(
            Instant::now() < deadline,
            "backlog not drained: {:?}",
            spool.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start_shipper(spool: &Spool, addr: SocketAddr) -> CancellationToken {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(shipper::run(
        spool.clone(),
        channel,
        ShipperConfig::new(JOIN),
        s.cancelled_owned(),
    ));
    stop
}

#[tokio::test]
async fn everything_arrives_once_and_orphaned_attempts_arrive_as_unknown() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let cfg = SpoolConfig::new(dir.path(), "proxy-s1");

    // Boot 1: 50 attempts, 40 finish, 10 are in flight when the process
    // dies; 5 refusals recorded whole. Nothing is shipped yet.
    {
        let spool = Spool::open(cfg.clone()).unwrap();
        for n in 0..50 {
            let ev = event(n);
            let seq = spool.attempt(ev.clone()).await.unwrap();
            if n % 5 != 0 {
                spool.outcome(seq, done(ev));
            }
        }
        for n in 50..55 {
            let mut ev = event(n);
            ev.outcome = Outcome::Forbidden as i32;
            spool.whole(ev);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Boot 2: the control plane is up; 20 more calls.
    let cp = start_cp(&db, addr).await;
    let spool = Spool::open(cfg.clone()).unwrap();
    assert_eq!(spool.epoch(), 2);
    let ship = start_shipper(&spool, addr);
    for n in 100..120 {
        let ev = event(n);
        let seq = spool.attempt(ev.clone()).await.unwrap();
        spool.outcome(seq, done(ev));
    }
    wait_drained(&spool, Duration::from_secs(20)).await;

    assert_eq!(count(&db, "SELECT count(*) FROM audit_events").await, 75);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_events WHERE outcome = 'unknown'"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_events WHERE outcome = 'forbidden'"
        )
        .await,
        5
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM audit_events WHERE NOT chain_ok").await,
        0
    );
    assert_eq!(count(&db, "SELECT count(*) FROM audit_gaps").await, 0);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT epoch) FROM audit_events").await,
        2
    );
    let store = sentinel_control_plane::store::Store::new(db.pool.clone());
    let report = store.verify_chains(None).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");

    // The segments of boot 1 are reclaimed once acked.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let segs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .count();
        if segs == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{segs} segments left; only the open one should remain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ship.cancel();
    cp.cancel();
}

#[tokio::test]
async fn delivery_resumes_after_the_control_plane_comes_back() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let spool = Spool::open(SpoolConfig::new(dir.path(), "proxy-s2")).unwrap();
    // The shipper starts while no control plane is there.
    let ship = start_shipper(&spool, addr);
    for n in 0..100 {
        let ev = event(n);
        let seq = spool.attempt(ev.clone()).await.unwrap();
        spool.outcome(seq, done(ev));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spool.stats().backlog, 100);

    let cp = start_cp(&db, addr).await;
    wait_drained(&spool, Duration::from_secs(20)).await;
    assert_eq!(count(&db, "SELECT count(*) FROM audit_events").await, 100);

    // Down again while calls go on; then back.
    cp.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 100..300 {
        let ev = event(n);
        let seq = spool.attempt(ev.clone()).await.unwrap();
        spool.outcome(seq, done(ev));
    }
    let cp = start_cp(&db, addr).await;
    wait_drained(&spool, Duration::from_secs(30)).await;
    assert_stored_once(&db, 300).await;
    ship.cancel();
    cp.cancel();
}

/// The shipper follows the writer across many small segments (it keeps the
/// one it reads open), and attempts stamped in place (durability `os`, as
/// the proxy appends them) arrive whole, once each, with their outcomes.
#[tokio::test]
async fn in_place_attempts_ship_across_rolling_segments() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut cfg = SpoolConfig::new(dir.path(), "proxy-s3");
    cfg.durability = sentinel_spool::Durability::Os;
    // A few records per segment: the writer rolls over about every tenth
    // call while the shipper reads behind it.
    cfg.segment_bytes = 4096;
    let spool = Spool::open(cfg).unwrap();
    let cp = start_cp(&db, addr).await;
    let ship = start_shipper(&spool, addr);
    for n in 0..400 {
        let mut ev = event(n);
        let seq = spool.attempt_in_place(&mut ev).await.unwrap();
        // Stamped as the record was written.
        assert_eq!((ev.sequence, ev.proxy_id.as_str()), (seq, "proxy-s3"));
        assert_eq!(ev.outcome, Outcome::Unknown as i32);
        spool.outcome(seq, done(ev));
        if n % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    wait_drained(&spool, Duration::from_secs(30)).await;
    assert_stored_once(&db, 400).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM audit_events WHERE outcome = 'ok'"
        )
        .await,
        400
    );
    ship.cancel();
    cp.cancel();
}
