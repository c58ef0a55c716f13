//! API keys and proxy join tokens. Only hashes are stored; the full key
//! exists once, in the response to the call that made it.

use sentinel_shared::keys::{self, KeyKind};
use sentinel_shared::proto;
use sqlx::AssertSqlSafe;
use time::OffsetDateTime;

use super::{Store, bump_version, from_us, to_us};
use crate::error::{Error, Result};

/// A key as admins see it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: String,
    pub role: String,
    pub owner: String,
    pub description: String,
    pub created_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub rotated_from: Option<String>,
}

impl ApiKeyRow {
    pub fn to_proto(&self) -> proto::ApiKey {
        let ApiKeyRow {
            id,
            role,
            owner,
            description,
            created_at,
            expires_at,
            revoked_at,
            rotated_from,
        } = self;
        proto::ApiKey {
            id: id.clone(),
            prefix: keys::display_prefix(KeyKind::Api, id),
            role: role.clone(),
            owner: owner.clone(),
            description: description.clone(),
            created_at_us: to_us(*created_at),
            expires_at_us: expires_at.map(to_us).unwrap_or(0),
            revoked_at_us: revoked_at.map(to_us).unwrap_or(0),
            rotated_from: rotated_from.clone().unwrap_or_default(),
        }
    }
}

/// A newly made key: the row and the one copy of the secret.
pub struct CreatedKey {
    pub row: ApiKeyRow,
    pub secret: String,
    pub version: u64,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("row", &self.row)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a new key is bound to.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub role: String,
    pub owner: String,
    pub description: String,
    /// Unix microseconds; `None`: never expires.
    pub expires_at_us: Option<i64>,
}

/// Filters for listing keys.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub include_revoked: bool,
    pub role: Option<String>,
    pub owner: Option<String>,
}

const KEY_COLUMNS: &str =
    "id, role, owner, description, created_at, expires_at, revoked_at, rotated_from";

