//! A policy snapshot compiled for fast matching, the RBAC decision, and the
//! delta between two snapshots.
//!
//! The proxy compiles each snapshot once, when it arrives, and then answers
//! every request from the compiled form: glob sets are built here, never per
//! request. `sentinelctl can-i` runs the same [`CompiledPolicy::authorize`].

use std::collections::HashMap;
use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::audit::Redactor;
use crate::proto::{self, PolicyDelta, PolicySnapshot};
use crate::spec::{self, PolicySpec, ValidationErrors};

/// The method every rate limit counts unless it names others.
pub const TOOLS_CALL: &str = "tools/call";

/// Matches tools against patterns. A pattern with a `/` is matched against
/// `backend/tool` (`*` stays within a segment, `**` crosses them); a pattern
/// without one is matched against the tool name on any backend.
#[derive(Debug, Clone)]
pub struct ToolMatcher {
    qualified: GlobSet,
    qualified_patterns: Vec<String>,
    bare: GlobSet,
    bare_patterns: Vec<String>,
}

impl ToolMatcher {
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let mut q = GlobSetBuilder::new();
        let mut b = GlobSetBuilder::new();
        let mut qualified_patterns = Vec::new();
        let mut bare_patterns = Vec::new();
        for p in patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("pattern '{p}': {}", e.kind()))?;
            if p.contains('/') {
                q.add(glob);
                qualified_patterns.push(p.clone());
            } else {
                b.add(glob);
                bare_patterns.push(p.clone());
            }
        }
        Ok(Self {
            qualified: q.build().map_err(|e| e.to_string())?,
            qualified_patterns,
            bare: b.build().map_err(|e| e.to_string())?,
            bare_patterns,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.qualified_patterns.is_empty() && self.bare_patterns.is_empty()
    }

    /// Whether any pattern matches. `qualified` is `backend/tool`.
    pub fn is_match(&self, tool: &str, qualified: &str) -> bool {
        self.bare.is_match(tool) || self.qualified.is_match(qualified)
    }

    /// The first pattern (in policy order within its kind) that matches.
    pub fn first_match(&self, tool: &str, qualified: &str) -> Option<&str> {
        if let Some(&i) = self.qualified.matches(qualified).first() {
            return Some(&self.qualified_patterns[i]);
        }
        self.bare
            .matches(tool)
            .first()
            .map(|&i| self.bare_patterns[i].as_str())
    }
}

/// How a rate limit groups callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitScope {
    PerKey,
    PerRole,
}

/// A rate limit of a role, ready to check.
#[derive(Debug, Clone)]
pub struct CompiledRateLimit {
    /// Position within the role; with the role name it identifies the bucket.
    pub index: usize,
    pub scope: LimitScope,
    pub per_second: f64,
    pub burst: u32,
    tools: Option<ToolMatcher>,
    methods: Vec<String>,
}

impl CompiledRateLimit {
    /// Whether a call of `method` (to `tool`, if it is a tool call) counts.
    pub fn applies(&self, method: &str, tool: Option<(&str, &str)>) -> bool {
        let method_counts = if self.methods.is_empty() {
            method == TOOLS_CALL
        } else {
            self.methods.iter().any(|m| m == method)
        };
        if !method_counts {
            return false;
        }
        match (&self.tools, tool) {
            (None, _) => true,
            (Some(m), Some((name, qualified))) => m.is_match(name, qualified),
            (Some(_), None) => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CompiledRole {
    pub name: String,
    allow: ToolMatcher,
    deny: ToolMatcher,
    pub rate_limits: Vec<CompiledRateLimit>,
}

/// Why RBAC refused a call. The text goes to the audit decision and the log,
/// never in more detail than this to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    UnknownRole(String),
    DeniedBy(String),
    NoAllowMatch,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::UnknownRole(r) => write!(f, "role '{r}' does not exist"),
            DenyReason::DeniedBy(p) => write!(f, "denied by pattern '{p}'"),
            DenyReason::NoAllowMatch => f.write_str("no allow pattern matches (default deny)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow { pattern: String },
    Deny(DenyReason),
}

impl AuthzDecision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, AuthzDecision::Allow { .. })
    }
}

