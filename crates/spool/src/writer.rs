//! The spool writer: it owns the open segment and appends records.
//!
//! - Durability `fsync`: one thread appends in groups. Every append waiting
//!   on a group shares one `write` and one `fdatasync`; a call's attempt is
//!   acknowledged only after its group is on disk.
//! - Durability `os`: the caller appends and `write`s its record itself,
//!   under a mutex held for that one `write` (never across an await). A
//!   handoff to a thread and back costs two wake-ups per record, more than
//!   the `write` of a few KB into the page cache it would save.
//!
//! Sequence numbers are assigned here, under the writer's lock, so they
//! follow the order of the file.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use sentinel_shared::proto::{AuditEvent, Outcome};
use tokio::sync::{mpsc, oneshot, watch};

use crate::format::{self, Kind, Next};
use crate::{AppendError, Durability, SpoolConfig, WhenFull};

/// Where the writer has written up to: segment index and byte offset. The
/// reader never reads past it in the open segment.
pub type Pos = (u64, u64);

/// State shared by the writer, the shipper and the request path.
pub struct Shared {
    pub dir: PathBuf,
    pub proxy_id: String,
    pub epoch: u64,
    pub durability: Durability,
    /// Bytes of all segment files on disk.
    pub used_bytes: AtomicU64,
    /// Events appended (attempts and whole events) not yet acked.
    pub unacked: AtomicU64,
    pub dropped: AtomicU64,
    pub rejected: AtomicU64,
    /// Index of the segment the writer appends to: never reclaimed.
    pub open_segment: AtomicU64,
    pub committed: watch::Sender<Pos>,
}

// Boxing `Append`'s event would cost an allocation per record on the hot
// path to shrink the rare `Flush`.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Cmd {
    Append {
        kind: Kind,
        /// The attempt's sequence, for an outcome.
        sequence: u64,
        event: AuditEvent,
        reply: Option<oneshot::Sender<Result<u64, AppendError>>>,
    },
    /// Answered once everything sent before it is written (and synced).
    Flush {
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
}

/// An append waiting for its group: where to answer, and the answer.
type Waiter = (
    oneshot::Sender<Result<u64, AppendError>>,
    Result<u64, AppendError>,
);

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: File,
    index: u64,
    offset: u64,
    next_seq: u64,
    /// Hash of the last record appended (the next one's `prev`), and of the
    /// last one on disk: a failed write rolls back to it.
    chain: [u8; 32],
    durable_chain: [u8; 32],
    /// Sequence numbers and backlog handed out to the group being built,
    /// taken back if its write fails.
    group_first_seq: u64,
    max_bytes: u64,
    segment_bytes: u64,
    when_full: WhenFull,
    buf: Vec<u8>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(error) = self.file.sync_data() {
            tracing::warn!(%error, "spool: final sync failed");
        }
    }
}

