//! `sentinel demo`: a complete local Sentinel in one process — Postgres (or
//! `DATABASE_URL`), the control plane, one proxy and the demo upstream —
//! with a demo policy seeded and copy-paste instructions printed. Ctrl-C
//! (or SIGTERM) stops everything, the Postgres cluster it runs included.
//!
//! Ports, from `--port-base N`: N the proxy's MCP endpoint, N+1 the control
//! plane's gRPC, N+2 its REST API, N+3 the demo upstream, N+4 Postgres (when
//! the demo runs its own). `--port-base 0` picks free ports (tests).
//!
//! Exit codes: 0 after a clean stop, 69 when Postgres or a port is not
//! available, 1 for any other failure.

mod pg;
mod seed;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use sentinel_control_plane::config::Config as CpConfig;
use sentinel_control_plane::server::{self as cp_server, Listeners};
use sentinel_proxy::config::Config as ProxyConfig;
use sentinel_shared::keys::{self, KeyKind};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const EX_UNAVAILABLE: u8 = 69;
const PROXY_ID: &str = "demo-proxy";
/// How long any one component may take to become ready.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// How long any one component may take to stop.
const STOP_LIMIT: Duration = Duration::from_secs(15);

#[derive(Parser)]
#[command(
    name = "sentinel",
    version,
    about = "Sentinel, the MCP security gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a complete local system (Postgres, control plane, proxy, demo
    /// upstream) with a demo policy, and print how to use it.
    Demo(DemoArgs),
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo keeps its Postgres cluster, the proxy's audit spool
    /// and policy cache. A later run reuses it.
    #[arg(long, default_value = ".sentinel-demo")]
    data_dir: PathBuf,
    /// First of five consecutive ports on 127.0.0.1 (0: any free ports).
    #[arg(long, default_value_t = 8700)]
    port_base: u16,
}

/// Why the demo stopped early; decides the exit code.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // reqwest and tonic are built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sentinel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Command::Demo(args) = cli.command;
    let shutdown = CancellationToken::new();
    rt.spawn(cancel_on_signal(shutdown.clone()));
    let code = match rt.block_on(demo(args, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sentinel demo: {e}");
            match e {
                DemoError::Unavailable(_) => ExitCode::from(EX_UNAVAILABLE),
                DemoError::Failed(_) => ExitCode::FAILURE,
            }
        }
    };
    // Tasks still running (a connection being served) are not waited for.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

async fn cancel_on_signal(token: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    eprintln!("\nsentinel demo: stopping...");
    token.cancel();
}

/// The port for slot `i` (0 proxy, 1 gRPC, 2 REST, 3 upstream, 4 Postgres).
fn port(base: u16, i: u16) -> Result<u16, DemoError> {
    if base == 0 {
        return Ok(0);
    }
    base.checked_add(i).ok_or_else(|| {
        DemoError::Unavailable(format!("--port-base {base} leaves no room for 5 ports"))
    })
}

async fn bind(base: u16, i: u16, what: &str) -> Result<TcpListener, DemoError> {
    let p = port(base, i)?;
    TcpListener::bind(("127.0.0.1", p)).await.map_err(|e| {
        DemoError::Unavailable(format!(
            "cannot listen on 127.0.0.1:{p} for the {what}: {e} (is another demo running? pass --port-base N to use ports N..N+4)"
        ))
    })
}

async fn demo(args: DemoArgs, shutdown: CancellationToken) -> Result<(), DemoError> {
    let data_dir = prepare_data_dir(&args.data_dir)?;
    let proxy_l = bind(args.port_base, 0, "proxy").await?;
    let grpc_l = bind(args.port_base, 1, "control plane's gRPC API").await?;
    let http_l = bind(args.port_base, 2, "control plane's REST API").await?;
    let upstream_l = bind(args.port_base, 3, "demo upstream").await?;
    let pg_port = port(args.port_base, 4)?;

    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.trim().is_empty()) {
        eprintln!("sentinel demo: using the Postgres server in DATABASE_URL");
    } else {
        eprintln!(
            "sentinel demo: starting Postgres in {} ...",
            data_dir.join("pg").display()
        );
    }
    // Not raced against Ctrl-C: a cluster half started would be left
    // running. Start-up is bounded by pg_ctl's own wait; `run` notices the
    // request to stop and stops the cluster below.
    let postgres = match pg::provision(&data_dir, pg_port).await {
        Ok(p) => p,
        Err(pg::PgError::Local(e)) => return Err(DemoError::Unavailable(e.to_string())),
        Err(pg::PgError::Other(e)) => return Err(DemoError::Unavailable(format!("{e:#}"))),
    };
    for note in &postgres.notes {
        eprintln!("sentinel demo: {note}");
    }
    let listeners = Sockets {
        proxy: proxy_l,
        grpc: grpc_l,
        http: http_l,
        upstream: upstream_l,
    };
    let result = run(&data_dir, &postgres, listeners, shutdown).await;
    if let Some(local) = &postgres.local {
        if let Err(e) = pg::stop(local).await {
            eprintln!("sentinel demo: stopping Postgres failed: {e:#}");
        } else {
            eprintln!("sentinel demo: Postgres stopped");
        }
    }
    result.map_err(DemoError::Failed)
}