/// A key as the proxy checks it.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub id: String,
    pub hash: Vec<u8>,
    pub role: String,
    pub owner: String,
    /// Unix microseconds; `None`: never expires.
    pub expires_at_us: Option<i64>,
}

/// One policy version, compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// The snapshot it was compiled from, kept to persist it and to apply the
    /// next delta to.
    pub snapshot: PolicySnapshot,
    pub spec: PolicySpec,
    keys: HashMap<String, KeyEntry>,
    roles: HashMap<String, CompiledRole>,
    pub redactor: Redactor,
}

impl CompiledPolicy {
    /// Validates and compiles a snapshot. A snapshot that fails here is
    /// rejected whole: the caller keeps enforcing its last good version.
    pub fn compile(snapshot: PolicySnapshot) -> Result<Self, ValidationErrors> {
        let spec = spec_of(&snapshot)?;
        spec.validate()?;
        let mut errs = ValidationErrors::default();
        let mut keys = HashMap::with_capacity(snapshot.api_keys.len());
        for (i, k) in snapshot.api_keys.iter().enumerate() {
            if k.hash.len() != 32 {
                errs.push(format!("api_keys[{i}].hash"), "must be 32 bytes (SHA-256)");
            }
            if k.id.is_empty() {
                errs.push(format!("api_keys[{i}].id"), "must not be empty");
            }
            keys.insert(
                k.id.clone(),
                KeyEntry {
                    id: k.id.clone(),
                    hash: k.hash.clone(),
                    role: k.role.clone(),
                    owner: k.owner.clone(),
                    expires_at_us: (k.expires_at_us > 0).then_some(k.expires_at_us),
                },
            );
        }
        for (i, sk) in snapshot.session_keys.iter().enumerate() {
            if sk.key.len() != 32 {
                errs.push(format!("session_keys[{i}].key"), "must be 32 bytes");
            }
        }
        let mut roles = HashMap::with_capacity(spec.roles.len());
        for (i, r) in spec.roles.iter().enumerate() {
            match compile_role(r) {
                Ok(c) => {
                    roles.insert(r.name.clone(), c);
                }
                Err(m) => errs.push(format!("roles[{i}]"), m),
            }
        }
        let redactor = match Redactor::new(&spec.redaction_rules) {
            Ok(r) => r,
            Err(m) => {
                errs.push("redaction_rules", m);
                Redactor::default()
            }
        };
        errs.into_result()?;
        Ok(Self {
            snapshot,
            spec,
            keys,
            roles,
            redactor,
        })
    }

    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    pub fn key(&self, id: &str) -> Option<&KeyEntry> {
        self.keys.get(id)
    }

    pub fn role(&self, name: &str) -> Option<&CompiledRole> {
        self.roles.get(name)
    }

    /// RBAC: may a holder of `role` call `tool` on `backend`? Deny wins,
    /// and with no matching allow pattern the answer is no.
    pub fn authorize(&self, role: &str, backend: &str, tool: &str) -> AuthzDecision {
        let qualified = format!("{backend}/{tool}");
        self.authorize_qualified(role, tool, &qualified)
    }

    /// As [`Self::authorize`], with `backend/tool` already built.
    pub fn authorize_qualified(&self, role: &str, tool: &str, qualified: &str) -> AuthzDecision {
        let Some(r) = self.roles.get(role) else {
            return AuthzDecision::Deny(DenyReason::UnknownRole(role.to_string()));
        };
        if let Some(p) = r.deny.first_match(tool, qualified) {
            return AuthzDecision::Deny(DenyReason::DeniedBy(p.to_string()));
        }
        match r.allow.first_match(tool, qualified) {
            Some(p) => AuthzDecision::Allow {
                pattern: p.to_string(),
            },
            None => AuthzDecision::Deny(DenyReason::NoAllowMatch),
        }
    }

