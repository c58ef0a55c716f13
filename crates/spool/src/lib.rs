//! The proxy's audit spool: nothing a proxy forwards goes unrecorded.
//!
//! Before a tool call is forwarded, its attempt is appended here and made
//! durable ([`Spool::attempt`]); its outcome follows ([`Spool::outcome`]).
//! Calls refused before forwarding are appended whole ([`Spool::whole`]).
//! The [`shipper`] streams the records to the control plane in sequence
//! order, sealing each event into the proxy's hash chain for this boot
//! epoch, and deletes a segment only once the control plane acked (after
//! its Postgres commit) every event in it.
//!
//! After a crash, an attempt without an outcome is delivered with outcome
//! `unknown`: the call may have been forwarded, its result was not seen.
//!
//! Modules:
//! - [`format`]: the segment and record encoding;
//! - [`writer`]: the thread that appends with group commit, and recovery;
//! - [`shipper`]: delivery to the control plane until acked.

pub mod format;
pub mod shipper;
pub mod writer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sentinel_shared::proto::AuditEvent;
use tokio::sync::{mpsc, oneshot, watch};

use crate::format::Kind;
use crate::writer::{Cmd, Shared, Writer};

/// How durable an appended attempt is before the call goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `fdatasync` per group: survives a machine crash.
    #[default]
    Fsync,
    /// Written to the OS: survives a process crash, not a machine crash.
    Os,
}

/// What happens to a call when the spool is full or the disk fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Refuse the call (the proxy answers 503): nothing unrecorded.
    #[default]
    Reject,
    /// Forward it unrecorded, counted in `sentinel_audit_dropped_total`.
    Drop,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub proxy_id: String,
    pub durability: Durability,
    /// Bytes of segments kept at most (unacked audit).
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    pub when_full: WhenFull,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>, proxy_id: impl Into<String>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            proxy_id: proxy_id.into(),
            durability: Durability::Fsync,
            max_bytes: 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            when_full: WhenFull::Reject,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("audit spool is full")]
    Full,
    #[error("audit spool write failed: {0}")]
    Disk(String),
    #[error("audit spool is closed")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("spool directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Counters for heartbeats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub epoch: u64,
    pub backlog: u64,
    pub spool_bytes: u64,
    pub dropped: u64,
    pub rejected: u64,
}

/// The request path's handle on the spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    to: Appender,
    shared: Arc<Shared>,
}

/// How appends reach the writer.
#[derive(Clone)]
enum Appender {
    /// `fsync`: the group-commit thread.
    Thread(mpsc::UnboundedSender<Cmd>),
    /// `os`: the caller writes (see [`writer`]).
    Inline(Arc<Mutex<Writer>>),
}

