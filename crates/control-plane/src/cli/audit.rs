//! `sentinelctl audit`: query, tail, export, verify, gaps.
//!
//! Queries go over gRPC, page by page; export and the live tail are REST
//! streams, relayed as they arrive so an export of millions of events holds
//! one chunk in memory at a time. Events are shown in the REST API's JSON
//! shape ([`AuditEventView`]) whichever way they came.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use sentinel_shared::proto as pb;
use serde_json::{Value, json};

use super::conn::{self, Rest, root, status};
use super::render::{self, Table};
use super::{Ctx, Error, ExitCode, FilterArgs, RangeArgs, Result, fail};
use crate::rest::audit::AuditEventView;
use crate::store::audit::StoredEvent;

/// Largest page the server gives.
const MAX_PAGE: u32 = 1000;
/// Attempts to reopen a live tail the server ended (about half a minute
/// in all) before giving up.
const RECONNECT_TRIES: u32 = 8;
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
/// Largest SSE event we hold while reading it.
const MAX_SSE_EVENT: usize = 16 * 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Events matching the filters, newest first.
    Query(QueryArgs),
    /// The most recent events; with --follow, new ones as they arrive
    /// (until Ctrl-C).
    Tail(TailArgs),
    /// Every matching event as NDJSON or CSV on stdout, newest first.
    Export(ExportArgs),
    /// Re-check every stored hash chain. Exits 2 if tampering is found.
    Verify {
        /// Only this proxy's chains.
        #[arg(long)]
        proxy: Option<String>,
    },
    /// Sequence numbers missing from proxies' audit chains (`audit query
    /// --near-gap` shows the events either side of each).
    Gaps {
        #[arg(long)]
        proxy: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub range: RangeArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only events right next to an open gap of their chain: the last event
    /// before missing sequence numbers and the first one after, each marked
    /// with the gap it borders. Shows where records are missing and what
    /// surrounds the hole (`audit gaps` lists the holes alone).
    #[arg(long)]
    pub near_gap: bool,
    /// The most events to show (default 100, or all with --all).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Follow cursors to the last page.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Recent events shown first.
    #[arg(short = 'n', long, default_value_t = 10)]
    pub lines: u32,
    /// Keep printing new events as they are committed.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Ndjson,
    Csv,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value_t = ExportFormat::Ndjson)]
    pub format: ExportFormat,
    #[command(flatten)]
    pub range: RangeArgs,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Only events right next to an open gap of their chain (see `audit
    /// query --near-gap`).
    #[arg(long)]
    pub near_gap: bool,
    /// The most events to export (default: all).
    #[arg(long)]
    pub limit: Option<u64>,
}

pub async fn run(ctx: &Ctx, cmd: AuditCmd) -> Result<ExitCode> {
    match cmd {
        AuditCmd::Query(a) => query(ctx, a).await,
        AuditCmd::Tail(a) => tail(ctx, a).await,
        AuditCmd::Export(a) => export(ctx, a).await,
        AuditCmd::Verify { proxy } => verify(ctx, proxy).await,
        AuditCmd::Gaps { proxy } => gaps(ctx, proxy).await,
    }
}

fn grpc_query(filter: &FilterArgs, from_us: Option<i64>, to_us: Option<i64>) -> pb::AuditQuery {
    let f = filter.clone();
    pb::AuditQuery {
        from_us: from_us.unwrap_or(0),
        to_us: to_us.unwrap_or(0),
        subject: f.subject.unwrap_or_default(),
        api_key_id: f.key.unwrap_or_default(),
        role: f.role.unwrap_or_default(),
        tool: f.tool.unwrap_or_default(),
        backend: f.backend.unwrap_or_default(),
        outcome: f.outcome.unwrap_or_default(),
        proxy_id: f.proxy.unwrap_or_default(),
        request_id: f.request_id.unwrap_or_default(),
        session_id: f.session_id.unwrap_or_default(),
        chain_broken_only: f.chain_broken_only,
        near_gap: false,
        limit: 0,
        cursor: String::new(),
    }
}

