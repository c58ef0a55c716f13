//! Audit: one [`AuditEvent`] per tools/call attempt, handed to an
//! [`AuditSink`].
//!
//! The request path calls [`AuditSink::attempt`] before it forwards a call
//! and [`AuditSink::outcome`] once the outcome is known; a call decided
//! without forwarding (a denial) is handed over whole with
//! [`AuditSink::decided`]. The sink (the durable spool in production) sets
//! the proxy id, epoch, sequence and hash chain: the request path never does.

pub mod event;
pub mod spool;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sentinel_shared::proto::AuditEvent;

/// Names an attempt recorded by a sink, so its outcome can be matched to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptTicket(pub u64);

/// The sink cannot record the attempt (spool full, disk failure): the call
/// must not be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit unavailable: {reason}")]
pub struct AuditUnavailable {
    pub reason: String,
}

pub type AttemptFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AttemptTicket, AuditUnavailable>> + Send + 'a>>;

/// Where audit events go.
pub trait AuditSink: Send + Sync + 'static {
    /// Records the attempt of a call about to be forwarded (`outcome` is
    /// `unknown` in `ev`). Resolves once the attempt is as durable as the
    /// sink promises; `Err` refuses the call (HTTP 503). The sink may fill
    /// in what it stamps on every record (proxy id, epoch, sequence) rather
    /// than copy the event.
    fn attempt<'a>(&'a self, ev: &'a mut AuditEvent) -> AttemptFuture<'a>;
    /// The complete event of an attempt recorded earlier. Never blocks.
    fn outcome(&self, ticket: AttemptTicket, ev: AuditEvent);
    /// A complete event for a call that was never forwarded (a refusal).
    /// Never blocks.
    fn decided(&self, ev: AuditEvent);
}

/// Keeps events in memory, unbounded: for tests only.
#[derive(Default)]
pub struct MemorySink {
    inner: Mutex<MemoryInner>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct MemoryInner {
    next: u64,
    attempts: Vec<(AttemptTicket, AuditEvent)>,
    events: Vec<AuditEvent>,
    fail_attempts: bool,
}

impl MemorySink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Makes every later `attempt` fail, as a full spool would.
    pub fn set_failing(&self, failing: bool) {
        self.inner().fail_attempts = failing;
    }

    /// Complete events so far (decided and outcomes), in order.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.inner().events.clone()
    }

    /// Attempts recorded so far.
    pub fn attempts(&self) -> Vec<AuditEvent> {
        self.inner()
            .attempts
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits until at least `n` complete events are held or `timeout` passes.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<AuditEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            {
                let g = self.inner();
                if g.events.len() >= n {
                    return g.events.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.events();
            }
        }
    }
}

impl AuditSink for MemorySink {
    fn attempt<'a>(&'a self, ev: &'a mut AuditEvent) -> AttemptFuture<'a> {
        Box::pin(async move {
            let mut g = self.inner();
            if g.fail_attempts {
                return Err(AuditUnavailable {
                    reason: "memory sink set to fail".into(),
                });
            }
            g.next += 1;
            let t = AttemptTicket(g.next);
            g.attempts.push((t, ev.clone()));
            Ok(t)
        })
    }

    fn outcome(&self, _ticket: AttemptTicket, ev: AuditEvent) {
        self.inner().events.push(ev);
        self.notify.notify_waiters();
    }

    fn decided(&self, ev: AuditEvent) {
        self.inner().events.push(ev);
        self.notify.notify_waiters();
    }
}
