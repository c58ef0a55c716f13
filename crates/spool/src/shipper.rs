//! The shipper: reads the spool in file order and streams its events to the
//! control plane's `AuditIngest`, in sequence order per boot epoch.
//!
//! - An event is shipped once its outcome is known. An attempt from an
//!   earlier boot that never got an outcome is shipped with outcome
//!   `unknown` (the process died while the call was in flight).
//! - Each event is sealed into the epoch's hash chain as it is shipped, in
//!   sequence order, so the chain is over the final content.
//! - The control plane acks a batch after its commit. The shipper records
//!   the last acked (epoch, sequence, hash) in the `acked` file and deletes
//!   segments whose every event is acked. After any restart or reconnect,
//!   delivery resumes after that point; replays are absorbed by event ids.
//! - Memory is bounded: at most `pending_cap` events are held while the
//!   head of the line waits for its outcome; later records are re-read from
//!   disk when there is room.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sentinel_shared::proto::audit_ingest_client::AuditIngestClient;
use sentinel_shared::proto::{
    AuditBatch, AuditEvent, IngestHello, IngestRequest, IngestResponse, Outcome, ingest_request,
};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::format::{self, Kind, NextRaw};
use crate::writer::{Shared, list_segments};
use crate::{Durability, Spool, write_atomically};

const ACK_FILE: &str = "acked";
/// How often the ack file is rewritten at most while acks arrive.
const ACK_SAVE_EVERY: Duration = Duration::from_millis(200);
/// Bytes read from a segment at a time.
const READ_CHUNK: u64 = 16 * 1024 * 1024;

/// The last event the control plane acked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acked {
    pub epoch: u64,
    pub sequence: u64,
    pub hash: Vec<u8>,
}

impl Acked {
    fn key(&self) -> (u64, u64) {
        (self.epoch, self.sequence)
    }
}

pub fn read_ack(dir: &Path) -> std::io::Result<Acked> {
    let text = match std::fs::read_to_string(dir.join(ACK_FILE)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Acked::default()),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace();
    let epoch = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let sequence = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let hash = parts.next().map(from_hex).unwrap_or_default();
    Ok(Acked {
        epoch,
        sequence,
        hash,
    })
}

