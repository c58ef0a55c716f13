//! The admin REST API (`/api/v1`), its OpenAPI document and Swagger UI, and
//! the unauthenticated probes (`/healthz`, `/readyz`, `/metrics`).
//!
//! One submodule per noun: [`keys`], [`policy`], [`audit`], [`fleet`];
//! [`extract`] holds the extractors that turn bad input into our JSON error
//! shape. Handlers only translate between HTTP and [`Store`](crate::store::Store)
//! calls: every rule (validation, versioning, redaction) lives in the store
//! or in `sentinel_shared::spec`, so gRPC and REST cannot disagree.
//!
//! Every error, including a bad route, a wrong method, a body that is not
//! JSON and a missing credential, answers
//! `{"error": {"code", "message", "fields": [{"field", "message"}]}}`.

pub mod audit;
pub mod extract;
pub mod fleet;
pub mod keys;
pub mod policy;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::Error;
use crate::state::{AppState, bearer};

/// Where the OpenAPI document is served, without credentials (it describes
/// the API; it holds no data).
pub const OPENAPI_PATH: &str = "/api/v1/openapi.json";
/// Prefix of everything that needs the admin credential.
const API_PREFIX: &str = "/api/v1";
/// How long `/readyz` waits for Postgres to answer.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sentinel control plane",
        description = "Admin API of Sentinel, the MCP security gateway: API keys, policy, audit, fleet. \
            Every /api/v1 call needs `Authorization: Bearer <admin token>`."
    ),
    modifiers(&BearerAuth),
    security(("admin_token" = [])),
    tags(
        (name = "keys", description = "API keys: the secret is shown once"),
        (name = "policy", description = "Roles, backends, JWT issuers; every change bumps the policy version"),
        (name = "audit", description = "Audit queries, export, live tail, tamper evidence"),
        (name = "fleet", description = "Proxies and join tokens"),
        (name = "health", description = "Probes, no credential needed"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The shape of every error body, for the OpenAPI document (the value is
/// built by [`Error`]'s `IntoResponse`).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `invalid_argument`, `not_found`, `already_exists`,
    /// `failed_precondition`, `unauthenticated`, `unavailable`, `internal`...
    pub code: String,
    pub message: String,
    /// For `invalid_argument`: each field at fault, e.g. `roles[0].allow[1]`.
    pub fields: Vec<FieldErrorBody>,
}

#[derive(Serialize, ToSchema)]
pub struct FieldErrorBody {
    pub field: String,
    pub message: String,
}

/// The REST API with its probes, OpenAPI document and Swagger UI (`/docs`).
pub fn router(state: AppState) -> Router {
    router_until(state, CancellationToken::new())
}

/// [`router`], whose long-lived responses (live tails) end when `shutdown`
/// is cancelled: a graceful shutdown waits for open connections, and a
/// tail left open would hold it for as long as the tail may last.
pub fn router_until(state: AppState, shutdown: CancellationToken) -> Router {
    let (api, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(keys::routes())
        .merge(policy::routes())
        .merge(audit::routes())
        .merge(fleet::routes())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .split_for_parts();
    // `Router::layer` wraps everything added before it, fallback included;
    // layers read bottom to top: a request meets the trace span first, then
    // `require_admin`.
    api.merge(SwaggerUi::new("/docs").url(OPENAPI_PATH, openapi))
        .fallback(not_found)
        // Lets live tails see the server shutting down.
        .layer(Extension(audit::Shutdown(shutdown)))
        // Turns axum's bare 405 into our error shape.
        .layer(middleware::map_response(json_method_not_allowed))
        // Checks the admin credential on every /api/v1 path before routing,
        // so unknown /api/v1 paths do not tell an anonymous caller what
        // exists.
        .layer(middleware::from_fn_with_state(state.clone(), require_admin))
        // One span per request (method, path), refusals included. Headers
        // are not recorded: they carry the admin token.
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

fn needs_admin(path: &str) -> bool {
    let under_api = path == API_PREFIX
        || path
            .strip_prefix(API_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'));
    under_api && path != OPENAPI_PATH
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if needs_admin(req.uri().path()) {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        if let Err(e) = state.check_admin(token) {
            let mut resp = e.into_response();
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Error {
    Error::not_found("route", req.uri().path())
}

async fn json_method_not_allowed(resp: Response) -> Response {
    if resp.status() != StatusCode::METHOD_NOT_ALLOWED || resp.headers().contains_key(CONTENT_TYPE)
    {
        return resp;
    }
    let (mut parts, _) = resp.into_parts();
    let body = serde_json::json!({
        "error": {
            "code": "method_not_allowed",
            "message": "method not allowed on this path",
            "fields": [],
        }
    });
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let mut out = (parts.status, Json(body)).into_response();
    // Keep `Allow`, which names the methods that are.
    for (k, v) in &parts.headers {
        out.headers_mut().entry(k).or_insert_with(|| v.clone());
    }
    out
}

#[derive(Serialize, ToSchema)]
pub struct Status {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = Status)))]
async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// The process can serve: Postgres answers.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, body = Status), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Response {
    // A probe must answer within the prober's timeout even when Postgres
    // hangs rather than refuses.
    let up = tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await;
    if up.unwrap_or(false) {
        Json(Status { status: "ready" }).into_response()
    } else {
        let body = serde_json::json!({
            "error": {"code": "unavailable", "message": "database unavailable", "fields": []}
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Prometheus metrics, when a recorder is installed.
#[utoipa::path(get, path = "/metrics", tag = "health", security(()),
    responses((status = 200, content_type = "text/plain", description = "Prometheus text format"),
              (status = 404, body = ErrorBody, description = "no metrics recorder in this process")))]
async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            // Read at scrape time so that a filled gap clears at once; on a
            // database error the previous values stay.
            match state.store.open_gap_totals().await {
                Ok((gaps, missing)) => {
                    metrics::gauge!("sentinel_audit_gaps_open").set(gaps as f64);
                    metrics::gauge!("sentinel_audit_gap_events_missing").set(missing as f64);
                }
                Err(e) => tracing::debug!(error = %e, "open gaps not read for /metrics"),
            }
            (
                [(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                )],
                handle.render(),
            )
                .into_response()
        }
        None => Error::not_found("route", "/metrics").into_response(),
    }
}

/// RFC 3339 text of a timestamp, for JSON views.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests;
