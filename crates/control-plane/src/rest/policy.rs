//! `/api/v1/policy` and the per-object policy endpoints (roles, backends,
//! JWT issuers, session keys). Every read is redacted; every write is
//! validated by the store and answers with the policy version it produced.

use axum::Json;
use axum::extract::State;
use sentinel_shared::spec::{BackendSpec, JwtIssuerSpec, PolicySpec, RoleSpec};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ErrorBody;
use super::extract::{ApiJson, Params, PathName};
use crate::error::{Error, Result};
use crate::state::AppState;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_policy, apply_policy))
        .routes(routes!(put_role, delete_role))
        .routes(routes!(put_backend, delete_backend))
        .routes(routes!(put_jwt_issuer, delete_jwt_issuer))
        .routes(routes!(rotate_session_key))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    pub version: u64,
    /// The declarative policy with every secret shown as `<redacted>`.
    /// Writing it back unchanged keeps the stored secrets.
    #[schema(value_type = Object)]
    pub spec: PolicySpec,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ApplyView {
    /// The version now in force: the new one when `applied`, else the
    /// current one.
    pub version: u64,
    pub applied: bool,
    pub dry_run: bool,
    /// One line per change: `+ role ops`, `- backend legacy`, `~ audit`.
    pub changes: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionView {
    /// The policy version after the call (unchanged when nothing changed).
    pub version: u64,
}

/// The current policy, secrets redacted.
#[utoipa::path(get, path = "/api/v1/policy", tag = "policy",
    responses((status = 200, body = PolicyView)))]
async fn get_policy(State(state): State<AppState>) -> Result<Json<PolicyView>> {
    let (spec, version) = state.store.policy_spec_versioned().await?;
    Ok(Json(PolicyView {
        version,
        spec: spec.redacted(),
    }))
}

/// Replace the whole policy with the document given (declarative: what is
/// not in it is removed). With `dry_run=true`, only report what would
/// change.
#[utoipa::path(put, path = "/api/v1/policy", tag = "policy",
    params(("dry_run" = Option<bool>, Query, description = "report the changes without applying them (default false)")),
    request_body(content = Object, description = "the full policy document"),
    responses(
        (status = 200, body = ApplyView),
        (status = 400, body = ErrorBody, description = "the document is invalid; each error names its field, e.g. roles[0].allow[1]"),
        (status = 409, body = ErrorBody, description = "a role still bound to active keys would be removed"),
    ))]
async fn apply_policy(
    State(state): State<AppState>,
    mut params: Params,
    ApiJson(spec): ApiJson<PolicySpec>,
) -> Result<Json<ApplyView>> {
    let dry_run = params.bool("dry_run").unwrap_or(false);
    params.finish()?;
    let outcome = state.store.apply_policy(spec, dry_run).await?;
    Ok(Json(ApplyView {
        version: outcome.version,
        applied: outcome.applied,
        dry_run,
        changes: outcome.changes,
    }))
}

/// The object's name in the body must be the one in the path, or empty.
fn same_name(path: &str, body: &mut String) -> Result<()> {
    if body.is_empty() {
        *body = path.to_string();
        Ok(())
    } else if body == path {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!("'{body}' does not match the name in the path '{path}'"),
        ))
    }
}

/// Create or replace a role.
#[utoipa::path(put, path = "/api/v1/roles/{name}", tag = "policy",
    params(("name" = String, Path)),
    request_body(content = Object, description = "the role: allow, deny, rate_limits, description"),
    responses((status = 200, body = VersionView), (status = 400, body = ErrorBody)))]
async fn put_role(
    State(state): State<AppState>,
    PathName(name): PathName,
    ApiJson(mut role): ApiJson<RoleSpec>,
) -> Result<Json<VersionView>> {
    same_name(&name, &mut role.name)?;
    let version = state.store.put_role(role).await?;
    Ok(Json(VersionView { version }))
}

/// Delete a role. Refused while active keys or a JWT issuer use it.
#[utoipa::path(delete, path = "/api/v1/roles/{name}", tag = "policy",
    params(("name" = String, Path)),
    responses((status = 200, body = VersionView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_role(
    State(state): State<AppState>,
    PathName(name): PathName,
) -> Result<Json<VersionView>> {
    let version = state.store.delete_role(&name).await?;
    Ok(Json(VersionView { version }))
}

/// Create or replace an upstream backend. Header values are secrets:
/// `<redacted>` keeps the stored value.
#[utoipa::path(put, path = "/api/v1/backends/{name}", tag = "policy",
    params(("name" = String, Path)),
    request_body(content = Object, description = "the backend: url or stdio, headers, timeout_ms, disabled"),
    responses((status = 200, body = VersionView), (status = 400, body = ErrorBody)))]
async fn put_backend(
    State(state): State<AppState>,
    PathName(name): PathName,
    ApiJson(mut backend): ApiJson<BackendSpec>,
) -> Result<Json<VersionView>> {
    same_name(&name, &mut backend.name)?;
    let version = state.store.put_backend(backend).await?;
    Ok(Json(VersionView { version }))
}

/// Delete an upstream backend.
#[utoipa::path(delete, path = "/api/v1/backends/{name}", tag = "policy",
    params(("name" = String, Path)),
    responses((status = 200, body = VersionView), (status = 404, body = ErrorBody)))]
async fn delete_backend(
    State(state): State<AppState>,
    PathName(name): PathName,
) -> Result<Json<VersionView>> {
    let version = state.store.delete_backend(&name).await?;
    Ok(Json(VersionView { version }))
}

/// Create or replace a JWT issuer. `hmac_secret` is a secret: `<redacted>`
/// keeps the stored value.
#[utoipa::path(put, path = "/api/v1/jwt-issuers/{name}", tag = "policy",
    params(("name" = String, Path)),
    request_body(content = Object, description = "the issuer: issuer, audiences, algorithms, keys, claim mapping"),
    responses((status = 200, body = VersionView), (status = 400, body = ErrorBody)))]
async fn put_jwt_issuer(
    State(state): State<AppState>,
    PathName(name): PathName,
    ApiJson(mut issuer): ApiJson<JwtIssuerSpec>,
) -> Result<Json<VersionView>> {
    same_name(&name, &mut issuer.name)?;
    let version = state.store.put_jwt_issuer(issuer).await?;
    Ok(Json(VersionView { version }))
}

/// Delete a JWT issuer.
#[utoipa::path(delete, path = "/api/v1/jwt-issuers/{name}", tag = "policy",
    params(("name" = String, Path)),
    responses((status = 200, body = VersionView), (status = 404, body = ErrorBody)))]
async fn delete_jwt_issuer(
    State(state): State<AppState>,
    PathName(name): PathName,
) -> Result<Json<VersionView>> {
    let version = state.store.delete_jwt_issuer(&name).await?;
    Ok(Json(VersionView { version }))
}

/// Start sealing MCP sessions with a new key; the previous few keys still
/// open sessions sealed before.
#[utoipa::path(post, path = "/api/v1/session-keys/rotate", tag = "policy",
    responses((status = 200, body = VersionView)))]
async fn rotate_session_key(State(state): State<AppState>) -> Result<Json<VersionView>> {
    let version = state.store.rotate_session_key().await?;
    Ok(Json(VersionView { version }))
}
