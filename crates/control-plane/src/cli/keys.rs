//! `sentinelctl keys`: create, list, get, revoke, rotate API keys.
//!
//! A key's secret exists in two places only: the answer to create or rotate,
//! and the hands of whoever received it. This is the one command that ever
//! prints one, and it says so next to it.

use clap::{Args, Subcommand};
use sentinel_shared::now_us;
use sentinel_shared::proto as pb;
use serde_json::json;

use super::conn::{self, status};
use super::render::{self, Table, fields, json_time_us, opt_time_us};
use super::{Ctx, Error, ExitCode, Result};

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create(CreateArgs),
    /// List keys (active ones unless --all).
    List(ListArgs),
    /// Show one key.
    Get { id: String },
    /// Revoke a key: every proxy refuses it within the second.
    Revoke { id: String },
    /// Replace a key with a new secret; the old one stays valid for --grace.
    Rotate {
        id: String,
        /// How long the old key keeps working, e.g. 60s, 1h (default: 0,
        /// revoked at once).
        #[arg(long, default_value = "0")]
        grace: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Role the key holds.
    #[arg(long)]
    pub role: String,
    #[arg(long, default_value = "")]
    pub owner: String,
    #[arg(long, default_value = "")]
    pub description: String,
    /// Expire after this long, e.g. 30d, 12h.
    #[arg(long, conflicts_with = "expires_at")]
    pub expires_in: Option<String>,
    /// Expire at this time (RFC 3339).
    #[arg(long)]
    pub expires_at: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub role: Option<String>,
    #[arg(long)]
    pub owner: Option<String>,
    /// Include revoked keys.
    #[arg(long)]
    pub all: bool,
}

