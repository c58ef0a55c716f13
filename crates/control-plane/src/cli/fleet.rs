//! `sentinelctl fleet list` and `sentinelctl join-tokens create`.

use clap::Subcommand;
use sentinel_shared::now_us;
use sentinel_shared::proto as pb;
use serde_json::json;

use super::conn::{self, status};
use super::render::{self, Table, ago, json_time_us};
use super::{Ctx, ExitCode, Result};

#[derive(Debug, Subcommand)]
pub enum FleetCmd {
    /// Proxies: connection, build, policy version acked, heartbeat, audit
    /// backlog, gaps and chain breaks.
    List,
}

#[derive(Debug, Subcommand)]
pub enum JoinTokensCmd {
    /// Create a join token for proxies; it is printed once.
    Create {
        #[arg(long, default_value = "")]
        description: String,
    },
}

pub async fn run(ctx: &Ctx, cmd: FleetCmd) -> Result<ExitCode> {
    let FleetCmd::List = cmd;
    let mut admin = conn::admin(ctx).await?;
    let r = admin
        .list_proxies(pb::ListProxiesRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let current = r.policy_version;
    if ctx.json() {
        let proxies: Vec<_> = r.proxies.iter().map(|p| view(p, current)).collect();
        render::json(&json!({"policy_version": current, "proxies": proxies}))?;
        return Ok(0);
    }
    let now = now_us();
    let mut t = Table::new(&[
        "PROXY",
        "CONNECTED",
        "BUILD",
        "POLICY",
        "LAST HEARTBEAT",
        "BACKLOG",
        "GAPS",
        "BREAKS",
    ]);
    for p in &r.proxies {
        let backlog = p.stats.as_ref().map_or(0, |s| s.audit_backlog);
        t.row(vec![
            p.proxy_id.clone(),
            if p.connected { "yes" } else { "no" }.into(),
            p.build_version.clone(),
            policy_cell(p, current),
            ago(p.last_seen_us, now),
            backlog.to_string(),
            p.audit_gap_events.to_string(),
            p.audit_chain_breaks.to_string(),
        ]);
    }
    let mut out = format!("policy version {current}\n");
    if t.is_empty() {
        out.push_str("no proxies have joined\n");
    } else {
        out.push_str(&t.render());
    }
    render::out(&out)?;
    Ok(0)
}

/// `7/7`, `6/7 (behind)`, or the version the proxy refused and why.
fn policy_cell(p: &pb::ProxyInfo, current: u64) -> String {
    let mut s = format!("{}/{current}", p.acked_version);
    if p.acked_version < current {
        s.push_str(" (behind)");
    }
    if p.rejected_version != 0 && p.rejected_version > p.acked_version {
        s.push_str(&format!(
            " rejected v{}: {}",
            p.rejected_version, p.reject_reason
        ));
    }
    s
}

fn view(p: &pb::ProxyInfo, current: u64) -> serde_json::Value {
    let pb::ProxyInfo {
        proxy_id,
        build_version,
        labels,
        connected,
        control_plane_id,
        first_seen_us,
        last_seen_us,
        acked_version,
        rejected_version,
        reject_reason,
        stats,
        audit_gap_events,
        audit_chain_breaks,
    } = p;
    let stats = stats.clone().unwrap_or_default();
    let pb::ProxyStats {
        audit_backlog,
        spool_bytes,
        audit_dropped,
        audit_rejected,
        open_sessions,
        tool_catalog_hash,
        policy_version,
        boot_epoch,
    } = stats;
    json!({
        "proxy_id": proxy_id,
        "connected": connected,
        "build_version": build_version,
        "labels": labels,
        "control_plane_id": control_plane_id,
        "first_seen": json_time_us(*first_seen_us),
        "last_heartbeat": json_time_us(*last_seen_us),
        "acked_version": acked_version,
        "current_version": current,
        "in_sync": *acked_version == current,
        "rejected_version": rejected_version,
        "reject_reason": reject_reason,
        "audit_backlog": audit_backlog,
        "spool_bytes": spool_bytes,
        "audit_dropped": audit_dropped,
        "audit_rejected": audit_rejected,
        "open_sessions": open_sessions,
        "tool_catalog_hash": tool_catalog_hash,
        "enforced_version": policy_version,
        "boot_epoch": boot_epoch,
        "audit_gap_events": audit_gap_events,
        "audit_chain_breaks": audit_chain_breaks,
    })
}

pub async fn run_join_tokens(ctx: &Ctx, cmd: JoinTokensCmd) -> Result<ExitCode> {
    let JoinTokensCmd::Create { description } = cmd;
    let mut admin = conn::admin(ctx).await?;
    let t = admin
        .create_join_token(pb::CreateJoinTokenRequest { description })
        .await
        .map_err(status)?
        .into_inner();
    if ctx.json() {
        render::json(&json!({"id": t.id, "token": t.token}))?;
    } else {
        render::out(&render::fields(&[("id:", t.id), ("token:", t.token)]))?;
    }
    render::note("warning: this is the only time the join token is shown; store it now");
    Ok(0)
}
