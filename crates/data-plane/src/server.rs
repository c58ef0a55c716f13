//! The HTTP server: routes, shared state and graceful shutdown.
//!
//! `run` takes an already-bound listener so tests start the real server on
//! `127.0.0.1:0`, and a shutdown future so they stop it.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use http::StatusCode;
use tokio::net::TcpListener;

use crate::audit::AuditSink;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::mcp::front::{self, AppState};
use crate::policy::PolicyReader;

/// Serves until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    config: Config,
    listener: TcpListener,
    policy: PolicyReader,
    audit: Arc<dyn AuditSink>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    run_with_clock(
        config,
        listener,
        policy,
        audit,
        Arc::new(SystemClock::default()),
        shutdown,
    )
    .await
}

/// [`run`] with an injected clock (tests of expiry and rate limits).
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    policy: PolicyReader,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(&config, policy, audit, clock);
    tracing::info!(addr = %listener.local_addr()?, proxy_id = %config.proxy_id, "sentinel-proxy serving");
    // Small writes (SSE events, JSON-RPC answers) must not wait on Nagle
    // for the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves one MCP client on this process's stdin/stdout (the stdio front)
/// until stdin closes. `credential` is the API key or JWT the agent's
/// environment gives the proxy (e.g. `SENTINEL_API_KEY`); logs must go to
/// stderr.
pub async fn run_stdio(
    config: &Config,
    policy: PolicyReader,
    audit: Arc<dyn AuditSink>,
    credential: &str,
) -> std::io::Result<()> {
    let state = Arc::new(AppState::new(
        config,
        policy,
        audit,
        Arc::new(SystemClock::default()),
    ));
    crate::mcp::stdio_front::serve(state, credential, tokio::io::stdin(), tokio::io::stdout()).await
}

/// The routes. `Router::layer` wraps bottom to top; there is one layer here.
pub fn router(
    config: &Config,
    policy: PolicyReader,
    audit: Arc<dyn AuditSink>,
    clock: Arc<dyn Clock>,
) -> Router {
    let metrics = crate::metrics::handle();
    let state = Arc::new(AppState::new(config, policy, audit, clock));
    let metadata_path = format!("/.well-known/oauth-protected-resource{}", config.mcp_path);
    Router::new()
        .route(
            &config.mcp_path,
            post(front::post).get(front::get).delete(front::delete),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            get(front::resource_metadata),
        )
        .route(&metadata_path, get(front::resource_metadata))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        // The front reads the body itself with its own limit (413 with a
        // JSON-RPC body); axum's default 2 MB limit must not cut in first.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Ready only once a policy is applied; says why not otherwise.
async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    match st.reader.current() {
        Some(s) => (
            StatusCode::OK,
            format!("ready: policy version {}", s.version()),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no policy applied yet (control plane unreachable and no cached policy)",
        )
            .into_response(),
    }
}