/// Creates the data directory (0755: as root, the `postgres` user must walk
/// through it to the cluster) and returns its absolute path.
fn prepare_data_dir(dir: &Path) -> Result<PathBuf, DemoError> {
    let unavailable = |e: std::io::Error| {
        DemoError::Unavailable(format!("data directory {}: {e}", dir.display()))
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(unavailable)?;
    }
    dir.canonicalize().map_err(unavailable)
}

struct Sockets {
    proxy: TcpListener,
    grpc: TcpListener,
    http: TcpListener,
    upstream: TcpListener,
}

/// One running component: its task and how to stop it.
struct Part {
    name: &'static str,
    task: JoinHandle<Result<(), String>>,
    stop: CancellationToken,
}

impl Part {
    fn spawn<F>(name: &'static str, f: impl FnOnce(CancellationToken) -> F) -> Part
    where
        F: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        Part {
            name,
            task: tokio::spawn(f(stop.clone())),
            stop,
        }
    }

    async fn shut(self) {
        self.stop.cancel();
        match tokio::time::timeout(STOP_LIMIT, self.task).await {
            Ok(Ok(Ok(()))) => eprintln!("sentinel demo: {} stopped", self.name),
            Ok(Ok(Err(e))) => eprintln!("sentinel demo: {} stopped with an error: {e}", self.name),
            Ok(Err(e)) => eprintln!("sentinel demo: {} task failed: {e}", self.name),
            Err(_) => eprintln!(
                "sentinel demo: {} did not stop within {}s; leaving it",
                self.name,
                STOP_LIMIT.as_secs()
            ),
        }
    }

    /// Fails if the component has already ended (it should run until told).
    fn check_running(&mut self) -> Result<()> {
        if self.task.is_finished() {
            bail!(
                "the {} stopped during start-up (see the log above)",
                self.name
            );
        }
        Ok(())
    }
}

