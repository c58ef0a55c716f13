//! The policy bus: the current policy snapshot of this control-plane
//! instance, fanned out to every sync stream through a `watch` channel.
//!
//! Every policy write bumps the version and queues `pg_notify` in the same
//! transaction, so every instance sharing the database hears of every change
//! (whichever instance made it). On a notification the bus reloads the
//! snapshot, computes the delta from the previous one and publishes both:
//! a stream that is exactly one version behind sends the small delta, any
//! other stream sends the whole snapshot. A periodic check of the version
//! covers a notification lost while the LISTEN connection was down.

use std::sync::Arc;
use std::time::Duration;

use sentinel_shared::policy;
use sentinel_shared::proto::{PolicyDelta, PolicySnapshot};
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::{POLICY_CHANNEL, Store};

/// One published policy version.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Arc<PolicySnapshot>,
    /// The change from the previously published version, if there was one.
    pub delta: Option<Arc<PolicyDelta>>,
}

impl Published {
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }
}

/// A handle on the bus: subscribe to it, or ask for an immediate reload.
#[derive(Clone)]
pub struct PolicyBus {
    rx: watch::Receiver<Arc<Published>>,
    poke: Arc<Notify>,
}

impl PolicyBus {
    /// Loads the current snapshot and starts the task that follows changes,
    /// until `shutdown`.
    pub async fn start(
        store: Store,
        reload_interval: Duration,
        shutdown: CancellationToken,
    ) -> Result<PolicyBus> {
        store.ensure_session_key().await?;
        let first = Arc::new(Published {
            snapshot: Arc::new(store.load_snapshot().await?),
            delta: None,
        });
        let (tx, rx) = watch::channel(first);
        let poke = Arc::new(Notify::new());
        tokio::spawn(follow(store, tx, poke.clone(), reload_interval, shutdown));
        Ok(PolicyBus { rx, poke })
    }

    /// A receiver positioned at the current version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        rx
    }

    pub fn current(&self) -> Arc<Published> {
        self.rx.borrow().clone()
    }

    /// Reload now (after a write through this instance: no need to wait for
    /// the notification's round trip).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Waits until the bus has published `version` or later (bounded).
    pub async fn wait_for(&self, version: u64, timeout: Duration) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|p| p.version() >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn follow(
    store: Store,
    tx: watch::Sender<Arc<Published>>,
    poke: Arc<Notify>,
    reload_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut listener: Option<PgListener> = None;
    let mut tick = tokio::time::interval(reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::from_millis(100);
    loop {
        if listener.is_none() {
            match listen(&store).await {
                Ok(l) => {
                    listener = Some(l);
                    backoff = Duration::from_millis(100);
                    // Changes made while not listening were not announced.
                    reload(&store, &tx).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "policy LISTEN connection failed; retrying");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = recv(&mut listener), if listener.is_some() => match n {
                Ok(()) => reload(&store, &tx).await,
                Err(error) => {
                    tracing::warn!(%error, "policy LISTEN connection lost");
                    listener = None;
                }
            },
            _ = tokio::time::sleep(backoff), if listener.is_none() => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            _ = poke.notified() => reload(&store, &tx).await,
            _ = tick.tick() => reload(&store, &tx).await,
        }
    }
}

async fn listen(store: &Store) -> Result<PgListener> {
    let mut l = PgListener::connect_with(&store.pool).await?;
    l.listen(POLICY_CHANNEL).await?;
    Ok(l)
}

async fn recv(listener: &mut Option<PgListener>) -> Result<()> {
    match listener {
        Some(l) => {
            l.recv().await?;
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Publishes the database's snapshot if it is newer than the published one.
async fn reload(store: &Store, tx: &watch::Sender<Arc<Published>>) {
    let current = tx.borrow().snapshot.clone();
    match store.policy_version().await {
        Ok(v) if v <= current.version => return,
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(%error, "policy version check failed");
            return;
        }
    }
    let next = match store.load_snapshot().await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "policy reload failed");
            return;
        }
    };
    if next.version <= current.version {
        return;
    }
    let delta = policy::diff(&current, &next);
    tracing::info!(
        version = next.version,
        from = current.version,
        "policy version published"
    );
    metrics::gauge!("sentinel_policy_version").set(next.version as f64);
    tx.send_replace(Arc::new(Published {
        snapshot: Arc::new(next),
        delta: Some(Arc::new(delta)),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::keys::NewKey;
    use crate::testing::TestDb;
    use sentinel_shared::spec::RoleSpec;

    #[tokio::test]
    async fn a_change_through_another_instance_is_published_by_notification() {
        let db = TestDb::new().await;
        let shutdown = CancellationToken::new();
        // A long reload interval: only the notification can explain a fast publish.
        let bus = PolicyBus::start(
            db.store.clone(),
            Duration::from_secs(3600),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut rx = bus.subscribe();
        let v0 = bus.current().version();
        // Give the listener a moment to connect.
        tokio::time::sleep(Duration::from_millis(200)).await;

        // A second store on the same database: another control plane.
        let other = Store::new(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&db.url)
                .await
                .unwrap(),
        );
        other
            .put_role(RoleSpec {
                name: "dev".into(),
                allow: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        let created = other
            .create_key(NewKey {
                role: "dev".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        // The role and the key may arrive as one publish or two.
        while rx.borrow().version() < created.version {
            tokio::time::timeout(Duration::from_secs(2), rx.changed())
                .await
                .expect("published within 2 s")
                .unwrap();
        }
        let p = rx.borrow().clone();
        assert_eq!(p.version(), created.version);
        assert!(p.version() > v0);
        let delta = p.delta.as_ref().unwrap();
        assert!(delta.base_version >= v0);
        assert_eq!(delta.upsert_keys.len(), 1);
        assert_eq!(delta.upsert_keys[0].id, created.row.id);
        shutdown.cancel();
    }
}
