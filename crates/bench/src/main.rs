//! `sentinel-bench`: Sentinel's benchmark harness. Every figure is measured
//! in one run against a baseline of the same run, and printed as a table and
//! as JSON. Everything binds 127.0.0.1; every loop is bounded.
//!
//! - `propagation`: time from an admin revoke returning to each of N policy
//!   sync streams receiving it (N = 10, 100, 1000), and end to end, to the
//!   first 401 a client of a real proxy sees.
//! - `ingest`: events/s the control plane commits from the ingest stream,
//!   against a raw `COPY` of the same rows into the same table.
//! - `overhead`: latency, throughput, CPU and memory of the proxy against
//!   the upstream alone and nginx, as separate processes (`overhead.rs`).
//!
//! Run with `cargo run --release -p sentinel-bench -- all` (or one name;
//! `--quick` for the CI smoke version).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops loudly

mod callgrind;
mod ingest;
mod load;
mod overhead;
mod procs;
mod propagation;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use sentinel_control_plane::config::Config;
use sentinel_control_plane::server::{self, Listeners};
use sentinel_control_plane::testing::TestDb;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "admin-token-for-benchmarks-012345";
pub const JOIN: &str = "join-token-for-benchmarks-0123456";

#[derive(Parser)]
#[command(
    name = "sentinel-bench",
    about = "Sentinel benchmarks (ratios against same-run baselines)"
)]
struct Cli {
    /// Seconds-not-minutes version, for CI: fewer rounds and sizes.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum What {
    Propagation,
    Ingest,
    Callgrind,
    Overhead,
    All,
}

/// A control plane on a fresh database, in this process.
pub struct Cp {
    pub db: TestDb,
    pub grpc: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Cp {
    pub async fn start() -> Cp {
        let db = TestDb::new().await;
        let mut config = Config {
            database_url: db.url.clone(),
            instance_id: "cp-bench".into(),
            admin_tokens: vec![ADMIN.into()],
            join_tokens: vec![JOIN.into()],
            ..Config::default()
        };
        config.db.max_connections = 32;
        config.sync.reload_interval_secs = 3600;
        config.finish().unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = server::run(config, Listeners { grpc, http }, None, s).await;
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reqwest::get(format!("http://{http_addr}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "control plane not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Cp {
            db,
            grpc: addr,
            stop,
        }
    }
}

/// Median, min and max.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The `p` quantile of sorted values.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    println!(
        "sentinel-bench on {} cores; client, control plane and Postgres share them",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut json = serde_json::Map::new();
    if matches!(cli.what, What::Propagation | What::All) {
        json.insert("propagation".into(), propagation::run(cli.quick).await);
    }
    if matches!(cli.what, What::Ingest | What::All) {
        json.insert("ingest".into(), ingest::run(cli.quick).await);
    }
    if matches!(cli.what, What::Callgrind | What::All) {
        json.insert("callgrind".into(), callgrind::run(cli.quick).await);
    }
    if matches!(cli.what, What::Overhead | What::All) {
        json.insert("overhead".into(), overhead::run(cli.quick).await);
    }
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}