async fn run(
    data_dir: &Path,
    postgres: &pg::Postgres,
    sockets: Sockets,
    shutdown: CancellationToken,
) -> Result<()> {
    let addr = |l: &TcpListener| l.local_addr().context("listener address");
    let (proxy_addr, grpc_addr, http_addr, upstream_addr) = (
        addr(&sockets.proxy)?,
        addr(&sockets.grpc)?,
        addr(&sockets.http)?,
        addr(&sockets.upstream)?,
    );
    let admin_token = format!("sntadmin_{}", uuid::Uuid::new_v4().simple());
    let join_token = keys::generate(KeyKind::Join).secret;
    let grpc_url = format!("http://{grpc_addr}");
    let upstream_url = format!("http://{upstream_addr}/mcp");

    // The control plane first: everything else needs it.
    let mut cp_config = CpConfig {
        database_url: postgres.url.clone(),
        instance_id: "demo-control-plane".into(),
        admin_tokens: vec![admin_token.clone()],
        join_tokens: vec![join_token.clone()],
        ..CpConfig::default()
    };
    cp_config.grpc.listen = grpc_addr.to_string();
    cp_config.http.listen = http_addr.to_string();
    cp_config
        .finish()
        .map_err(|e| anyhow!("control plane configuration: {e}"))?;
    let metrics = sentinel_proxy::metrics::handle();
    let (grpc_l, http_l) = (sockets.grpc, sockets.http);
    let mut cp = Part::spawn("control plane", move |stop| async move {
        cp_server::run(
            cp_config,
            Listeners {
                grpc: grpc_l,
                http: http_l,
            },
            Some(metrics),
            stop,
        )
        .await
        .map_err(|e| e.to_string())
    });
    let mut parts = Vec::new();
    let started = start_rest(
        &mut cp,
        &mut parts,
        sockets.proxy,
        sockets.upstream,
        StartInfo {
            data_dir,
            proxy_addr,
            http_addr,
            grpc_url: &grpc_url,
            upstream_url: &upstream_url,
            admin_token: &admin_token,
            join_token: &join_token,
        },
        &shutdown,
    )
    .await;
    let outcome = match started {
        Ok(Some(seeded)) => {
            print_banner(&Banner {
                data_dir,
                postgres,
                proxy_addr,
                grpc_url: &grpc_url,
                http_addr,
                upstream_url: &upstream_url,
                admin_token: &admin_token,
                seeded: &seeded,
            });
            watch(&mut cp, &mut parts, &shutdown).await
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    // The proxy first (its shipper talks to the control plane), the
    // control plane next (it holds the database), the upstream last.
    let (proxy, others): (Vec<Part>, Vec<Part>) =
        parts.into_iter().partition(|p| p.name == "proxy");
    for part in proxy {
        part.shut().await;
        // Let the control plane record the proxy's departure before it
        // stops, so the fleet view is right on the next run.
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && seed::proxy_connected(&grpc_url, &admin_token, PROXY_ID)
                .await
                .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cp.shut().await;
    for part in others {
        part.shut().await;
    }
    outcome
}

struct StartInfo<'a> {
    data_dir: &'a Path,
    proxy_addr: SocketAddr,
    http_addr: SocketAddr,
    grpc_url: &'a str,
    upstream_url: &'a str,
    admin_token: &'a str,
    join_token: &'a str,
}

/// Starts the upstream and the proxy once the control plane is ready and
/// the policy is seeded. `Ok(None)`: the user stopped the demo meanwhile.
async fn start_rest(
    cp: &mut Part,
    parts: &mut Vec<Part>,
    proxy_l: TcpListener,
    upstream_l: TcpListener,
    info: StartInfo<'_>,
    shutdown: &CancellationToken,
) -> Result<Option<seed::Seeded>> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .context("http client")?;
    let cp_ready = format!("http://{}/readyz", info.http_addr);
    if !wait_until(shutdown, cp, "control plane", || {
        let (http, url) = (&http, &cp_ready);
        async move { ready(http, url).await }
    })
    .await?
    {
        return Ok(None);
    }

    parts.push(Part::spawn("demo upstream", move |stop| async move {
        sentinel_demo::upstream::serve(upstream_l, stop.cancelled_owned())
            .await
            .map_err(|e| e.to_string())
    }));

    let seeded = tokio::select! {
        s = seed::seed(info.grpc_url, info.admin_token, info.upstream_url) => s?,
        _ = shutdown.cancelled() => return Ok(None),
    };
    if seeded.revoked > 0 {
        eprintln!(
            "sentinel demo: revoked {} demo key(s) of an earlier run",
            seeded.revoked
        );
    }

    let proxy_dir = info.data_dir.join("proxy");
    std::fs::create_dir_all(&proxy_dir)
        .with_context(|| format!("creating {}", proxy_dir.display()))?;
    let mut config = ProxyConfig {
        proxy_id: PROXY_ID.into(),
        listen: info.proxy_addr,
        upstream_timeout_ms: 10_000,
        ..ProxyConfig::default()
    };
    config.control_plane.url = info.grpc_url.to_string();
    config.control_plane.join_token = info.join_token.to_string();
    config.control_plane.cache_file = Some(proxy_dir.join("policy.cache"));
    config.spool.dir = proxy_dir.join("spool");
    config
        .validate()
        .map_err(|e| anyhow!("proxy configuration: {e}"))?;
    parts.push(Part::spawn("proxy", move |stop| async move {
        sentinel_proxy::boot::start(config, proxy_l, stop.cancelled_owned())
            .await
            .map_err(|e| e.to_string())
    }));

    // Ready means: serving, and enforcing a policy that holds the new keys
    // (a policy cached by an earlier run would not).
    let proxy_ready = format!("http://{}/readyz", info.proxy_addr);
    let want = seeded.version;
    let proxy = parts.last_mut().context("proxy part")?;
    let ok = wait_until(shutdown, proxy, "proxy", || {
        let (http, url) = (&http, &proxy_ready);
        async move {
            ready(http, url).await
                && seed::acked_version(info.grpc_url, info.admin_token, PROXY_ID)
                    .await
                    .is_ok_and(|v| v >= want)
        }
    })
    .await?;
    Ok(ok.then_some(seeded))
}

async fn ready(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Polls `check` until it holds (true), the user stops the demo (false), the
/// component dies or [`READY_LIMIT`] passes (errors).
async fn wait_until<F, Fut>(
    shutdown: &CancellationToken,
    part: &mut Part,
    what: &str,
    mut check: F,
) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if shutdown.is_cancelled() {
            return Ok(false);
        }
        part.check_running()?;
        if check().await {
            return Ok(true);
        }
        if Instant::now() > deadline {
            bail!("the {what} was not ready within {}s", READY_LIMIT.as_secs());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.cancelled() => return Ok(false),
        }
    }
}

/// Runs until the user stops the demo or a component ends on its own (an
/// error: each should run until told to stop).
async fn watch(cp: &mut Part, parts: &mut [Part], shutdown: &CancellationToken) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        for p in std::iter::once(&mut *cp).chain(parts.iter_mut()) {
            if p.task.is_finished() {
                bail!("the {} stopped unexpectedly (see the log above)", p.name);
            }
        }
    }
}