pub(crate) fn lock(w: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// An append's answer once its write is known: a record that was taken
/// but not written is a disk error.
fn after_write(
    written: &std::io::Result<()>,
    r: Result<u64, AppendError>,
) -> Result<u64, AppendError> {
    match (written, r) {
        (Err(e), Ok(seq)) if seq != 0 => Err(AppendError::Disk(e.to_string())),
        (_, r) => r,
    }
}

/// Room beyond `max_bytes` kept for outcomes of admitted attempts and for
/// refusals, so a full spool still records how admitted calls ended.
fn reserve(max: u64) -> u64 {
    max / 16
}

impl Writer {
    pub(crate) fn start(
        shared: Arc<Shared>,
        cfg: &SpoolConfig,
        index: u64,
    ) -> std::io::Result<Writer> {
        let (file, offset) = create_segment(&shared.dir, index, shared.epoch, shared.durability)?;
        shared.used_bytes.fetch_add(offset, Ordering::Relaxed);
        shared.open_segment.store(index, Ordering::Release);
        shared.committed.send_replace((index, offset));
        Ok(Writer {
            shared,
            file,
            index,
            offset,
            next_seq: 1,
            chain: [0; 32],
            durable_chain: [0; 32],
            group_first_seq: 1,
            max_bytes: cfg.max_bytes,
            segment_bytes: cfg.segment_bytes,
            when_full: cfg.when_full,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Runs until every sender is gone (durability `fsync`).
    pub(crate) fn run(writer: Arc<Mutex<Writer>>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut group: Vec<Waiter> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut w = lock(&writer);
            w.begin();
            w.take_cmd(first, &mut group);
            // Everything that queued while the last group was being written
            // joins this one: that is the group commit.
            while w.buf.len() < 4 * 1024 * 1024 {
                match rx.try_recv() {
                    Ok(cmd) => w.take_cmd(cmd, &mut group),
                    Err(_) => break,
                }
            }
            let result = w.end();
            drop(w);
            for (reply, r) in group.drain(..) {
                let _ = reply.send(after_write(&result, r));
            }
        }
    }

    /// Appends one record and writes it before returning (durability `os`).
    pub(crate) fn append_now(
        &mut self,
        kind: Kind,
        sequence: u64,
        mut event: AuditEvent,
    ) -> Result<u64, AppendError> {
        self.append_in_place(kind, sequence, &mut event)
    }

    /// As [`Writer::append_now`], stamping the caller's event in place.
    pub(crate) fn append_in_place(
        &mut self,
        kind: Kind,
        sequence: u64,
        event: &mut AuditEvent,
    ) -> Result<u64, AppendError> {
        self.begin();
        let r = self.take(kind, sequence, event);
        let result = self.end();
        after_write(&result, r)
    }

    fn begin(&mut self) {
        self.buf.clear();
        self.group_first_seq = self.next_seq;
    }

    /// Writes what `take` gathered; starts a new segment past its size.
    fn end(&mut self) -> std::io::Result<()> {
        let result = self.flush();
        if result.is_ok()
            && self.offset >= self.segment_bytes
            && let Err(error) = self.roll()
        {
            tracing::error!(%error, "spool: opening a new segment failed");
        }
        result
    }

    fn take_cmd(&mut self, cmd: Cmd, group: &mut Vec<Waiter>) {
        match cmd {
            Cmd::Append {
                kind,
                sequence,
                mut event,
                reply,
            } => {
                let result = self.take(kind, sequence, &mut event);
                if let Some(reply) = reply {
                    group.push((reply, result));
                }
            }
            // Answered with the group it joins, after its write.
            Cmd::Flush { reply } => group.push((reply, Ok(0))),
        }
    }

    fn take(
        &mut self,
        kind: Kind,
        sequence: u64,
        event: &mut AuditEvent,
    ) -> Result<u64, AppendError> {
        let used = self.shared.used_bytes.load(Ordering::Relaxed) + self.buf.len() as u64;
        let limit = match kind {
            Kind::Attempt => self.max_bytes,
            Kind::Outcome | Kind::Whole => self.max_bytes + reserve(self.max_bytes),
        };
        let estimate = event.encoded_len() as u64 + 64;
        if kind == Kind::Outcome && sequence == 0 {
            // The outcome of an attempt that was dropped: nothing to add.
            Ok(0)
        } else if used + estimate > limit {
            match (self.when_full, kind) {
                (WhenFull::Reject, Kind::Attempt) => {
                    self.shared.rejected.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("sentinel_audit_spool_rejected_total").increment(1);
                    Err(AppendError::Full)
                }
                _ => {
                    let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    metrics::counter!("sentinel_audit_dropped_total").increment(1);
                    // Once, then every 1000th: a full spool must not flood the log.
                    if n % 1000 == 1 {
                        tracing::warn!(dropped_total = n, tool = %event.tool, "audit spool full: event dropped");
                    }
                    Ok(0)
                }
            }
        } else {
            let seq = match kind {
                Kind::Outcome => sequence,
                Kind::Attempt | Kind::Whole => {
                    let s = self.next_seq;
                    self.next_seq += 1;
                    self.shared.unacked.fetch_add(1, Ordering::Relaxed);
                    s
                }
            };
            event.proxy_id.clone_from(&self.shared.proxy_id);
            event.epoch = self.shared.epoch;
            event.sequence = seq;
            if kind == Kind::Attempt {
                event.outcome = Outcome::Unknown as i32;
            }
            self.chain = format::encode(kind, seq, &self.chain, event, &mut self.buf);
            Ok(seq)
        }
    }

    /// Writes the group and makes it as durable as configured. On failure
    /// the segment is cut back to its last good length, so a half-written
    /// group never sits in front of later records.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self
            .file
            .write_all(&self.buf)
            .and_then(|()| match self.shared.durability {
                Durability::Fsync => self.file.sync_data(),
                Durability::Os => Ok(()),
            });
        match r {
            Ok(()) => {
                self.durable_chain = self.chain;
                self.offset += self.buf.len() as u64;
                self.shared
                    .used_bytes
                    .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                metrics::gauge!("sentinel_audit_spool_bytes")
                    .set(self.shared.used_bytes.load(Ordering::Relaxed) as f64);
                self.shared
                    .committed
                    .send_replace((self.index, self.offset));
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, bytes = self.buf.len(), "spool: write failed");
                metrics::counter!("sentinel_audit_spool_write_errors_total").increment(1);
                let _ = self.file.set_len(self.offset);
                let _ = self.file.seek(SeekFrom::Start(self.offset));
                // The group is not on disk: its sequence numbers are handed
                // out again, so the chain of sequences has no hole.
                let lost = self.next_seq - self.group_first_seq;
                self.next_seq = self.group_first_seq;
                self.chain = self.durable_chain;
                let _ =
                    self.shared
                        .unacked
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                            Some(u.saturating_sub(lost))
                        });
                Err(e)
            }
        }
    }

    fn roll(&mut self) -> std::io::Result<()> {
        // With `os` the segment is left to the OS like every write to it
        // (and the caller's thread is not held up by a sync of 64 MiB).
        if self.shared.durability == Durability::Fsync {
            self.file.sync_data()?;
        }
        let index = self.index + 1;
        let (file, offset) = create_segment(
            &self.shared.dir,
            index,
            self.shared.epoch,
            self.shared.durability,
        )?;
        self.shared.used_bytes.fetch_add(offset, Ordering::Relaxed);
        self.file = file;
        self.index = index;
        self.offset = offset;
        self.shared.open_segment.store(index, Ordering::Release);
        self.shared.committed.send_replace((index, offset));
        Ok(())
    }
}