/// The file holding the boot epoch.
const EPOCH_FILE: &str = "epoch";

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir`: checks and repairs what a
    /// crash left, starts a new boot epoch and the writer thread.
    pub fn open(cfg: SpoolConfig) -> Result<Spool, OpenError> {
        let io = |source| OpenError::Io {
            dir: cfg.dir.clone(),
            source,
        };
        std::fs::create_dir_all(&cfg.dir).map_err(io)?;
        let scanned = writer::recover(&cfg.dir).map_err(io)?;
        let acked = shipper::read_ack(&cfg.dir).map_err(io)?;
        let last_epoch = read_epoch(&cfg.dir).map_err(io)?;
        let epoch = scanned
            .iter()
            .map(|s| s.epoch)
            .chain([last_epoch, acked.epoch])
            .max()
            .unwrap_or(0)
            + 1;
        write_atomically(&cfg.dir, EPOCH_FILE, epoch.to_string().as_bytes(), true).map_err(io)?;
        let used: u64 = writer::list_segments(&cfg.dir)
            .map_err(io)?
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let backlog = shipper::count_unacked(&cfg.dir, &acked).map_err(io)?;
        let next_index = scanned.last().map_or(1, |s| s.index + 1);
        let (committed, _) = watch::channel((next_index, 0));
        let shared = Arc::new(Shared {
            dir: cfg.dir.clone(),
            proxy_id: cfg.proxy_id.clone(),
            epoch,
            durability: cfg.durability,
            used_bytes: AtomicU64::new(used),
            unacked: AtomicU64::new(backlog),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            open_segment: AtomicU64::new(next_index),
            committed,
        });
        let writer = Arc::new(Mutex::new(
            Writer::start(shared.clone(), &cfg, next_index).map_err(io)?,
        ));
        let to = match cfg.durability {
            Durability::Os => Appender::Inline(writer),
            Durability::Fsync => {
                let (tx, rx) = mpsc::unbounded_channel();
                std::thread::Builder::new()
                    .name("audit-spool".into())
                    .spawn(move || Writer::run(writer, rx))
                    .map_err(io)?;
                Appender::Thread(tx)
            }
        };
        let chain_breaks: u64 = scanned.iter().map(|s| s.chain_breaks).sum();
        tracing::info!(
            dir = %cfg.dir.display(),
            epoch,
            backlog,
            bytes = used,
            chain_breaks,
            "audit spool open"
        );
        Ok(Spool { to, shared })
    }

    /// Appends the attempt of a call about to be forwarded; resolves once it
    /// is durable. Returns its sequence number (0: dropped, by the `drop`
    /// policy of a full spool). An error means: do not forward the call.
    pub async fn attempt(&self, event: AuditEvent) -> Result<u64, AppendError> {
        match &self.to {
            Appender::Inline(w) => writer::lock(w).append_now(Kind::Attempt, 0, event),
            Appender::Thread(tx) => {
                let (reply, rx) = oneshot::channel();
                tx.send(Cmd::Append {
                    kind: Kind::Attempt,
                    sequence: 0,
                    event,
                    reply: Some(reply),
                })
                .map_err(|_| AppendError::Closed)?;
                rx.await.map_err(|_| AppendError::Closed)?
            }
        }
    }

    /// As [`Spool::attempt`], stamping `event` in place (proxy id, epoch,
    /// sequence, outcome `unknown`) instead of taking it: with durability
    /// `os` the record is encoded straight from the caller's event, which
    /// saves a copy of it per call.
    pub async fn attempt_in_place(&self, event: &mut AuditEvent) -> Result<u64, AppendError> {
        match &self.to {
            Appender::Inline(w) => writer::lock(w).append_in_place(Kind::Attempt, 0, event),
            Appender::Thread(_) => self.attempt(event.clone()).await,
        }
    }

    /// Appends the complete event of attempt `sequence`. Never waits for a
    /// sync.
    pub fn outcome(&self, sequence: u64, event: AuditEvent) {
        self.append(Kind::Outcome, sequence, event);
    }

    /// Appends the complete event of a call that was never forwarded.
    /// Never waits for a sync.
    pub fn whole(&self, event: AuditEvent) {
        self.append(Kind::Whole, 0, event);
    }

    fn append(&self, kind: Kind, sequence: u64, event: AuditEvent) {
        match &self.to {
            // A failure is counted and logged by the writer.
            Appender::Inline(w) => {
                let _ = writer::lock(w).append_now(kind, sequence, event);
            }
            Appender::Thread(tx) => {
                let _ = tx.send(Cmd::Append {
                    kind,
                    sequence,
                    event,
                    reply: None,
                });
            }
        }
    }

    /// Resolves once every record appended before the call is written as
    /// durably as configured: outcomes and refusals are not waited for when
    /// appended, so a stopping proxy waits here before it exits.
    pub async fn flush(&self) {
        if let Appender::Thread(tx) = &self.to {
            let (reply, rx) = oneshot::channel();
            if tx.send(Cmd::Flush { reply }).is_ok() {
                let _ = rx.await;
            }
        }
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            epoch: self.shared.epoch,
            backlog: self.shared.unacked.load(Ordering::Relaxed),
            spool_bytes: self.shared.used_bytes.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            rejected: self.shared.rejected.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

fn read_epoch(dir: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(dir.join(EPOCH_FILE)) {
        Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Replaces `dir/name` with `data` (write, sync, rename).
pub(crate) fn write_atomically(
    dir: &Path,
    name: &str,
    data: &[u8],
    sync: bool,
) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    if sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    if sync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(tool: &str) -> AuditEvent {
        AuditEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            tool: tool.into(),
            mcp_method: "tools/call".into(),
            ..Default::default()
        }
    }

    fn cfg(dir: &Path) -> SpoolConfig {
        SpoolConfig::new(dir, "proxy-t")
    }

    #[tokio::test]
    async fn concurrent_attempts_share_commits_and_get_distinct_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(cfg(dir.path())).unwrap();
        assert_eq!(spool.epoch(), 1);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = spool.clone();
            tasks.push(tokio::spawn(async move {
                let seq = s.attempt(ev(&format!("t{i}"))).await.unwrap();
                if i % 2 == 0 {
                    s.outcome(seq, ev("done"));
                }
                seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        spool.whole(ev("denied"));
        // `whole` does not wait: give the writer a moment.
        for _ in 0..100 {
            if spool.stats().backlog == 201 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(spool.stats().backlog, 201);
        drop(spool);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // A restart is a new epoch and finds the backlog on disk.
        let again = Spool::open(cfg(dir.path())).unwrap();
        assert_eq!(again.epoch(), 2);
        assert_eq!(again.stats().backlog, 201);
    }

    #[tokio::test]
    async fn flush_returns_once_everything_appended_before_it_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(cfg(dir.path())).unwrap();
        let seq = spool.attempt(ev("called")).await.unwrap();
        spool.outcome(seq, ev("called"));
        for i in 0..500 {
            spool.whole(ev(&format!("denied{i}")));
        }
        spool.flush().await;
        // No polling: the writer took every record queued before the flush.
        assert_eq!(spool.stats().backlog, 501);
        drop(spool);
        let reopened = Spool::open(cfg(dir.path())).unwrap();
        assert_eq!(reopened.stats().backlog, 501);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_os_durability_the_caller_writes_and_sequences_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.durability = Durability::Os;
        // Small segments: appends roll over to new segments as they go.
        c.segment_bytes = 4096;
        let spool = Spool::open(c.clone()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = spool.clone();
            tasks.push(tokio::spawn(async move {
                let seq = s.attempt(ev(&format!("t{i}"))).await.unwrap();
                s.outcome(seq, ev("done"));
                seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        // Written before `whole` returns: no writer thread to wait for.
        spool.whole(ev("denied"));
        assert_eq!(spool.stats().backlog, 201);
        assert!(writer::list_segments(dir.path()).unwrap().len() > 2);
        drop(spool);
        let scanned = writer::recover(dir.path()).unwrap();
        assert_eq!(scanned.iter().map(|s| s.chain_breaks).sum::<u64>(), 0);
        let again = Spool::open(c).unwrap();
        assert_eq!(again.epoch(), 2);
        assert_eq!(again.stats().backlog, 201);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(cfg(dir.path())).unwrap();
        for _ in 0..10 {
            spool.attempt(ev("echo")).await.unwrap();
        }
        drop(spool);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (_, path) = writer::list_segments(dir.path()).unwrap().pop().unwrap();
        let good_len = std::fs::metadata(&path).unwrap().len();
        // Half a record, as a crash in the middle of a write leaves it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9]).unwrap();
        drop(f);
        let again = Spool::open(cfg(dir.path())).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        assert_eq!(again.stats().backlog, 10);
    }

    #[tokio::test]
    async fn a_record_removed_from_disk_breaks_the_record_chain() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(cfg(dir.path())).unwrap();
        for _ in 0..3 {
            spool.attempt(ev("echo")).await.unwrap();
        }
        drop(spool);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let (_, path) = writer::list_segments(dir.path()).unwrap().remove(0);
        assert_eq!(writer::recover(dir.path()).unwrap()[0].chain_breaks, 0);
        // Cut the second record out: every checksum still holds.
        let data = std::fs::read(&path).unwrap();
        let h = format::HEADER_LEN as usize;
        let len1 = 8 + u32::from_le_bytes(data[h..h + 4].try_into().unwrap()) as usize;
        let at2 = h + len1;
        let len2 = 8 + u32::from_le_bytes(data[at2..at2 + 4].try_into().unwrap()) as usize;
        let mut cut = data[..at2].to_vec();
        cut.extend_from_slice(&data[at2 + len2..]);
        std::fs::write(&path, cut).unwrap();
        let scanned = writer::recover(dir.path()).unwrap();
        assert_eq!(scanned[0].chain_breaks, 1);
    }

    #[tokio::test]
    async fn a_full_spool_rejects_or_drops_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.max_bytes = 2048;
        let spool = Spool::open(c.clone()).unwrap();
        let mut rejected = 0;
        for _ in 0..100 {
            if spool.attempt(ev("echo")).await == Err(AppendError::Full) {
                rejected += 1;
            }
        }
        assert!(rejected > 50, "{rejected}");
        assert_eq!(spool.stats().rejected, rejected);
        drop(spool);

        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.max_bytes = 2048;
        c.when_full = WhenFull::Drop;
        let spool = Spool::open(c).unwrap();
        let mut dropped = 0;
        for _ in 0..100 {
            if spool.attempt(ev("echo")).await.unwrap() == 0 {
                dropped += 1;
            }
        }
        assert!(dropped > 50);
        assert_eq!(spool.stats().dropped, dropped);
    }
}
