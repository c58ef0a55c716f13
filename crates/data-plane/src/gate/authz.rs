//! Authorization: RBAC over `backend/tool`, deny wins, default deny. The
//! matching itself is [`sentinel_shared::policy::CompiledPolicy`]'s, so the
//! proxy and `sentinelctl can-i` can never disagree.

use sentinel_shared::policy::{AuthzDecision, DenyReason};

use crate::gate::authn::Principal;
use crate::policy::Snapshot;

/// Why RBAC refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role '{role}' may not call '{qualified}': {reason}")]
pub struct Forbidden {
    pub role: String,
    pub qualified: String,
    pub reason: DenyReason,
}

/// The allow pattern that let a call through, for the audit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub pattern: String,
}

pub fn authorize(
    principal: &Principal,
    snap: &Snapshot,
    backend: &str,
    tool: &str,
) -> Result<Allowed, Forbidden> {
    let qualified = format!("{backend}/{tool}");
    match snap
        .policy
        .authorize_qualified(principal.role(), tool, &qualified)
    {
        AuthzDecision::Allow { pattern } => Ok(Allowed { pattern }),
        AuthzDecision::Deny(reason) => Err(Forbidden {
            role: principal.role().to_string(),
            qualified,
            reason,
        }),
    }
}

/// Whether a list entry is shown to this principal.
pub fn may_see(principal: &Principal, snap: &Snapshot, backend: &str, tool: &str) -> bool {
    let qualified = format!("{backend}/{tool}");
    snap.policy.may_call(principal.role(), tool, &qualified)
}
