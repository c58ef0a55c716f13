//! `/api/v1/proxies` and `/api/v1/join-tokens`: the fleet, and the tokens
//! that let a new proxy join it.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ErrorBody;
use super::extract::{OptionalJson, Params};
use super::rfc3339;
use crate::error::Result;
use crate::state::AppState;
use crate::store::fleet::ProxyRow;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_proxies))
        .routes(routes!(create_join_token))
}

/// A proxy as the fleet view shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProxyView {
    pub proxy_id: String,
    pub build_version: String,
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    /// A policy stream is open and was heard from recently.
    pub connected: bool,
    /// The control-plane instance holding its stream.
    pub control_plane_id: String,
    pub first_seen: String,
    pub last_seen: String,
    /// The newest policy version it applied.
    pub acked_version: i64,
    /// The newest version it refused, and why.
    pub rejected_version: i64,
    pub reject_reason: String,
    /// Its last heartbeat: audit backlog, spool bytes, open sessions...
    #[schema(value_type = Object)]
    pub stats: serde_json::Value,
    /// Audit events known missing from its chains.
    pub audit_gap_events: i64,
    /// Broken links found in its chains.
    pub audit_chain_breaks: i64,
}

impl From<ProxyRow> for ProxyView {
    fn from(r: ProxyRow) -> Self {
        let ProxyRow {
            proxy_id,
            build_version,
            labels,
            connected,
            control_plane_id,
            first_seen,
            last_seen,
            acked_version,
            rejected_version,
            reject_reason,
            stats,
            gap_events,
            chain_breaks,
        } = r;
        ProxyView {
            proxy_id,
            build_version,
            labels,
            connected,
            control_plane_id,
            first_seen: rfc3339(first_seen),
            last_seen: rfc3339(last_seen),
            acked_version,
            rejected_version,
            reject_reason,
            stats,
            audit_gap_events: gap_events,
            audit_chain_breaks: chain_breaks,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProxyList {
    pub proxies: Vec<ProxyView>,
}

/// Every proxy ever seen, with its connection state and policy version.
#[utoipa::path(get, path = "/api/v1/proxies", tag = "fleet",
    responses((status = 200, body = ProxyList), (status = 400, body = ErrorBody)))]
async fn list_proxies(State(state): State<AppState>, params: Params) -> Result<Json<ProxyList>> {
    params.finish()?;
    let stale = Duration::from_secs(state.config.sync.stale_after_secs);
    let rows = state.store.list_proxies(stale).await?;
    Ok(Json(ProxyList {
        proxies: rows.into_iter().map(ProxyView::from).collect(),
    }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// What the token is for (which fleet, who asked).
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JoinTokenView {
    pub id: String,
    /// The token a proxy presents. Store it now: it cannot be shown again.
    pub token: String,
}

/// Create a join token for proxies; the answer holds it, once.
#[utoipa::path(post, path = "/api/v1/join-tokens", tag = "fleet",
    request_body(content = Option<JoinTokenRequest>, description = "optional"),
    responses((status = 201, body = JoinTokenView), (status = 400, body = ErrorBody)))]
async fn create_join_token(
    State(state): State<AppState>,
    OptionalJson(req): OptionalJson<JoinTokenRequest>,
) -> Result<impl IntoResponse> {
    let (id, token) = state.store.create_join_token(&req.description).await?;
    Ok((StatusCode::CREATED, Json(JoinTokenView { id, token })))
}
