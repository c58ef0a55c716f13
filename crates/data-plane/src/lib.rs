//! Sentinel's data plane: a stateless MCP proxy that authenticates,
//! authorizes, rate limits and audits every tool call.
//!
//! Modules:
//! - [`boot`]: start-up of a whole proxy (policy, spool, shipper, server);
//! - [`config`]: the TOML file and `SENTINEL_PROXY_*` overrides;
//! - [`control`]: the policy sync client toward the control plane;
//! - [`policy`]: the policy in force (`watch` channel) and local files;
//! - [`gate`]: authentication, authorization, rate limiting;
//! - [`stack`]: the gates of a tools/call, in order, with audit;
//! - [`mcp`]: the MCP endpoint for both protocol eras, sessions, federation;
//! - [`upstream`]: HTTP and stdio upstreams;
//! - [`audit`]: the audit event and the sink it is handed to;
//! - [`server`]: routes, health, metrics, `run`;
//! - [`clock`], [`error`], [`metrics`]: cross-cutting pieces.
//!
//! Architecture invariant: the data plane never opens a database
//! connection; policy arrives only through [`policy::PolicyPublisher`].

pub mod audit;
pub mod boot;
pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod gate;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod stack;
pub mod upstream;

#[cfg(test)]
pub(crate) mod testing;
