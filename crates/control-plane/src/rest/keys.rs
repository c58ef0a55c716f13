//! `/api/v1/keys`: API keys. The secret appears once, in the answer to the
//! call that made it (create or rotate); every other read shows the key
//! without it, since only its hash is stored.

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use http::StatusCode;
use sentinel_shared::keys::{KeyKind, display_prefix};
use sentinel_shared::spec::ValidationErrors;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ErrorBody;
use super::extract::{ApiJson, OptionalJson, Params, PathName};
use super::rfc3339;
use crate::error::Result;
use crate::state::AppState;
use crate::store::keys::{ApiKeyRow, CreatedKey, KeyFilter, NewKey};
use crate::store::to_us;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_key, list_keys))
        .routes(routes!(get_key))
        .routes(routes!(revoke_key))
        .routes(routes!(rotate_key))
}

/// Longest lifetime a key may be given with `ttl`: ten years.
const MAX_TTL_SECS: u64 = 10 * 366 * 24 * 3600;

/// An API key as admins see it. There is no secret here, ever.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    /// How the key's text starts (`sntk_<id>`), to recognise it in a
    /// client's configuration.
    pub prefix: String,
    pub role: String,
    pub owner: String,
    pub description: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// The key this one replaced, when it came from a rotation.
    pub rotated_from: Option<String>,
    /// `active`, `expired` or `revoked`.
    pub state: &'static str,
}

impl From<ApiKeyRow> for KeyView {
    fn from(row: ApiKeyRow) -> Self {
        let ApiKeyRow {
            id,
            role,
            owner,
            description,
            created_at,
            expires_at,
            revoked_at,
            rotated_from,
        } = row;
        let state = if revoked_at.is_some() {
            "revoked"
        } else if expires_at.is_some_and(|e| e <= OffsetDateTime::now_utc()) {
            "expired"
        } else {
            "active"
        };
        KeyView {
            prefix: display_prefix(KeyKind::Api, &id),
            id,
            role,
            owner,
            description,
            created_at: rfc3339(created_at),
            expires_at: expires_at.map(rfc3339),
            revoked_at: revoked_at.map(rfc3339),
            rotated_from,
            state,
        }
    }
}

/// A key's lifetime: seconds, or a number with a unit (`90s`, `30m`, `12h`,
/// `30d`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Ttl {
    Seconds(u64),
    Text(String),
}

impl Ttl {
    fn seconds(&self) -> std::result::Result<u64, String> {
        let secs = match self {
            Ttl::Seconds(s) => *s,
            Ttl::Text(t) => parse_duration(t)?,
        };
        if secs == 0 {
            return Err("must be positive".into());
        }
        if secs > MAX_TTL_SECS {
            return Err(format!(
                "must be at most {MAX_TTL_SECS} seconds (ten years)"
            ));
        }
        Ok(secs)
    }
}

fn parse_duration(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("'{text}' is not a duration such as 3600, 90m, 12h or 30d");
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// The role the key is bound to; it must exist.
    pub role: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub description: String,
    /// RFC 3339 expiry. Give this or `ttl`, or neither (never expires).
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub ttl: Option<Ttl>,
}

impl CreateKeyRequest {
    fn into_new_key(self) -> Result<NewKey> {
        let CreateKeyRequest {
            role,
            owner,
            description,
            expires_at,
            ttl,
        } = self;
        let mut errs = ValidationErrors::default();
        let expires_at_us = match (expires_at, ttl) {
            (Some(_), Some(_)) => {
                errs.push("ttl", "give either expires_at or ttl, not both");
                None
            }
            (Some(at), None) => match OffsetDateTime::parse(&at, &Rfc3339) {
                Ok(t) => Some(to_us(t)),
                Err(_) => {
                    errs.push(
                        "expires_at",
                        "must be an RFC 3339 timestamp such as 2027-01-01T00:00:00Z",
                    );
                    None
                }
            },
            (None, Some(ttl)) => match ttl.seconds() {
                Ok(secs) => Some(sentinel_shared::now_us().saturating_add(secs as i64 * 1_000_000)),
                Err(m) => {
                    errs.push("ttl", m);
                    None
                }
            },
            (None, None) => None,
        };
        errs.into_result()?;
        Ok(NewKey {
            role,
            owner,
            description,
            expires_at_us,
        })
    }
}