    /// Cheap yes/no form of [`Self::authorize_qualified`] for filtering lists.
    pub fn may_call(&self, role: &str, tool: &str, qualified: &str) -> bool {
        match self.roles.get(role) {
            Some(r) => !r.deny.is_match(tool, qualified) && r.allow.is_match(tool, qualified),
            None => false,
        }
    }
}

fn compile_role(r: &spec::RoleSpec) -> Result<CompiledRole, String> {
    let mut limits = Vec::with_capacity(r.rate_limits.len());
    for (index, rl) in r.rate_limits.iter().enumerate() {
        limits.push(CompiledRateLimit {
            index,
            scope: match rl.scope {
                spec::RateScope::PerKey => LimitScope::PerKey,
                spec::RateScope::PerRole => LimitScope::PerRole,
            },
            per_second: rl.per_second,
            burst: rl.burst,
            tools: if rl.tools.is_empty() {
                None
            } else {
                Some(ToolMatcher::new(&rl.tools)?)
            },
            methods: rl.methods.clone(),
        });
    }
    Ok(CompiledRole {
        name: r.name.clone(),
        allow: ToolMatcher::new(&r.allow)?,
        deny: ToolMatcher::new(&r.deny)?,
        rate_limits: limits,
    })
}

/// The declarative part of a snapshot.
pub fn spec_of(s: &PolicySnapshot) -> Result<PolicySpec, ValidationErrors> {
    PolicySpec::try_from(proto::PolicySpec {
        roles: s.roles.clone(),
        backends: s.backends.clone(),
        jwt_issuers: s.jwt_issuers.clone(),
        redaction_rules: s.redaction_rules.clone(),
        audit: s.audit.clone(),
        federation: s.federation.clone(),
    })
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta is based on version {delta_base}, but version {held} is held")]
    BaseMismatch { held: u64, delta_base: u64 },
    #[error("delta version {version} does not move forward from {base}")]
    NotForward { base: u64, version: u64 },
}

/// The changes from `old` to `new`: keys one by one, other sections whole
/// when they differ.
pub fn diff(old: &PolicySnapshot, new: &PolicySnapshot) -> PolicyDelta {
    let old_keys: HashMap<&str, &proto::ApiKeyRecord> =
        old.api_keys.iter().map(|k| (k.id.as_str(), k)).collect();
    let new_ids: std::collections::HashSet<&str> =
        new.api_keys.iter().map(|k| k.id.as_str()).collect();
    let upsert_keys = new
        .api_keys
        .iter()
        .filter(|k| old_keys.get(k.id.as_str()) != Some(k))
        .cloned()
        .collect();
    let removed_key_ids = old
        .api_keys
        .iter()
        .filter(|k| !new_ids.contains(k.id.as_str()))
        .map(|k| k.id.clone())
        .collect();
    PolicyDelta {
        base_version: old.version,
        version: new.version,
        created_at_us: new.created_at_us,
        upsert_keys,
        removed_key_ids,
        roles: (old.roles != new.roles).then(|| proto::RoleSet {
            roles: new.roles.clone(),
        }),
        backends: (old.backends != new.backends).then(|| proto::BackendSet {
            backends: new.backends.clone(),
        }),
        jwt_issuers: (old.jwt_issuers != new.jwt_issuers).then(|| proto::JwtIssuerSet {
            issuers: new.jwt_issuers.clone(),
        }),
        redaction_rules: (old.redaction_rules != new.redaction_rules).then(|| {
            proto::RedactionRuleSet {
                rules: new.redaction_rules.clone(),
            }
        }),
        audit: (old.audit != new.audit).then(|| new.audit.clone().unwrap_or_default()),
        federation: (old.federation != new.federation)
            .then(|| new.federation.clone().unwrap_or_default()),
        session_keys: (old.session_keys != new.session_keys).then(|| proto::SessionKeySet {
            keys: new.session_keys.clone(),
        }),
    }
}

