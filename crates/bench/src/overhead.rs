//! Proxy overhead: the same `tools/call` load against the upstream alone
//! (`direct`, the physical limit), through nginx (a reverse proxy that does
//! nothing but relay), through `sentinel-proxy` with a local policy file
//! (`sentinel-policy`) and through `sentinel-proxy` joined to a real
//! control plane with audit shipped to Postgres (`sentinel-full`, spool
//! durability `os`; `sentinel-full-fsync` with `fsync`).
//!
//! Every set-up is started fresh as real processes on 127.0.0.1 in every
//! round, and the set-ups alternate within a round (A B C D, A B C D, ...),
//! so drift on the machine spreads over all of them. Figures are medians
//! over rounds with min and max; "added" latency and throughput ratios are
//! taken against the baseline of the same round.
//!
//! Cores: nothing is pinned; client, upstreams, the proxy under test, the
//! control plane and Postgres share every core. nginx runs
//! `worker_processes auto` (one worker per core) and sentinel-proxy its
//! default, one event-loop thread (`workers = 1`; set
//! `SENTINEL_PROXY_WORKERS` to compare others); the upstreams run one
//! thread each.
//!
//! Memory: an idle `sentinel-policy` proxy, the same proxy holding 1,000
//! idle legacy sessions (each on its own open connection), and a control
//! plane process holding 1,000 policy sync streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sentinel_control_plane::testing::TestDb;
use sentinel_shared::keys::{self, KeyKind};
use sentinel_shared::proto::admin_client::AdminClient;
use sentinel_shared::proto::policy_sync_client::PolicySyncClient;
use sentinel_shared::proto::{self as pb, proxy_message};
use sentinel_shared::spec::{BackendSpec, PolicySpec, RateLimitSpec, RoleSpec};
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::load::{self, Era, Outcome, Target};
use crate::procs::{self, Proc};
use crate::{ADMIN, JOIN, quantile, spread};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Direct,
    Nginx,
    Policy,
    Full,
    FullFsync,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Policy => "sentinel-policy",
            Kind::Full => "sentinel-full",
            Kind::FullFsync => "sentinel-full-fsync",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// Open loop at this many calls/s over 16 connections.
    Rate(u32),
    /// Closed loop over this many connections.
    Saturate(usize),
}

/// One column of the matrix: era and response framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    era: Era,
    sse: bool,
}

impl Case {
    fn name(self) -> String {
        format!(
            "{} {}",
            self.era.name(),
            if self.sse { "SSE" } else { "JSON" }
        )
    }
}

/// Connections of the fixed-rate runs.
const RATE_CONNS: usize = 16;
/// Calls on each connection before a measurement starts.
const WARM_CALLS: usize = 5;
/// Legacy sessions and sync streams held for the memory figures.
const MEMORY_SESSIONS: usize = 1000;

/// What runs, how long, how often.
struct Plan {
    rounds: usize,
    run: Duration,
    kinds: Vec<Kind>,
    /// (case, modes) per set-up kind.
    matrix: Vec<(Case, Vec<Mode>)>,
    fsync_matrix: Vec<(Case, Vec<Mode>)>,
    memory_sessions: usize,
}

impl Plan {
    fn new(quick: bool, nginx: bool) -> Plan {
        let legacy_json = Case {
            era: Era::Legacy,
            sse: false,
        };
        let modern_json = Case {
            era: Era::Modern,
            sse: false,
        };
        let legacy_sse = Case {
            era: Era::Legacy,
            sse: true,
        };
        let modern_sse = Case {
            era: Era::Modern,
            sse: true,
        };
        let mut kinds = vec![Kind::Direct];
        if nginx {
            kinds.push(Kind::Nginx);
        }
        kinds.extend([Kind::Policy, Kind::Full]);
        if quick {
            return Plan {
                rounds: 1,
                run: Duration::from_millis(500),
                kinds,
                matrix: vec![
                    (legacy_json, vec![Mode::Rate(200), Mode::Saturate(16)]),
                    (modern_sse, vec![Mode::Saturate(16)]),
                ],
                fsync_matrix: Vec::new(),
                memory_sessions: 20,
            };
        }
        kinds.push(Kind::FullFsync);
        let full = vec![
            Mode::Rate(500),
            Mode::Rate(1000),
            Mode::Rate(2000),
            Mode::Saturate(16),
            Mode::Saturate(64),
        ];
        let reduced = vec![Mode::Rate(1000), Mode::Saturate(16)];
        Plan {
            rounds: 5,
            run: Duration::from_secs(2),
            kinds,
            matrix: vec![
                (legacy_json, full.clone()),
                (modern_json, full),
                (legacy_sse, reduced.clone()),
                (modern_sse, reduced.clone()),
            ],
            fsync_matrix: vec![(legacy_json, reduced.clone()), (modern_json, reduced)],
            memory_sessions: MEMORY_SESSIONS,
        }
    }
}

