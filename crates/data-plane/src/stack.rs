//! The gates of a tools/call, in order. Read top to bottom:
//!
//! 1. **authenticate** (done by the front for every request, since every
//!    method needs a principal; its refusal of a tools/call is audited here
//!    through [`refuse_unauthenticated`]);
//! 2. **authorize**: RBAC on `backend/tool`, after routing has told us which
//!    backend owns the tool; before any token is spent, so denied calls do
//!    not eat the caller's rate;
//! 3. **rate limit**: only calls that may happen count;
//! 4. **audit attempt**: the attempt is recorded before anything is
//!    forwarded; if it cannot be, nothing is forwarded (503);
//! 5. **forward** to the owning upstream;
//! 6. **audit outcome**: when the answer is seen (for a stream, when its
//!    response passes by; if the stream dies first, `unknown`).
//!
//! Exactly one audit event leaves every path through this function.

use serde_json::Value;

use crate::audit::event::CallAudit;
use crate::error::ProxyError;
use crate::gate::authz::authorize;
use crate::mcp::federation::{self, ListKind};
use crate::mcp::front::{Answer, Call, Relay};
use crate::upstream::Reply;

/// A tools/call through all the gates. `msg` is the client's request.
pub async fn tools_call(call: &Call<'_>, mut msg: Value) -> Answer {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let shown = msg["params"]["name"].as_str().unwrap_or("").to_string();
    let mut audit = call.audit("tools/call");
    audit.tool("", &shown);
    audit.arguments(msg["params"].get("arguments"), &call.snap);
    audit.verdict(
        "authenticate",
        true,
        format!(
            "{} {}",
            call.principal.method().as_str(),
            call.principal.binding()
        ),
    );

    // Routing: which backend owns the name the client used.
    let Some((backend, tool)) = call.resolve(ListKind::Tools, &shown).await else {
        let err = ProxyError::UnknownTool(shown);
        audit.verdict("authorize", false, "no backend offers this tool");
        audit.refuse(&err);
        return Answer::error(id, err);
    };
    audit.tool(&backend.name, &tool);

    // Authorize.
    match authorize(&call.principal, &call.snap, &backend.name, &tool) {
        Ok(a) => audit.verdict("authorize", true, format!("allowed by '{}'", a.pattern)),
        Err(f) => {
            audit.verdict("authorize", false, f.reason.to_string());
            let err = ProxyError::Forbidden(f);
            audit.refuse(&err);
            return Answer::error(id, err);
        }
    }

    // Rate limit.
    let qualified = format!("{}/{tool}", backend.name);
    match call.st.limiter.check(
        &call.principal,
        &call.snap,
        "tools/call",
        Some((&tool, &qualified)),
    ) {
        Ok(()) => audit.verdict("rate_limit", true, "within limits"),
        Err(r) => {
            audit.verdict("rate_limit", false, r.to_string());
            let err = ProxyError::RateLimited(r);
            audit.refuse(&err);
            return Answer::error(id, err);
        }
    }

    // Audit the attempt before anything leaves the proxy.
    if let Err(e) = audit.attempt().await {
        let err = ProxyError::AuditUnavailable(e.reason);
        audit.verdict("audit", false, err.to_string());
        audit.refuse(&err);
        return Answer::error(id, err);
    }

    // Forward.
    msg["params"]["name"] = Value::String(tool);
    let route = match call.route(backend) {
        Ok(r) => r,
        Err(e) => {
            let err = ProxyError::Upstream(e);
            audit.fail(&err);
            return Answer::error(id, err);
        }
    };
    match backend.upstream.send(&msg, route).await {
        Ok(reply) => {
            let mut relay = Relay {
                backend: backend.name.clone(),
                id,
                add_result_type: call.is_modern() && backend.upstream.stateless_is_legacy().await,
                cacheable: false,
                audit: Some(audit),
                timeout: backend.timeout,
                cancel: None,
            };
            // In a legacy session a client that goes away mid-call is
            // answered for by a cancellation toward the upstream.
            if let crate::upstream::Route::Session(s) = route {
                relay.cancel = Some((backend.upstream.clone(), s.clone()));
            }
            relay.answer(reply)
        }
        Err(e) => {
            let err = ProxyError::Upstream(e);
            audit.fail(&err);
            Answer::error(id, err)
        }
    }
}

/// The audit event of a tools/call refused at authentication.
pub fn refuse_unauthenticated(audit: CallAudit, msg: &Value, err: &ProxyError) {
    let mut audit = audit;
    audit.tool("", msg["params"]["name"].as_str().unwrap_or(""));
    audit.verdict("authenticate", false, err.to_string());
    audit.refuse(err);
}

/// Resolves a name for routed methods other than tools/call. With `audit`
/// (the policy audits this method), the event is completed like a tool
/// call's.
pub async fn route_named(
    call: &Call<'_>,
    kind: ListKind,
    mut msg: Value,
    mut audit: Option<CallAudit>,
) -> Answer {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let key = kind_key(kind);
    let shown = msg["params"][key].as_str().unwrap_or("").to_string();
    let fail = |audit: Option<CallAudit>, err: ProxyError| {
        if let Some(a) = audit {
            a.fail(&err);
        }
        Answer::error(id.clone(), err)
    };
    let Some((backend, name)) = call.resolve(kind, &shown).await else {
        // A URI no list showed (e.g. one built from a template): ask each
        // upstream in turn; the first that answers with a result owns it.
        if kind == ListKind::Resources {
            for b in &call.snap.backends {
                let Ok(route) = call.route(b) else { continue };
                let Ok(reply) = b.upstream.send(&msg, route).await else {
                    continue;
                };
                if let Ok(answer) = reply.response_to(&id, b.timeout).await
                    && answer.get("result").is_some()
                {
                    let mut relay = Relay {
                        backend: b.name.clone(),
                        id: id.clone(),
                        add_result_type: call.is_modern() && b.upstream.stateless_is_legacy().await,
                        cacheable: true,
                        audit: audit.take(),
                        timeout: b.timeout,
                        cancel: None,
                    };
                    if let Some(a) = relay.audit.as_mut() {
                        a.tool(&b.name, &shown);
                    }
                    return relay.answer(Reply::Json(answer));
                }
            }
        }
        return fail(
            audit,
            ProxyError::InvalidParams(format!("unknown {key} '{shown}'")),
        );
    };
    if let Some(a) = audit.as_mut() {
        a.tool(&backend.name, &name);
    }
    if matches!(kind, ListKind::Prompts) {
        msg["params"][key] = Value::String(name);
    }
    let route = match call.route(backend) {
        Ok(r) => r,
        Err(e) => return fail(audit, ProxyError::Upstream(e)),
    };
    match backend.upstream.send(&msg, route).await {
        Ok(reply) => Relay {
            backend: backend.name.clone(),
            id,
            add_result_type: call.is_modern() && backend.upstream.stateless_is_legacy().await,
            cacheable: matches!(kind, ListKind::Resources),
            audit,
            timeout: backend.timeout,
            cancel: None,
        }
        .answer(reply),
        Err(e) => fail(audit, ProxyError::Upstream(e)),
    }
}

fn kind_key(kind: ListKind) -> &'static str {
    match kind {
        ListKind::Tools | ListKind::Prompts => "name",
        ListKind::Resources | ListKind::ResourceTemplates => "uri",
    }
}

pub use federation::merge;
