//! The Postgres pool and the embedded migrations.
//!
//! Architecture invariant: the control plane is the only process that opens
//! a database connection; migrations run here, at start-up, before any
//! listener accepts a request.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database_url is not a valid Postgres URL: {0}")]
    BadUrl(sqlx::Error),
    #[error("cannot reach Postgres at {target}: {source}")]
    Unreachable { target: String, source: sqlx::Error },
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

/// Connects to Postgres, failing fast with a message naming the server when
/// it cannot be reached.
pub async fn connect(
    url: &str,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, DbError> {
    let opts: PgConnectOptions = url.parse().map_err(DbError::BadUrl)?;
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or("postgres")
    );
    let opts = opts.application_name("sentinel-control-plane");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(opts)
        .await
        .map_err(|source| DbError::Unreachable { target, source })
}

/// Applies every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
