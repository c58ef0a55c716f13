//! `bench-upstream`: the demo MCP upstream as a process of its own, so the
//! overhead benchmark can read its CPU time apart from the proxy's.
//!
//! ```text
//! bench-upstream --listen 127.0.0.1:9000          # tools/call answered as JSON
//! bench-upstream --listen 127.0.0.1:9001 --sse    # ... as a one-event SSE stream
//! ```
//!
//! One runtime thread by default: per call it costs less than a
//! multi-threaded runtime (no work stealing, no cross-thread wake-ups), and
//! one core is far more than the proxies in front of it can feed.

use std::net::SocketAddr;

use clap::Parser;
use sentinel_demo::upstream::{self, Options};

#[derive(Parser)]
#[command(
    name = "bench-upstream",
    about = "The demo MCP upstream, for benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Answer tools/call as text/event-stream.
    #[arg(long)]
    sse: bool,
    /// Runtime threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        // The harness reads the bound address from the first line.
        println!("listening on {}", listener.local_addr()?);
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        upstream::serve_with(listener, Options { sse: args.sse }, shutdown).await?;
        Ok(())
    })
}