/// An event in the REST API's JSON shape.
fn view(e: pb::StoredAuditEvent) -> Value {
    let pb::StoredAuditEvent {
        event,
        received_at_us,
        chain_ok,
        borders_gaps,
    } = e;
    let v = AuditEventView::from(StoredEvent {
        event: event.unwrap_or_default(),
        received_at_us,
        chain_ok,
        borders_gaps: borders_gaps
            .into_iter()
            .map(|g| (g.from_seq, g.to_seq))
            .collect(),
    });
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn n(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

fn tool_of(v: &Value) -> String {
    match (s(v, "backend"), s(v, "tool")) {
        ("", "") => s(v, "mcp_method").to_string(),
        ("", t) => t.to_string(),
        (b, "") => format!("{b}/"),
        (b, t) => format!("{b}/{t}"),
    }
}

/// The timestamp at seconds precision (the view's has microseconds).
fn short_time(v: &Value) -> String {
    match v.get("timestamp_us").and_then(Value::as_i64) {
        Some(us) => render::time_us(us),
        None => s(v, "timestamp").to_string(),
    }
}

fn latency(v: &Value) -> String {
    let us = n(v, "latency_us");
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.1}ms", us as f64 / 1000.0)
    }
}

const COLUMNS: &[&str] = &[
    "TIME", "OUTCOME", "SUBJECT", "ROLE", "KEY", "TOOL", "PROXY", "STATUS", "LATENCY", "REQUEST",
];

fn cells(v: &Value) -> Vec<String> {
    let mut outcome = s(v, "outcome").to_string();
    if v.get("chain_ok").and_then(Value::as_bool) == Some(false) {
        outcome.push_str(" (chain broken)");
    }
    outcome.push_str(&gap_marks(v));
    vec![
        short_time(v),
        outcome,
        s(v, "subject").into(),
        s(v, "role").into(),
        s(v, "api_key_id").into(),
        tool_of(v),
        s(v, "proxy_id").into(),
        n(v, "http_status").to_string(),
        latency(v),
        s(v, "request_id").into(),
    ]
}

/// Which open gaps the event borders, e.g. ` (then missing 3-4)` for the
/// last event before a gap and ` (after missing 3-4)` for the first one
/// after it; empty when it borders none.
fn gap_marks(v: &Value) -> String {
    let seq = n(v, "sequence");
    let mut out = String::new();
    for g in v
        .get("borders_gaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (a, b) = (n(g, "from_seq"), n(g, "to_seq"));
        let range = if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        };
        let side = if a > seq { "then" } else { "after" };
        out.push_str(&format!(" ({side} missing {range})"));
    }
    out
}

/// One event on one line, for streams (no look-ahead to align on).
fn line(v: &Value) -> String {
    let c: Vec<String> = cells(v).iter().map(|x| render::clean(x)).collect();
    format!(
        "{}  {:<15} {:<16} {:<10} {:<28} {:<14} {:>3} {:>8}  {}\n",
        c[0], c[1], c[2], c[3], c[5], c[6], c[7], c[8], c[9]
    )
}

async fn query(ctx: &Ctx, a: QueryArgs) -> Result<ExitCode> {
    let QueryArgs {
        range,
        filter,
        near_gap,
        limit,
        all,
    } = a;
    let filter = filter.normalized()?;
    let (from_us, to_us) = range.resolve()?;
    if limit == Some(0) {
        return fail("--limit must be at least 1");
    }
    let mut remaining = limit.unwrap_or(if all { u64::MAX } else { 100 });
    // An explicit --limit past one page is followed like --all.
    let follow = all || limit.is_some();
    let mut q = grpc_query(&filter, from_us, to_us);
    q.near_gap = near_gap;
    let mut admin = conn::admin(ctx).await?;
    let mut events = Vec::new();
    let mut more = false;
    let mut page_size = MAX_PAGE;
    loop {
        q.limit = u32::try_from(remaining.min(u64::from(page_size))).unwrap_or(page_size);
        let page = match admin.query_audit(q.clone()).await {
            Ok(p) => p.into_inner(),
            // Events can carry up to a megabyte of arguments each: a page
            // too large to receive is asked for again in halves.
            Err(s) if too_large(&s) && q.limit > 1 => {
                page_size = (q.limit / 2).max(1);
                continue;
            }
            Err(s) => return Err(status(s)),
        };
        remaining = remaining.saturating_sub(page.events.len() as u64);
        events.extend(page.events.into_iter().map(view));
        if page.next_cursor.is_empty() {
            break;
        }
        if remaining == 0 || !follow {
            more = true;
            break;
        }
        q.cursor = page.next_cursor;
    }
    if ctx.json() {
        render::json(&json!({"events": events, "more": more}))?;
    } else {
        let mut t = Table::new(COLUMNS);
        for e in &events {
            t.row(cells(e));
        }
        if t.is_empty() {
            render::note("no events");
        } else {
            t.print()?;
        }
        if more {
            render::note("(more events: --all to page through them, or narrow the filters)");
        }
    }
    Ok(0)
}