fn create_segment(
    dir: &Path,
    index: u64,
    epoch: u64,
    durability: Durability,
) -> std::io::Result<(File, u64)> {
    let path = dir.join(format::segment_name(index));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    file.write_all(&format::header(epoch))?;
    if durability == Durability::Fsync {
        file.sync_data()?;
        File::open(dir)?.sync_all()?;
    }
    Ok((file, format::HEADER_LEN))
}

/// What recovery found in one segment.
pub(crate) struct Scanned {
    pub index: u64,
    pub epoch: u64,
    /// Records in this segment that do not link to their predecessor.
    pub chain_breaks: u64,
}

/// Checks every segment at start: a torn or corrupt tail is cut off (and
/// said so in the log); a segment without a valid header is set aside.
/// Returns the valid segments in order.
pub(crate) fn recover(dir: &Path) -> std::io::Result<Vec<Scanned>> {
    let mut out = Vec::new();
    // The record chain of the epoch being read: (epoch, last hash). The
    // first record found of an epoch is taken as it is (older segments may
    // have been reclaimed); every later one must link to its predecessor.
    let mut chain: Option<(u64, [u8; 32])> = None;
    for (index, path) in list_segments(dir)? {
        let data = std::fs::read(&path)?;
        let Some(epoch) = format::parse_header(&data) else {
            let aside = path.with_extension("bad");
            tracing::error!(segment = %path.display(), "spool: segment header invalid; set aside");
            std::fs::rename(&path, &aside)?;
            continue;
        };
        let mut pos = format::HEADER_LEN as usize;
        let mut chain_breaks = 0;
        loop {
            match format::decode(&data[pos..]) {
                Next::Record(r, n) => {
                    if let Some((e, last)) = chain
                        && e == epoch
                        && r.prev != last
                    {
                        tracing::error!(
                            segment = %path.display(),
                            offset = pos,
                            epoch,
                            sequence = r.sequence,
                            "spool: record chain broken: records were altered, inserted or removed on disk"
                        );
                        metrics::counter!("sentinel_audit_spool_chain_breaks_total").increment(1);
                        chain_breaks += 1;
                    }
                    chain = Some((epoch, r.hash));
                    pos += n as usize;
                }
                Next::End => break,
                Next::Corrupt(why) => {
                    let cut = data.len() - pos;
                    tracing::warn!(
                        segment = %path.display(),
                        offset = pos,
                        bytes_cut = cut,
                        reason = %why,
                        "spool: torn or corrupt tail cut off"
                    );
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(pos as u64)?;
                    f.sync_all()?;
                    break;
                }
            }
        }
        out.push(Scanned {
            index,
            epoch,
            chain_breaks,
        });
    }
    Ok(out)
}

/// Segment files in index order.
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(i) = entry.file_name().to_str().and_then(format::segment_index) {
            v.push((i, entry.path()));
        }
    }
    v.sort_unstable_by_key(|(i, _)| *i);
    Ok(v)
}