fn write_ack(dir: &Path, a: &Acked, sync: bool) -> std::io::Result<()> {
    let text = format!("{} {} {}\n", a.epoch, a.sequence, to_hex(&a.hash));
    write_atomically(dir, ACK_FILE, text.as_bytes(), sync)
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// Events (attempts and whole events) on disk after `acked`.
pub fn count_unacked(dir: &Path, acked: &Acked) -> std::io::Result<u64> {
    let mut n = 0;
    for (_, path) in list_segments(dir)? {
        let data = std::fs::read(&path)?;
        let Some(epoch) = format::parse_header(&data) else {
            continue;
        };
        let mut pos = format::HEADER_LEN as usize;
        while let NextRaw::Record(r, len) = format::decode_raw(&data[pos..]) {
            pos += len as usize;
            if r.kind != Kind::Outcome && (epoch, r.sequence) > acked.key() {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[derive(Debug, Clone)]
pub struct ShipperConfig {
    pub join_token: String,
    /// Events per batch at most.
    pub batch_max: usize,
    /// Batches sent and not yet acked at most.
    pub max_in_flight: usize,
    /// Events held in memory at most while waiting for an outcome.
    pub pending_cap: usize,
    /// How long a commit seen while nothing is in flight waits before it is
    /// read: the outcome of a fast call then joins its attempt, and the
    /// shipper runs once per call, after the call, instead of twice in the
    /// middle of it (on a one-thread proxy the request waits for that).
    pub linger: Duration,
}

impl ShipperConfig {
    pub fn new(join_token: impl Into<String>) -> Self {
        ShipperConfig {
            join_token: join_token.into(),
            batch_max: 1000,
            max_in_flight: 4,
            pending_cap: 20_000,
            linger: Duration::from_millis(2),
        }
    }
}

#[derive(Default)]
struct Entry {
    /// The attempt's event, undecoded: needed only if no outcome comes.
    attempt: Option<Vec<u8>>,
    done: Option<AuditEvent>,
}

struct Batch {
    id: u64,
    events: Vec<AuditEvent>,
    last: Acked,
}

struct Conn {
    tx: mpsc::Sender<IngestRequest>,
    rx: tonic::Streaming<IngestResponse>,
}

struct Shipper {
    shared: Arc<Shared>,
    cfg: ShipperConfig,
    acked: Acked,
    /// What the ack file holds, and when it was last written.
    ack_saved: Acked,
    ack_saved_at: tokio::time::Instant,
    /// The last event put in a batch (sealed): the chain continues from it.
    shipped: Acked,
    pending: BTreeMap<(u64, u64), Entry>,
    /// Events sealed into the chain and not sent yet: the next batch.
    staged: Vec<AuditEvent>,
    in_flight: VecDeque<Batch>,
    next_batch: u64,
    // Reader position: segment index, offset, that segment's epoch.
    seg: u64,
    off: u64,
    seg_epoch: u64,
    /// Where to read again once there is room (segment, offset, epoch).
    rewind: Option<(u64, u64, u64)>,
    /// Largest key seen in each fully or partly read segment.
    seg_max: BTreeMap<u64, (u64, u64)>,
    /// The segment being read, kept open between reads: one `pread` per
    /// read instead of open, seek, reads and close.
    file: Option<(u64, std::fs::File)>,
}

/// Ships until `shutdown` resolves. Never returns an error: the control
/// plane being away is the normal case it waits out.
pub async fn run(
    spool: Spool,
    channel: Channel,
    cfg: ShipperConfig,
    shutdown: impl Future<Output = ()>,
) {
    let shared = spool.shared().clone();
    let acked = match read_ack(&shared.dir) {
        Ok(a) => a,
        Err(error) => {
            tracing::error!(%error, "spool: cannot read the ack file; starting from the beginning");
            Acked::default()
        }
    };
    let first = list_segments(&shared.dir)
        .ok()
        .and_then(|v| v.first().map(|(i, _)| *i))
        .unwrap_or(1);
    let mut s = Shipper {
        shared,
        cfg,
        shipped: acked.clone(),
        ack_saved: acked.clone(),
        ack_saved_at: tokio::time::Instant::now(),
        acked,
        pending: BTreeMap::new(),
        staged: Vec::new(),
        in_flight: VecDeque::new(),
        next_batch: 1,
        seg: first,
        off: 0,
        seg_epoch: 0,
        rewind: None,
        seg_max: BTreeMap::new(),
        file: None,
    };
    let mut committed = s.shared.committed.subscribe();
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(50);
    // A deadline, not a fresh sleep per loop turn: the loop wakes on every
    // commit and tick, which would otherwise postpone a reconnect forever.
    let mut reconnect_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        s.read_available();
        let had = conn.is_some();
        if let Some(c) = &conn
            && !s.fill(c).await
        {
            conn = None;
        }
        tokio::select! {
            _ = &mut shutdown => {
                s.persist_ack(true).await;
                return;
            }
            // While a batch is in flight the next one fills up unread: its
            // ack wakes the loop, which then reads everything committed
            // meanwhile into one batch (one transaction on the control
            // plane instead of one per group commit).
            _ = committed.changed(), if s.in_flight.is_empty() => {
                tokio::time::sleep(s.cfg.linger).await;
            }
            ack = next_ack(&mut conn) => match ack {
                Some(Ok(resp)) => {
                    backoff = Duration::from_millis(50);
                    if let Err(why) = s.on_ack(resp).await {
                        tracing::warn!(%why, "audit ack out of order; reconnecting");
                        conn = None;
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!(code = ?status.code(), message = %status.message(), "audit ingest stream failed");
                    conn = None;
                }
                None => {
                    tracing::warn!("audit ingest stream closed by the control plane");
                    conn = None;
                }
            },
            _ = tokio::time::sleep_until(reconnect_at), if conn.is_none() => {
                match connect(&channel, &s.shared.proxy_id, &s.cfg.join_token).await {
                    Ok(c) => {
                        // Whatever was sent and not acked goes again.
                        let mut ok = true;
                        for b in &s.in_flight {
                            ok &= send(&c, b).await;
                        }
                        if ok {
                            tracing::info!(resent = s.in_flight.len(), "audit ingest stream connected");
                            conn = Some(c);
                        }
                    }
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = %status.message(), "audit ingest connect failed");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        reconnect_at = tokio::time::Instant::now() + backoff;
                    }
                }
            }
            _ = tick.tick() => s.persist_ack(false).await,
        }
        if had && conn.is_none() {
            // Lost the stream: back off before the next try, so a control
            // plane that accepts and then fails is not hammered.
            reconnect_at = tokio::time::Instant::now() + backoff;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

async fn next_ack(conn: &mut Option<Conn>) -> Option<Result<IngestResponse, tonic::Status>> {
    match conn {
        Some(c) => c.rx.next().await,
        None => std::future::pending().await,
    }
}

async fn connect(channel: &Channel, proxy_id: &str, token: &str) -> Result<Conn, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    let hello = IngestRequest {
        msg: Some(ingest_request::Msg::Hello(IngestHello {
            proxy_id: proxy_id.to_string(),
            join_token: token.to_string(),
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| tonic::Status::cancelled("closed"))?;
    let mut client =
        AuditIngestClient::new(channel.clone()).max_encoding_message_size(64 * 1024 * 1024);
    let rx = client.ingest(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Conn { tx, rx })
}

async fn send(c: &Conn, b: &Batch) -> bool {
    let req = IngestRequest {
        msg: Some(ingest_request::Msg::Batch(AuditBatch {
            batch_id: b.id,
            events: b.events.clone(),
        })),
    };
    c.tx.send(req).await.is_ok()
}

impl Shipper {
    fn max_pending_key(&self) -> Option<(u64, u64)> {
        self.pending.last_key_value().map(|(k, _)| *k)
    }

    /// Reads what the writer has committed since the last call.
    fn read_available(&mut self) {
        if let Some((seg, off, epoch)) = self.rewind
            && self.pending.len() < self.cfg.pending_cap / 2
        {
            self.rewind = None;
            (self.seg, self.off, self.seg_epoch) = (seg, off, epoch);
        }
        loop {
            let (open_seg, open_off) = *self.shared.committed.borrow();
            let path = self.shared.dir.join(format::segment_name(self.seg));
            if self.file.as_ref().is_none_or(|(i, _)| *i != self.seg) {
                self.file = std::fs::File::open(&path).ok().map(|f| (self.seg, f));
            }
            let Some((_, file)) = &self.file else {
                // Set aside or reclaimed: go on with the next one there is.
                match self.next_segment() {
                    Some(i) if i <= open_seg => {
                        (self.seg, self.off) = (i, 0);
                        continue;
                    }
                    _ => return,
                }
            };
            if self.off == 0 {
                match read_range(file, 0, format::HEADER_LEN).map(|d| format::parse_header(&d)) {
                    Ok(Some(epoch)) => {
                        self.seg_epoch = epoch;
                        self.off = format::HEADER_LEN;
                    }
                    _ => return,
                }
            }
            let limit = if self.seg == open_seg {
                open_off
            } else {
                u64::MAX
            };
            if self.off >= limit {
                return;
            }
            let want = (limit - self.off).min(READ_CHUNK);
            let data = match read_range(file, self.off, want) {
                Ok(d) => d,
                Err(error) => {
                    tracing::warn!(%error, segment = %path.display(), "spool: read failed");
                    self.file = None;
                    return;
                }
            };
            // The chunk stopped short of the data there is: a record cut at
            // its end is read whole next time round.
            let chunk_cut = data.len() as u64 == want && want == READ_CHUNK;
            let mut pos = 0usize;
            let mut bad = false;
            loop {
                match format::decode_raw(&data[pos..]) {
                    NextRaw::Record(r, n) => {
                        self.take(r, self.off + pos as u64);
                        pos += n as usize;
                    }
                    NextRaw::End => break,
                    NextRaw::Corrupt(_) if chunk_cut && pos > 0 => break,
                    NextRaw::Corrupt(why) => {
                        tracing::error!(segment = %path.display(), offset = self.off + pos as u64, %why, "spool: unreadable record; skipping the rest of the segment");
                        bad = true;
                        break;
                    }
                }
            }
            self.off += pos as u64;
            if chunk_cut && !bad {
                continue;
            }
            // The end of what this segment holds now.
            if self.seg < open_seg {
                match self.next_segment() {
                    Some(i) => (self.seg, self.off) = (i, 0),
                    None => return,
                }
            } else {
                return;
            }
        }
    }

    fn next_segment(&self) -> Option<u64> {
        list_segments(&self.shared.dir)
            .ok()?
            .into_iter()
            .map(|(i, _)| i)
            .find(|&i| i > self.seg)
    }

    fn take(&mut self, r: format::Raw<'_>, pos: u64) {
        let key = (self.seg_epoch, r.sequence);
        let m = self.seg_max.entry(self.seg).or_insert(key);
        *m = (*m).max(key);
        if key <= self.shipped.key() {
            return; // shipped already (or acked before a restart)
        }
        let full = self.pending.len() >= self.cfg.pending_cap;
        if full && self.max_pending_key().is_some_and(|mx| key > mx) {
            if self.rewind.is_none() {
                self.rewind = Some((self.seg, pos, self.seg_epoch));
            }
            return;
        }
        match r.kind {
            Kind::Attempt => self.pending.entry(key).or_default().attempt = Some(r.event.to_vec()),
            Kind::Whole => {
                if let Some(ev) = decode_event(r.event, key) {
                    self.pending.entry(key).or_default().done = Some(ev);
                }
            }
            Kind::Outcome => {
                if let Some(e) = self.pending.get_mut(&key)
                    && let Some(ev) = decode_event(r.event, key)
                {
                    e.done = Some(ev);
                    e.attempt = None;
                }
            }
        }
    }

    /// The next event to ship, sealed, if the head of the line is ready.
    fn next_ready(&mut self) -> Option<AuditEvent> {
        loop {
            let (&(epoch, seq), entry) = self.pending.first_key_value()?;
            let finished_epoch = epoch < self.shared.epoch && self.seg_epoch > epoch;
            if epoch != self.shipped.epoch {
                // A new epoch: only once the previous one is all shipped.
                let prev_done = self.shipped.epoch == 0
                    || (self.shipped.epoch < self.shared.epoch
                        && self.seg_epoch > self.shipped.epoch);
                if !prev_done {
                    return None;
                }
                self.shipped = Acked {
                    epoch,
                    sequence: 0,
                    hash: Vec::new(),
                };
                continue;
            }
            let in_order = seq == self.shipped.sequence + 1;
            if !in_order && !finished_epoch {
                return None;
            }
            if entry.done.is_none() && !finished_epoch {
                return None;
            }
            let (_, entry) = self.pending.pop_first()?;
            let mut ev = match (entry.done, entry.attempt) {
                (Some(done), _) => done,
                (None, Some(attempt)) => match decode_event(&attempt, (epoch, seq)) {
                    Some(mut attempt) => {
                        attempt.outcome = Outcome::Unknown as i32;
                        attempt
                    }
                    None => continue,
                },
                (None, None) => continue,
            };
            if !in_order {
                tracing::warn!(
                    epoch,
                    from = self.shipped.sequence + 1,
                    to = seq - 1,
                    "spool: sequences missing from an earlier epoch"
                );
            }
            sentinel_shared::audit::seal(&mut ev, &self.shipped.hash);
            self.shipped = Acked {
                epoch,
                sequence: seq,
                hash: ev.hash.clone(),
            };
            return Some(ev);
        }
    }

    /// Sends new batches while there is room in flight. A batch short of
    /// `batch_max` goes only when nothing is in flight, so batches grow
    /// with the load instead of one per spool commit. False if the stream
    /// broke.
    async fn fill(&mut self, c: &Conn) -> bool {
        while self.in_flight.len() < self.cfg.max_in_flight {
            while self.staged.len() < self.cfg.batch_max {
                match self.next_ready() {
                    Some(ev) => self.staged.push(ev),
                    None => break,
                }
            }
            let full = self.staged.len() >= self.cfg.batch_max;
            if self.staged.is_empty() || (!full && !self.in_flight.is_empty()) {
                return true;
            }
            // `shipped` is the last staged event: every staged event goes.
            let b = Batch {
                id: self.next_batch,
                events: std::mem::take(&mut self.staged),
                last: self.shipped.clone(),
            };
            self.next_batch += 1;
            let ok = send(c, &b).await;
            self.in_flight.push_back(b);
            if !ok {
                return false;
            }
        }
        true
    }

    async fn on_ack(&mut self, resp: IngestResponse) -> Result<(), String> {
        let Some(front) = self.in_flight.front() else {
            return Err(format!(
                "ack for batch {} with nothing in flight",
                resp.batch_id
            ));
        };
        if front.id != resp.batch_id {
            return Err(format!(
                "ack for batch {}, expected {}",
                resp.batch_id, front.id
            ));
        }
        let Some(b) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let n = b.events.len() as u64;
        self.acked = b.last;
        let _ = self
            .shared
            .unacked
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(n))
            });
        metrics::counter!("sentinel_audit_events_shipped_total").increment(n);
        if resp.dead_lettered > 0 {
            tracing::warn!(
                batch = resp.batch_id,
                dead_lettered = resp.dead_lettered,
                "control plane dead-lettered audit events"
            );
        }
        self.persist_ack(false).await;
        metrics::gauge!("sentinel_audit_backlog")
            .set(self.shared.unacked.load(Ordering::Relaxed) as f64);
        Ok(())
    }

    /// Records the last ack in the ack file and reclaims fully acked
    /// segments, off the async threads. Unless `force`d (or a segment can
    /// go), at most every [`ACK_SAVE_EVERY`]: at low rates each batch is
    /// one call, and a file written and renamed per batch was a fifth of
    /// the proxy's CPU. An ack not yet saved when the proxy dies only means
    /// those events are shipped again, which ingest counts as duplicates.
    async fn persist_ack(&mut self, force: bool) {
        if self.acked == self.ack_saved {
            return;
        }
        let open = self.shared.open_segment.load(Ordering::Acquire);
        let key = self.acked.key();
        let reclaimable: Vec<u64> = self
            .seg_max
            .iter()
            .filter(|&(&seg, &max)| seg < open && seg < self.seg && max <= key)
            .map(|(&seg, _)| seg)
            .collect();
        if !force && reclaimable.is_empty() && self.ack_saved_at.elapsed() < ACK_SAVE_EVERY {
            return;
        }
        for seg in &reclaimable {
            self.seg_max.remove(seg);
        }
        let dir = self.shared.dir.clone();
        let acked = self.acked.clone();
        let sync = self.shared.durability == Durability::Fsync;
        let shared = self.shared.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            write_ack(&dir, &acked, sync)?;
            for seg in reclaimable {
                let path = dir.join(format::segment_name(seg));
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&path)?;
                shared.used_bytes.fetch_sub(
                    len.min(shared.used_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
            }
            Ok(())
        })
        .await;
        self.ack_saved_at = tokio::time::Instant::now();
        match r {
            Ok(Ok(())) => self.ack_saved = self.acked.clone(),
            Ok(Err(error)) => tracing::warn!(%error, "spool: recording the ack failed"),
            Err(error) => tracing::warn!(%error, "spool: ack task failed"),
        }
    }
}

/// The event of a record whose checksum held. One that does not decode is
/// named in the log and skipped: an outcome's attempt then ships as
/// `unknown`; a missing attempt or whole event is a missing sequence, which
/// ships as a gap once its epoch has ended (as a torn record always did).
fn decode_event(bytes: &[u8], (epoch, sequence): (u64, u64)) -> Option<AuditEvent> {
    use prost::Message;
    match AuditEvent::decode(bytes) {
        Ok(ev) => Some(ev),
        Err(error) => {
            tracing::error!(epoch, sequence, %error, "spool: event does not decode; skipped");
            None
        }
    }
}

/// Up to `len` bytes of `file` from `off` (fewer at its end), by
/// positioned reads that leave no cursor behind.
fn read_range(file: &std::fs::File, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    // The open segment's committed length is known and small; a closed
    // segment is read in chunks of up to `READ_CHUNK`, bounded by its size.
    let len = if len > 1 << 20 {
        len.min(file.metadata()?.len().saturating_sub(off))
    } else {
        len
    };
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}
