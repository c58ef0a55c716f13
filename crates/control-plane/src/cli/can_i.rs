//! `sentinelctl can-i`: would this key or role be allowed to call a tool,
//! and why.
//!
//! The answer comes from [`CompiledPolicy`], the code the proxy runs on
//! every call, compiled from a snapshot built out of what the admin API
//! shows: the policy (GetPolicy) and the key (GetApiKey). The admin API
//! never reveals key hashes; authorization does not read them, so the
//! snapshot carries a placeholder.

use clap::Args;
use sentinel_shared::now_us;
use sentinel_shared::policy::{AuthzDecision, CompiledPolicy};
use sentinel_shared::proto as pb;
use sentinel_shared::spec::{PolicySpec, PrefixMode};
use serde_json::json;

use super::conn::{self, status};
use super::render::{self, clean, time_us};
use super::{Ctx, Error, ExitCode, Result, fail};

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("who").required(true).args(["key", "role"])))]
pub struct CanIArgs {
    /// API key id (as in `keys list`).
    #[arg(long)]
    pub key: Option<String>,
    /// Role name.
    #[arg(long)]
    pub role: Option<String>,
    /// `backend/tool`, or the name agents see (`backend__tool`).
    pub tool: String,
}

/// Who is asking, once the key (if any) is looked up.
enum Who {
    Role(String),
    Key { id: String, role: String },
}

impl Who {
    fn describe(&self) -> String {
        match self {
            Who::Role(r) => format!("role '{r}'"),
            Who::Key { id, role } => format!("key '{id}' (role '{role}')"),
        }
    }
}

pub async fn run(ctx: &Ctx, a: CanIArgs) -> Result<ExitCode> {
    let CanIArgs { key, role, tool } = a;
    if tool.trim().is_empty() {
        return fail("the tool name must not be empty");
    }
    let mut admin = conn::admin(ctx).await?;
    let view = admin
        .get_policy(pb::GetPolicyRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let version = view.version;
    let proto_spec = view.spec.unwrap_or_default();
    let spec = PolicySpec::try_from(proto_spec.clone()).map_err(|e| {
        Error::Message(format!(
            "the server sent a policy this CLI cannot read: {e}"
        ))
    })?;

    // The key, as the proxy's snapshot would hold it: only unrevoked keys
    // are pushed to proxies at all.
    let mut record = None;
    if let Some(id) = &key {
        let found = admin
            .get_api_key(pb::GetApiKeyRequest { id: id.clone() })
            .await;
        let k = match found {
            Ok(k) => k.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return deny(ctx, &tool, version, &format!("key '{id}' is unknown"));
            }
            Err(s) => return Err(status(s)),
        };
        if k.revoked_at_us != 0 && k.revoked_at_us <= now_us() {
            return deny(
                ctx,
                &tool,
                version,
                &format!("key '{id}' was revoked at {}", time_us(k.revoked_at_us)),
            );
        }
        record = Some(pb::ApiKeyRecord {
            id: k.id,
            hash: vec![0; 32],
            role: k.role,
            owner: k.owner,
            expires_at_us: k.expires_at_us,
        });
    }
    let pb::PolicySpec {
        roles,
        backends,
        jwt_issuers,
        redaction_rules,
        audit,
        federation,
    } = proto_spec;
    let snapshot = pb::PolicySnapshot {
        version,
        created_at_us: 0,
        roles,
        api_keys: record.into_iter().collect(),
        backends,
        jwt_issuers,
        redaction_rules,
        audit,
        federation,
        session_keys: Vec::new(),
    };
    let policy = CompiledPolicy::compile(snapshot)
        .map_err(|e| Error::Message(format!("the current policy does not compile: {e}")))?;

    let who = match (&key, role) {
        (Some(id), _) => {
            let Some(entry) = policy.key(id) else {
                return deny(ctx, &tool, version, &format!("key '{id}' is unknown"));
            };
            if let Some(exp) = entry.expires_at_us
                && exp <= now_us()
            {
                return deny(
                    ctx,
                    &tool,
                    version,
                    &format!("key '{id}' expired at {}", time_us(exp)),
                );
            }
            Who::Key {
                id: id.clone(),
                role: entry.role.clone(),
            }
        }
        (None, Some(r)) => Who::Role(r),
        (None, None) => return fail("pass --key or --role"),
    };
    let role = match &who {
        Who::Role(r) | Who::Key { role: r, .. } => r.clone(),
    };

    let targets = resolve(&spec, &tool)?;
    let mut decisions = Vec::new();
    for (backend, name) in &targets {
        let d = policy.authorize(&role, backend, name);
        decisions.push((backend.clone(), name.clone(), d));
    }
    let allowed = decisions.iter().all(|(_, _, d)| d.is_allowed());
    let notes = backend_notes(&spec, &targets);

    if ctx.json() {
        let ds: Vec<_> = decisions
            .iter()
            .map(|(b, t, d)| {
                json!({
                    "backend": b,
                    "tool": t,
                    "allowed": d.is_allowed(),
                    "reason": reason(d),
                    "pattern": match d { AuthzDecision::Allow { pattern } => Some(pattern), _ => None },
                })
            })
            .collect();
        render::json(&json!({
            "allowed": allowed,
            "key": key,
            "role": role,
            "tool": tool,
            "policy_version": version,
            "decisions": ds,
            "notes": notes,
        }))?;
    } else {
        let mut out = String::new();
        for (b, t, d) in &decisions {
            out.push_str(&clean(&format!(
                "{}: {} {} {b}/{t}: {}",
                if d.is_allowed() { "yes" } else { "no" },
                who.describe(),
                if d.is_allowed() {
                    "may call"
                } else {
                    "may not call"
                },
                reason(d)
            )));
            out.push('\n');
        }
        render::out(&out)?;
        for n in &notes {
            render::note(&clean(&format!("note: {n}")));
        }
    }
    Ok(if allowed { 0 } else { 1 })
}

