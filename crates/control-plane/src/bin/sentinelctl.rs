//! `sentinelctl`: the operators' command line for Sentinel. Parses the
//! arguments, runs one command (see `sentinel_control_plane::cli`) and exits
//! with its code; every failure is one line on stderr.

use clap::Parser;
use sentinel_control_plane::cli::{self, Cli, Error};

/// Bad usage (an unknown flag, a missing argument). Not clap's default 2,
/// which `audit verify` keeps for "tampering found".
const EXIT_USAGE: u8 = 64;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` are reported as "errors" on stdout.
            return if e.use_stderr() {
                std::process::ExitCode::from(EXIT_USAGE)
            } else {
                std::process::ExitCode::SUCCESS
            };
        }
    };
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