/// Whether a call failed because the answer exceeded the size we accept.
fn too_large(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    ) && s.message().contains("too large")
}

async fn tail(ctx: &Ctx, a: TailArgs) -> Result<ExitCode> {
    let TailArgs {
        filter,
        lines,
        follow,
    } = a;
    let filter = filter.normalized()?;
    // The live stream opens first: it starts at the server's clock, so an
    // event committed while the recent ones are read is in the stream
    // (and skipped there if it was already shown), never in neither.
    let rest = if follow { Some(Rest::new(ctx)?) } else { None };
    let mut stream = match &rest {
        Some(r) => Some(open_tail(r, &filter, None).await?),
        None => None,
    };
    let mut shown = HashSet::new();
    if lines > 0 {
        let mut q = grpc_query(&filter, None, None);
        q.limit = lines.min(MAX_PAGE);
        let mut admin = conn::admin(ctx).await?;
        let page = admin.query_audit(q).await.map_err(status)?.into_inner();
        for e in page.events.into_iter().rev() {
            let v = view(e);
            shown.insert(s(&v, "event_id").to_string());
            print_event(ctx, &v)?;
        }
    }
    let (Some(rest), Some(first)) = (rest, stream.take()) else {
        return Ok(0);
    };
    let mut resp = first;
    let mut last_id: Option<String> = None;
    loop {
        let ended = tokio::select! {
            r = relay(ctx, resp, &shown, &mut last_id) => r,
            _ = tokio::signal::ctrl_c() => return Ok(0),
        };
        // Our own output failing is final (`?`); the stream failing is not.
        if let Err(lost) = ended? {
            render::note(&lost);
        }
        // The server ends a tail after an hour, or when it shuts down (a
        // restart, an upgrade): resume after the last event shown, so
        // nothing committed meanwhile is missed.
        let mut delay = Duration::from_millis(500);
        let mut attempt = 0;
        resp = loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = tokio::signal::ctrl_c() => return Ok(0),
            }
            let opened = tokio::select! {
                r = open_tail(&rest, &filter, last_id.clone()) => r,
                _ = tokio::signal::ctrl_c() => return Ok(0),
            };
            match opened {
                Ok(r) => break r,
                Err(e) if attempt + 1 >= RECONNECT_TRIES => return Err(e),
                Err(e) => {
                    if attempt == 0 {
                        render::note(&format!("live tail: {e}; reconnecting"));
                    }
                    attempt += 1;
                    delay = (delay * 2).min(RECONNECT_MAX_DELAY);
                }
            }
        };
    }
}

fn print_event(ctx: &Ctx, v: &Value) -> Result<()> {
    if ctx.json() {
        render::json_line(v)
    } else {
        render::out(&line(v))
    }
}

async fn open_tail(
    rest: &Rest,
    filter: &FilterArgs,
    last_id: Option<String>,
) -> Result<reqwest::Response> {
    let headers: Vec<(&str, String)> = last_id
        .map(|id| vec![("last-event-id", id)])
        .unwrap_or_default();
    rest.get("/api/v1/audit/tail", &filter.query_pairs(), &headers, None)
        .await
}

/// Prints the events of one SSE response until the server ends it. The
/// inner error is a stream that broke (worth reopening); the outer one is
/// final.
async fn relay(
    ctx: &Ctx,
    resp: reqwest::Response,
    skip: &HashSet<String>,
    last_id: &mut Option<String>,
) -> Result<Result<(), String>> {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut ev = SseEvent::default();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("live tail interrupted: {}", root(&e)))),
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&raw);
            let l = text.trim_end_matches(['\n', '\r']);
            if l.is_empty() {
                let done = std::mem::take(&mut ev);
                if let Some(id) = &done.id {
                    *last_id = Some(id.clone());
                }
                dispatch(ctx, done, skip)?;
                continue;
            }
            ev.field(l);
        }
        if buf.len() > MAX_SSE_EVENT || ev.data.len() > MAX_SSE_EVENT {
            return fail("live tail: the server sent an oversized event");
        }
    }
    Ok(Ok(()))
}

#[derive(Default)]
struct SseEvent {
    event: String,
    data: String,
    id: Option<String>,
}

