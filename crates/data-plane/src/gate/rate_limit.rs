//! Rate limiting: governor token buckets per key (and per role), as the
//! role's limits say. Buckets are per proxy: a fleet of N proxies admits up
//! to N times a per-key limit (documented in the operator guide).
//!
//! Limiters are kept across policy versions as long as the limit itself is
//! unchanged, so a policy push (say, a key revocation) does not refill every
//! bucket.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Governor};
use sentinel_shared::policy::{CompiledRateLimit, LimitScope};

use crate::clock::{Clock, GovernorClock};
use crate::gate::authn::Principal;
use crate::policy::Snapshot;

type Keyed = Governor<
    String,
    DefaultKeyedStateStore<String>,
    GovernorClock,
    governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
>;

/// A refusal: which limit, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit #{index} of role '{role}' exceeded; retry after {retry_after:?}")]
pub struct RateLimited {
    pub role: String,
    pub index: usize,
    pub retry_after: Duration,
}

impl RateLimited {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let s = self.retry_after.as_secs_f64().ceil() as u64;
        s.max(1)
    }
}

/// The limiters of one role, by shape.
type RoleLimiters = Vec<(LimitShape, Arc<Keyed>)>;

/// A limit as the cache knows it: its position in the role and its shape.
/// A limit whose shape changed gets a fresh limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LimitShape {
    index: usize,
    per_second_bits: u64,
    burst: u32,
}

pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    /// The one bucket key of per-role limits.
    role_bucket: String,
    /// By role name (looked up without allocating), then by shape.
    limiters: Mutex<HashMap<String, RoleLimiters>>,
}

impl RateLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            role_bucket: String::new(),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from every bucket that applies to this call.
    /// `tool` is `(tool, backend/tool)` for tool calls.
    pub fn check(
        &self,
        principal: &Principal,
        snap: &Snapshot,
        method: &str,
        tool: Option<(&str, &str)>,
    ) -> Result<(), RateLimited> {
        let Some(role) = snap.policy.role(principal.role()) else {
            return Ok(());
        };
        for limit in role.rate_limits.iter().filter(|l| l.applies(method, tool)) {
            let Some(limiter) = self.limiter(&role.name, limit) else {
                continue;
            };
            let key = match limit.scope {
                LimitScope::PerKey => principal.bucket(),
                LimitScope::PerRole => &self.role_bucket,
            };
            if let Err(not_until) = limiter.check_key(key) {
                let now = governor::clock::Clock::now(&GovernorClock(self.clock.clone()));
                return Err(RateLimited {
                    role: role.name.clone(),
                    index: limit.index,
                    retry_after: not_until.wait_time_from(now),
                });
            }
        }
        Ok(())
    }

    fn limiter(&self, role: &str, limit: &CompiledRateLimit) -> Option<Arc<Keyed>> {
        let shape = LimitShape {
            index: limit.index,
            per_second_bits: limit.per_second.to_bits(),
            burst: limit.burst,
        };
        let mut map = match self.limiters.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some((_, l)) = map
            .get(role)
            .and_then(|v| v.iter().find(|(s, _)| *s == shape))
        {
            return Some(l.clone());
        }
        if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / limit.per_second);
        let burst = NonZeroU32::new(limit.burst.max(1))?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        let l = Arc::new(Governor::dashmap_with_clock(
            quota,
            GovernorClock(self.clock.clone()),
        ));
        // Roles that went away keep their entry until the map is this big;
        // then every bucket starts over.
        if map.len() > 4096 {
            map.clear();
        }
        let shapes = map.entry(role.to_string()).or_default();
        shapes.retain(|(s, _)| s.index != shape.index);
        shapes.push((shape, l.clone()));
        Some(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;
    use crate::gate::authn::authenticate;
    use crate::testing::snapshot_with;

    #[tokio::test]
    async fn bucket_refills_with_the_clock() {
        let (snap, keys) = snapshot_with("0123456789abcdef0123456789abcdef");
        let clock = FakeClock::at(1);
        let rl = RateLimiter::new(Arc::new(clock.clone()));
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", keys[2].parse().unwrap());
        let p = authenticate(&h, &snap, 1).await.unwrap();
        // The `limited` role allows 2 calls at once and 1 per second.
        assert!(
            rl.check(&p, &snap, "tools/call", Some(("echo", "b/echo")))
                .is_ok()
        );
        assert!(
            rl.check(&p, &snap, "tools/call", Some(("echo", "b/echo")))
                .is_ok()
        );
        let err = rl
            .check(&p, &snap, "tools/call", Some(("echo", "b/echo")))
            .unwrap_err();
        assert_eq!(err.retry_after_secs(), 1);
        // tools/list does not count.
        assert!(rl.check(&p, &snap, "tools/list", None).is_ok());
        clock.advance(Duration::from_millis(1000));
        assert!(
            rl.check(&p, &snap, "tools/call", Some(("echo", "b/echo")))
                .is_ok()
        );
        assert!(
            rl.check(&p, &snap, "tools/call", Some(("echo", "b/echo")))
                .is_err()
        );
    }
}
