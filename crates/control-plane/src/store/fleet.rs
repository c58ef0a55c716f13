//! The fleet: what each proxy reported on its policy stream.

use std::collections::HashMap;
use std::time::Duration;

use sentinel_shared::proto::{self, ProxyStats};
use time::OffsetDateTime;

use super::{Store, to_us};
use crate::error::Result;

/// A proxy as the fleet view shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ProxyRow {
    pub proxy_id: String,
    pub build_version: String,
    pub labels: serde_json::Value,
    /// Connected now: a stream is open and was heard from recently.
    pub connected: bool,
    pub control_plane_id: String,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
    pub acked_version: i64,
    pub rejected_version: i64,
    pub reject_reason: String,
    pub stats: serde_json::Value,
    pub gap_events: i64,
    pub chain_breaks: i64,
}

impl ProxyRow {
    pub fn to_proto(&self) -> proto::ProxyInfo {
        let labels: HashMap<String, String> =
            serde_json::from_value(self.labels.clone()).unwrap_or_default();
        proto::ProxyInfo {
            proxy_id: self.proxy_id.clone(),
            build_version: self.build_version.clone(),
            labels,
            connected: self.connected,
            control_plane_id: self.control_plane_id.clone(),
            first_seen_us: to_us(self.first_seen),
            last_seen_us: to_us(self.last_seen),
            acked_version: self.acked_version as u64,
            rejected_version: self.rejected_version as u64,
            reject_reason: self.reject_reason.clone(),
            stats: Some(stats_from_json(&self.stats)),
            audit_gap_events: self.gap_events as u64,
            audit_chain_breaks: self.chain_breaks as u64,
        }
    }
}

pub fn stats_to_json(s: &ProxyStats) -> serde_json::Value {
    let ProxyStats {
        audit_backlog,
        spool_bytes,
        audit_dropped,
        audit_rejected,
        open_sessions,
        tool_catalog_hash,
        policy_version,
        boot_epoch,
    } = s;
    serde_json::json!({
        "audit_backlog": audit_backlog,
        "spool_bytes": spool_bytes,
        "audit_dropped": audit_dropped,
        "audit_rejected": audit_rejected,
        "open_sessions": open_sessions,
        "tool_catalog_hash": tool_catalog_hash,
        "policy_version": policy_version,
        "boot_epoch": boot_epoch,
    })
}

pub fn stats_from_json(v: &serde_json::Value) -> ProxyStats {
    let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    ProxyStats {
        audit_backlog: n("audit_backlog"),
        spool_bytes: n("spool_bytes"),
        audit_dropped: n("audit_dropped"),
        audit_rejected: n("audit_rejected"),
        open_sessions: n("open_sessions"),
        tool_catalog_hash: v
            .get("tool_catalog_hash")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string(),
        policy_version: n("policy_version"),
        boot_epoch: n("boot_epoch"),
    }
}

