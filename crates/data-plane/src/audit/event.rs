//! Building the audit event of one call as it moves through the gates.
//!
//! A [`CallAudit`] is created when a call is recognised and ends exactly one
//! way: refused (a complete event via `decided`), or attempted and then
//! finished (`attempt`, then `outcome`). If it is dropped unfinished (the
//! client went away mid-stream) its `Drop` records outcome `unknown`: the
//! `finally` that makes "exactly one event per attempt" hold.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value, json};

use sentinel_shared::audit::{audit_arguments, bound_text, outcome_str, scrub};
use sentinel_shared::proto::{AuditEvent, Outcome};

use super::{AttemptTicket, AuditSink, AuditUnavailable};
use crate::error::ProxyError;
use crate::gate::authn::Principal;
use crate::policy::Snapshot;

pub struct CallAudit {
    sink: Arc<dyn AuditSink>,
    ev: AuditEvent,
    started: Instant,
    decision: Map<String, Value>,
    ticket: Option<AttemptTicket>,
    finished: bool,
    max_response: usize,
}

impl CallAudit {
    pub fn new(sink: Arc<dyn AuditSink>, request_id: &str, method: &str, now_us: i64) -> Self {
        Self {
            sink,
            ev: AuditEvent {
                // The id carries the same millisecond as the timestamp.
                event_id: sentinel_shared::audit::event_id_at(now_us),
                request_id: request_id.to_string(),
                timestamp_us: now_us,
                mcp_method: method.to_string(),
                auth_method: "none".into(),
                outcome: Outcome::Unknown as i32,
                ..Default::default()
            },
            started: Instant::now(),
            decision: Map::new(),
            ticket: None,
            finished: false,
            max_response: sentinel_shared::spec::DEFAULT_MAX_RESPONSE_BYTES as usize,
        }
    }

    pub fn principal(&mut self, p: &Principal) {
        self.ev.subject = scrub(p.subject()).into_owned();
        self.ev.role = scrub(p.role()).into_owned();
        self.ev.api_key_id = p.key_id().unwrap_or("").to_string();
        self.ev.auth_method = p.method().as_str().into();
    }

    pub fn session(&mut self, audit_id: &str) {
        self.ev.session_id = audit_id.to_string();
    }

    pub fn client(&mut self, protocol_version: &str, client_name: &str) {
        self.ev.protocol_version = scrub(protocol_version).into_owned();
        self.ev.client_name = scrub(client_name).into_owned();
    }

    /// The tool as the client named it, until routing knows better.
    pub fn tool(&mut self, backend: &str, tool: &str) {
        self.ev.backend = backend.to_string();
        self.ev.tool = scrub(tool).into_owned();
    }

    pub fn arguments(&mut self, args: Option<&Value>, snap: &Snapshot) {
        self.max_response = snap.audit.max_response_bytes as usize;
        let Some(args) = args else { return };
        let raw = json_text(args);
        let (text, cut) = audit_arguments(
            &raw,
            &snap.policy.redactor,
            snap.audit.max_argument_bytes as usize,
        );
        self.ev.arguments = scrub(&text).into_owned();
        self.ev.arguments_truncated = cut;
    }

    /// Records one gate's verdict in the decision document.
    pub fn verdict(&mut self, gate: &str, allowed: bool, reason: impl Into<String>) {
        self.decision.insert(
            gate.to_string(),
            json!({"verdict": if allowed { "allow" } else { "deny" }, "reason": reason.into()}),
        );
    }

    /// A refusal before forwarding: the event is complete.
    pub fn refuse(mut self, err: &ProxyError) {
        self.fill_error(
            err.outcome(),
            err.status().as_u16(),
            err.code(),
            &err.to_string(),
        );
        self.finished = true;
        let ev = self.take();
        self.sink.decided(ev);
    }

    /// Records the attempt before forwarding. On `Err` the call must not be
    /// forwarded; the event is then completed as refused.
    pub async fn attempt(&mut self) -> Result<(), AuditUnavailable> {
        self.ev.latency_us = self.started.elapsed().as_micros() as u64;
        self.ev.decision = json_text(&self.decision);
        match self.sink.attempt(&mut self.ev).await {
            Ok(t) => {
                self.ticket = Some(t);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The upstream answered `answer` (a JSON-RPC response).
    pub fn finish(mut self, http_status: u16, answer: &Value) {
        if let Some(err) = answer.get("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
            self.verdict("forward", false, format!("upstream answered error {code}"));
            self.fill_error(Outcome::UpstreamError, http_status, code, msg);
        } else {
            let result = answer.get("result").map(json_text).unwrap_or_default();
            self.record_result(http_status, &result);
        }
        self.complete();
    }

    /// The upstream answered with a result, given as its JSON text (the
    /// relay's pass-through of plain answers, which builds no tree of it).
    pub fn finish_result(mut self, http_status: u16, result: &str) {
        self.record_result(http_status, result);
        self.complete();
    }

    fn record_result(&mut self, http_status: u16, result: &str) {
        self.verdict("forward", true, "upstream answered");
        self.ev.outcome = Outcome::Ok as i32;
        self.ev.http_status = u32::from(http_status);
        let (bounded, _) = bound_text(result, self.max_response);
        self.ev.response = match scrub(&bounded) {
            Cow::Borrowed(_) => bounded,
            Cow::Owned(clean) => clean,
        };
    }

    /// Forwarding failed (upstream down, slow, garbage).
    pub fn fail(mut self, err: &ProxyError) {
        self.verdict("forward", false, err.to_string());
        self.fill_error(
            err.outcome(),
            err.status().as_u16(),
            err.code(),
            &err.to_string(),
        );
        self.complete();
    }

    fn fill_error(&mut self, outcome: Outcome, status: u16, code: i64, message: &str) {
        self.ev.outcome = outcome as i32;
        self.ev.http_status = u32::from(status);
        self.ev.jsonrpc_error_code = code.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
        self.ev.jsonrpc_error_message = scrub(message).into_owned();
        self.ev.response = json!({"code": code, "message": message}).to_string();
    }

    fn complete(&mut self) {
        self.finished = true;
        let ev = self.take();
        match self.ticket.take() {
            Some(t) => self.sink.outcome(t, ev),
            None => self.sink.decided(ev),
        }
    }

    fn take(&mut self) -> AuditEvent {
        self.ev.latency_us = self.started.elapsed().as_micros() as u64;
        self.ev.decision = json_text(&self.decision);
        self.decision.clear();
        let outcome = Outcome::try_from(self.ev.outcome).unwrap_or(Outcome::Unknown);
        metrics::counter!("sentinel_tool_calls_total", "outcome" => outcome_str(outcome))
            .increment(1);
        metrics::histogram!("sentinel_tool_call_seconds", "outcome" => outcome_str(outcome))
            .record(self.started.elapsed().as_secs_f64());
        std::mem::take(&mut self.ev)
    }
}

/// Compact JSON text, as `Value`'s `Display` writes it, but straight into
/// bytes: `Display` goes through `fmt::Write` a piece at a time, which
/// costs more per byte than the text of a 1 KB argument is worth.
fn json_text<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Drop for CallAudit {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.verdict(
            "forward",
            false,
            "the proxy stopped before the result was seen",
        );
        self.ev.outcome = Outcome::Unknown as i32;
        self.complete();
    }
}
