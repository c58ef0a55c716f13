//! What durability costs: attempts appended per second and the latency of
//! one `attempt` (until it is as durable as configured), for `fsync` (group
//! commit) and `os`, at several concurrencies, side by side in one run.
//!
//! `cargo bench -p sentinel-spool --bench append` (bounded: a few seconds
//! per row). Set `SPOOL_BENCH_DIR` to measure another disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sentinel_shared::proto::AuditEvent;
use sentinel_spool::{Durability, Spool, SpoolConfig};

const ROUNDS: usize = 5;

fn event() -> AuditEvent {
    let ts = sentinel_shared::now_us();
    AuditEvent {
        event_id: sentinel_shared::audit::event_id_at(ts),
        request_id: "01J0000000000000000000000".into(),
        timestamp_us: ts,
        subject: "alice@example.com".into(),
        role: "developer".into(),
        api_key_id: "AbCdEfGhIjKl".into(),
        auth_method: "api_key".into(),
        mcp_method: "tools/call".into(),
        tool: "demo__echo".into(),
        backend: "demo".into(),
        // About a 1 KB call, as in the proxy benchmark.
        arguments: format!("{{\"message\":\"{}\"}}", "x".repeat(1000)),
        ..Default::default()
    }
}

/// (attempts/s, p50 us, p99 us) for `calls` attempts at `conc` concurrency.
async fn run(durability: Durability, conc: usize, calls: usize) -> (f64, f64, f64) {
    let base = std::env::var("SPOOL_BENCH_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/spool-bench").to_string()
    });
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let mut cfg = SpoolConfig::new(dir.path(), "bench");
    cfg.durability = durability;
    let spool = Spool::open(cfg).unwrap();
    let template = Arc::new(event());
    let started = Instant::now();
    let per = calls / conc;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (s, t) = (spool.clone(), template.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t0 = Instant::now();
                let seq = s.attempt((*t).clone()).await.unwrap();
                lat.push(t0.elapsed());
                s.outcome(seq, (*t).clone());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(calls);
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    ((per * conc) as f64 / secs, pct(0.50), pct(0.99))
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "spool append, {ROUNDS} rounds each, median [min..max]; 1 KB events; attempt + outcome per call"
    );
    println!(
        "{:<6} {:>5} {:>26} {:>24} {:>24}",
        "mode", "conc", "attempts/s", "p50 us", "p99 us"
    );
    for conc in [1usize, 16, 64] {
        for (name, d) in [("fsync", Durability::Fsync), ("os", Durability::Os)] {
            // Fewer calls where each waits for its own fsync.
            let calls = if conc == 1 && d == Durability::Fsync {
                300
            } else {
                6400
            };
            let mut rate = Vec::new();
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            for _ in 0..ROUNDS {
                let (r, a, b) = run(d, conc, calls).await;
                rate.push(r);
                p50.push(a);
                p99.push(b);
            }
            let (r, rmin, rmax) = median(rate);
            let (a, amin, amax) = median(p50);
            let (b, bmin, bmax) = median(p99);
            println!(
                "{name:<6} {conc:>5} {:>26} {:>24} {:>24}",
                format!("{r:.0} [{rmin:.0}..{rmax:.0}]"),
                format!("{a:.0} [{amin:.0}..{amax:.0}]"),
                format!("{b:.0} [{bmin:.0}..{bmax:.0}]"),
            );
        }
    }
}
