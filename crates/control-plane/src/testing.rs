//! Test support: a fresh, migrated database per test on a real Postgres.
//!
//! The server is found in this order: `DATABASE_URL`; a server on
//! 127.0.0.1:5432; otherwise a throwaway cluster started from the local
//! PostgreSQL binaries in `target/test-pg` (shared by every test process and
//! left running for the next; `pg_ctl -D target/test-pg stop` ends it).
//! `SENTINEL_TEST_PG=local` skips the server on 5432.
//! Each test gets its own database, dropped when the test's [`TestDb`] is
//! dropped; databases left by crashed runs are dropped after an hour.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::local_pg::{self, LocalPg};
use crate::store::Store;

/// Port of the throwaway test cluster.
const TEST_PG_PORT: u16 = 54329;
const DB_PREFIX: &str = "sentinel_t_";

static SERVER: OnceCell<String> = OnceCell::const_new();

/// Where the shared throwaway test cluster lives.
pub fn test_cluster_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/test-pg"))
}

/// URL of the maintenance database of the server tests use.
pub async fn server_url() -> String {
    SERVER.get_or_init(find_or_start_server).await.clone()
}

async fn find_or_start_server() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        return url;
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres".to_string();
    // SENTINEL_TEST_PG=local skips 5432: how the fallback itself is tested.
    let force_local = std::env::var("SENTINEL_TEST_PG").is_ok_and(|v| v == "local");
    if !force_local && local_pg::port_open(5432) && PgConnection::connect(&local).await.is_ok() {
        return local;
    }
    // Several test processes may get here at once: serialise on a lock file.
    let dir = test_cluster_dir();
    let started = tokio::task::spawn_blocking(move || -> Result<LocalPg, String> {
        std::fs::create_dir_all(dir.parent().unwrap_or(&dir)).map_err(|e| e.to_string())?;
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::File::create(&lock_path).map_err(|e| e.to_string())?;
        lock.lock().map_err(|e| e.to_string())?;
        let r = LocalPg::start(&dir, TEST_PG_PORT, false).map_err(|e| e.to_string());
        let _ = lock.unlock();
        r
    })
    .await
    .expect("postgres start task");
    match started {
        Ok(pg) => pg.url(),
        Err(e) => panic!(
            "tests need Postgres: none at DATABASE_URL or 127.0.0.1:5432, and starting one failed: {e}"
        ),
    }
}

/// A database of its own for one test, migrated, dropped on drop.
pub struct TestDb {
    pub store: Store,
    pub pool: PgPool,
    /// URL of this test's database.
    pub url: String,
    name: String,
    server: String,
}

impl TestDb {
    /// A fresh database with the migrations applied.
    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        crate::db::migrate(&db.pool)
            .await
            .expect("migrations apply");
        db
    }

    /// A fresh database with nothing in it.
    pub async fn empty() -> TestDb {
        let server = server_url().await;
        let mut admin = PgConnection::connect(&server)
            .await
            .expect("connect to test postgres");
        drop_stale(&mut admin).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = format!("{DB_PREFIX}{now}_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create test database");
        let url = replace_db(&server, &name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .expect("connect to test database");
        TestDb {
            store: Store::new(pool.clone()),
            pool,
            url,
            name,
            server,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop the database from a thread of its own: Drop cannot await, and
        // the test's runtime may be shutting down.
        let server = self.server.clone();
        let name = self.name.clone();
        // The pool's sockets belong to the test's runtime, which this thread
        // blocks: closing them from here would deadlock. FORCE ends them.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut c) = PgConnection::connect(&server).await {
                    let _ = c
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Drops test databases older than an hour (left by killed test runs).
async fn drop_stale(admin: &mut PgConnection) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'sentinel\\_t\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap_or_default();
    for (name,) in names {
        let born: u64 = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if born + 3600 < now {
            let _ = admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .await;
        }
    }
}

/// The same server URL with another database name.
pub fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // postgres://user@host:port/db -> keep everything up to the last '/'
    // after the authority.
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let root = match path_start {
        Some(i) => &base[..i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::replace_db;

    #[test]
    fn replace_db_keeps_server_and_options() {
        assert_eq!(
            replace_db("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(replace_db("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            replace_db("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
    }
}
