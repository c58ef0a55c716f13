//! `sentinelctl`, the operators' command line: `sentinelctl <noun> <verb>`.
//!
//! Every command talks to a running control plane, never to Postgres: the
//! gRPC admin service for keys, policy, audit queries and the fleet; the
//! REST API where a response is a stream (audit export, live tail) or a
//! report only REST serves (chain verification, gaps).
//!
//! Modules:
//! - [`conn`]: the gRPC and REST connections, and the one-line errors made
//!   from what the server said;
//! - [`render`]: tables, JSON, times and durations, terminal-safe text;
//! - [`keys`], [`policy`], [`audit`], [`fleet`], [`can_i`]: the commands.
//!
//! Exit codes: 0 success; 1 failure, or "no" from `can-i`; 2 when
//! `audit verify` finds tampering; 64 on bad usage.

pub mod audit;
pub mod can_i;
pub mod conn;
pub mod fleet;
pub mod keys;
pub mod policy;
pub mod render;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// What a command that ran to the end asks the process to exit with.
pub type ExitCode = u8;

/// Why a command failed. Printed as one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Anything the operator should read: a refusal from the server, a bad
    /// file, an unreachable address.
    #[error("{0}")]
    Message(String),
    /// Writing our own output failed (a closed pipe, a full disk).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Message(msg.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (NDJSON for streams).
    Json,
}

/// The operators' CLI for Sentinel, the MCP security gateway.
///
/// Address and admin token come from flags or the environment
/// (SENTINEL_ADDR, SENTINEL_HTTP, SENTINEL_TOKEN). Prefer the environment
/// for the token: command-line arguments are visible to other local users.
#[derive(Debug, Parser)]
#[command(name = "sentinelctl", version, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// The control plane's gRPC admin address.
    #[arg(
        long,
        env = "SENTINEL_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    /// The control plane's REST address (audit export, tail, verify, gaps).
    #[arg(
        long,
        env = "SENTINEL_HTTP",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub http: String,
    /// The admin token.
    #[arg(long, env = "SENTINEL_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the control plane's certificate:
    /// needed for https:// addresses (no system roots are loaded).
    #[arg(long, env = "SENTINEL_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API keys: create (the secret is shown once), list, get, revoke, rotate.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// The policy: apply a file, diff, export, get.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// The audit trail: query, tail, export, verify, gaps.
    #[command(subcommand)]
    Audit(Box<audit::AuditCmd>),
    /// The proxies.
    #[command(subcommand)]
    Fleet(fleet::FleetCmd),
    /// Would this key or role be allowed to call a tool, and why.
    ///
    /// Evaluated by the same code the proxy runs, over the current policy.
    /// Exits 0 when allowed, 1 when denied.
    #[command(name = "can-i")]
    CanI(can_i::CanIArgs),
    /// Join tokens for proxies.
    #[command(name = "join-tokens", subcommand)]
    JoinTokens(fleet::JoinTokensCmd),
}

const EXAMPLES: &str = "\
Examples:
  export SENTINEL_ADDR=http://127.0.0.1:50051 SENTINEL_HTTP=http://127.0.0.1:8080 SENTINEL_TOKEN=...
  sentinelctl policy diff -f policy.yaml && sentinelctl policy apply -f policy.yaml
  sentinelctl keys create --role ops --owner alice --expires-in 30d
  sentinelctl can-i --key 3fK9x2LmQp7a everything/echo
  sentinelctl audit query --since 1h --outcome forbidden
  sentinelctl audit tail --follow -o json
  sentinelctl audit export --format csv --since 7d > audit.csv";

/// The flags every command shares, resolved.
pub struct Ctx {
    pub addr: String,
    pub http: String,
    token: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub output: Output,
}

impl Ctx {
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }

    /// The admin token, or the error saying how to give one.
    pub(crate) fn token(&self) -> Result<&str> {
        match self.token.as_deref().map(str::trim) {
            Some(t) if !t.is_empty() => Ok(t),
            _ => fail("no admin token: pass --token or set SENTINEL_TOKEN"),
        }
    }
}