fn reason(d: &AuthzDecision) -> String {
    match d {
        AuthzDecision::Allow { pattern } => format!("allowed by pattern '{pattern}'"),
        AuthzDecision::Deny(r) => r.to_string(),
    }
}

/// A refusal decided before any role is looked at (the key).
fn deny(ctx: &Ctx, tool: &str, version: u64, why: &str) -> Result<ExitCode> {
    if ctx.json() {
        render::json(&json!({
            "allowed": false,
            "tool": tool,
            "policy_version": version,
            "reason": why,
        }))?;
    } else {
        render::out(&format!("{}\n", clean(&format!("no: {why}"))))?;
    }
    Ok(1)
}

/// The (backend, tool) pairs a name stands for, resolved the way the proxy
/// routes a call: `backend/tool`; `backend<separator>tool`; or a bare name,
/// which belongs to whichever backend offers it. The proxy knows that from
/// the upstreams' tool lists; the CLI does not, so a bare name is checked
/// against every backend (and with one backend, that one).
pub fn resolve(spec: &PolicySpec, name: &str) -> Result<Vec<(String, String)>> {
    if let Some((b, t)) = name.split_once('/') {
        if b.is_empty() || t.is_empty() {
            return fail(format!("'{name}' must be backend/tool"));
        }
        return Ok(vec![(b.to_string(), t.to_string())]);
    }
    let sep = &spec.federation.separator;
    for b in &spec.backends {
        if let Some(rest) = name
            .strip_prefix(b.name.as_str())
            .and_then(|r| r.strip_prefix(sep.as_str()))
            && !rest.is_empty()
        {
            return Ok(vec![(b.name.clone(), rest.to_string())]);
        }
    }
    if spec.backends.is_empty() {
        return fail(format!(
            "the policy has no backends to resolve '{name}'; name the tool as backend/tool"
        ));
    }
    if spec.federation.prefix_mode == PrefixMode::Always {
        render::note(&clean(&format!(
            "note: with prefix_mode always agents see '<backend>{sep}{name}'; checking '{name}' on every backend"
        )));
    }
    Ok(spec
        .backends
        .iter()
        .map(|b| (b.name.clone(), name.to_string()))
        .collect())
}

/// Facts beyond RBAC that decide whether a call can go anywhere.
fn backend_notes(spec: &PolicySpec, targets: &[(String, String)]) -> Vec<String> {
    let mut notes = Vec::new();
    for (b, _) in targets {
        match spec.backends.iter().find(|x| &x.name == b) {
            None => notes.push(format!(
                "backend '{b}' is not in the policy: no proxy routes to it"
            )),
            Some(x) if x.disabled => notes.push(format!(
                "backend '{b}' is disabled: calls to it fail whatever RBAC says"
            )),
            Some(_) => {}
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sentinel_shared::spec::BackendSpec;

    #[test]
    fn names_resolve_like_the_proxy_routes_them() {
        let spec = PolicySpec {
            backends: vec![
                BackendSpec {
                    name: "everything".into(),
                    url: Some("http://x/mcp".into()),
                    ..Default::default()
                },
                BackendSpec {
                    name: "git".into(),
                    url: Some("http://y/mcp".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let one = |b: &str, t: &str| vec![(b.to_string(), t.to_string())];
        assert_eq!(resolve(&spec, "git/log").unwrap(), one("git", "log"));
        assert_eq!(
            resolve(&spec, "everything__echo").unwrap(),
            one("everything", "echo")
        );
        assert_eq!(resolve(&spec, "echo").unwrap().len(), 2);
        assert!(resolve(&spec, "/x").is_err());
        assert!(resolve(&PolicySpec::default(), "echo").is_err());
    }
}
