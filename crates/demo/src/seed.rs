//! The demo policy, applied through the control plane's admin gRPC API as
//! an operator would: the whole spec declaratively (so a second run changes
//! only what differs, e.g. the upstream's port), then one fresh API key per
//! role. Keys from earlier runs are revoked: their secrets were shown once
//! and are gone with that run.

use anyhow::{Context, Result};
use sentinel_shared::proto::admin_client::AdminClient;
use sentinel_shared::proto::{self as pb};
use sentinel_shared::spec::{
    BackendSpec, PolicySpec, RateLimitSpec, RateScope, RedactionRuleSpec, RoleSpec,
};
use tonic::Request;
use tonic::transport::Channel;

/// Marks the keys this command made, so only those are revoked next time.
const KEY_DESCRIPTION: &str = "sentinel demo key";
/// Calls per minute allowed to the analyst role.
pub const ANALYST_PER_MINUTE: u32 = 5;

/// A key made for the demo.
pub struct DemoKey {
    pub role: &'static str,
    pub owner: &'static str,
    pub secret: String,
    pub summary: &'static str,
}

/// What seeding produced.
pub struct Seeded {
    pub keys: Vec<DemoKey>,
    /// The policy version that holds every key; a proxy enforcing it (or a
    /// later one) accepts them.
    pub version: u64,
    pub revoked: usize,
}

/// The demo's policy: backend `demo`, roles `developer` and `analyst`, and
/// a redaction rule for e-mail addresses in audited arguments.
pub fn spec(upstream_url: &str) -> PolicySpec {
    PolicySpec {
        roles: vec![
            RoleSpec {
                name: "developer".into(),
                description: "May call every demo tool.".into(),
                allow: vec!["demo/*".into()],
                ..RoleSpec::default()
            },
            RoleSpec {
                name: "analyst".into(),
                description: format!(
                    "May read the time and echo, {ANALYST_PER_MINUTE} calls a minute; never customer data."
                ),
                allow: vec!["demo/echo".into(), "demo/time".into()],
                deny: vec!["demo/lookup_customer".into()],
                rate_limits: vec![RateLimitSpec {
                    scope: RateScope::PerKey,
                    per_second: f64::from(ANALYST_PER_MINUTE) / 60.0,
                    burst: ANALYST_PER_MINUTE,
                    ..RateLimitSpec::default()
                }],
            },
        ],
        backends: vec![BackendSpec {
            name: "demo".into(),
            url: Some(upstream_url.to_string()),
            timeout_ms: 10_000,
            ..BackendSpec::default()
        }],
        redaction_rules: vec![RedactionRuleSpec {
            key_pattern: "*email*".into(),
            ..RedactionRuleSpec::default()
        }],
        // Defaults: tools shown as `demo__echo`, arguments audited up to 8 KiB.
        ..PolicySpec::default()
    }
}

fn authed<T>(token: &str, msg: T) -> Result<Request<T>> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("admin token is not a valid header value")?,
    );
    Ok(r)
}

/// Applies [`spec`] and makes the keys.
pub async fn seed(grpc_url: &str, admin_token: &str, upstream_url: &str) -> Result<Seeded> {
    let channel = Channel::from_shared(grpc_url.to_string())
        .context("control plane gRPC URL")?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .connect()
        .await
        .context("connecting to the control plane's gRPC API")?;
    let mut admin = AdminClient::new(channel);

    let spec = spec(upstream_url);
    spec.validate()
        .map_err(|e| anyhow::anyhow!("the demo policy is invalid: {e}"))?;
    let applied = admin
        .apply_policy(authed(
            admin_token,
            pb::ApplyPolicyRequest {
                spec: Some((&spec).into()),
                dry_run: false,
            },
        )?)
        .await
        .context("applying the demo policy")?
        .into_inner();
    let mut version = applied.version;

    let mut revoked = 0;
    for owner in ["alice", "bob"] {
        let listed = admin
            .list_api_keys(authed(
                admin_token,
                pb::ListApiKeysRequest {
                    include_revoked: false,
                    owner: owner.into(),
                    ..Default::default()
                },
            )?)
            .await
            .context("listing earlier demo keys")?
            .into_inner();
        for key in listed.keys {
            if key.description == KEY_DESCRIPTION && key.revoked_at_us == 0 {
                admin
                    .revoke_api_key(authed(admin_token, pb::RevokeApiKeyRequest { id: key.id })?)
                    .await
                    .context("revoking an earlier demo key")?;
                revoked += 1;
            }
        }
    }

    let mut keys = Vec::new();
    for (role, owner, summary) in [
        ("developer", "alice", "every demo tool"),
        (
            "analyst",
            "bob",
            "demo__echo and demo__time only, 5 calls/minute; demo__lookup_customer is denied",
        ),
    ] {
        let created = admin
            .create_api_key(authed(
                admin_token,
                pb::CreateApiKeyRequest {
                    role: role.into(),
                    owner: owner.into(),
                    description: KEY_DESCRIPTION.into(),
                    expires_at_us: 0,
                },
            )?)
            .await
            .with_context(|| format!("creating the {role} key"))?
            .into_inner();
        version = version.max(created.policy_version);
        keys.push(DemoKey {
            role,
            owner,
            secret: created.secret,
            summary,
        });
    }
    Ok(Seeded {
        keys,
        version,
        revoked,
    })
}

/// Whether the control plane shows `proxy_id` as connected.
pub async fn proxy_connected(grpc_url: &str, admin_token: &str, proxy_id: &str) -> Result<bool> {
    Ok(proxy_info(grpc_url, admin_token, proxy_id)
        .await?
        .is_some_and(|p| p.connected))
}

async fn proxy_info(
    grpc_url: &str,
    admin_token: &str,
    proxy_id: &str,
) -> Result<Option<pb::ProxyInfo>> {
    let channel = Channel::from_shared(grpc_url.to_string())?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .connect()
        .await?;
    let list = AdminClient::new(channel)
        .list_proxies(authed(admin_token, pb::ListProxiesRequest {})?)
        .await?
        .into_inner();
    Ok(list.proxies.into_iter().find(|p| p.proxy_id == proxy_id))
}

/// The version the proxy `proxy_id` has acknowledged, as the control plane
/// saw it (0 when it has not reported yet).
pub async fn acked_version(grpc_url: &str, admin_token: &str, proxy_id: &str) -> Result<u64> {
    Ok(proxy_info(grpc_url, admin_token, proxy_id)
        .await?
        .map_or(0, |p| p.acked_version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_policy_is_valid() {
        let s = spec("http://127.0.0.1:1/mcp");
        assert!(s.validate().is_ok(), "{:?}", s.validate());
        let proto: pb::PolicySpec = (&s).into();
        assert_eq!(proto.roles.len(), 2);
        assert_eq!(
            proto.federation.map(|f| f.separator),
            Some("__".to_string())
        );
    }
}