impl SseEvent {
    fn field(&mut self, l: &str) {
        if l.starts_with(':') {
            return; // a comment: keep-alive
        }
        let (name, value) = match l.split_once(':') {
            Some((n, v)) => (n, v.strip_prefix(' ').unwrap_or(v)),
            None => (l, ""),
        };
        match name {
            "event" => self.event = value.to_string(),
            "id" => self.id = Some(value.to_string()),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
    }
}

fn dispatch(ctx: &Ctx, ev: SseEvent, skip: &HashSet<String>) -> Result<()> {
    if ev.data.is_empty() {
        return Ok(());
    }
    match ev.event.as_str() {
        "audit" | "" | "message" => {
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                render::note("live tail: skipped an event that is not JSON");
                return Ok(());
            };
            if skip.contains(s(&v, "event_id")) {
                return Ok(());
            }
            print_event(ctx, &v)
        }
        "error" => {
            let msg = serde_json::from_str::<Value>(&ev.data)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(ev.data);
            render::note(&format!(
                "live tail: server error: {} (still following)",
                render::clean(&msg)
            ));
            Ok(())
        }
        _ => Ok(()),
    }
}

async fn export(ctx: &Ctx, a: ExportArgs) -> Result<ExitCode> {
    let ExportArgs {
        format,
        range,
        filter,
        near_gap,
        limit,
    } = a;
    let filter = filter.normalized()?;
    let (from_us, to_us) = range.resolve()?;
    let mut q = filter.query_pairs();
    if near_gap {
        q.push(("near_gap", "true".into()));
    }
    q.push((
        "format",
        match format {
            ExportFormat::Ndjson => "ndjson",
            ExportFormat::Csv => "csv",
        }
        .into(),
    ));
    if let Some(us) = from_us {
        q.push(("from", render::time_us_precise(us)));
    }
    if let Some(us) = to_us {
        q.push(("to", render::time_us_precise(us)));
    }
    if let Some(l) = limit {
        if l == 0 {
            return fail("--limit must be at least 1");
        }
        q.push(("limit", l.min(u64::from(u32::MAX)).to_string()));
    }
    let rest = Rest::new(ctx)?;
    let resp = rest.get("/api/v1/audit/export", &q, &[], None).await?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Error::Message(format!(
                "export interrupted, output is incomplete: {}",
                root(&e)
            ))
        })?;
        let mut o = std::io::stdout().lock();
        o.write_all(&chunk)?;
        o.flush()?;
    }
    Ok(0)
}

async fn verify(ctx: &Ctx, proxy: Option<String>) -> Result<ExitCode> {
    let q: Vec<(&str, String)> = proxy.into_iter().map(|p| ("proxy_id", p)).collect();
    let rest = Rest::new(ctx)?;
    let v = rest.get_json("/api/v1/audit/verify", &q).await?;
    let ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
    if ctx.json() {
        render::json(&v)?;
    } else {
        let problems: Vec<&str> = v
            .get("problems")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut out = String::new();
        for p in &problems {
            out.push_str(&render::clean(p));
            out.push('\n');
        }
        out.push_str(&format!(
            "{}: {} chain(s), {} event(s) checked{}\n",
            if ok { "ok" } else { "TAMPERING DETECTED" },
            n(&v, "chains"),
            n(&v, "events"),
            if ok {
                String::new()
            } else {
                format!(", {} problem(s)", problems.len())
            }
        ));
        render::out(&out)?;
    }
    Ok(if ok { 0 } else { 2 })
}

async fn gaps(ctx: &Ctx, proxy: Option<String>) -> Result<ExitCode> {
    let q: Vec<(&str, String)> = proxy.into_iter().map(|p| ("proxy_id", p)).collect();
    let rest = Rest::new(ctx)?;
    let v = rest.get_json("/api/v1/audit/gaps", &q).await?;
    if ctx.json() {
        render::json(&v)?;
        return Ok(0);
    }
    let mut t = Table::new(&["PROXY", "EPOCH", "MISSING", "DETECTED"]);
    for g in v
        .get("gaps")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (a, b) = (n(g, "from_seq"), n(g, "to_seq"));
        t.row(vec![
            s(g, "proxy_id").into(),
            n(g, "epoch").to_string(),
            if a == b {
                format!("{a}")
            } else {
                format!("{a}-{b} ({} events)", b.saturating_sub(a) + 1)
            },
            s(g, "detected_at").into(),
        ]);
    }
    if t.is_empty() {
        render::note("no gaps");
    } else {
        t.print()?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_fields() {
        let mut e = SseEvent::default();
        for l in [
            ": keep-alive",
            "event: audit",
            "id: 1.x",
            "data: {\"a\":",
            "data: 1}",
        ] {
            e.field(l);
        }
        assert_eq!(e.event, "audit");
        assert_eq!(e.id.as_deref(), Some("1.x"));
        assert_eq!(e.data, "{\"a\":\n1}");
    }
}