impl Store {
    /// Records a new policy stream from `proxy_id`; returns the connection id
    /// that its later updates and its disconnect carry.
    pub async fn proxy_connected(
        &self,
        proxy_id: &str,
        build_version: &str,
        labels: &HashMap<String, String>,
        control_plane_id: &str,
    ) -> Result<uuid::Uuid> {
        let conn = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO proxies (proxy_id, build_version, labels, connected, control_plane_id, connection_id, last_seen) \
             VALUES ($1, $2, $3, true, $4, $5, now()) \
             ON CONFLICT (proxy_id) DO UPDATE SET build_version = EXCLUDED.build_version, labels = EXCLUDED.labels, \
               connected = true, control_plane_id = EXCLUDED.control_plane_id, \
               connection_id = EXCLUDED.connection_id, last_seen = now()",
        )
        .bind(proxy_id)
        .bind(build_version)
        .bind(serde_json::to_value(labels).unwrap_or_default())
        .bind(control_plane_id)
        .bind(conn)
        .execute(&self.pool)
        .await?;
        Ok(conn)
    }

    pub async fn proxy_acked(&self, proxy_id: &str, version: u64) -> Result<()> {
        sqlx::query(
            "UPDATE proxies SET acked_version = GREATEST(acked_version, $2), last_seen = now() WHERE proxy_id = $1",
        )
        .bind(proxy_id)
        .bind(version as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn proxy_rejected(&self, proxy_id: &str, version: u64, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE proxies SET rejected_version = $2, reject_reason = $3, last_seen = now() WHERE proxy_id = $1",
        )
        .bind(proxy_id)
        .bind(version as i64)
        .bind(sentinel_shared::audit::scrub(reason).as_ref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn proxy_heartbeat(&self, proxy_id: &str, stats: &ProxyStats) -> Result<()> {
        sqlx::query("UPDATE proxies SET stats = $2, last_seen = now() WHERE proxy_id = $1")
            .bind(proxy_id)
            .bind(stats_to_json(stats))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks the stream `connection` of `proxy_id` gone, unless a newer
    /// stream has replaced it.
    pub async fn proxy_disconnected(&self, proxy_id: &str, connection: uuid::Uuid) -> Result<()> {
        sqlx::query(
            "UPDATE proxies SET connected = false WHERE proxy_id = $1 AND connection_id = $2",
        )
        .bind(proxy_id)
        .bind(connection)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every proxy ever seen, with audit gap and chain-break counts.
    /// Open gaps over every chain, and how many records they miss. A gap
    /// that is filled leaves `audit_gaps`, so both figures fall back.
    pub async fn open_gap_totals(&self) -> Result<(u64, u64)> {
        let (gaps, missing): (i64, i64) = sqlx::query_as(
            "SELECT count(*), COALESCE(sum(to_seq - from_seq + 1), 0)::bigint FROM audit_gaps",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((gaps.max(0) as u64, missing.max(0) as u64))
    }

    pub async fn list_proxies(&self, stale_after: Duration) -> Result<Vec<ProxyRow>> {
        let rows = sqlx::query_as::<_, ProxyRow>(
            "SELECT p.proxy_id, p.build_version, p.labels, \
                    (p.connected AND p.last_seen > now() - make_interval(secs => $1)) AS connected, \
                    p.control_plane_id, p.first_seen, p.last_seen, p.acked_version, p.rejected_version, \
                    p.reject_reason, p.stats, \
                    COALESCE((SELECT sum(g.to_seq - g.from_seq + 1) FROM audit_gaps g WHERE g.proxy_id = p.proxy_id), 0)::bigint AS gap_events, \
                    COALESCE((SELECT sum(c.breaks) FROM audit_chains c WHERE c.proxy_id = p.proxy_id), 0)::bigint AS chain_breaks \
             FROM proxies p ORDER BY p.proxy_id",
        )
        .bind(stale_after.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestDb;

    #[tokio::test]
    async fn a_proxy_lifecycle_shows_in_the_fleet() {
        let db = TestDb::new().await;
        let s = &db.store;
        let labels = HashMap::from([("zone".to_string(), "a".to_string())]);
        let c1 = s
            .proxy_connected("p1", "0.1.0", &labels, "cp-1")
            .await
            .unwrap();
        s.proxy_acked("p1", 5).await.unwrap();
        s.proxy_acked("p1", 3).await.unwrap();
        s.proxy_rejected("p1", 6, "bad glob").await.unwrap();
        let stats = ProxyStats {
            audit_backlog: 12,
            policy_version: 5,
            ..Default::default()
        };
        s.proxy_heartbeat("p1", &stats).await.unwrap();
        let rows = s.list_proxies(Duration::from_secs(30)).await.unwrap();
        let p = rows[0].to_proto();
        assert!(p.connected);
        assert_eq!((p.acked_version, p.rejected_version), (5, 6));
        assert_eq!(p.reject_reason, "bad glob");
        assert_eq!(p.stats.unwrap().audit_backlog, 12);
        assert_eq!(p.labels["zone"], "a");
        // A newer stream replaces the first; the first one's disconnect does
        // not mark the proxy gone.
        let c2 = s
            .proxy_connected("p1", "0.1.1", &labels, "cp-2")
            .await
            .unwrap();
        s.proxy_disconnected("p1", c1).await.unwrap();
        assert!(s.list_proxies(Duration::from_secs(30)).await.unwrap()[0].connected);
        s.proxy_disconnected("p1", c2).await.unwrap();
        let row = &s.list_proxies(Duration::from_secs(30)).await.unwrap()[0];
        assert!(!row.connected);
        assert_eq!(row.build_version, "0.1.1");
    }

    #[tokio::test]
    async fn gaps_and_breaks_are_counted_per_proxy() {
        let db = TestDb::new().await;
        s_connect(&db).await;
        let mut events = crate::store::audit::tests::chain("p1", 1, 6);
        events.remove(2);
        db.store.ingest_batch("p1", events).await.unwrap();
        let row = &db
            .store
            .list_proxies(Duration::from_secs(30))
            .await
            .unwrap()[0];
        assert_eq!(row.gap_events, 1);
        assert_eq!(row.chain_breaks, 0);
    }

    async fn s_connect(db: &TestDb) {
        db.store
            .proxy_connected("p1", "v", &HashMap::new(), "cp")
            .await
            .unwrap();
    }
}
