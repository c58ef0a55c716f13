//! The current policy as an `Arc<Snapshot>` in a `tokio::sync::watch`
//! channel: the sync client publishes, every request reads.
//!
//! A request clones the `Arc` once and sees one whole version for its whole
//! life; no lock is held across an await. A snapshot that fails to compile
//! is rejected whole and the last good one stays in force. Until the first
//! snapshot is applied the channel holds `None` and the proxy serves nothing
//! (fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use sentinel_shared::policy::{CompiledPolicy, apply_delta};
use sentinel_shared::proto::{self, PolicyDelta, PolicySnapshot};
use sentinel_shared::spec::{AuditSpec, FederationSpec};

use crate::config::Config;
use crate::gate::authn::JwtVerifier;
use crate::mcp::session::SessionSealer;
use crate::upstream::Upstream;

/// One policy version, compiled, with everything derived from it that the
/// request path needs.
pub struct Snapshot {
    pub policy: CompiledPolicy,
    /// Enabled backends, in policy order.
    pub backends: Vec<Backend>,
    /// One verifier per configured JWT issuer.
    pub jwt: Vec<JwtVerifier>,
    /// Seals and opens session tokens; `None` when the policy carries no
    /// session key (legacy sessions are then refused).
    pub sealer: Option<SessionSealer>,
    pub federation: FederationSpec,
    pub audit: AuditSpec,
}

impl Snapshot {
    pub fn version(&self) -> u64 {
        self.policy.version()
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|b| b.name == name)
    }
}

/// An upstream as the request path uses it.
#[derive(Clone)]
pub struct Backend {
    pub name: String,
    pub upstream: Arc<Upstream>,
    pub timeout: Duration,
}

/// Why a snapshot was not applied; the text goes into `PolicyReject`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PolicyRejected {
    pub reason: String,
    /// The proxy needs a full snapshot (a delta did not fit its version).
    pub resync: bool,
}

impl PolicyRejected {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            resync: false,
        }
    }
}

/// Reads the current policy. Cheap to clone; one per request handler.
#[derive(Clone)]
pub struct PolicyReader {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl PolicyReader {
    /// The snapshot in force, or `None` before the first one.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.rx.borrow().clone()
    }

    /// The version in force, 0 before the first one.
    pub fn version(&self) -> u64 {
        self.rx.borrow().as_ref().map(|s| s.version()).unwrap_or(0)
    }

    /// Waits for the next change; `Err` when the publisher is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.rx.changed().await
    }
}

/// Applies new policy versions. Held by the sync client (or by `main` for a
/// local policy file).
pub struct PolicyPublisher {
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    env: UpstreamEnv,
    /// Upstream handles by backend name with the definition they were built
    /// from: an unchanged backend keeps its pooled connections, learned era
    /// and child process across policy versions.
    upstreams: Mutex<HashMap<String, (proto::Backend, Arc<Upstream>)>>,
}

/// What building upstreams needs from the local configuration.
#[derive(Clone)]
pub struct UpstreamEnv {
    pub stdio: std::collections::BTreeMap<String, crate::config::StdioCommand>,
    pub default_timeout: Duration,
    /// Shared by every HTTP upstream and the JWT issuers' key-set fetches.
    pub upstream: crate::upstream::http::UpstreamClient,
}

impl UpstreamEnv {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            stdio: cfg.stdio.clone(),
            default_timeout: Duration::from_millis(cfg.upstream_timeout_ms),
            upstream: crate::upstream::http::UpstreamClient::new(),
        }
    }
}

/// A publisher and a reader over the same channel, starting empty.
pub fn policy_channel(cfg: &Config) -> (PolicyPublisher, PolicyReader) {
    let (tx, rx) = watch::channel(None);
    (
        PolicyPublisher {
            tx,
            env: UpstreamEnv::from_config(cfg),
            upstreams: Mutex::new(HashMap::new()),
        },
        PolicyReader { rx },
    )
}

impl PolicyPublisher {
    /// A reader of this publisher's channel.
    pub fn reader(&self) -> PolicyReader {
        PolicyReader {
            rx: self.tx.subscribe(),
        }
    }

    /// The snapshot in force, to persist it or to base a delta on.
    pub fn current_snapshot(&self) -> Option<PolicySnapshot> {
        self.tx.borrow().as_ref().map(|s| s.policy.snapshot.clone())
    }

    /// Compiles and applies a whole snapshot. On `Err` the previous version
    /// stays in force.
    pub fn publish(&self, snapshot: PolicySnapshot) -> Result<u64, PolicyRejected> {
        let held = self.tx.borrow().as_ref().map(|s| s.version());
        if let Some(held) = held
            && snapshot.version < held
        {
            return Err(PolicyRejected::new(format!(
                "version {} is older than the version {held} in force",
                snapshot.version
            )));
        }
        let built = self.build(snapshot)?;
        let version = built.version();
        self.tx.send_replace(Some(Arc::new(built)));
        metrics::gauge!("sentinel_policy_version").set(version as f64);
        tracing::info!(version, "policy applied");
        Ok(version)
    }

    /// Applies a delta to the snapshot in force.
    pub fn apply_delta(&self, delta: PolicyDelta) -> Result<u64, PolicyRejected> {
        let Some(base) = self.current_snapshot() else {
            return Err(PolicyRejected {
                reason: "no snapshot to apply a delta to".into(),
                resync: true,
            });
        };
        let next = apply_delta(&base, delta).map_err(|e| PolicyRejected {
            reason: e.to_string(),
            resync: true,
        })?;
        self.publish(next)
    }

    fn build(&self, snapshot: PolicySnapshot) -> Result<Snapshot, PolicyRejected> {
        let policy =
            CompiledPolicy::compile(snapshot).map_err(|e| PolicyRejected::new(e.to_string()))?;
        let mut jwt = Vec::with_capacity(policy.spec.jwt_issuers.len());
        for (i, iss) in policy.spec.jwt_issuers.iter().enumerate() {
            jwt.push(
                JwtVerifier::new(iss, self.env.upstream.clone())
                    .map_err(|m| PolicyRejected::new(format!("jwt_issuers[{i}]: {m}")))?,
            );
        }
        let sealer = SessionSealer::new(&policy.snapshot.session_keys)
            .map_err(|m| PolicyRejected::new(format!("session_keys: {m}")))?;
        let backends = self.backends(&policy.snapshot.backends);
        Ok(Snapshot {
            federation: policy.spec.federation.clone(),
            audit: policy.spec.audit.clone(),
            backends,
            jwt,
            sealer,
            policy,
        })
    }

    fn backends(&self, defs: &[proto::Backend]) -> Vec<Backend> {
        let mut pool = match self.upstreams.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = Vec::with_capacity(defs.len());
        let mut keep = std::collections::HashSet::new();
        for def in defs.iter().filter(|b| !b.disabled) {
            keep.insert(def.name.clone());
            let timeout = if def.timeout_ms == 0 {
                self.env.default_timeout
            } else {
                Duration::from_millis(u64::from(def.timeout_ms))
            };
            let upstream = match pool.get(&def.name) {
                Some((old, up)) if old == def => up.clone(),
                _ => {
                    let up = Arc::new(Upstream::build(def, &self.env, timeout));
                    pool.insert(def.name.clone(), (def.clone(), up.clone()));
                    up
                }
            };
            out.push(Backend {
                name: def.name.clone(),
                upstream,
                timeout,
            });
        }
        pool.retain(|name, _| keep.contains(name));
        out
    }
}
