//! Policy storage: roles, backends, JWT issuers, settings and session keys,
//! and the snapshot proxies receive.

use sentinel_shared::policy::spec_of;
use sentinel_shared::proto::{self, PolicySnapshot};
use sentinel_shared::spec::{
    AuditSpec, BackendSpec, FederationSpec, JwtIssuerSpec, PolicySpec, RedactionRuleSpec, RoleSpec,
    ValidationErrors,
};
use sqlx::AssertSqlSafe;
use sqlx::{Postgres, Transaction};

use super::{Store, bump_version, to_us};
use crate::error::{Error, Result};

/// What a declarative apply did (or would do, on a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub version: u64,
    pub changes: Vec<String>,
    pub applied: bool,
}

/// How many session keys are kept: the newest seals, older ones still open
/// sessions sealed before a rotation.
const SESSION_KEYS_KEPT: i64 = 3;

/// id, hash, role, owner, expiry of a live key.
type KeyRow = (
    String,
    Vec<u8>,
    String,
    String,
    Option<time::OffsetDateTime>,
);

impl Store {
    /// The whole declarative policy, secrets included. Never hand this to an
    /// admin surface without [`PolicySpec::redacted`].
    pub async fn policy_spec(&self) -> Result<PolicySpec> {
        let mut conn = self.pool.acquire().await?;
        load_spec(&mut conn).await
    }

    /// The declarative policy and the version it is at, read in one
    /// snapshot so the two agree. Secrets included, as for [`policy_spec`].
    ///
    /// [`policy_spec`]: Store::policy_spec
    pub async fn policy_spec_versioned(&self) -> Result<(PolicySpec, u64)> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (version,): (i64,) = sqlx::query_as("SELECT version FROM policy_meta WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let spec = load_spec(&mut tx).await?;
        tx.commit().await?;
        Ok((spec, version as u64))
    }

    /// Replaces the whole declarative policy with `new` (what the file says
    /// is what runs). Redacted secrets keep their stored values. One version
    /// bump for the whole change; none when nothing changed.
    pub async fn apply_policy(&self, mut new: PolicySpec, dry_run: bool) -> Result<ApplyOutcome> {
        let (mut tx, version) = self.begin_policy_write().await?;
        let old = load_spec(&mut tx).await?;
        new.restore_secrets(&old)?;
        // Validate before sorting: field paths such as `roles[3].allow[0]`
        // must point into the document as the caller wrote it.
        new.validate()?;
        normalize(&mut new);
        check_key_roles(&mut tx, &new).await?;
        let changes = new.diff_lines(&old);
        if dry_run || changes.is_empty() {
            tx.rollback().await?;
            return Ok(ApplyOutcome {
                version,
                changes,
                applied: false,
            });
        }
        let version = write_spec(&mut tx, &old, &new).await?;
        tx.commit().await?;
        tracing::info!(version, changes = changes.len(), "policy applied");
        Ok(ApplyOutcome {
            version,
            changes,
            applied: true,
        })
    }

    /// Changes the policy through `edit`, validating the result as a whole.
    async fn edit_policy(&self, edit: impl FnOnce(&mut PolicySpec) -> Result<()>) -> Result<u64> {
        let (mut tx, version) = self.begin_policy_write().await?;
        let old = load_spec(&mut tx).await?;
        let mut new = old.clone();
        edit(&mut new)?;
        normalize(&mut new);
        new.validate()?;
        check_key_roles(&mut tx, &new).await?;
        if new == old {
            tx.rollback().await?;
            return Ok(version);
        }
        let version = write_spec(&mut tx, &old, &new).await?;
        tx.commit().await?;
        Ok(version)
    }

    pub async fn put_role(&self, role: RoleSpec) -> Result<u64> {
        role.validate().map_err(|e| e.nest("role"))?;
        self.edit_policy(|spec| {
            upsert(&mut spec.roles, role, |r| &r.name);
            Ok(())
        })
        .await
    }

    pub async fn delete_role(&self, name: &str) -> Result<u64> {
        self.edit_policy(|spec| remove(&mut spec.roles, name, "role", |r| &r.name))
            .await
    }

    pub async fn put_backend(&self, mut backend: BackendSpec) -> Result<u64> {
        let stored = self.policy_spec().await?;
        backend
            .validate(&stored.federation.separator)
            .map_err(|e| e.nest("backend"))?;
        let mut holder = PolicySpec {
            backends: vec![backend],
            ..Default::default()
        };
        holder.restore_secrets(&stored).map_err(|e| {
            ValidationErrors(
                e.0.into_iter()
                    .map(|mut f| {
                        f.field = f.field.replacen("backends[0]", "backend", 1);
                        f
                    })
                    .collect(),
            )
        })?;
        backend = holder.backends.remove(0);
        self.edit_policy(|spec| {
            upsert(&mut spec.backends, backend, |b| &b.name);
            Ok(())
        })
        .await
    }