pub async fn run(ctx: &Ctx, cmd: KeysCmd) -> Result<ExitCode> {
    match cmd {
        KeysCmd::Create(a) => create(ctx, a).await,
        KeysCmd::List(a) => list(ctx, a).await,
        KeysCmd::Get { id } => {
            let mut admin = conn::admin(ctx).await?;
            let k = admin
                .get_api_key(pb::GetApiKeyRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            show_key(ctx, &k)
        }
        KeysCmd::Revoke { id } => {
            let mut admin = conn::admin(ctx).await?;
            let k = admin
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(status)?
                .into_inner();
            if ctx.json() {
                render::json(&view(&k))?;
            } else {
                render::out(&format!(
                    "revoked key {} at {}\n",
                    render::clean(&k.id),
                    opt_time_us(k.revoked_at_us, "-")
                ))?;
            }
            Ok(0)
        }
        KeysCmd::Rotate { id, grace } => {
            let d = render::parse_duration(&grace)
                .map_err(|m| Error::Message(format!("--grace: {m}")))?;
            let grace_seconds = u32::try_from(d.as_secs())
                .map_err(|_| Error::Message("--grace is too long".into()))?;
            let mut admin = conn::admin(ctx).await?;
            let c = admin
                .rotate_api_key(pb::RotateApiKeyRequest {
                    id: id.clone(),
                    grace_seconds,
                })
                .await
                .map_err(status)?
                .into_inner();
            show_created(ctx, &c)?;
            if !ctx.json() {
                let old = if grace_seconds == 0 {
                    format!("old key {id} is revoked")
                } else {
                    format!("old key {id} stays valid for {grace}")
                };
                render::note(&render::clean(&old));
            }
            Ok(0)
        }
    }
}

async fn create(ctx: &Ctx, a: CreateArgs) -> Result<ExitCode> {
    let CreateArgs {
        role,
        owner,
        description,
        expires_in,
        expires_at,
    } = a;
    let expires_at_us = match (expires_in, expires_at) {
        (Some(d), _) => {
            let d = render::parse_duration(&d)
                .map_err(|m| Error::Message(format!("--expires-in: {m}")))?;
            if d.is_zero() {
                return super::fail("--expires-in must be more than 0");
            }
            let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
            now_us().saturating_add(us)
        }
        (None, Some(t)) => {
            render::parse_time(&t).map_err(|m| Error::Message(format!("--expires-at: {m}")))?
        }
        (None, None) => 0,
    };
    let mut admin = conn::admin(ctx).await?;
    let c = admin
        .create_api_key(pb::CreateApiKeyRequest {
            role,
            owner,
            description,
            expires_at_us,
        })
        .await
        .map_err(status)?
        .into_inner();
    show_created(ctx, &c)?;
    Ok(0)
}

/// Prints a newly made key with its secret, and the warning.
fn show_created(ctx: &Ctx, c: &pb::CreatedApiKey) -> Result<()> {
    let key = c.key.clone().unwrap_or_default();
    if ctx.json() {
        render::json(&json!({
            "key": view(&key),
            "secret": c.secret,
            "policy_version": c.policy_version,
        }))?;
    } else {
        let mut pairs = key_pairs(&key);
        pairs.push(("secret:", c.secret.clone()));
        render::out(&fields(&pairs))?;
    }
    render::note(
        "warning: this is the only time the secret is shown; store it now (only its hash is kept)",
    );
    Ok(())
}

async fn list(ctx: &Ctx, a: ListArgs) -> Result<ExitCode> {
    let ListArgs { role, owner, all } = a;
    let mut admin = conn::admin(ctx).await?;
    let keys = admin
        .list_api_keys(pb::ListApiKeysRequest {
            include_revoked: all,
            role: role.unwrap_or_default(),
            owner: owner.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .keys;
    if ctx.json() {
        let v: Vec<_> = keys.iter().map(view).collect();
        render::json(&v)?;
        return Ok(0);
    }
    let mut t = Table::new(&[
        "ID",
        "ROLE",
        "OWNER",
        "STATUS",
        "CREATED",
        "EXPIRES",
        "DESCRIPTION",
    ]);
    let now = now_us();
    for k in &keys {
        t.row(vec![
            k.id.clone(),
            k.role.clone(),
            k.owner.clone(),
            key_status(k, now).into(),
            opt_time_us(k.created_at_us, "-"),
            opt_time_us(k.expires_at_us, "never"),
            k.description.clone(),
        ]);
    }
    if t.is_empty() {
        render::note("no keys");
    } else {
        t.print()?;
    }
    Ok(0)
}

fn show_key(ctx: &Ctx, k: &pb::ApiKey) -> Result<ExitCode> {
    if ctx.json() {
        render::json(&view(k))?;
    } else {
        render::out(&fields(&key_pairs(k)))?;
    }
    Ok(0)
}

pub fn key_status(k: &pb::ApiKey, now: i64) -> &'static str {
    if k.revoked_at_us != 0 && k.revoked_at_us <= now {
        "revoked"
    } else if k.expires_at_us != 0 && k.expires_at_us <= now {
        "expired"
    } else {
        "active"
    }
}

fn key_pairs(k: &pb::ApiKey) -> Vec<(&'static str, String)> {
    let mut p = vec![
        ("id:", k.id.clone()),
        ("prefix:", k.prefix.clone()),
        ("role:", k.role.clone()),
        ("owner:", k.owner.clone()),
        ("description:", k.description.clone()),
        ("status:", key_status(k, now_us()).into()),
        ("created:", opt_time_us(k.created_at_us, "-")),
        ("expires:", opt_time_us(k.expires_at_us, "never")),
    ];
    if k.revoked_at_us != 0 {
        p.push(("revoked:", opt_time_us(k.revoked_at_us, "-")));
    }
    if !k.rotated_from.is_empty() {
        p.push(("rotated from:", k.rotated_from.clone()));
    }
    p
}

/// A key as JSON. There is no secret in an [`pb::ApiKey`] to leak.
fn view(k: &pb::ApiKey) -> serde_json::Value {
    let pb::ApiKey {
        id,
        prefix,
        role,
        owner,
        description,
        created_at_us,
        expires_at_us,
        revoked_at_us,
        rotated_from,
    } = k;
    json!({
        "id": id,
        "prefix": prefix,
        "role": role,
        "owner": owner,
        "description": description,
        "status": key_status(k, now_us()),
        "created_at": json_time_us(*created_at_us),
        "expires_at": json_time_us(*expires_at_us),
        "revoked_at": json_time_us(*revoked_at_us),
        "rotated_from": (!rotated_from.is_empty()).then_some(rotated_from),
    })
}
