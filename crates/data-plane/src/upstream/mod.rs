//! Upstream MCP servers: over Streamable HTTP ([`http`], either protocol
//! era, learned per upstream) or as a child process on stdio ([`stdio`],
//! only commands declared in the proxy's own config).
//!
//! The front speaks to every upstream through [`Upstream`]: open a legacy
//! session, send a message on a route (a legacy session or stateless), listen,
//! end. Whatever goes wrong becomes an [`UpstreamError`], which the client
//! sees as a JSON-RPC error and the audit log as `upstream_error`; it never
//! takes the proxy down.

pub mod http;
pub mod stdio;

use std::time::Duration;

use futures::stream::BoxStream;
use serde_json::Value;

use sentinel_shared::proto;

use crate::mcp::session::UpstreamSession;
use crate::policy::watch::UpstreamEnv;

/// A stream of JSON-RPC messages from an upstream (a listen stream).
pub type MessageStream = BoxStream<'static, Result<Value, UpstreamError>>;

/// The messages of an SSE reply as their `data` text, parsed only where
/// the relay needs to look inside one (see [`crate::mcp::raw`]). Not
/// checked to be JSON until read.
pub type TextStream = BoxStream<'static, Result<String, UpstreamError>>;

/// An upstream's answer to one message.
pub enum Reply {
    /// One JSON-RPC message (`application/json`).
    Json(Value),
    /// One JSON-RPC object as the upstream sent it (`application/json`),
    /// not parsed yet: a plain result passes through without a tree being
    /// built of it (see [`crate::mcp::raw`]). Not checked to be JSON until
    /// it is read.
    Raw(Vec<u8>),
    /// Messages relayed one by one (`text/event-stream`); the response to
    /// the request is among them, usually last.
    Stream(TextStream),
    /// `202 Accepted`: nothing to relay.
    Accepted,
}

impl Reply {
    /// Reads the reply until the response to `id`, dropping everything else
    /// (used where the proxy itself consumes the answer: lists, initialize).
    pub async fn response_to(self, id: &Value, idle: Duration) -> Result<Value, UpstreamError> {
        use futures::StreamExt;
        match self {
            Reply::Json(v) => Ok(v),
            Reply::Raw(b) => parse_message(&b),
            Reply::Accepted => Err(UpstreamError::Garbage(
                "202 where a response was due".into(),
            )),
            Reply::Stream(mut s) => {
                // Bounded: a stream gets at most 10 000 messages before its
                // answer, each within the idle timeout.
                for _ in 0..10_000 {
                    match tokio::time::timeout(idle, s.next()).await {
                        Err(_) => return Err(UpstreamError::Timeout),
                        Ok(None) => break,
                        Ok(Some(Err(e))) => return Err(e),
                        Ok(Some(Ok(text))) => {
                            let m = parse_event(&text)?;
                            if m.get("id") == Some(id)
                                && (m.get("result").is_some() || m.get("error").is_some())
                            {
                                return Ok(m);
                            }
                        }
                    }
                }
                Err(UpstreamError::Garbage(
                    "stream ended without a response".into(),
                ))
            }
        }
    }
}

/// One JSON-RPC message (or batch) from an upstream's body.
pub fn parse_message(body: &[u8]) -> Result<Value, UpstreamError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| UpstreamError::Garbage(format!("invalid json: {e}")))?;
    if !(v.is_object() || v.is_array()) {
        return Err(UpstreamError::Garbage("not a JSON-RPC message".into()));
    }
    Ok(v)
}

/// One JSON-RPC message from the `data` of an SSE event.
pub fn parse_event(text: &str) -> Result<Value, UpstreamError> {
    serde_json::from_str(text)
        .map_err(|e| UpstreamError::Garbage(format!("invalid json in event: {e}")))
}

