//! `sentinel-control-plane`: parses the configuration, binds the sockets and
//! hands them to [`server::run`]. Exit codes: 64 bad configuration, 69
//! database unreachable, 70 migration failed, 1 any other failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sentinel_control_plane::config::Config;
use sentinel_control_plane::db::DbError;
use sentinel_control_plane::server::{self, Listeners, StartError};
use tokio_util::sync::CancellationToken;

/// mimalloc rather than glibc malloc: a tools/call allocates and frees many
/// small buffers (JSON trees, headers, audit text) across threads, where
/// glibc's arenas spent about a quarter of the proxy's CPU (profile in
/// docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sentinel-control-plane",
    version,
    about = "Sentinel's control plane"
)]
struct Cli {
    /// Configuration file (TOML). `SENTINEL_CP_*` variables and
    /// `DATABASE_URL` override it.
    #[arg(long, short, env = "SENTINEL_CP_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Re-check every stored audit hash chain and report tampering; exits 2
    /// when a problem is found.
    Verify {
        /// Only this proxy's chains.
        #[arg(long)]
        proxy: Option<String>,
    },
}

const EX_CONFIG: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("sentinel-control-plane: invalid configuration:");
            for e in &errors.0 {
                eprintln!("  {}: {}", e.field, e.message);
            }
            return ExitCode::from(EX_CONFIG);
        }
    };
    init_logging(&config.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sentinel-control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => rt.block_on(serve(config)),
        Command::Verify { proxy } => rt.block_on(verify(config, proxy)),
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn exit_for(e: &StartError) -> ExitCode {
    match e {
        StartError::Db(DbError::Unreachable { .. } | DbError::BadUrl(_)) => {
            ExitCode::from(EX_UNAVAILABLE)
        }
        StartError::Db(DbError::Migration(_)) => ExitCode::from(EX_SOFTWARE),
        StartError::Tls(_) => ExitCode::from(EX_CONFIG),
        _ => ExitCode::FAILURE,
    }
}

async fn serve(config: Config) -> ExitCode {
    let bind = |addr: &str, field: &'static str| {
        let addr = addr.to_string();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| format!("{field}: cannot listen on {addr}: {e}"))
        }
    };
    let listeners = match tokio::try_join!(
        bind(&config.grpc.listen, "grpc.listen"),
        bind(&config.http.listen, "http.listen")
    ) {
        Ok((grpc, http)) => Listeners { grpc, http },
        Err(e) => {
            eprintln!("sentinel-control-plane: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    };
    tracing::info!(
        grpc = %config.grpc.listen,
        http = %config.http.listen,
        "starting control plane"
    );
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signals.cancel();
    });
    match server::run(config, listeners, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "control plane stopped");
            eprintln!("sentinel-control-plane: {e}");
            exit_for(&e)
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn verify(config: Config, proxy: Option<String>) -> ExitCode {
    let pool = match sentinel_control_plane::db::connect(
        &config.database_url,
        2,
        std::time::Duration::from_secs(config.db.connect_timeout_secs),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sentinel-control-plane verify: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    let store = sentinel_control_plane::store::Store::new(pool);
    match store.verify_chains(proxy.as_deref()).await {
        Ok(report) => {
            println!(
                "checked {} chains, {} events: {}",
                report.chains,
                report.events,
                if report.problems.is_empty() {
                    "intact"
                } else {
                    "PROBLEMS FOUND"
                }
            );
            for p in &report.problems {
                println!("  {p}");
            }
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("sentinel-control-plane verify: {e}");
            ExitCode::FAILURE
        }
    }
}
