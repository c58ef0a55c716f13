//! Time as the gates see it, behind a trait so that expiry and rate limits
//! are tested by moving a fake clock instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::nanos::Nanos;

/// Wall time (for expiry and audit timestamps) and monotonic time (for
/// token buckets).
pub trait Clock: Send + Sync + 'static {
    /// Unix microseconds.
    fn now_us(&self) -> i64;
    /// Monotonic nanoseconds since an arbitrary origin.
    fn mono(&self) -> Nanos;
}

/// The real clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        sentinel_shared::now_us()
    }
    fn mono(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock {
    wall_us: Arc<AtomicI64>,
    mono_ns: Arc<AtomicU64>,
}

impl FakeClock {
    pub fn at(unix_us: i64) -> Self {
        let c = Self::default();
        c.wall_us.store(unix_us, Ordering::SeqCst);
        c
    }
    pub fn advance(&self, by: Duration) {
        self.wall_us
            .fetch_add(by.as_micros() as i64, Ordering::SeqCst);
        self.mono_ns
            .fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_us(&self) -> i64 {
        self.wall_us.load(Ordering::SeqCst)
    }
    fn mono(&self) -> Nanos {
        Nanos::from(self.mono_ns.load(Ordering::SeqCst))
    }
}

/// Adapts a [`Clock`] to governor's clock trait.
#[derive(Clone)]
pub struct GovernorClock(pub Arc<dyn Clock>);

impl governor::clock::Clock for GovernorClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        self.0.mono()
    }
}