struct Banner<'a> {
    data_dir: &'a Path,
    postgres: &'a pg::Postgres,
    proxy_addr: SocketAddr,
    grpc_url: &'a str,
    http_addr: SocketAddr,
    upstream_url: &'a str,
    admin_token: &'a str,
    seeded: &'a seed::Seeded,
}

fn print_banner(b: &Banner<'_>) {
    let mcp = format!("http://{}/mcp", b.proxy_addr);
    let rest = format!("http://{}", b.http_addr);
    let dev_key = b.seeded.keys.first().map_or("<key>", |k| k.secret.as_str());
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(String::new());
    line(format!(
        "Sentinel demo is running (data in {}).",
        b.data_dir.display()
    ));
    line(String::new());
    line(format!("MCP endpoint (the proxy):  {mcp}"));
    line("API keys (new on every run; earlier demo keys are revoked):".into());
    for k in &b.seeded.keys {
        line(format!(
            "  {:<17}  {}   {}",
            format!("{} ({})", k.role, k.owner),
            k.secret,
            k.summary
        ));
    }
    line("Tools: demo__echo, demo__add, demo__time, demo__lookup_customer".into());
    line("       (arguments named like *email* are redacted in the audit log)".into());
    line(String::new());
    line("Control plane:".into());
    line(format!("  REST API     {rest}/api/v1"));
    line(format!("  Swagger UI   {rest}/docs"));
    line(format!("  OpenAPI      {rest}/api/v1/openapi.json"));
    line(format!("  gRPC (admin) {}", b.grpc_url));
    line(format!("  Admin token  {}", b.admin_token));
    match &b.postgres.local {
        Some(pg) => line(format!(
            "Postgres:      {} (cluster in {})",
            b.postgres.url,
            pg.data_dir.display()
        )),
        None => line(format!(
            "Postgres:      {} (from DATABASE_URL)",
            pg::redact(&b.postgres.url)
        )),
    }
    line(format!(
        "Demo upstream: {} (behind the proxy as backend 'demo')",
        b.upstream_url
    ));
    line(String::new());
    line("Call a tool (MCP 2026-07-28, stateless):".into());
    line(format!(
        "curl -sS {mcp} \\\n  -H 'Authorization: Bearer {dev_key}' \\\n  -H 'Content-Type: application/json' \\\n  -H 'Accept: application/json, text/event-stream' \\\n  -H 'MCP-Protocol-Version: 2026-07-28' \\\n  -H 'Mcp-Method: tools/call' \\\n  -H 'Mcp-Name: demo__echo' \\\n  -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"demo__echo\",\"arguments\":{{\"message\":\"hello\"}},\"_meta\":{{\"io.modelcontextprotocol/protocolVersion\":\"2026-07-28\",\"io.modelcontextprotocol/clientCapabilities\":{{}}}}}}}}'"
    ));
    line(String::new());
    line("With a real MCP client:".into());
    line(format!(
        "  MCP Inspector: npx @modelcontextprotocol/inspector  (Transport: Streamable HTTP, URL: {mcp},\n                 header Authorization: Bearer {dev_key})"
    ));
    line("  Python SDK (pip install 'mcp==2.3.0'):".into());
    line("python3 - <<'EOF'".into());
    line("import anyio".into());
    line("from mcp import Client".into());
    line("from mcp.client.streamable_http import streamable_http_client".into());
    line("from mcp.shared._httpx_utils import create_mcp_http_client".into());
    line("async def main():".into());
    line(format!(
        "    http = create_mcp_http_client(headers={{\"Authorization\": \"Bearer {dev_key}\"}})"
    ));
    line(format!(
        "    async with Client(streamable_http_client(\"{mcp}\", http_client=http)) as c:"
    ));
    line("        print([t.name for t in (await c.list_tools()).tools])".into());
    line("        print(await c.call_tool(\"demo__lookup_customer\", {\"email\": \"ada@example.com\"}))".into());
    line("anyio.run(main)".into());
    line("EOF".into());
    line(String::new());
    line("See the audit log:".into());
    line(format!(
        "  sentinelctl --addr {} --http {rest} --token {} audit query",
        b.grpc_url, b.admin_token
    ));
    line(
        "    (sentinelctl: cargo build --release -p sentinel-control-plane --bin sentinelctl)"
            .into(),
    );
    line(format!(
        "  curl -sS -H 'Authorization: Bearer {}' '{rest}/api/v1/audit?limit=10'",
        b.admin_token
    ));
    line(String::new());
    line("Press Ctrl-C to stop.".into());
    print!("{out}");
}
