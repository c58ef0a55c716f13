//! `sentinel-proxy`: parses config, binds the listener and calls
//! [`sentinel_proxy::boot::start`] (policy, audit spool, shipper, server).
//! Exit codes: 64 bad configuration, 1 any other failure.

use std::path::PathBuf;

use clap::Parser;
use sentinel_proxy::boot::{self, BootError};
use sentinel_proxy::config::{Config, EXIT_BAD_CONFIG};

/// mimalloc rather than glibc malloc: a tools/call allocates and frees many
/// small buffers (JSON trees, headers, audit text) across threads, where
/// glibc's arenas spent about a quarter of the proxy's CPU (profile in
/// docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sentinel-proxy", version, about = "Sentinel's MCP data plane")]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, short, env = "SENTINEL_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Serve MCP on stdin/stdout instead of HTTP (for agents that launch
    /// their MCP servers as processes); the client's credential comes from
    /// `SENTINEL_API_KEY`. Logs go to stderr.
    #[arg(long)]
    stdio: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    // One thread: a current-thread runtime, where every task, timer and
    // socket is served by the one event loop (no cross-thread wake-ups).
    let workers = config.worker_threads();
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sentinel-proxy: cannot start the runtime ({workers} workers): {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run(args, config));
}

async fn run(args: Args, config: Config) {
    if args.stdio {
        let Ok(credential) = std::env::var("SENTINEL_API_KEY") else {
            eprintln!(
                "invalid configuration:\n  SENTINEL_API_KEY: required with --stdio (the client's API key or token)"
            );
            std::process::exit(EXIT_BAD_CONFIG);
        };
        match boot::start_stdio(config, credential).await {
            Ok(()) => return,
            Err(e @ BootError::Config(_)) => {
                eprintln!("{e}");
                std::process::exit(EXIT_BAD_CONFIG);
            }
            Err(e) => {
                eprintln!("sentinel-proxy: {e}");
                std::process::exit(1);
            }
        }
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "invalid configuration:\n  listen: cannot listen on {}: {e}",
                config.listen
            );
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
    };
    match boot::start(config, listener, shutdown).await {
        Ok(()) => {}
        Err(e @ BootError::Config(_)) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
        Err(e) => {
            eprintln!("sentinel-proxy: {e}");
            std::process::exit(1);
        }
    }
}
