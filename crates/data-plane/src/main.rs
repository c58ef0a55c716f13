//! `sentinel-proxy`: parses config, binds the listener, loads the local
//! policy file if configured, and calls [`sentinel_proxy::server::run`].

use std::path::PathBuf;

use clap::Parser;
use sentinel_proxy::audit::MemorySink;
use sentinel_proxy::config::{Config, EXIT_BAD_CONFIG};
use sentinel_proxy::policy::file::PolicyFile;
use sentinel_proxy::policy::policy_channel;

#[derive(Parser)]
#[command(name = "sentinel-proxy", version, about = "Sentinel's MCP data plane")]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(long, short, env = "SENTINEL_PROXY_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    };
    let (publisher, reader) = policy_channel(&config);
    if let Some(path) = &config.policy_file {
        let snapshot = match PolicyFile::read(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("invalid configuration:\n  policy_file: {e}");
                std::process::exit(EXIT_BAD_CONFIG);
            }
        };
        if let Err(e) = publisher.publish(snapshot) {
            eprintln!("invalid configuration:\n  policy_file: {e}");
            std::process::exit(EXIT_BAD_CONFIG);
        }
    }
    // The control-plane sync client and the durable spool plug in here.
    let sink = MemorySink::new();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    sentinel_proxy::server::run(config, listener, reader, sink, shutdown).await?;
    drop(publisher);
    Ok(())
}