/// How a message reaches an upstream.
#[derive(Debug, Clone, Copy)]
pub enum Route<'a> {
    /// Inside the client's legacy session with this upstream.
    Session(&'a UpstreamSession),
    /// Stateless: the 2026-07-28 era if the upstream speaks it, else the
    /// proxy's own service session with it. Carries the client's
    /// `Mcp-Param-*` headers, which a 2026-07-28 upstream checks against the
    /// arguments (the proxy passes them on; it never decides on them).
    Stateless(&'a [(::http::HeaderName, ::http::HeaderValue)]),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answered something that is not MCP: {0}")]
    Garbage(String),
    #[error("upstream session has ended")]
    SessionGone,
    #[error("unavailable on this proxy: {0}")]
    Unavailable(String),
    #[error("not part of this session; initialize again")]
    NotInSession,
}

impl UpstreamError {
    /// What the client is told (no addresses, no internals).
    pub fn client_message(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "upstream unreachable",
            UpstreamError::Timeout => "upstream timed out",
            UpstreamError::Status(_) => "upstream failed",
            UpstreamError::Garbage(_) => "upstream sent an invalid answer",
            UpstreamError::SessionGone => "upstream session has ended",
            UpstreamError::Unavailable(_) => "upstream unavailable",
            UpstreamError::NotInSession => "upstream not in this session; initialize again",
        }
    }
}

/// One upstream, built from a policy backend and the local config.
pub enum Upstream {
    Http(Box<http::HttpUpstream>),
    Stdio(stdio::StdioUpstream),
    /// Configured in policy but impossible here (e.g. a stdio command this
    /// proxy does not declare): every call fails as an upstream error.
    Unavailable {
        name: String,
        reason: String,
    },
}

impl Upstream {
    pub fn build(def: &proto::Backend, env: &UpstreamEnv, timeout: Duration) -> Self {
        match &def.transport {
            Some(proto::backend::Transport::Http(h)) => {
                match http::HttpUpstream::new(&def.name, h, env.upstream.clone(), timeout) {
                    Ok(u) => Upstream::Http(Box::new(u)),
                    Err(reason) => Upstream::Unavailable {
                        name: def.name.clone(),
                        reason,
                    },
                }
            }
            Some(proto::backend::Transport::Stdio(s)) => match env.stdio.get(&s.command_ref) {
                Some(cmd) => {
                    Upstream::Stdio(stdio::StdioUpstream::new(&def.name, cmd.clone(), timeout))
                }
                None => {
                    tracing::warn!(backend = %def.name, command = %s.command_ref, "stdio command not declared in this proxy's config");
                    Upstream::Unavailable {
                        name: def.name.clone(),
                        reason: format!("stdio command '{}' is not declared here", s.command_ref),
                    }
                }
            },
            None => Upstream::Unavailable {
                name: def.name.clone(),
                reason: "backend has no transport".into(),
            },
        }
    }

    /// Opens a legacy session with the client's `initialize` params.
    pub async fn open_session(
        &self,
        init_params: &Value,
    ) -> Result<UpstreamSession, UpstreamError> {
        match self {
            Upstream::Http(h) => h.open_session(init_params).await,
            Upstream::Stdio(s) => s.open_session().await,
            Upstream::Unavailable { reason, .. } => Err(UpstreamError::Unavailable(reason.clone())),
        }
    }

    /// Sends a request, notification or response.
    pub async fn send(&self, msg: &Value, route: Route<'_>) -> Result<Reply, UpstreamError> {
        let r = match self {
            Upstream::Http(h) => h.send(msg, route).await,
            Upstream::Stdio(s) => s.send(msg).await,
            Upstream::Unavailable { reason, .. } => Err(UpstreamError::Unavailable(reason.clone())),
        };
        // Upstream health as the request path sees it.
        metrics::counter!(
            "sentinel_upstream_requests_total",
            "backend" => self.name().to_string(),
            "result" => if r.is_ok() { "ok" } else { "error" }
        )
        .increment(1);
        r
    }

    pub fn name(&self) -> &str {
        match self {
            Upstream::Http(h) => h.name(),
            Upstream::Stdio(s) => s.name(),
            Upstream::Unavailable { name, .. } => name,
        }
    }

    /// Whether messages sent statelessly reach a legacy-era upstream (its
    /// results then lack the 2026-07-28 `resultType`).
    pub async fn stateless_is_legacy(&self) -> bool {
        match self {
            Upstream::Http(h) => !h.is_modern().await,
            _ => true,
        }
    }

    /// Opens the upstream's GET listen stream of a legacy session, if it has
    /// one.
    pub async fn listen(&self, session: &UpstreamSession) -> Option<MessageStream> {
        match self {
            Upstream::Http(h) => h.listen(session).await,
            Upstream::Stdio(s) => Some(s.notifications()),
            Upstream::Unavailable { .. } => None,
        }
    }

    /// Ends a legacy session.
    pub async fn end(&self, session: &UpstreamSession) {
        if let Upstream::Http(h) = self {
            h.end(session).await;
        }
    }
}
