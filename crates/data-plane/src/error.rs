//! The one error type of the data plane's MCP surface: every refusal or
//! failure a client can meet, with its HTTP status, JSON-RPC code and audit
//! outcome decided here and nowhere else.

use http::StatusCode;
use sentinel_shared::proto::Outcome;

use crate::gate::authn::Unauthenticated;
use crate::gate::authz::Forbidden;
use crate::gate::rate_limit::RateLimited;
use crate::upstream::UpstreamError;

/// JSON-RPC codes the proxy answers with.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    /// MCP 2026-07-28: headers disagree with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    pub const UNAUTHENTICATED: i64 = -32001;
    pub const FORBIDDEN: i64 = -32003;
    pub const RATE_LIMITED: i64 = -32029;
    pub const UPSTREAM: i64 = -32050;
    pub const UNAVAILABLE: i64 = -32051;
    pub const SESSION: i64 = -32052;
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("parse error: {0}")]
    Parse(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("invalid params: {0}")]
    InvalidParams(String),
    #[error("{0}")]
    HeaderMismatch(String),
    #[error("method not found: {0}")]
    MethodNotFound(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(#[from] Unauthenticated),
    #[error("forbidden: {0}")]
    Forbidden(#[from] Forbidden),
    #[error("rate limited: {0}")]
    RateLimited(#[from] RateLimited),
    #[error("upstream error: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("unknown tool: {0}")]
    UnknownTool(String),
    #[error("session not found")]
    SessionNotFound,
    #[error("session belongs to another principal")]
    SessionPrincipal,
    #[error("no policy has been applied yet")]
    NoPolicy,
    #[error("audit unavailable: {0}")]
    AuditUnavailable(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Parse(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::HeaderMismatch(_)
            | ProxyError::InvalidParams(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotFound(_) | ProxyError::UnknownTool(_) => StatusCode::OK,
            ProxyError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) | ProxyError::SessionPrincipal => StatusCode::FORBIDDEN,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            // An upstream session that ended means the client's session has:
            // 404 tells the client to initialize again.
            ProxyError::Upstream(UpstreamError::SessionGone) => StatusCode::NOT_FOUND,
            ProxyError::Upstream(_) => StatusCode::OK,
            ProxyError::SessionNotFound => StatusCode::NOT_FOUND,
            ProxyError::NoPolicy | ProxyError::AuditUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    pub fn code(&self) -> i64 {
        match self {
            ProxyError::Parse(_) => code::PARSE_ERROR,
            ProxyError::InvalidRequest(_) => code::INVALID_REQUEST,
            ProxyError::InvalidParams(_) | ProxyError::UnknownTool(_) => code::INVALID_PARAMS,
            ProxyError::HeaderMismatch(_) => code::HEADER_MISMATCH,
            ProxyError::MethodNotFound(_) => code::METHOD_NOT_FOUND,
            ProxyError::Unauthenticated(_) => code::UNAUTHENTICATED,
            ProxyError::Forbidden(_) | ProxyError::SessionPrincipal => code::FORBIDDEN,
            ProxyError::RateLimited(_) => code::RATE_LIMITED,
            ProxyError::Upstream(_) => code::UPSTREAM,
            ProxyError::SessionNotFound => code::SESSION,
            ProxyError::NoPolicy | ProxyError::AuditUnavailable(_) => code::UNAVAILABLE,
        }
    }

    /// The audit outcome (and metric label) of a call that ended here.
    pub fn outcome(&self) -> Outcome {
        match self {
            ProxyError::Unauthenticated(_) => Outcome::Unauthenticated,
            ProxyError::Forbidden(_) | ProxyError::SessionPrincipal => Outcome::Forbidden,
            ProxyError::RateLimited(_) => Outcome::RateLimited,
            ProxyError::Upstream(_) | ProxyError::AuditUnavailable(_) | ProxyError::NoPolicy => {
                Outcome::UpstreamError
            }
            ProxyError::Parse(_)
            | ProxyError::InvalidRequest(_)
            | ProxyError::InvalidParams(_)
            | ProxyError::HeaderMismatch(_)
            | ProxyError::MethodNotFound(_)
            | ProxyError::UnknownTool(_)
            | ProxyError::SessionNotFound => Outcome::InvalidRequest,
        }
    }

    /// What the client is told. Details (which pattern denied, why a token
    /// failed) go to the log and the audit decision, not to the client.
    pub fn client_message(&self) -> String {
        match self {
            ProxyError::Unauthenticated(_) => "authentication required".into(),
            ProxyError::Forbidden(_) => "not allowed to call this tool".into(),
            ProxyError::SessionPrincipal => "session belongs to another principal".into(),
            ProxyError::RateLimited(_) => "rate limit exceeded".into(),
            ProxyError::Upstream(e) => format!("upstream error: {}", e.client_message()),
            other => other.to_string(),
        }
    }
}