impl Plan {
    /// Focused runs while profiling: `SENTINEL_BENCH_SETUPS` (names, comma
    /// separated, e.g. `direct,sentinel-full`), `SENTINEL_BENCH_SECS` (per
    /// run), `SENTINEL_BENCH_ROUNDS`. Unset, the plan is as above.
    fn narrow_from_env(&mut self) {
        if let Ok(names) = std::env::var("SENTINEL_BENCH_SETUPS") {
            let names: Vec<&str> = names.split(',').map(str::trim).collect();
            self.kinds.retain(|k| names.contains(&k.name()));
        }
        if let Some(secs) = std::env::var("SENTINEL_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| (0.1..=600.0).contains(s))
        {
            self.run = Duration::from_secs_f64(secs);
        }
        if let Some(r) = std::env::var("SENTINEL_BENCH_ROUNDS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|r| (1..=50).contains(r))
        {
            self.rounds = r;
        }
    }
}

/// The proxy's `workers` as the set-ups get it: the proxies inherit the
/// bench's environment, so `SENTINEL_PROXY_WORKERS` reaches them.
fn proxy_workers() -> String {
    std::env::var("SENTINEL_PROXY_WORKERS").unwrap_or_else(|_| "1 (default)".into())
}

/// A set-up's processes, running.
struct SetUp {
    /// The proxy under test (nginx: master and workers); empty for direct.
    front: Vec<u32>,
    /// The control plane (sentinel-full only).
    cp: Option<u32>,
    /// The JSON and the SSE upstream.
    upstreams: [u32; 2],
    json: Target,
    sse: Target,
    // Dropped in this order: processes first, then their database and files.
    _procs: Vec<Proc>,
    db: Option<TestDb>,
    _dir: tempfile::TempDir,
}

fn target(addr: SocketAddr, path: &str, tool: &str, key: Option<&str>) -> Target {
    Target {
        addr,
        path: path.into(),
        tool: tool.into(),
        key: key.map(str::to_string),
        era: Era::Legacy,
    }
}

/// The policy both Sentinel set-ups enforce: one role allowed on the two
/// echo tools by RBAC, with a rate limit far above what the machine does.
fn policy(json: SocketAddr, sse: SocketAddr) -> PolicySpec {
    PolicySpec {
        roles: vec![RoleSpec {
            name: "bench".into(),
            allow: vec!["up/echo".into(), "upsse/echo".into()],
            rate_limits: vec![RateLimitSpec {
                per_second: 1_000_000.0,
                burst: 1_000_000,
                ..Default::default()
            }],
            ..Default::default()
        }],
        backends: vec![
            BackendSpec {
                name: "up".into(),
                url: Some(format!("http://{json}/mcp")),
                timeout_ms: 10_000,
                ..Default::default()
            },
            BackendSpec {
                name: "upsse".into(),
                url: Some(format!("http://{sse}/mcp")),
                timeout_ms: 10_000,
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn proxy_config(dir: &Path, port: u16, durability: &str, source: &str) -> String {
    format!(
        "proxy_id = \"bench-proxy\"\nlisten = \"127.0.0.1:{port}\"\nupstream_timeout_ms = 10000\n{source}\n\
         [spool]\ndir = \"{}\"\ndurability = \"{durability}\"\n",
        dir.join("spool").display()
    )
}

fn spawn_proxy(dir: &Path, config: &str) -> anyhow::Result<Proc> {
    let path = dir.join("proxy.toml");
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join("proxy.log"))?;
    Proc::spawn(
        "sentinel-proxy",
        Command::new(procs::bin("sentinel-proxy"))
            .arg("--config")
            .arg(&path)
            // Per-request logging is not what is measured (nginx runs with
            // its access log off).
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log),
    )
}

fn admin_req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    if let Ok(v) = format!("Bearer {ADMIN}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// A control plane process on a fresh database.
async fn start_cp(dir: &Path) -> anyhow::Result<(Proc, TestDb, SocketAddr)> {
    let db = TestDb::new().await;
    let grpc: SocketAddr = format!("127.0.0.1:{}", procs::free_port()).parse()?;
    let http = procs::free_port();
    let log = std::fs::File::create(dir.join("control-plane.log"))?;
    let p = Proc::spawn(
        "sentinel-control-plane",
        Command::new(procs::bin("sentinel-control-plane"))
            .env("DATABASE_URL", &db.url)
            .env("SENTINEL_CP_GRPC__LISTEN", grpc.to_string())
            .env("SENTINEL_CP_HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env("SENTINEL_CP_ADMIN_TOKENS", format!("[\"{ADMIN}\"]"))
            .env("SENTINEL_CP_JOIN_TOKENS", format!("[\"{JOIN}\"]"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    procs::wait_ready(
        &format!("http://127.0.0.1:{http}/readyz"),
        Duration::from_secs(30),
    )
    .await?;
    Ok((p, db, grpc))
}

async fn channel(grpc: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{grpc}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

async fn start(kind: Kind, nginx: Option<&Path>) -> anyhow::Result<SetUp> {
    let dir = tempfile::Builder::new()
        .prefix("overhead-")
        .tempdir_in(bench_dir()?)?;
    let (up_json, json_addr) = procs::upstream(false)?;
    let (up_sse, sse_addr) = procs::upstream(true)?;
    let upstreams = [up_json.pid(), up_sse.pid()];
    let mut running = vec![up_json, up_sse];
    let mut cp = None;
    let mut db = None;
    let (json, sse, front) = match kind {
        Kind::Direct => (
            target(json_addr, "/mcp", "echo", None),
            target(sse_addr, "/mcp", "echo", None),
            Vec::new(),
        ),
        Kind::Nginx => {
            let nginx = nginx.ok_or_else(|| anyhow::anyhow!("nginx is not installed"))?;
            let port = procs::free_port();
            let p = procs::start_nginx(nginx, dir.path(), port, json_addr, sse_addr)?;
            let master = p.pid();
            running.push(p);
            procs::wait_ready(
                &format!("http://127.0.0.1:{port}/healthz"),
                Duration::from_secs(10),
            )
            .await?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            (
                target(addr, "/mcp", "echo", None),
                target(addr, "/sse/mcp", "echo", None),
                procs::with_children(master),
            )
        }
        Kind::Policy => {
            let key = keys::generate(KeyKind::Api).secret;
            let file = json!({
                "version": 1,
                "policy": policy(json_addr, sse_addr),
                "api_keys": [{"key": key, "role": "bench", "owner": "bench"}],
                "session_keys": [{"id": 1, "key": "07".repeat(32)}],
            });
            let policy_path = dir.path().join("policy.json");
            std::fs::write(&policy_path, serde_json::to_vec_pretty(&file)?)?;
            let port = procs::free_port();
            let config = proxy_config(
                dir.path(),
                port,
                "os",
                &format!("policy_file = \"{}\"", policy_path.display()),
            );
            let p = spawn_proxy(dir.path(), &config)?;
            let pid = p.pid();
            running.push(p);
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            procs::wait_ready(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await?;
            (
                target(addr, "/mcp", "up__echo", Some(&key)),
                target(addr, "/mcp", "upsse__echo", Some(&key)),
                vec![pid],
            )
        }
        Kind::Full | Kind::FullFsync => {
            let (cp_proc, cp_db, grpc) = start_cp(dir.path()).await?;
            cp = Some(cp_proc.pid());
            running.push(cp_proc);
            db = Some(cp_db);
            let mut admin = AdminClient::new(channel(grpc).await?);
            admin
                .apply_policy(admin_req(pb::ApplyPolicyRequest {
                    spec: Some(pb::PolicySpec::from(&policy(json_addr, sse_addr))),
                    dry_run: false,
                }))
                .await?;
            let key = admin
                .create_api_key(admin_req(pb::CreateApiKeyRequest {
                    role: "bench".into(),
                    owner: "bench".into(),
                    ..Default::default()
                }))
                .await?
                .into_inner()
                .secret;
            let port = procs::free_port();
            let durability = if kind == Kind::FullFsync {
                "fsync"
            } else {
                "os"
            };
            let config = proxy_config(
                dir.path(),
                port,
                durability,
                &format!(
                    "[control_plane]\nurl = \"http://{grpc}\"\njoin_token = \"{JOIN}\"\ncache_file = \"{}\"\n",
                    dir.path().join("policy.cache").display()
                ),
            );
            let p = spawn_proxy(dir.path(), &config)?;
            let pid = p.pid();
            running.push(p);
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            procs::wait_ready(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await?;
            (
                target(addr, "/mcp", "up__echo", Some(&key)),
                target(addr, "/mcp", "upsse__echo", Some(&key)),
                vec![pid],
            )
        }
    };
    let s = SetUp {
        front,
        cp,
        upstreams,
        json,
        sse,
        _procs: running,
        db,
        _dir: dir,
    };
    // The key reaches a joined proxy with its first snapshot: wait until a
    // call goes through (any set-up: it also proves the wiring).
    let t = Arc::new(s.json.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = match load::Conn::open(t.clone()).await {
            Ok(mut c) => c.call().await,
            Err(e) => Err(e.to_string()),
        };
        match r {
            Ok(()) => break,
            Err(e) if tokio::time::Instant::now() > deadline => {
                anyhow::bail!("{}: no successful call within 30 s: {e}", kind.name())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(s)
}

/// `target/bench`, where set-ups keep their files while they run.
fn bench_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = procs::target_dir().join("bench");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// One measurement.
#[derive(Debug)]
struct Sample {
    round: usize,
    kind: Kind,
    case: Case,
    mode: Mode,
    calls: u64,
    errors: u64,
    /// Calls before the measurement (audited all the same).
    warm_calls: u64,
    first_error: Option<String>,
    p50_us: f64,
    p99_us: f64,
    rate: f64,
    /// CPU microseconds per call of the proxy process(es), of the upstream
    /// that served the calls, and of the control plane.
    front_cpu_us: Option<f64>,
    upstream_cpu_us: f64,
    cp_cpu_us: Option<f64>,
}

async fn measure(
    s: &SetUp,
    round: usize,
    kind: Kind,
    case: Case,
    mode: Mode,
    run: Duration,
) -> anyhow::Result<Sample> {
    let mut t = if case.sse {
        s.sse.clone()
    } else {
        s.json.clone()
    };
    t.era = case.era;
    let t = Arc::new(t);
    let conns = match mode {
        Mode::Rate(_) => RATE_CONNS,
        Mode::Saturate(c) => c,
    };
    let mut cs = load::open(&t, conns).await?;
    load::warm(&mut cs, WARM_CALLS).await.map_err(|e| {
        anyhow::anyhow!("{} {}: warm-up call failed: {e}", kind.name(), case.name())
    })?;
    let upstream = s.upstreams[usize::from(case.sse)];
    let front0 = procs::cpu_ticks_all(&s.front);
    let up0 = procs::cpu_ticks(upstream);
    let cp0 = s.cp.map(procs::cpu_ticks);
    let o: Outcome = match mode {
        Mode::Rate(r) => load::fixed_rate(cs, f64::from(r), run).await,
        Mode::Saturate(_) => load::saturate(cs, run).await,
    };
    let per_call = |ticks: u64| ticks as f64 / procs::TICKS_PER_SEC * 1e6 / o.calls.max(1) as f64;
    let front_cpu_us = (!s.front.is_empty())
        .then(|| per_call(procs::cpu_ticks_all(&s.front).saturating_sub(front0)));
    let upstream_cpu_us = per_call(procs::cpu_ticks(upstream).saturating_sub(up0));
    let cp_cpu_us =
        s.cp.zip(cp0)
            .map(|(pid, t0)| per_call(procs::cpu_ticks(pid).saturating_sub(t0)));
    Ok(Sample {
        round,
        kind,
        case,
        mode,
        calls: o.calls,
        errors: o.errors,
        warm_calls: (conns * WARM_CALLS) as u64,
        first_error: o.first_error.clone(),
        p50_us: quantile(&o.latency_us, 0.5),
        p99_us: quantile(&o.latency_us, 0.99),
        rate: o.rate(),
        front_cpu_us,
        upstream_cpu_us,
        cp_cpu_us,
    })
}

/// Audit events the control plane stored (sentinel-full: proof that audit
/// was shipped, not only spooled).
async fn audit_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_events")
        .fetch_one(&db.pool)
        .await
        .unwrap_or(-1)
}

pub async fn run(quick: bool) -> Value {
    println!("\n== proxy overhead: direct vs nginx vs sentinel-proxy (issue 6)");
    if let Err(e) = procs::build_binaries() {
        println!("overhead: skipped: {e}");
        return json!({"skipped": e.to_string()});
    }
    let nginx = procs::nginx(!quick);
    if nginx.is_none() {
        println!("nginx: skipped (not installed)");
    }
    let mut plan = Plan::new(quick, nginx.is_some());
    plan.narrow_from_env();
    println!(
        "{} round(s), {} s per run, set-ups alternate within a round; {} connections at fixed rates; \
         echo tool, {} B argument; nothing pinned: every process may use all {} cores \
         (nginx worker_processes auto, sentinel-proxy workers = {}, upstreams 1 thread, client 2 threads); \
         {} binaries",
        plan.rounds,
        plan.run.as_secs_f64(),
        RATE_CONNS,
        load::ARG_BYTES,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        proxy_workers(),
        procs::profile()
    );
    let mut samples = Vec::new();
    let mut hwm: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
    let mut audit: BTreeMap<Kind, Vec<(u64, i64)>> = BTreeMap::new();
    let mut failures = Vec::new();
    for round in 0..plan.rounds {
        for &kind in &plan.kinds {
            let s = match start(kind, nginx.as_deref()).await {
                Ok(s) => s,
                Err(e) => {
                    println!("round {}: {} did not start: {e:#}", round + 1, kind.name());
                    failures.push(format!("round {}: {}: {e:#}", round + 1, kind.name()));
                    continue;
                }
            };
            let matrix = if kind == Kind::FullFsync {
                &plan.fsync_matrix
            } else {
                &plan.matrix
            };
            // The call that proved the set-up ready is audited too.
            let mut calls = 1;
            for (case, modes) in matrix {
                for &mode in modes {
                    match measure(&s, round, kind, *case, mode, plan.run).await {
                        Ok(x) => {
                            calls += x.calls + x.errors + x.warm_calls;
                            samples.push(x);
                        }
                        Err(e) => {
                            println!("round {}: {}: {e:#}", round + 1, kind.name());
                            failures.push(format!("round {}: {}: {e:#}", round + 1, kind.name()));
                        }
                    }
                }
            }
            if !s.front.is_empty() {
                let kb = procs::status_kb_all(&s.front, "VmHWM");
                hwm.entry(kind).or_default().push(kb as f64 / 1024.0);
            }
            if let Some(db) = &s.db {
                // Shipping is asynchronous: give it a moment to catch up.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut rows = audit_rows(db).await;
                while (rows as u64) < calls && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    rows = audit_rows(db).await;
                }
                audit.entry(kind).or_default().push((calls, rows));
            }
            println!("round {} {}: done", round + 1, kind.name());
        }
    }
    let mut out = report(&plan, &samples, &hwm, &audit);
    let memory = memory(plan.memory_sessions).await;
    out.insert("memory".into(), memory);
    out.insert("failures".into(), json!(failures));
    if !failures.is_empty() {
        println!("FAILURES:");
        for f in &failures {
            println!("  {f}");
        }
    }
    Value::Object(out)
}

fn med(v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let (m, lo, hi) = spread(v);
    json!({"median": m, "min": lo, "max": hi})
}

fn fmt(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, lo, hi) = spread(v.to_vec());
    format!("{m:.digits$} [{lo:.digits$}..{hi:.digits$}]")
}

fn report(
    plan: &Plan,
    samples: &[Sample],
    hwm: &BTreeMap<Kind, Vec<f64>>,
    audit: &BTreeMap<Kind, Vec<(u64, i64)>>,
) -> serde_json::Map<String, Value> {
    // Index: (case, mode, kind) -> samples by round.
    let mut by: BTreeMap<(Case, Mode, Kind), BTreeMap<usize, &Sample>> = BTreeMap::new();
    for s in samples {
        by.entry((s.case, s.mode, s.kind))
            .or_default()
            .insert(s.round, s);
    }
    let same_round =
        |case: Case, mode: Mode, base: Kind, kind: Kind, f: &dyn Fn(&Sample, &Sample) -> f64| {
            let mut v = Vec::new();
            if let (Some(a), Some(b)) = (by.get(&(case, mode, kind)), by.get(&(case, mode, base))) {
                for (r, s) in a {
                    if let Some(b) = b.get(r) {
                        v.push(f(s, b));
                    }
                }
            }
            v
        };
    let mut rows = Vec::new();
    let mut cases: Vec<Case> = plan.matrix.iter().map(|(c, _)| *c).collect();
    cases.dedup();

    println!(
        "\n-- fixed rate, {RATE_CONNS} connections: latency µs, median [min..max] over rounds"
    );
    println!(
        "{:<18} {:>6} {:<20} {:>24} {:>24} {:>24} {:>24} {:>7}",
        "case", "rate", "set-up", "p50", "p99", "added p50", "added p99", "errors"
    );
    let mut kinds: Vec<Kind> = plan.kinds.clone();
    kinds.sort();
    for &case in &cases {
        let mut modes: Vec<Mode> = by.keys().filter(|k| k.0 == case).map(|k| k.1).collect();
        modes.sort();
        modes.dedup();
        for &mode in &modes {
            for &kind in &kinds {
                let Some(rs) = by.get(&(case, mode, kind)) else {
                    continue;
                };
                let p50: Vec<f64> = rs.values().map(|s| s.p50_us).collect();
                let p99: Vec<f64> = rs.values().map(|s| s.p99_us).collect();
                let rate: Vec<f64> = rs.values().map(|s| s.rate).collect();
                let errors: u64 = rs.values().map(|s| s.errors).sum();
                let calls: u64 = rs.values().map(|s| s.calls).sum();
                let add50 = same_round(case, mode, Kind::Direct, kind, &|a, b| a.p50_us - b.p50_us);
                let add99 = same_round(case, mode, Kind::Direct, kind, &|a, b| a.p99_us - b.p99_us);
                let vs_direct = same_round(case, mode, Kind::Direct, kind, &|a, b| a.rate / b.rate);
                let vs_nginx = same_round(case, mode, Kind::Nginx, kind, &|a, b| a.rate / b.rate);
                let front: Vec<f64> = rs.values().filter_map(|s| s.front_cpu_us).collect();
                let up: Vec<f64> = rs.values().map(|s| s.upstream_cpu_us).collect();
                let cp: Vec<f64> = rs.values().filter_map(|s| s.cp_cpu_us).collect();
                if let Mode::Rate(r) = mode {
                    println!(
                        "{:<18} {:>6} {:<20} {:>24} {:>24} {:>24} {:>24} {:>7}",
                        case.name(),
                        r,
                        kind.name(),
                        fmt(&p50, 0),
                        fmt(&p99, 0),
                        if kind == Kind::Direct {
                            "-".into()
                        } else {
                            fmt(&add50, 0)
                        },
                        if kind == Kind::Direct {
                            "-".into()
                        } else {
                            fmt(&add99, 0)
                        },
                        errors
                    );
                }
                let first_error = rs.values().find_map(|s| s.first_error.clone());
                rows.push(json!({
                    "case": case.name(),
                    "era": case.era.name(),
                    "response": if case.sse { "sse" } else { "json" },
                    "mode": match mode { Mode::Rate(_) => "fixed_rate", Mode::Saturate(_) => "saturation" },
                    "rate": match mode { Mode::Rate(r) => json!(r), Mode::Saturate(_) => Value::Null },
                    "connections": match mode { Mode::Rate(_) => RATE_CONNS, Mode::Saturate(c) => c },
                    "setup": kind.name(),
                    "rounds": rs.len(),
                    "calls": calls,
                    "errors": errors,
                    "first_error": first_error,
                    "p50_us": med(p50),
                    "p99_us": med(p99),
                    "added_p50_us": med(add50),
                    "added_p99_us": med(add99),
                    "calls_per_sec": med(rate),
                    "ratio_to_direct": med(vs_direct),
                    "ratio_to_nginx": med(vs_nginx),
                    "proxy_cpu_us_per_call": med(front),
                    "upstream_cpu_us_per_call": med(up),
                    "control_plane_cpu_us_per_call": med(cp),
                }));
            }
        }
    }

    println!("\n-- saturation: calls/s and CPU µs per call, median [min..max] over rounds");
    println!(
        "{:<18} {:>5} {:<20} {:>24} {:>18} {:>18} {:>18} {:>18} {:>7}",
        "case",
        "conns",
        "set-up",
        "calls/s",
        "x direct",
        "x nginx",
        "proxy CPU µs",
        "upstream CPU µs",
        "errors"
    );
    for &case in &cases {
        for conns in [16usize, 64] {
            let mode = Mode::Saturate(conns);
            for &kind in &kinds {
                let Some(rs) = by.get(&(case, mode, kind)) else {
                    continue;
                };
                let rate: Vec<f64> = rs.values().map(|s| s.rate).collect();
                let vs_direct = same_round(case, mode, Kind::Direct, kind, &|a, b| a.rate / b.rate);
                let vs_nginx = same_round(case, mode, Kind::Nginx, kind, &|a, b| a.rate / b.rate);
                let front: Vec<f64> = rs.values().filter_map(|s| s.front_cpu_us).collect();
                let up: Vec<f64> = rs.values().map(|s| s.upstream_cpu_us).collect();
                let errors: u64 = rs.values().map(|s| s.errors).sum();
                println!(
                    "{:<18} {:>5} {:<20} {:>24} {:>18} {:>18} {:>18} {:>18} {:>7}",
                    case.name(),
                    conns,
                    kind.name(),
                    fmt(&rate, 0),
                    if kind == Kind::Direct {
                        "-".into()
                    } else {
                        fmt(&vs_direct, 2)
                    },
                    if kind == Kind::Nginx || vs_nginx.is_empty() {
                        "-".into()
                    } else {
                        fmt(&vs_nginx, 2)
                    },
                    fmt(&front, 1),
                    fmt(&up, 1),
                    errors
                );
            }
        }
    }
    // Control-plane CPU per call (sentinel-full, saturation 16).
    for &case in &cases {
        for kind in [Kind::Full, Kind::FullFsync] {
            if let Some(rs) = by.get(&(case, Mode::Saturate(16), kind)) {
                let cp: Vec<f64> = rs.values().filter_map(|s| s.cp_cpu_us).collect();
                println!(
                    "control plane CPU µs per call, {} saturation 16, {}: {}",
                    case.name(),
                    kind.name(),
                    fmt(&cp, 1)
                );
            }
        }
    }

    println!("\n-- peak RSS (VmHWM) of the proxy process(es), MiB, median [min..max]");
    let mut peak = serde_json::Map::new();
    for (kind, v) in hwm {
        println!("{:<20} {}", kind.name(), fmt(v, 1));
        peak.insert(kind.name().into(), med(v.clone()));
    }
    let mut shipped = serde_json::Map::new();
    for (kind, v) in audit {
        let text: Vec<String> = v.iter().map(|(c, r)| format!("{r}/{c}")).collect();
        println!(
            "audit rows in Postgres / calls made, {} per round: {}",
            kind.name(),
            text.join(" ")
        );
        shipped.insert(
            kind.name().into(),
            json!(
                v.iter()
                    .map(|(c, r)| json!({"calls": c, "audit_rows": r}))
                    .collect::<Vec<_>>()
            ),
        );
    }

    // Targets (issue 6).
    let mut targets = serde_json::Map::new();
    let get =
        |case: Case, mode: Mode, kind: Kind, f: &dyn Fn(&Sample, &Sample) -> f64, base: Kind| {
            spread(same_round(case, mode, base, kind, f)).0
        };
    for &case in cases.iter().filter(|c| !c.sse) {
        let n = case.name();
        if by.contains_key(&(case, Mode::Rate(1000), Kind::Full)) {
            let a50 = get(
                case,
                Mode::Rate(1000),
                Kind::Full,
                &|a, b| a.p50_us - b.p50_us,
                Kind::Direct,
            );
            let a99 = get(
                case,
                Mode::Rate(1000),
                Kind::Full,
                &|a, b| a.p99_us - b.p99_us,
                Kind::Direct,
            );
            targets.insert(
                format!("{n}: added p50 at 1000/s, full <= 100 us"),
                json!({"value": a50, "met": a50 <= 100.0}),
            );
            targets.insert(
                format!("{n}: added p99 at 1000/s, full <= 300 us"),
                json!({"value": a99, "met": a99 <= 300.0}),
            );
        }
        if by.contains_key(&(case, Mode::Saturate(16), Kind::Nginx)) {
            let r = get(
                case,
                Mode::Saturate(16),
                Kind::Full,
                &|a, b| a.rate / b.rate,
                Kind::Nginx,
            );
            targets.insert(
                format!("{n}: saturation 16, full / nginx >= 1"),
                json!({"value": r, "met": r >= 1.0}),
            );
            let cpu = |kind: Kind| {
                spread(
                    by.get(&(case, Mode::Saturate(16), kind))
                        .map(|rs| rs.values().filter_map(|s| s.front_cpu_us).collect())
                        .unwrap_or_default(),
                )
                .0
            };
            let (full, ngx) = (cpu(Kind::Full), cpu(Kind::Nginx));
            targets.insert(
                format!("{n}: proxy CPU/call (full) <= nginx's"),
                json!({"value": full, "nginx": ngx, "met": full <= ngx}),
            );
        }
    }
    if !targets.is_empty() {
        println!("\n-- targets");
        for (k, v) in &targets {
            println!("{k}: {v}");
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("rounds".into(), json!(plan.rounds));
    out.insert("run_secs".into(), json!(plan.run.as_secs_f64()));
    out.insert(
        "cores".into(),
        json!(format!(
            "nothing pinned; all processes share all cores; nginx worker_processes auto, sentinel-proxy workers = {}, upstreams 1 thread, client 2 threads",
            proxy_workers()
        )),
    );
    out.insert("rows".into(), json!(rows));
    out.insert("peak_rss_mib".into(), Value::Object(peak));
    out.insert("audit_shipped".into(), Value::Object(shipped));
    out.insert("targets".into(), Value::Object(targets));
    out
}

/// Idle proxy RSS, proxy RSS with many idle legacy sessions, control plane
/// RSS with as many sync streams.
async fn memory(n: usize) -> Value {
    println!("\n-- memory (VmRSS, MiB)");
    let mut out = serde_json::Map::new();
    match proxy_memory(n).await {
        Ok((idle, anon, held)) => {
            println!("sentinel-policy proxy idle (policy loaded): {idle:.1}");
            println!(
                "  of which private (RssAnon): {anon:.1}; the rest is the binary's code and shared libraries (RssFile), shared by every proxy on the host"
            );
            println!(
                "sentinel-policy proxy with {n} idle legacy sessions (one open connection each): {held:.1}"
            );
            out.insert("proxy_idle_mib".into(), json!(idle));
            out.insert("proxy_idle_anon_mib".into(), json!(anon));
            out.insert("proxy_sessions".into(), json!(n));
            out.insert("proxy_with_sessions_mib".into(), json!(held));
            out.insert(
                "target_idle_proxy_le_10_mib".into(),
                json!({"value": idle, "met": idle <= 10.0}),
            );
        }
        Err(e) => {
            println!("proxy memory: failed: {e:#}");
            out.insert("proxy_error".into(), json!(format!("{e:#}")));
        }
    }
    match cp_memory(n).await {
        Ok((idle, held)) => {
            println!("control plane idle: {idle:.1}");
            println!("control plane with {n} policy sync streams: {held:.1}");
            out.insert("control_plane_idle_mib".into(), json!(idle));
            out.insert("control_plane_streams".into(), json!(n));
            out.insert("control_plane_with_streams_mib".into(), json!(held));
        }
        Err(e) => {
            println!("control plane memory: failed: {e:#}");
            out.insert("control_plane_error".into(), json!(format!("{e:#}")));
        }
    }
    Value::Object(out)
}

fn rss_mib(pid: u32) -> f64 {
    procs::status_kb(pid, "VmRSS") as f64 / 1024.0
}

/// Idle RSS, its private (anonymous) part, RSS with `n` sessions.
async fn proxy_memory(n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let s = start(Kind::Policy, None).await?;
    let pid = s.front.first().copied().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_mib(pid);
    let anon = procs::status_kb(pid, "RssAnon") as f64 / 1024.0;
    let t = Arc::new(s.json.clone());
    let mut held = Vec::with_capacity(n);
    while held.len() < n {
        let batch = (n - held.len()).min(50);
        held.extend(load::open(&t, batch).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_mib(pid);
    drop(held);
    Ok((idle, anon, with))
}

async fn cp_memory(n: usize) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::Builder::new()
        .prefix("memory-")
        .tempdir_in(bench_dir()?)?;
    let (p, _db, grpc) = start_cp(dir.path()).await?;
    let pid = p.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_mib(pid);
    // 100 streams per HTTP/2 connection, as servers cap concurrent streams.
    let mut chans = Vec::new();
    for _ in 0..n.div_ceil(100) {
        chans.push(channel(grpc).await?);
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut keep = Vec::with_capacity(n);
    for i in 0..n {
        let ch = chans[i / 100].clone();
        let tx = tx.clone();
        let (out, out_rx) = tokio::sync::mpsc::channel(4);
        out.send(pb::ProxyMessage {
            msg: Some(proxy_message::Msg::Hello(pb::Hello {
                proxy_id: format!("bench-mem-{i}"),
                build_version: "bench".into(),
                join_token: JOIN.into(),
                ..Default::default()
            })),
        })
        .await?;
        keep.push(out);
        tokio::spawn(async move {
            let Ok(resp) = PolicySyncClient::new(ch)
                .sync(ReceiverStream::new(out_rx))
                .await
            else {
                return;
            };
            let mut inbound = resp.into_inner();
            let mut first = true;
            while let Some(Ok(_)) = inbound.next().await {
                if first {
                    let _ = tx.send(());
                    first = false;
                }
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for got in 0..n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(())) => {}
            _ => anyhow::bail!("only {got} of {n} sync streams got a snapshot"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_mib(pid);
    drop(keep);
    drop(p);
    Ok((idle, with))
}