/// Applies `delta` to `base`, giving the next whole snapshot.
pub fn apply_delta(
    base: &PolicySnapshot,
    delta: PolicyDelta,
) -> Result<PolicySnapshot, DeltaError> {
    let PolicyDelta {
        base_version,
        version,
        created_at_us,
        upsert_keys,
        removed_key_ids,
        roles,
        backends,
        jwt_issuers,
        redaction_rules,
        audit,
        federation,
        session_keys,
    } = delta;
    if base_version != base.version {
        return Err(DeltaError::BaseMismatch {
            held: base.version,
            delta_base: base_version,
        });
    }
    if version <= base.version {
        return Err(DeltaError::NotForward {
            base: base.version,
            version,
        });
    }
    let mut next = base.clone();
    next.version = version;
    next.created_at_us = created_at_us;
    if !removed_key_ids.is_empty() || !upsert_keys.is_empty() {
        let removed: std::collections::HashSet<&str> =
            removed_key_ids.iter().map(String::as_str).collect();
        let upserted: std::collections::HashSet<&str> =
            upsert_keys.iter().map(|k| k.id.as_str()).collect();
        next.api_keys
            .retain(|k| !removed.contains(k.id.as_str()) && !upserted.contains(k.id.as_str()));
        next.api_keys.extend(upsert_keys);
    }
    if let Some(r) = roles {
        next.roles = r.roles;
    }
    if let Some(b) = backends {
        next.backends = b.backends;
    }
    if let Some(j) = jwt_issuers {
        next.jwt_issuers = j.issuers;
    }
    if let Some(r) = redaction_rules {
        next.redaction_rules = r.rules;
    }
    if let Some(a) = audit {
        next.audit = Some(a);
    }
    if let Some(f) = federation {
        next.federation = Some(f);
    }
    if let Some(s) = session_keys {
        next.session_keys = s.keys;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{RateLimitSpec, RoleSpec};

    fn snapshot(version: u64, roles: Vec<RoleSpec>) -> PolicySnapshot {
        PolicySnapshot {
            version,
            roles: roles.iter().map(Into::into).collect(),
            audit: Some(Default::default()),
            federation: Some((&spec::FederationSpec::default()).into()),
            ..Default::default()
        }
    }

    fn role(name: &str, allow: &[&str], deny: &[&str]) -> RoleSpec {
        RoleSpec {
            name: name.into(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rbac_table() {
        let p = CompiledPolicy::compile(snapshot(
            1,
            vec![
                role(
                    "ops",
                    &["everything/*", "files/read_*"],
                    &["everything/trigger-*"],
                ),
                role("echoer", &["echo"], &[]),
                role("all", &["*"], &["*/delete_*"]),
                role("nothing", &[], &[]),
            ],
        ))
        .unwrap();
        // (role, backend, tool, allowed)
        let cases = [
            ("ops", "everything", "echo", true),
            ("ops", "everything", "trigger-sampling-request", false),
            ("ops", "files", "read_file", true),
            ("ops", "files", "write_file", false),
            ("echoer", "everything", "echo", true),
            ("echoer", "other", "echo", true),
            ("echoer", "everything", "get-sum", false),
            ("all", "x", "anything", true),
            ("all", "x", "delete_all", false),
            ("nothing", "everything", "echo", false),
            ("ghost", "everything", "echo", false),
        ];
        for (r, b, t, want) in cases {
            let d = p.authorize(r, b, t);
            assert_eq!(d.is_allowed(), want, "{r} {b}/{t}: {d:?}");
            assert_eq!(
                p.may_call(r, t, &format!("{b}/{t}")),
                want,
                "may_call {r} {b}/{t}"
            );
        }
        assert_eq!(
            p.authorize("ops", "everything", "trigger-x"),
            AuthzDecision::Deny(DenyReason::DeniedBy("everything/trigger-*".into()))
        );
        assert_eq!(
            p.authorize("ghost", "b", "t"),
            AuthzDecision::Deny(DenyReason::UnknownRole("ghost".into()))
        );
        assert_eq!(
            p.authorize("nothing", "b", "t"),
            AuthzDecision::Deny(DenyReason::NoAllowMatch)
        );
    }

    #[test]
    fn star_does_not_cross_the_backend_separator() {
        let p = CompiledPolicy::compile(snapshot(1, vec![role("r", &["every*"], &[])])).unwrap();
        // A bare pattern matches tool names only, never `backend/...`.
        assert!(!p.authorize("r", "everything", "echo").is_allowed());
        assert!(p.authorize("r", "b", "everyday").is_allowed());
    }

    #[test]
    fn rate_limits_count_tools_call_by_default() {
        let mut r = role("r", &["*"], &[]);
        r.rate_limits = vec![
            RateLimitSpec {
                per_second: 1.0,
                burst: 1,
                ..Default::default()
            },
            RateLimitSpec {
                per_second: 1.0,
                burst: 1,
                tools: vec!["b/slow".into()],
                methods: vec!["tools/call".into(), "tools/list".into()],
                ..Default::default()
            },
        ];
        let p = CompiledPolicy::compile(snapshot(1, vec![r])).unwrap();
        let limits = &p.role("r").unwrap().rate_limits;
        assert!(limits[0].applies("tools/call", Some(("x", "b/x"))));
        assert!(!limits[0].applies("tools/list", None));
        assert!(limits[1].applies("tools/call", Some(("slow", "b/slow"))));
        assert!(!limits[1].applies("tools/call", Some(("fast", "b/fast"))));
        assert!(!limits[1].applies("tools/list", None));
    }

    #[test]
    fn delta_round_trip() {
        let mut a = snapshot(1, vec![role("r", &["*"], &[])]);
        a.api_keys = vec![
            proto::ApiKeyRecord {
                id: "k1".into(),
                hash: vec![1; 32],
                role: "r".into(),
                ..Default::default()
            },
            proto::ApiKeyRecord {
                id: "k2".into(),
                hash: vec![2; 32],
                role: "r".into(),
                ..Default::default()
            },
        ];
        let mut b = a.clone();
        b.version = 2;
        b.api_keys.remove(0);
        b.api_keys.push(proto::ApiKeyRecord {
            id: "k3".into(),
            hash: vec![3; 32],
            ..Default::default()
        });
        b.roles[0].deny_tools.push("x".into());
        let d = diff(&a, &b);
        assert_eq!(d.removed_key_ids, vec!["k1".to_string()]);
        assert_eq!(d.upsert_keys.len(), 1);
        assert!(d.roles.is_some());
        assert!(d.backends.is_none());
        let mut applied = apply_delta(&a, d.clone()).unwrap();
        applied.api_keys.sort_by(|x, y| x.id.cmp(&y.id));
        let mut want = b.clone();
        want.api_keys.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(applied, want);
        assert_eq!(
            apply_delta(&b, d.clone()),
            Err(DeltaError::BaseMismatch {
                held: 2,
                delta_base: 1
            })
        );
        let mut stale = d;
        stale.version = 1;
        assert_eq!(
            apply_delta(&a, stale),
            Err(DeltaError::NotForward {
                base: 1,
                version: 1
            })
        );
    }

    #[test]
    fn bad_snapshots_are_rejected_whole() {
        let mut s = snapshot(1, vec![role("r", &["["], &[])]);
        assert!(CompiledPolicy::compile(s.clone()).is_err());
        s.roles = vec![(&role("r", &["*"], &[])).into()];
        s.api_keys = vec![proto::ApiKeyRecord {
            id: "k".into(),
            hash: vec![0; 3],
            ..Default::default()
        }];
        let err = CompiledPolicy::compile(s).unwrap_err();
        assert_eq!(err.0[0].field, "api_keys[0].hash");
    }
}