impl Store {
    /// Creates an API key bound to an existing role.
    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey> {
        validate_new_key(&new)?;
        let (mut tx, _) = self.begin_policy_write().await?;
        let created = insert_key(&mut tx, &new, None).await?;
        let version = bump_version(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(key_id = %created.0.id, role = %created.0.role, version, "api key created");
        Ok(CreatedKey {
            row: created.0,
            secret: created.1,
            version,
        })
    }

    pub async fn list_keys(&self, filter: &KeyFilter) -> Result<Vec<ApiKeyRow>> {
        let rows = sqlx::query_as::<_, ApiKeyRow>(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys \
             WHERE ($1 OR revoked_at IS NULL) AND ($2::text IS NULL OR role = $2) AND ($3::text IS NULL OR owner = $3) \
             ORDER BY created_at, id"
        )))
        .bind(filter.include_revoked)
        .bind(&filter.role)
        .bind(&filter.owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn get_key(&self, id: &str) -> Result<ApiKeyRow> {
        sqlx::query_as::<_, ApiKeyRow>(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| Error::not_found("api key", id))
    }

    /// Revokes a key; proxies stop accepting it with the next version.
    /// Revoking a revoked key changes nothing and is not an error.
    pub async fn revoke_key(&self, id: &str) -> Result<(ApiKeyRow, u64)> {
        let (mut tx, version) = self.begin_policy_write().await?;
        let row = sqlx::query_as::<_, ApiKeyRow>(AssertSqlSafe(format!(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        match row {
            Some(row) => {
                let v = bump_version(&mut tx).await?;
                tx.commit().await?;
                tracing::info!(key_id = %id, version = v, "api key revoked");
                Ok((row, v))
            }
            None => {
                tx.rollback().await?;
                Ok((self.get_key(id).await?, version))
            }
        }
    }

    /// Replaces a key with a new one bound to the same role and owner. The
    /// old key stays valid for `grace_seconds` (0: revoked at once).
    pub async fn rotate_key(&self, id: &str, grace_seconds: u32) -> Result<CreatedKey> {
        if grace_seconds > 30 * 24 * 3600 {
            return Err(Error::invalid(
                "grace_seconds",
                "must be at most 2592000 (30 days)",
            ));
        }
        let (mut tx, _) = self.begin_policy_write().await?;
        let old = sqlx::query_as::<_, ApiKeyRow>(AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::not_found("api key", id))?;
        if old.revoked_at.is_some() {
            return Err(Error::Conflict(format!(
                "api key '{id}' is revoked and cannot be rotated"
            )));
        }
        let new = NewKey {
            role: old.role.clone(),
            owner: old.owner.clone(),
            description: old.description.clone(),
            expires_at_us: old.expires_at.map(to_us),
        };
        let (row, secret) = insert_key(&mut tx, &new, Some(id)).await?;
        if grace_seconds == 0 {
            sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE api_keys SET expires_at = LEAST(COALESCE(expires_at, 'infinity'), now() + make_interval(secs => $2)) \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(grace_seconds as f64)
            .execute(&mut *tx)
            .await?;
        }
        let version = bump_version(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(old_key_id = %id, new_key_id = %row.id, version, "api key rotated");
        Ok(CreatedKey {
            row,
            secret,
            version,
        })
    }

    /// Creates a join token for proxies. Returns (id, token).
    pub async fn create_join_token(&self, description: &str) -> Result<(String, String)> {
        if description.len() > 1024 {
            return Err(Error::invalid(
                "description",
                "must be at most 1024 characters",
            ));
        }
        let k = keys::generate(KeyKind::Join);
        sqlx::query("INSERT INTO join_tokens (id, hash, description) VALUES ($1, $2, $3)")
            .bind(&k.id)
            .bind(&k.hash[..])
            .bind(description)
            .execute(&self.pool)
            .await?;
        tracing::info!(token_id = %k.id, "join token created");
        Ok((k.id, k.secret))
    }

    /// Whether `token` is a live join token created through the admin API.
    pub async fn check_join_token(&self, token: &str) -> Result<bool> {
        let Ok(id) = keys::parse(KeyKind::Join, token) else {
            return Ok(false);
        };
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT hash FROM join_tokens WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some_and(|(hash,)| keys::verify_hash(token, &hash)))
    }
}

fn validate_new_key(new: &NewKey) -> Result<()> {
    let mut errs = sentinel_shared::spec::ValidationErrors::default();
    if new.role.is_empty() {
        errs.push("role", "is required");
    }
    if new.owner.len() > 256 {
        errs.push("owner", "must be at most 256 characters");
    }
    if new.description.len() > 1024 {
        errs.push("description", "must be at most 1024 characters");
    }
    if let Some(exp) = new.expires_at_us
        && exp <= sentinel_shared::now_us()
    {
        errs.push("expires_at", "must be in the future");
    }
    errs.into_result().map_err(Error::Invalid)
}

async fn insert_key(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    new: &NewKey,
    rotated_from: Option<&str>,
) -> Result<(ApiKeyRow, String)> {
    let exists: Option<(String,)> = sqlx::query_as("SELECT name FROM policy_roles WHERE name = $1")
        .bind(&new.role)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        return Err(Error::invalid(
            "role",
            format!("no role named '{}'", new.role),
        ));
    }
    let k = keys::generate(KeyKind::Api);
    let row = sqlx::query_as::<_, ApiKeyRow>(AssertSqlSafe(format!(
        "INSERT INTO api_keys (id, hash, role, owner, description, expires_at, rotated_from) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
    )))
    .bind(&k.id)
    .bind(&k.hash[..])
    .bind(&new.role)
    .bind(&new.owner)
    .bind(&new.description)
    .bind(new.expires_at_us.map(from_us))
    .bind(rotated_from)
    .fetch_one(&mut **tx)
    .await?;
    Ok((row, k.secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;
    use sentinel_shared::spec::RoleSpec;

    async fn db_with_role() -> TestDb {
        let db = TestDb::new().await;
        db.store
            .put_role(RoleSpec {
                name: "ops".into(),
                allow: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        db
    }

    fn new_key() -> NewKey {
        NewKey {
            role: "ops".into(),
            owner: "alice".into(),
            description: "laptop".into(),
            expires_at_us: None,
        }
    }

    #[tokio::test]
    async fn create_stores_only_the_hash() {
        let db = db_with_role().await;
        let created = db.store.create_key(new_key()).await.unwrap();
        assert_eq!(
            keys::parse(KeyKind::Api, &created.secret),
            Ok(created.row.id.as_str())
        );
        let (hash,): (Vec<u8>,) = sqlx::query_as("SELECT hash FROM api_keys WHERE id = $1")
            .bind(&created.row.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(keys::verify_hash(&created.secret, &hash));
        // Nothing in the table contains the secret text.
        let (dump,): (String,) = sqlx::query_as("SELECT string_agg(t::text, ',') FROM api_keys t")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert!(!dump.contains(&created.secret));
        assert!(!format!("{created:?}").contains(&created.secret));
        let snap = db.store.load_snapshot().await.unwrap();
        assert_eq!(snap.version, created.version);
        assert_eq!(snap.api_keys.len(), 1);
        assert_eq!(snap.api_keys[0].hash, hash);
    }

    #[tokio::test]
    async fn create_refuses_unknown_roles_and_past_expiry() {
        let db = db_with_role().await;
        let err = db
            .store
            .create_key(NewKey {
                role: "ghost".into(),
                ..new_key()
            })
            .await
            .unwrap_err();
        assert_eq!(err.fields()[0].field, "role");
        let err = db
            .store
            .create_key(NewKey {
                expires_at_us: Some(1),
                ..new_key()
            })
            .await
            .unwrap_err();
        assert_eq!(err.fields()[0].field, "expires_at");
    }

    #[tokio::test]
    async fn list_get_revoke() {
        let db = db_with_role().await;
        let a = db.store.create_key(new_key()).await.unwrap();
        let b = db
            .store
            .create_key(NewKey {
                owner: "bob".into(),
                ..new_key()
            })
            .await
            .unwrap();
        assert_eq!(
            db.store
                .list_keys(&KeyFilter::default())
                .await
                .unwrap()
                .len(),
            2
        );
        let only_bob = KeyFilter {
            owner: Some("bob".into()),
            ..Default::default()
        };
        assert_eq!(db.store.list_keys(&only_bob).await.unwrap()[0].id, b.row.id);
        assert_eq!(db.store.get_key(&a.row.id).await.unwrap(), a.row);
        let (revoked, v) = db.store.revoke_key(&a.row.id).await.unwrap();
        assert!(revoked.revoked_at.is_some());
        assert!(v > b.version);
        // Revoking again is idempotent and does not bump the version.
        let (_, v2) = db.store.revoke_key(&a.row.id).await.unwrap();
        assert_eq!(v2, v);
        assert_eq!(
            db.store
                .list_keys(&KeyFilter::default())
                .await
                .unwrap()
                .len(),
            1
        );
        let all = KeyFilter {
            include_revoked: true,
            ..Default::default()
        };
        assert_eq!(db.store.list_keys(&all).await.unwrap().len(), 2);
        let snap = db.store.load_snapshot().await.unwrap();
        assert_eq!(
            snap.api_keys
                .iter()
                .map(|k| k.id.as_str())
                .collect::<Vec<_>>(),
            vec![b.row.id.as_str()]
        );
        assert!(matches!(
            db.store.get_key("nope").await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            db.store.revoke_key("nope").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn rotate_with_and_without_grace() {
        let db = db_with_role().await;
        let a = db.store.create_key(new_key()).await.unwrap();
        let b = db.store.rotate_key(&a.row.id, 0).await.unwrap();
        assert_eq!(b.row.rotated_from.as_deref(), Some(a.row.id.as_str()));
        assert_eq!(b.row.role, "ops");
        assert!(
            db.store
                .get_key(&a.row.id)
                .await
                .unwrap()
                .revoked_at
                .is_some()
        );
        assert!(matches!(
            db.store.rotate_key(&a.row.id, 0).await,
            Err(Error::Conflict(_))
        ));
        let c = db.store.rotate_key(&b.row.id, 60).await.unwrap();
        let old = db.store.get_key(&b.row.id).await.unwrap();
        assert!(old.revoked_at.is_none());
        let exp = old.expires_at.expect("grace sets an expiry");
        assert!(
            exp > OffsetDateTime::now_utc()
                && exp < OffsetDateTime::now_utc() + time::Duration::seconds(61)
        );
        assert_ne!(c.secret, b.secret);
        assert!(matches!(
            db.store.rotate_key(&b.row.id, 99_999_999).await,
            Err(Error::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn role_with_keys_cannot_be_deleted() {
        let db = db_with_role().await;
        let a = db.store.create_key(new_key()).await.unwrap();
        assert!(matches!(
            db.store.delete_role("ops").await,
            Err(Error::Conflict(_))
        ));
        db.store.revoke_key(&a.row.id).await.unwrap();
        db.store.delete_role("ops").await.unwrap();
    }

    #[tokio::test]
    async fn join_tokens_check_by_hash() {
        let db = TestDb::new().await;
        let (_, token) = db.store.create_join_token("fleet a").await.unwrap();
        assert!(db.store.check_join_token(&token).await.unwrap());
        assert!(!db.store.check_join_token("sntj_nope").await.unwrap());
        let other = keys::generate(KeyKind::Join);
        assert!(!db.store.check_join_token(&other.secret).await.unwrap());
    }
}