/// The answer to create and rotate: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKeyView {
    pub key: KeyView,
    /// The full API key. Store it now: it cannot be shown again.
    pub secret: String,
    /// The policy version that carries the key to the proxies.
    pub version: u64,
}

impl From<CreatedKey> for CreatedKeyView {
    fn from(c: CreatedKey) -> Self {
        let CreatedKey {
            row,
            secret,
            version,
        } = c;
        CreatedKeyView {
            key: row.into(),
            secret,
            version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedKey {
    pub key: KeyView,
    /// The policy version after which proxies refuse the key.
    pub version: u64,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old key keeps working, seconds (at most 30 days);
    /// 0 (the default) revokes it at once.
    #[serde(default)]
    pub grace_seconds: u32,
}

/// Create an API key; the answer holds its secret, once.
#[utoipa::path(post, path = "/api/v1/keys", tag = "keys",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, body = CreatedKeyView),
        (status = 400, body = ErrorBody, description = "a field is invalid; the error names it"),
    ))]
async fn create_key(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<impl IntoResponse> {
    let created = state.store.create_key(req.into_new_key()?).await?;
    Ok((StatusCode::CREATED, Json(CreatedKeyView::from(created))))
}

/// List API keys (never their secrets).
#[utoipa::path(get, path = "/api/v1/keys", tag = "keys",
    params(
        ("role" = Option<String>, Query, description = "only keys bound to this role"),
        ("owner" = Option<String>, Query, description = "only keys of this owner"),
        ("include_revoked" = Option<bool>, Query, description = "include revoked keys (default false)"),
    ),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody)))]
async fn list_keys(State(state): State<AppState>, mut params: Params) -> Result<Json<KeyList>> {
    let filter = KeyFilter {
        role: params.string("role"),
        owner: params.string("owner"),
        include_revoked: params.bool("include_revoked").unwrap_or(false),
    };
    params.finish()?;
    let keys = state.store.list_keys(&filter).await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(KeyView::from).collect(),
    }))
}

/// One API key (never its secret).
#[utoipa::path(get, path = "/api/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = KeyView), (status = 404, body = ErrorBody)))]
async fn get_key(State(state): State<AppState>, PathName(id): PathName) -> Result<Json<KeyView>> {
    Ok(Json(state.store.get_key(&id).await?.into()))
}

/// Revoke an API key. Revoking a revoked key changes nothing.
#[utoipa::path(post, path = "/api/v1/keys/{id}/revoke", tag = "keys",
    params(("id" = String, Path, description = "key id")),
    responses((status = 200, body = RevokedKey), (status = 404, body = ErrorBody)))]
async fn revoke_key(
    State(state): State<AppState>,
    PathName(id): PathName,
) -> Result<Json<RevokedKey>> {
    let (row, version) = state.store.revoke_key(&id).await?;
    Ok(Json(RevokedKey {
        key: row.into(),
        version,
    }))
}

/// Replace an API key with a new one bound to the same role and owner; the
/// answer holds the new secret, once.
#[utoipa::path(post, path = "/api/v1/keys/{id}/rotate", tag = "keys",
    params(("id" = String, Path, description = "key id")),
    request_body(content = Option<RotateRequest>, description = "optional; an empty body means grace_seconds = 0"),
    responses(
        (status = 201, body = CreatedKeyView),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the key is revoked"),
    ))]
async fn rotate_key(
    State(state): State<AppState>,
    PathName(id): PathName,
    OptionalJson(req): OptionalJson<RotateRequest>,
) -> Result<impl IntoResponse> {
    let created = state.store.rotate_key(&id, req.grace_seconds).await?;
    Ok((StatusCode::CREATED, Json(CreatedKeyView::from(created))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30d"), Ok(2_592_000));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(Ttl::Seconds(0).seconds().is_err());
        assert!(Ttl::Text("4000d".into()).seconds().is_err());
    }

    #[test]
    fn ttl_and_expiry_are_exclusive() {
        let req = CreateKeyRequest {
            role: "ops".into(),
            owner: String::new(),
            description: String::new(),
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            ttl: Some(Ttl::Seconds(60)),
        };
        let err = req.into_new_key().unwrap_err();
        assert_eq!(err.fields()[0].field, "ttl");
    }
}