/// Runs one command line to its end.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli {
        addr,
        http,
        token,
        ca_cert,
        output,
        command,
    } = cli;
    let ctx = Ctx {
        addr,
        http,
        token,
        ca_cert,
        output,
    };
    match command {
        Command::Keys(c) => keys::run(&ctx, c).await,
        Command::Policy(c) => policy::run(&ctx, c).await,
        Command::Audit(c) => audit::run(&ctx, *c).await,
        Command::Fleet(c) => fleet::run(&ctx, c).await,
        Command::CanI(a) => can_i::run(&ctx, a).await,
        Command::JoinTokens(c) => fleet::run_join_tokens(&ctx, c).await,
    }
}

/// Audit filters shared by `audit query`, `export` and `tail`.
#[derive(Debug, Clone, Default, Args)]
pub struct FilterArgs {
    /// Client subject.
    #[arg(long)]
    pub subject: Option<String>,
    /// API key id.
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub role: Option<String>,
    /// Tool name; `backend/tool` also sets --backend.
    #[arg(long)]
    pub tool: Option<String>,
    #[arg(long)]
    pub backend: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(sentinel_shared::audit::OUTCOMES))]
    pub outcome: Option<String>,
    /// Proxy id.
    #[arg(long)]
    pub proxy: Option<String>,
    #[arg(long)]
    pub request_id: Option<String>,
    #[arg(long)]
    pub session_id: Option<String>,
    /// Only events whose hash chain link did not verify.
    #[arg(long)]
    pub chain_broken_only: bool,
}

impl FilterArgs {
    /// `--tool backend/tool` is shorthand for `--backend backend --tool tool`.
    pub fn normalized(mut self) -> Result<Self> {
        if let Some(t) = &self.tool
            && let Some((b, tool)) = t.split_once('/')
        {
            if let Some(given) = &self.backend
                && given != b
            {
                return fail(format!(
                    "--tool '{t}' names backend '{b}' but --backend is '{given}'"
                ));
            }
            self.backend = Some(b.to_string());
            self.tool = Some(tool.to_string());
        }
        Ok(self)
    }

    /// The filters as REST query parameters.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        let mut put = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                q.push((k, v.clone()));
            }
        };
        put("subject", &self.subject);
        put("key_id", &self.key);
        put("role", &self.role);
        put("tool", &self.tool);
        put("backend", &self.backend);
        put("outcome", &self.outcome);
        put("proxy_id", &self.proxy);
        put("request_id", &self.request_id);
        put("session_id", &self.session_id);
        if self.chain_broken_only {
            q.push(("chain_broken_only", "true".into()));
        }
        q
    }
}

/// Time range flags of `audit query` and `audit export`.
#[derive(Debug, Clone, Default, Args)]
pub struct RangeArgs {
    /// Only events this recent, e.g. 15m, 1h, 7d.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub since: Option<String>,
    /// Events at or after this time (RFC 3339).
    #[arg(long)]
    pub from: Option<String>,
    /// Events before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
}

impl RangeArgs {
    /// The range as unix microseconds (`None`: open).
    pub fn resolve(&self) -> Result<(Option<i64>, Option<i64>)> {
        if let Some(s) = &self.since {
            let d =
                render::parse_duration(s).map_err(|m| Error::Message(format!("--since: {m}")))?;
            let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
            return Ok((Some(sentinel_shared::now_us().saturating_sub(us)), None));
        }
        let from = self
            .from
            .as_deref()
            .map(|s| render::parse_time(s).map_err(|m| Error::Message(format!("--from: {m}"))))
            .transpose()?;
        let to = self
            .to
            .as_deref()
            .map(|s| render::parse_time(s).map_err(|m| Error::Message(format!("--to: {m}"))))
            .transpose()?;
        if let (Some(a), Some(b)) = (from, to)
            && a >= b
        {
            return fail("--from must be before --to");
        }
        Ok((from, to))
    }
}
