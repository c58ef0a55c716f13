//! The policy sync client: the only way policy reaches a running proxy.
//!
//! At start the last applied snapshot is loaded from the cache file, so a
//! proxy enforces its last known policy while the control plane is away (a
//! proxy that never had one serves nothing). Then it holds one stream to
//! the control plane: hello, a full snapshot, then every version as it is
//! published. Each version is applied and acked, or rejected with the
//! reason while the previous version stays in force (fail closed on a bad
//! update). A delta that does not fit asks for a resync. Heartbeats carry
//! the proxy's stats. The stream is reopened with backoff whenever it ends.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sentinel_shared::proto::policy_sync_client::PolicySyncClient;
use sentinel_shared::proto::{
    Heartbeat, Hello, PolicyAck, PolicyReject, PolicySnapshot, ProxyMessage, ProxyStats,
    control_message, proxy_message,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::policy::PolicyPublisher;

/// How often the proxy reports its stats.
const HEARTBEAT: Duration = Duration::from_secs(5);

pub struct SyncClient {
    pub proxy_id: String,
    pub join_token: String,
    pub labels: HashMap<String, String>,
    /// Where the last applied snapshot is kept (protobuf).
    pub cache_file: Option<PathBuf>,
    /// The stats sent in heartbeats.
    pub stats: Arc<dyn Fn() -> ProxyStats + Send + Sync>,
}

/// Loads the cached snapshot, if any, and publishes it.
pub fn load_cache(path: &Path, publisher: &PolicyPublisher) -> Option<u64> {
    let file = std::fs::read(path).ok()?;
    // Layout: SHA-256 of the snapshot, then the snapshot (protobuf).
    let Some((sum, bytes)) = file.split_at_checked(32) else {
        tracing::warn!(cache = %path.display(), "policy cache too short; ignored");
        return None;
    };
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    if digest.as_slice() != sum {
        tracing::warn!(cache = %path.display(), "policy cache fails its integrity check; ignored");
        return None;
    }
    let snapshot = match PolicySnapshot::decode(bytes) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, cache = %path.display(), "policy cache unreadable; ignored");
            return None;
        }
    };
    match publisher.publish(snapshot) {
        Ok(v) => {
            tracing::info!(version = v, "policy loaded from cache");
            Some(v)
        }
        Err(e) => {
            tracing::warn!(reason = %e, "cached policy not applicable; ignored");
            None
        }
    }
}

/// Writes the cache owner-only (it holds key hashes and session keys),
/// with a checksum, atomically.
fn store_cache(path: &Path, snapshot: &PolicySnapshot) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let bytes = snapshot.encode_to_vec();
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    let r = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&digest)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = r {
        tracing::warn!(%error, cache = %path.display(), "policy cache not written");
    }
}

impl SyncClient {
    /// Follows the control plane until `shutdown` resolves.
    pub async fn run(
        self,
        channel: Channel,
        publisher: Arc<PolicyPublisher>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            tokio::select! {
                _ = &mut shutdown => return,
                r = self.session(&channel, &publisher) => {
                    match r {
                        Ok(()) => tracing::warn!("policy stream ended by the control plane"),
                        Err(status) => tracing::warn!(code = ?status.code(), message = %status.message(), "policy stream failed"),
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            // Jitter, so a fleet does not reconnect in lockstep after an
            // outage: sleep between half and all of the backoff.
            let mut r = [0u8; 2];
            rand::fill(&mut r);
            let wait =
                backoff.mul_f64(0.5 + f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 2.0);
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One stream, from hello until it ends.
    async fn session(
        &self,
        channel: &Channel,
        publisher: &PolicyPublisher,
    ) -> Result<(), tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let last = publisher.current_snapshot().map_or(0, |s| s.version);
        let hello = Hello {
            proxy_id: self.proxy_id.clone(),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            labels: self.labels.clone(),
            last_applied_version: last,
            join_token: self.join_token.clone(),
        };
        send(&tx, proxy_message::Msg::Hello(hello)).await?;
        let mut client =
            PolicySyncClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
        let mut inbound = client.sync(ReceiverStream::new(rx)).await?.into_inner();
        tracing::info!(last_applied = last, "policy stream open");
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                msg = inbound.next() => {
                    let Some(msg) = msg else { return Ok(()) };
                    let Some(msg) = msg?.msg else { continue };
                    let (version, result) = match msg {
                        control_message::Msg::Snapshot(s) => (s.version, publisher.publish(s)),
                        control_message::Msg::Delta(d) => (d.version, publisher.apply_delta(d)),
                    };
                    let reply = match result {
                        Ok(v) => {
                            if let (Some(path), Some(snap)) = (&self.cache_file, publisher.current_snapshot()) {
                                store_cache(path, &snap);
                            }
                            proxy_message::Msg::Ack(PolicyAck { version: v })
                        }
                        Err(e) => {
                            tracing::warn!(version, reason = %e.reason, resync = e.resync, "policy update rejected");
                            metrics::counter!("sentinel_policy_rejected_total").increment(1);
                            proxy_message::Msg::Reject(PolicyReject { version, reason: e.reason, resync: e.resync })
                        }
                    };
                    send(&tx, reply).await?;
                }
                _ = beat.tick() => {
                    let stats = (self.stats)();
                    send(&tx, proxy_message::Msg::Heartbeat(Heartbeat { stats: Some(stats) })).await?;
                }
            }
        }
    }
}

async fn send(tx: &mpsc::Sender<ProxyMessage>, m: proxy_message::Msg) -> Result<(), tonic::Status> {
    tx.send(ProxyMessage { msg: Some(m) })
        .await
        .map_err(|_| tonic::Status::cancelled("policy stream closed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_owner_only_and_a_tampered_one_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.cache");
        let snap = PolicySnapshot {
            version: 7,
            ..Default::default()
        };
        store_cache(&path, &snap);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut bytes = std::fs::read(&path).unwrap();
        let (sum, body) = bytes.split_at(32);
        let digest: [u8; 32] = Sha256::digest(body).into();
        assert_eq!(sum, digest.as_slice());
        // Flip a byte of the snapshot: the checksum no longer matches.
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let cfg = crate::config::Config::default();
        let (publisher, _reader) = crate::policy::policy_channel(&cfg);
        assert_eq!(load_cache(&path, &publisher), None);
    }
}
