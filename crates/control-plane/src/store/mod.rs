//! All SQL of the control plane lives under this module.
//!
//! - [`policy`]: roles, backends, JWT issuers, settings, session keys, the
//!   global version and the snapshot proxies receive;
//! - [`keys`]: API keys and join tokens;
//! - [`audit`]: idempotent batch ingest, chain and gap tracking, queries,
//!   partitions and retention;
//! - [`fleet`]: what each proxy reported.
//!
//! Every policy-changing write runs in one transaction that locks the
//! version row, bumps the version and notifies [`POLICY_CHANNEL`]; the
//! notification is delivered at commit, so listeners never see a version
//! whose rows are not yet visible.

pub mod audit;
pub mod fleet;
pub mod keys;
pub mod policy;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use crate::error::Result;

/// The LISTEN/NOTIFY channel carrying new policy versions.
pub const POLICY_CHANNEL: &str = "sentinel_policy";

/// The control plane's handle on Postgres.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: PgPool,
    /// Audit day partitions known to exist, so ingest creates each once.
    partitions: Arc<Mutex<HashSet<time::Date>>>,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            partitions: Arc::default(),
        }
    }

    /// Starts a policy write: a transaction holding the version row lock, so
    /// policy writes are serialised and each gets exactly one version.
    pub(crate) async fn begin_policy_write(&self) -> Result<(Transaction<'static, Postgres>, u64)> {
        let mut tx = self.pool.begin().await?;
        let (version,): (i64,) =
            sqlx::query_as("SELECT version FROM policy_meta WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        Ok((tx, version as u64))
    }

    /// The current policy version.
    pub async fn policy_version(&self) -> Result<u64> {
        let (v,): (i64,) = sqlx::query_as("SELECT version FROM policy_meta WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(v as u64)
    }

    /// Whether Postgres answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// Bumps the policy version inside `tx` and queues the notification that
/// Postgres delivers when `tx` commits.
pub(crate) async fn bump_version(tx: &mut Transaction<'static, Postgres>) -> Result<u64> {
    let (v,): (i64,) =
        sqlx::query_as("UPDATE policy_meta SET version = version + 1, updated_at = now() WHERE id = 1 RETURNING version")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(POLICY_CHANNEL)
        .bind(v.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(v as u64)
}

/// Unix microseconds of a timestamp.
pub fn to_us(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1000) as i64
}

/// Timestamp of unix microseconds; out-of-range values clamp to the epoch.
pub fn from_us(us: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