    pub async fn delete_backend(&self, name: &str) -> Result<u64> {
        self.edit_policy(|spec| remove(&mut spec.backends, name, "backend", |b| &b.name))
            .await
    }

    pub async fn put_jwt_issuer(&self, mut issuer: JwtIssuerSpec) -> Result<u64> {
        let stored = self.policy_spec().await?;
        let mut holder = PolicySpec {
            jwt_issuers: vec![issuer],
            ..Default::default()
        };
        holder
            .restore_secrets(&stored)
            .map_err(|e| e.nest("issuer"))?;
        issuer = holder.jwt_issuers.remove(0);
        issuer.validate().map_err(|e| e.nest("issuer"))?;
        self.edit_policy(|spec| {
            upsert(&mut spec.jwt_issuers, issuer, |j| &j.name);
            Ok(())
        })
        .await
    }

    pub async fn delete_jwt_issuer(&self, name: &str) -> Result<u64> {
        self.edit_policy(|spec| remove(&mut spec.jwt_issuers, name, "jwt issuer", |j| &j.name))
            .await
    }

    /// Creates the first session key if there is none. Safe to race: two
    /// control planes starting together create one key.
    pub async fn ensure_session_key(&self) -> Result<()> {
        let (mut tx, _) = self.begin_policy_write().await?;
        let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM session_keys")
            .fetch_one(&mut *tx)
            .await?;
        if count == 0 {
            insert_session_key(&mut tx, 1).await?;
            bump_version(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Adds a new session-sealing key (the newest seals from now on) and
    /// drops the oldest beyond the few kept to open existing sessions.
    pub async fn rotate_session_key(&self) -> Result<u64> {
        let (mut tx, _) = self.begin_policy_write().await?;
        let (max,): (Option<i32>,) = sqlx::query_as("SELECT max(id) FROM session_keys")
            .fetch_one(&mut *tx)
            .await?;
        insert_session_key(&mut tx, max.unwrap_or(0) + 1).await?;
        sqlx::query("DELETE FROM session_keys WHERE id NOT IN (SELECT id FROM session_keys ORDER BY id DESC LIMIT $1)")
            .bind(SESSION_KEYS_KEPT)
            .execute(&mut *tx)
            .await?;
        let v = bump_version(&mut tx).await?;
        tx.commit().await?;
        tracing::info!(version = v, "session key rotated");
        Ok(v)
    }

    /// The snapshot proxies receive: one consistent read of every table.
    pub async fn load_snapshot(&self) -> Result<PolicySnapshot> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (version, updated_at): (i64, time::OffsetDateTime) =
            sqlx::query_as("SELECT version, updated_at FROM policy_meta WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?;
        let spec = load_spec(&mut tx).await?;
        let keys: Vec<KeyRow> = sqlx::query_as(
            "SELECT id, hash, role, owner, expires_at FROM api_keys WHERE revoked_at IS NULL ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await?;
        let session_keys: Vec<(i32, Vec<u8>)> =
            sqlx::query_as("SELECT id, key FROM session_keys ORDER BY id")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        let p = proto::PolicySpec::from(&spec);
        Ok(PolicySnapshot {
            version: version as u64,
            created_at_us: to_us(updated_at),
            roles: p.roles,
            api_keys: keys
                .into_iter()
                .map(|(id, hash, role, owner, expires_at)| proto::ApiKeyRecord {
                    id,
                    hash,
                    role,
                    owner,
                    expires_at_us: expires_at.map(to_us).unwrap_or(0),
                })
                .collect(),
            backends: p.backends,
            jwt_issuers: p.jwt_issuers,
            redaction_rules: p.redaction_rules,
            audit: p.audit,
            federation: p.federation,
            session_keys: session_keys
                .into_iter()
                .map(|(id, key)| proto::SessionKey { id: id as u32, key })
                .collect(),
        })
    }
}

/// Checks that the declarative part of a stored snapshot still parses: used
/// by tests and by the snapshot loader's callers.
pub fn snapshot_spec(s: &PolicySnapshot) -> Result<PolicySpec> {
    spec_of(s).map_err(Error::Invalid)
}

fn upsert<T>(items: &mut Vec<T>, item: T, name: impl Fn(&T) -> &String) {
    match items.iter().position(|x| name(x) == name(&item)) {
        Some(i) => items[i] = item,
        None => items.push(item),
    }
}

fn remove<T>(
    items: &mut Vec<T>,
    wanted: &str,
    what: &'static str,
    name: impl Fn(&T) -> &String,
) -> Result<()> {
    let before = items.len();
    items.retain(|x| name(x) != wanted);
    if items.len() == before {
        return Err(Error::not_found(what, wanted));
    }
    Ok(())
}

/// Named objects are kept in name order, so two documents that differ only
/// in order are the same policy.
fn normalize(spec: &mut PolicySpec) {
    spec.roles.sort_by(|a, b| a.name.cmp(&b.name));
    spec.backends.sort_by(|a, b| a.name.cmp(&b.name));
    spec.jwt_issuers.sort_by(|a, b| a.name.cmp(&b.name));
}

/// A role may not disappear while active keys are bound to it.
async fn check_key_roles(tx: &mut Transaction<'static, Postgres>, spec: &PolicySpec) -> Result<()> {
    let names: Vec<String> = spec.roles.iter().map(|r| r.name.clone()).collect();
    let orphans: Vec<(String, i64)> = sqlx::query_as(
        "SELECT role, count(*) FROM api_keys WHERE revoked_at IS NULL AND NOT (role = ANY($1)) GROUP BY role ORDER BY role",
    )
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    if let Some((role, n)) = orphans.first() {
        return Err(Error::Conflict(format!(
            "roles: role '{role}' is still bound to {n} active API key(s); revoke or rotate them first"
        )));
    }
    Ok(())
}

async fn load_spec(conn: &mut sqlx::PgConnection) -> Result<PolicySpec> {
    let roles = load_named::<RoleSpec>(conn, "SELECT spec FROM policy_roles ORDER BY name").await?;
    let backends =
        load_named::<BackendSpec>(conn, "SELECT spec FROM policy_backends ORDER BY name").await?;
    let jwt_issuers =
        load_named::<JwtIssuerSpec>(conn, "SELECT spec FROM policy_jwt_issuers ORDER BY name")
            .await?;
    let (redaction, audit, federation): (serde_json::Value, serde_json::Value, serde_json::Value) =
        sqlx::query_as(
            "SELECT redaction_rules, audit, federation FROM policy_settings WHERE id = 1",
        )
        .fetch_one(&mut *conn)
        .await?;
    Ok(PolicySpec {
        roles,
        backends,
        jwt_issuers,
        redaction_rules: decode::<Vec<RedactionRuleSpec>>(redaction, "redaction_rules")?,
        audit: decode::<AuditSpec>(audit, "audit")?,
        federation: decode::<FederationSpec>(federation, "federation")?,
    })
}

async fn load_named<T: serde::de::DeserializeOwned>(
    conn: &mut sqlx::PgConnection,
    sql: &'static str,
) -> Result<Vec<T>> {
    let rows: Vec<(serde_json::Value,)> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|(v,)| decode(v, "stored policy"))
        .collect()
}

fn decode<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v)
        .map_err(|e| Error::Internal(format!("stored {what} does not parse: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(e.to_string()))
}

/// Writes what changed between `old` and `new` and bumps the version.
async fn write_spec(
    tx: &mut Transaction<'static, Postgres>,
    old: &PolicySpec,
    new: &PolicySpec,
) -> Result<u64> {
    let version = bump_version(tx).await?;
    write_named(
        tx,
        "policy_roles",
        &old.roles,
        &new.roles,
        |r| &r.name,
        version,
    )
    .await?;
    write_named(
        tx,
        "policy_backends",
        &old.backends,
        &new.backends,
        |b| &b.name,
        version,
    )
    .await?;
    write_named(
        tx,
        "policy_jwt_issuers",
        &old.jwt_issuers,
        &new.jwt_issuers,
        |j| &j.name,
        version,
    )
    .await?;
    if old.redaction_rules != new.redaction_rules
        || old.audit != new.audit
        || old.federation != new.federation
    {
        sqlx::query(
            "UPDATE policy_settings SET redaction_rules = $1, audit = $2, federation = $3, updated_version = $4 WHERE id = 1",
        )
        .bind(encode(&new.redaction_rules)?)
        .bind(encode(&new.audit)?)
        .bind(encode(&new.federation)?)
        .bind(version as i64)
        .execute(&mut **tx)
        .await?;
    }
    Ok(version)
}

async fn write_named<T: PartialEq + serde::Serialize>(
    tx: &mut Transaction<'static, Postgres>,
    table: &str,
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
    version: u64,
) -> Result<()> {
    for o in old {
        if !new.iter().any(|n| name(n) == name(o)) {
            sqlx::query(AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE name = $1"
            )))
            .bind(name(o))
            .execute(&mut **tx)
            .await?;
        }
    }
    for n in new {
        if old.iter().any(|o| o == n) {
            continue;
        }
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (name, spec, updated_version) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET spec = EXCLUDED.spec, updated_version = EXCLUDED.updated_version"
        )))
        .bind(name(n))
        .bind(encode(n)?)
        .bind(version as i64)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn insert_session_key(tx: &mut Transaction<'static, Postgres>, id: i32) -> Result<()> {
    let mut key = [0u8; 32];
    rand::fill(&mut key[..]);
    sqlx::query("INSERT INTO session_keys (id, key) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
        .bind(id)
        .bind(&key[..])
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;
    use sentinel_shared::spec::REDACTED;

    fn role(name: &str, allow: &[&str]) -> RoleSpec {
        RoleSpec {
            name: name.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn backend(name: &str) -> BackendSpec {
        BackendSpec {
            name: name.into(),
            url: Some("http://127.0.0.1:9/mcp".into()),
            headers: [(
                "Authorization".to_string(),
                "Bearer upstream-secret".to_string(),
            )]
            .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn roles_put_get_delete_bump_the_version() {
        let db = TestDb::new().await;
        let s = &db.store;
        let v0 = s.policy_version().await.unwrap();
        let v1 = s.put_role(role("ops", &["*"])).await.unwrap();
        assert!(v1 > v0);
        // Writing the same role again changes nothing and keeps the version.
        assert_eq!(s.put_role(role("ops", &["*"])).await.unwrap(), v1);
        let v2 = s.put_role(role("ops", &["everything/*"])).await.unwrap();
        assert_eq!(v2, v1 + 1);
        assert_eq!(
            s.policy_spec().await.unwrap().roles[0].allow,
            vec!["everything/*"]
        );
        let v3 = s.delete_role("ops").await.unwrap();
        assert_eq!(v3, v2 + 1);
        assert!(matches!(
            s.delete_role("ops").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn invalid_roles_name_the_field() {
        let db = TestDb::new().await;
        let err = db
            .store
            .put_role(role("bad name", &["["]))
            .await
            .unwrap_err();
        let fields: Vec<_> = err.fields().iter().map(|f| f.field.clone()).collect();
        assert!(fields.contains(&"role.name".to_string()), "{fields:?}");
        assert!(fields.contains(&"role.allow[0]".to_string()), "{fields:?}");
    }

    #[tokio::test]
    async fn backends_keep_secrets_when_written_back_redacted() {
        let db = TestDb::new().await;
        let s = &db.store;
        s.put_backend(backend("everything")).await.unwrap();
        let shown = s.policy_spec().await.unwrap().redacted();
        assert_eq!(shown.backends[0].headers["Authorization"], REDACTED);
        // Writing the redacted form back keeps the stored secret.
        let mut again = shown.backends[0].clone();
        again.timeout_ms = 5000;
        s.put_backend(again).await.unwrap();
        let stored = s.policy_spec().await.unwrap();
        assert_eq!(
            stored.backends[0].headers["Authorization"],
            "Bearer upstream-secret"
        );
        assert_eq!(stored.backends[0].timeout_ms, 5000);
        // A placeholder with nothing behind it is refused, naming the field.
        let mut orphan = backend("other");
        orphan
            .headers
            .insert("Authorization".into(), REDACTED.into());
        let err = s.put_backend(orphan).await.unwrap_err();
        assert_eq!(err.fields()[0].field, "backend.headers.Authorization");
        s.delete_backend("everything").await.unwrap();
        assert!(s.policy_spec().await.unwrap().backends.is_empty());
    }

    #[tokio::test]
    async fn jwt_issuers_put_and_delete() {
        let db = TestDb::new().await;
        let s = &db.store;
        s.put_role(role("ops", &["*"])).await.unwrap();
        let issuer = JwtIssuerSpec {
            name: "idp".into(),
            issuer: "https://idp.example".into(),
            audiences: vec!["sentinel".into()],
            algorithms: vec!["HS256".into()],
            hmac_secret: "s".repeat(40),
            default_role: "ops".into(),
            ..Default::default()
        };
        s.put_jwt_issuer(issuer.clone()).await.unwrap();
        let shown = s.policy_spec().await.unwrap().redacted();
        assert_eq!(shown.jwt_issuers[0].hmac_secret, REDACTED);
        // A role an issuer defaults to cannot be deleted.
        let err = s.delete_role("ops").await.unwrap_err();
        assert_eq!(err.fields()[0].field, "jwt_issuers[0].default_role");
        s.delete_jwt_issuer("idp").await.unwrap();
        s.delete_role("ops").await.unwrap();
        let mut bad = issuer;
        bad.algorithms = vec!["none".into()];
        let err = s.put_jwt_issuer(bad).await.unwrap_err();
        assert_eq!(err.fields()[0].field, "issuer.algorithms[0]");
    }

    #[tokio::test]
    async fn apply_is_declarative_with_dry_run_and_one_version() {
        let db = TestDb::new().await;
        let s = &db.store;
        s.put_role(role("old", &["*"])).await.unwrap();
        s.put_backend(backend("everything")).await.unwrap();
        let v0 = s.policy_version().await.unwrap();
        let mut doc = s.policy_spec().await.unwrap().redacted();
        doc.roles = vec![role("reader", &["everything/echo"]), role("writer", &["*"])];
        doc.audit.retention_days = 30;
        let dry = s.apply_policy(doc.clone(), true).await.unwrap();
        assert!(!dry.applied);
        assert_eq!(dry.version, v0);
        assert_eq!(
            dry.changes,
            vec!["+ role reader", "+ role writer", "- role old", "~ audit"]
        );
        assert_eq!(s.policy_spec().await.unwrap().roles[0].name, "old");
        let done = s.apply_policy(doc.clone(), false).await.unwrap();
        assert!(done.applied);
        assert_eq!(done.version, v0 + 1);
        let now = s.policy_spec().await.unwrap();
        assert_eq!(now.roles.len(), 2);
        assert_eq!(
            now.backends[0].headers["Authorization"],
            "Bearer upstream-secret"
        );
        // The same document again is a no-op.
        let again = s.apply_policy(doc, false).await.unwrap();
        assert!(!again.applied && again.changes.is_empty());
        assert_eq!(again.version, v0 + 1);
    }

    #[tokio::test]
    async fn spec_and_version_are_read_together() {
        let db = TestDb::new().await;
        let s = &db.store;
        let v = s.put_role(role("ops", &["*"])).await.unwrap();
        let (spec, version) = s.policy_spec_versioned().await.unwrap();
        assert_eq!(version, v);
        assert_eq!(spec.roles[0].name, "ops");
    }

    #[tokio::test]
    async fn apply_errors_point_into_the_document_as_written() {
        let db = TestDb::new().await;
        // "b" sorts after "a": the bad pattern is at roles[0] as written.
        let doc = PolicySpec {
            roles: vec![role("b", &["*", "["]), role("a", &["*"])],
            ..Default::default()
        };
        let err = db.store.apply_policy(doc, true).await.unwrap_err();
        assert_eq!(err.fields()[0].field, "roles[0].allow[1]", "{err}");
    }

    #[tokio::test]
    async fn apply_refuses_invalid_documents_whole() {
        let db = TestDb::new().await;
        let s = &db.store;
        let v0 = s.policy_version().await.unwrap();
        let doc = PolicySpec {
            roles: vec![role("a", &["*"]), role("a", &["["])],
            ..Default::default()
        };
        let err = s.apply_policy(doc, false).await.unwrap_err();
        assert!(err.fields().len() >= 2, "{err}");
        assert_eq!(s.policy_version().await.unwrap(), v0);
    }

    #[tokio::test]
    async fn snapshot_holds_everything_and_session_keys_rotate() {
        let db = TestDb::new().await;
        let s = &db.store;
        s.ensure_session_key().await.unwrap();
        s.ensure_session_key().await.unwrap();
        s.put_role(role("ops", &["*"])).await.unwrap();
        s.put_backend(backend("everything")).await.unwrap();
        let snap = s.load_snapshot().await.unwrap();
        assert_eq!(snap.version, s.policy_version().await.unwrap());
        assert_eq!(snap.session_keys.len(), 1);
        assert_eq!(snap.roles.len(), 1);
        // The proxy gets the real secret; only admin reads redact.
        let spec = snapshot_spec(&snap).unwrap();
        assert_eq!(
            spec.backends[0].headers["Authorization"],
            "Bearer upstream-secret"
        );
        for _ in 0..4 {
            s.rotate_session_key().await.unwrap();
        }
        let snap = s.load_snapshot().await.unwrap();
        let ids: Vec<u32> = snap.session_keys.iter().map(|k| k.id).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        sentinel_shared::policy::CompiledPolicy::compile(snap).unwrap();
    }
}
