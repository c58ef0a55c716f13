//! `sentinelctl`: the operators' command line for Sentinel. Parses the
//! arguments, runs one command (see `sentinel_control_plane::cli`) and exits
//! with its code; every failure is one line on stderr.

use clap::Parser;
use sentinel_control_plane::cli::{self, Cli, Error};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Both ring and aws-lc may be compiled in; say which one builds TLS
    // configs, or the first https:// connection panics. An error means a
    // provider is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            cli::render::note(&format!("error: cannot start the async runtime: {e}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        // A reader that went away (`| head`) is not a failure.
        Err(Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            cli::render::note(&format!("error: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}
