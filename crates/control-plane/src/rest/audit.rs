//! `/api/v1/audit`: the audit explorer's queries, export, live tail, and the
//! tamper-evidence reports (gaps, chain verification, dead letters).
//!
//! Every endpoint that filters reads the same query parameters (see
//! [`read_filter`]); a value that does not parse, or a parameter the
//! endpoint does not know, is a 400 naming the parameter.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use http::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use sentinel_shared::audit::{self, outcome_str};
use sentinel_shared::proto::{AuditEvent, Outcome};
use serde::Serialize;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::ErrorBody;
use super::extract::Params;
use super::rfc3339;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::Store;
use crate::store::audit::{AuditFilter, DEFAULT_PAGE, Gap, MAX_PAGE, StoredEvent, VerifyReport};
use crate::store::from_us;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(query))
        .routes(routes!(export))
        .routes(routes!(tail))
        .routes(routes!(gaps))
        .routes(routes!(verify))
        .routes(routes!(dead_letters))
}

/// Ends live tails when the server shuts down (see [`super::router_until`]).
#[derive(Clone)]
pub struct Shutdown(pub CancellationToken);

/// How often the live tail asks Postgres for new events.
const TAIL_POLL: Duration = Duration::from_millis(200);
/// Events read per poll: bounds the memory a tail holds.
const TAIL_PAGE: u32 = 500;
/// A tail ends after this long; `EventSource` clients reconnect on their own
/// and resume from `Last-Event-ID`, so nothing is lost. This bounds how long
/// one admin request can hold a task and a pool slot's worth of polling.
const TAIL_MAX: Duration = Duration::from_secs(3600);
/// Live tails open at once on this process. Each polls Postgres five times
/// a second; the bound keeps a burst of dashboards (or a misbehaving
/// script) from taking the pool away from ingest. Process-wide rather than
/// per router, since the pool it protects is too.
const MAX_TAILS: usize = 64;
static TAILS: Semaphore = Semaphore::const_new(MAX_TAILS);

/// An audit event as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEventView {
    pub event_id: String,
    pub request_id: String,
    /// When the attempt started (RFC 3339, and unix microseconds).
    pub timestamp: String,
    pub timestamp_us: i64,
    /// When the control plane committed it.
    pub received_at: String,
    pub proxy_id: String,
    pub epoch: u64,
    pub sequence: u64,
    pub subject: String,
    pub role: String,
    pub api_key_id: String,
    pub auth_method: String,
    pub session_id: String,
    pub mcp_method: String,
    pub tool: String,
    pub backend: String,
    /// Redacted, bounded JSON text of the arguments.
    pub arguments: String,
    pub arguments_truncated: bool,
    pub response: String,
    pub outcome: &'static str,
    pub http_status: u32,
    pub jsonrpc_error_code: i32,
    pub jsonrpc_error_message: String,
    pub latency_us: u64,
    /// JSON text: each gate's verdict and reason.
    pub decision: String,
    pub protocol_version: String,
    pub client_name: String,
    /// Hex SHA-256 of the previous event of the chain, and of this one.
    pub prev_hash: String,
    pub hash: String,
    /// Whether ingest found this event correctly linked into its chain.
    pub chain_ok: bool,
    /// Open gaps of this event's chain that it borders: a range starting
    /// at `sequence + 1` means records are missing right after it, one
    /// ending at `sequence - 1` right before it. Shown by the query and
    /// export endpoints (see `near_gap`); always empty on the live tail.
    pub borders_gaps: Vec<SequenceRange>,
}

/// Sequence numbers missing from one chain, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct SequenceRange {
    pub from_seq: u64,
    pub to_seq: u64,
}

impl From<StoredEvent> for AuditEventView {
    fn from(s: StoredEvent) -> Self {
        let StoredEvent {
            event,
            received_at_us,
            chain_ok,
            borders_gaps,
        } = s;
        // Every field named, so a new proto field fails the build here
        // until the API shows it (or decides not to).
        let AuditEvent {
            event_id,
            request_id,
            timestamp_us,
            proxy_id,
            epoch,
            sequence,
            subject,
            role,
            api_key_id,
            auth_method,
            session_id,
            mcp_method,
            tool,
            backend,
            arguments,
            arguments_truncated,
            response,
            outcome,
            http_status,
            jsonrpc_error_code,
            jsonrpc_error_message,
            latency_us,
            decision,
            protocol_version,
            client_name,
            prev_hash,
            hash,
        } = event;
        AuditEventView {
            event_id,
            request_id,
            timestamp: rfc3339(from_us(timestamp_us)),
            timestamp_us,
            received_at: rfc3339(from_us(received_at_us)),
            proxy_id,
            epoch,
            sequence,
            subject,
            role,
            api_key_id,
            auth_method,
            session_id,
            mcp_method,
            tool,
            backend,
            arguments,
            arguments_truncated,
            response,
            outcome: outcome_str(Outcome::try_from(outcome).unwrap_or(Outcome::Unspecified)),
            http_status,
            jsonrpc_error_code,
            jsonrpc_error_message,
            latency_us,
            decision,
            protocol_version,
            client_name,
            prev_hash: hex::encode(prev_hash),
            hash: hex::encode(hash),
            chain_ok,
            borders_gaps: borders_gaps
                .into_iter()
                .map(|(from_seq, to_seq)| SequenceRange { from_seq, to_seq })
                .collect(),
        }
    }
}

/// Which endpoint reads the filter: they differ in what `limit` and
/// `cursor` mean.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A page: `limit` is the page size, `cursor` continues a query.
    Page,
    /// Everything matching: `limit` caps the total, `cursor` starts there.
    Export,
    /// New events as they arrive: no time range, no paging.
    Tail,
}

/// Reads the filter parameters shared by the audit endpoints.
fn read_filter(p: &mut Params, usage: Use) -> AuditFilter {
    let mut f = AuditFilter::default();
    if usage != Use::Tail {
        f.from_us = p.time_us("from");
        f.to_us = p.time_us("to");
        f.cursor = p.string("cursor");
        f.limit = p.u32("limit");
        if let Some(l) = f.limit
            && l == 0
        {
            p.reject("limit", "must be at least 1");
        }
        if let (Some(a), Some(b)) = (f.from_us, f.to_us)
            && a >= b
        {
            p.reject("from", "must be before 'to'");
        }
        // Not on the tail: a new event is rarely next to a gap yet, and
        // one that becomes so later would never be shown there.
        f.near_gap = p.bool("near_gap").unwrap_or(false);
    }
    f.subject = p.string("subject");
    f.api_key_id = p.string("key_id");
    f.role = p.string("role");
    f.tool = p.string("tool");
    f.backend = p.string("backend");
    f.outcome = p.choice("outcome", audit::OUTCOMES).map(str::to_string);
    f.proxy_id = p.string("proxy_id");
    f.request_id = p.string("request_id");
    f.session_id = p.string("session_id");
    f.chain_broken_only = p.bool("chain_broken_only").unwrap_or(false);
    f
}

/// The parameters of [`read_filter`], for the OpenAPI document.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct FilterParams {
    /// Events at or after this time (RFC 3339).
    from: Option<String>,
    /// Events before this time (RFC 3339).
    to: Option<String>,
    subject: Option<String>,
    /// API key id.
    key_id: Option<String>,
    role: Option<String>,
    tool: Option<String>,
    backend: Option<String>,
    /// ok, unauthenticated, forbidden, rate_limited, upstream_error,
    /// unknown or invalid_request.
    outcome: Option<String>,
    proxy_id: Option<String>,
    request_id: Option<String>,
    session_id: Option<String>,
    /// Only events whose chain link was found broken.
    chain_broken_only: Option<bool>,
    /// Only events right next to an open gap of their chain (the last
    /// event before missing sequence numbers, the first one after); each
    /// names the gap in `borders_gaps`. An event stops matching once its
    /// gap is filled.
    near_gap: Option<bool>,
    /// Page size (1..=1000, default 100); for export, the most events to
    /// export (default: all).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub events: Vec<AuditEventView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Query audit events, newest first, one page at a time.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(FilterParams),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody, description = "a parameter is invalid; the error names it")))]
async fn query(State(state): State<AppState>, mut params: Params) -> Result<Json<AuditPage>> {
    let filter = read_filter(&mut params, Use::Page);
    params.finish()?;
    let (events, next_cursor) = state.store.query_audit(&filter).await?;
    Ok(Json(AuditPage {
        events: events.into_iter().map(AuditEventView::from).collect(),
        next_cursor,
    }))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Ndjson,
    Csv,
}

/// Export every matching event, newest first, as NDJSON (one event per
/// line) or CSV, streamed page by page.
#[utoipa::path(get, path = "/api/v1/audit/export", tag = "audit",
    params(FilterParams, ("format" = Option<String>, Query, description = "ndjson (default) or csv")),
    responses(
        (status = 200, content_type = "application/x-ndjson", description = "one JSON event per line"),
        (status = 400, body = ErrorBody),
    ))]
async fn export(State(state): State<AppState>, mut params: Params) -> Result<Response> {
    let format = match params.choice("format", &["ndjson", "csv"]) {
        Some("csv") => Format::Csv,
        _ => Format::Ndjson,
    };
    let mut filter = read_filter(&mut params, Use::Export);
    params.finish()?;
    let remaining = filter.limit.map_or(u64::MAX, u64::from);
    filter.limit = Some(MAX_PAGE);
    // The first page is read before answering, so a bad filter or an
    // unreachable database is an error status, not a truncated 200.
    let (first, next) = state.store.query_audit(&filter).await?;
    let exporter = Exporter {
        store: state.store.clone(),
        filter,
        format,
        page: Some(first),
        next,
        remaining,
        header_done: false,
    };
    let (content_type, file) = match format {
        Format::Ndjson => ("application/x-ndjson", "audit.ndjson"),
        Format::Csv => ("text/csv; charset=utf-8", "audit.csv"),
    };
    let mut resp = Body::from_stream(exporter.stream()).into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Pages through a query, rendering each page as one chunk.
struct Exporter {
    store: Store,
    filter: AuditFilter,
    format: Format,
    /// A page read but not yet rendered.
    page: Option<Vec<StoredEvent>>,
    next: Option<String>,
    remaining: u64,
    header_done: bool,
}

impl Exporter {
    fn stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        futures::stream::unfold(self, |mut ex| async move {
            let page = match ex.page.take() {
                Some(p) => p,
                None => {
                    let cursor = ex.next.take()?;
                    if ex.remaining == 0 {
                        return None;
                    }
                    ex.filter.cursor = Some(cursor);
                    match ex.store.query_audit(&ex.filter).await {
                        Ok((p, next)) => {
                            ex.next = next;
                            p
                        }
                        Err(e) => {
                            // Ending the body with an error aborts the
                            // response: the client sees a broken transfer,
                            // never a silently short export.
                            tracing::warn!(error = %e, "audit export failed mid-stream");
                            ex.next = None;
                            ex.remaining = 0;
                            return Some((Err(std::io::Error::other(e.public_message())), ex));
                        }
                    }
                }
            };
            if ex.remaining == 0 && ex.header_done {
                return None;
            }
            let take = usize::try_from(ex.remaining)
                .unwrap_or(usize::MAX)
                .min(page.len());
            ex.remaining -= take as u64;
            let mut out = Vec::with_capacity(take * 512 + 512);
            if ex.format == Format::Csv && !ex.header_done {
                csv_header(&mut out);
            }
            ex.header_done = true;
            for ev in page.into_iter().take(take) {
                let view = AuditEventView::from(ev);
                match ex.format {
                    Format::Ndjson => {
                        if serde_json::to_writer(&mut out, &view).is_ok() {
                            out.push(b'\n');
                        }
                    }
                    Format::Csv => csv_row(&mut out, &view),
                }
            }
            Some((Ok(Bytes::from(out)), ex))
        })
    }
}

const CSV_COLUMNS: &[&str] = &[
    "event_id",
    "timestamp",
    "received_at",
    "request_id",
    "proxy_id",
    "epoch",
    "sequence",
    "subject",
    "role",
    "api_key_id",
    "auth_method",
    "session_id",
    "mcp_method",
    "tool",
    "backend",
    "outcome",
    "http_status",
    "jsonrpc_error_code",
    "jsonrpc_error_message",
    "latency_us",
    "arguments",
    "arguments_truncated",
    "response",
    "decision",
    "protocol_version",
    "client_name",
    "chain_ok",
    "prev_hash",
    "hash",
    "borders_gaps",
];

fn csv_header(out: &mut Vec<u8>) {
    out.extend_from_slice(CSV_COLUMNS.join(",").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn csv_row(out: &mut Vec<u8>, v: &AuditEventView) {
    // Texts come from agents and upstreams: quote them, and neutralise a
    // leading formula character so a spreadsheet opening the export does
    // not evaluate `=HYPERLINK(...)` planted in a tool argument.
    let t = |s: &str| Cell::Text(s.to_string());
    let n = |s: String| Cell::Number(s);
    let cells = [
        t(&v.event_id),
        t(&v.timestamp),
        t(&v.received_at),
        t(&v.request_id),
        t(&v.proxy_id),
        n(v.epoch.to_string()),
        n(v.sequence.to_string()),
        t(&v.subject),
        t(&v.role),
        t(&v.api_key_id),
        t(&v.auth_method),
        t(&v.session_id),
        t(&v.mcp_method),
        t(&v.tool),
        t(&v.backend),
        t(v.outcome),
        n(v.http_status.to_string()),
        n(v.jsonrpc_error_code.to_string()),
        t(&v.jsonrpc_error_message),
        n(v.latency_us.to_string()),
        t(&v.arguments),
        n(v.arguments_truncated.to_string()),
        t(&v.response),
        t(&v.decision),
        t(&v.protocol_version),
        t(&v.client_name),
        n(v.chain_ok.to_string()),
        t(&v.prev_hash),
        t(&v.hash),
        // `from-to` ranges, `;`-separated: no comma to quote.
        n(v.borders_gaps
            .iter()
            .map(|g| format!("{}-{}", g.from_seq, g.to_seq))
            .collect::<Vec<_>>()
            .join(";")),
    ];
    debug_assert_eq!(cells.len(), CSV_COLUMNS.len());
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        c.write(out);
    }
    out.extend_from_slice(b"\r\n");
}

enum Cell {
    Text(String),
    Number(String),
}

impl Cell {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Cell::Number(s) => out.extend_from_slice(s.as_bytes()),
            Cell::Text(s) => {
                let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
                let quote = formula || s.contains([',', '"', '\n', '\r']);
                if !quote {
                    out.extend_from_slice(s.as_bytes());
                    return;
                }
                out.push(b'"');
                if formula {
                    out.push(b'\'');
                }
                out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
                out.push(b'"');
            }
        }
    }
}

/// Follow new audit events as they are committed, as server-sent events
/// (`event: audit`, data: one event). Each event's `id` is its position:
/// a client reconnecting with `Last-Event-ID` resumes after it.
#[utoipa::path(get, path = "/api/v1/audit/tail", tag = "audit",
    params(
        ("subject" = Option<String>, Query), ("key_id" = Option<String>, Query),
        ("role" = Option<String>, Query), ("tool" = Option<String>, Query),
        ("backend" = Option<String>, Query), ("outcome" = Option<String>, Query),
        ("proxy_id" = Option<String>, Query), ("request_id" = Option<String>, Query),
        ("session_id" = Option<String>, Query), ("chain_broken_only" = Option<bool>, Query),
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this event"),
    ),
    responses(
        (status = 200, content_type = "text/event-stream", description = "a stream of audit events"),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "too many live tails are open"),
    ))]
async fn tail(
    State(state): State<AppState>,
    Extension(Shutdown(shutdown)): Extension<Shutdown>,
    headers: HeaderMap,
    mut params: Params,
) -> Result<impl IntoResponse> {
    let filter = read_filter(&mut params, Use::Tail);
    params.finish()?;
    let position = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(parse_position)
            .ok_or_else(|| Error::invalid("Last-Event-ID", "is not an id this stream sent"))?,
        None => state.store.audit_tail_start().await?,
    };
    let Ok(permit) = TAILS.try_acquire() else {
        return Err(Error::Conflict(format!(
            "{MAX_TAILS} live tails are open on this control plane; close one or query /api/v1/audit"
        )));
    };
    let tail = Tail {
        _permit: permit,
        shutdown,
        store: state.store.clone(),
        filter,
        position,
        buffered: VecDeque::new(),
        page_was_full: true,
        ends_at: Instant::now() + TAIL_MAX,
    };
    let sse = Sse::new(tail.stream()).keep_alive(KeepAlive::default());
    // Proxies such as nginx buffer responses unless told otherwise.
    Ok((
        [
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                http::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        sse,
    ))
}

fn position_id(received_us: i64, event_id: &str) -> String {
    format!("{received_us}.{event_id}")
}

fn parse_position(s: &str) -> Option<(i64, uuid::Uuid)> {
    let (us, id) = s.split_once('.')?;
    Some((us.parse().ok()?, uuid::Uuid::parse_str(id).ok()?))
}

struct Tail {
    /// Held for as long as the stream lives (dropped with it when the
    /// client goes away).
    _permit: SemaphorePermit<'static>,
    /// Cancelled when the server shuts down: the stream ends then.
    shutdown: CancellationToken,
    store: Store,
    filter: AuditFilter,
    /// (received time, event id) of the last event read.
    position: (i64, uuid::Uuid),
    buffered: VecDeque<StoredEvent>,
    /// A full page means more may be waiting: poll again without sleeping.
    page_was_full: bool,
    ends_at: Instant,
}

impl Tail {
    fn stream(self) -> impl Stream<Item = std::result::Result<Event, Infallible>> + Send + 'static {
        futures::stream::unfold(self, |mut t| async move {
            loop {
                while let Some(ev) = t.buffered.pop_front() {
                    if !matches(&t.filter, &ev) {
                        continue;
                    }
                    let id = position_id(ev.received_at_us, &ev.event.event_id);
                    let view = AuditEventView::from(ev);
                    let Ok(data) = serde_json::to_string(&view) else {
                        continue;
                    };
                    return Some((Ok(Event::default().event("audit").id(id).data(data)), t));
                }
                if Instant::now() >= t.ends_at || t.shutdown.is_cancelled() {
                    return None;
                }
                if !t.page_was_full {
                    tokio::select! {
                        () = tokio::time::sleep(TAIL_POLL) => {}
                        () = t.shutdown.cancelled() => return None,
                    }
                }
                match t.store.audit_tail(t.position, TAIL_PAGE).await {
                    Ok(page) => {
                        t.page_was_full = page.len() >= TAIL_PAGE as usize;
                        if let Some(last) = page.last()
                            && let Ok(id) = uuid::Uuid::parse_str(&last.event.event_id)
                        {
                            t.position = (last.received_at_us, id);
                        }
                        t.buffered.extend(page);
                    }
                    Err(e) => {
                        // Tell the watcher, then keep trying: a database
                        // restart should not end every open tail.
                        t.page_was_full = false;
                        let msg = serde_json::json!({"error": e.public_message()}).to_string();
                        return Some((Ok(Event::default().event("error").data(msg)), t));
                    }
                }
            }
        })
    }
}

/// The tail's filter, applied to each event read (the query endpoints
/// filter in SQL instead).
fn matches(f: &AuditFilter, s: &StoredEvent) -> bool {
    let e = &s.event;
    let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    eq(&f.subject, &e.subject)
        && eq(&f.api_key_id, &e.api_key_id)
        && eq(&f.role, &e.role)
        && eq(&f.tool, &e.tool)
        && eq(&f.backend, &e.backend)
        && eq(&f.proxy_id, &e.proxy_id)
        && eq(&f.request_id, &e.request_id)
        && eq(&f.session_id, &e.session_id)
        && f.outcome.as_deref().is_none_or(|o| {
            o == outcome_str(Outcome::try_from(e.outcome).unwrap_or(Outcome::Unspecified))
        })
        && (!f.chain_broken_only || !s.chain_ok)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GapView {
    pub proxy_id: String,
    pub epoch: u64,
    /// The missing sequence numbers, both ends included.
    pub from_seq: u64,
    pub to_seq: u64,
    pub detected_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GapList {
    pub gaps: Vec<GapView>,
}

/// Sequence numbers missing from proxies' audit chains: events a proxy
/// recorded that have not (yet) arrived.
#[utoipa::path(get, path = "/api/v1/audit/gaps", tag = "audit",
    params(("proxy_id" = Option<String>, Query, description = "only this proxy")),
    responses((status = 200, body = GapList), (status = 400, body = ErrorBody)))]
async fn gaps(State(state): State<AppState>, mut params: Params) -> Result<Json<GapList>> {
    let proxy_id = params.string("proxy_id");
    params.finish()?;
    let gaps = state.store.audit_gaps(proxy_id.as_deref()).await?;
    Ok(Json(GapList {
        gaps: gaps
            .into_iter()
            .map(|g| {
                let Gap {
                    proxy_id,
                    epoch,
                    from_seq,
                    to_seq,
                    detected_at_us,
                } = g;
                GapView {
                    proxy_id,
                    epoch,
                    from_seq,
                    to_seq,
                    detected_at: rfc3339(from_us(detected_at_us)),
                }
            })
            .collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VerifyView {
    /// Whether every stored chain checked out.
    pub ok: bool,
    pub chains: u64,
    pub events: u64,
    /// One line per problem: a content/hash mismatch, a broken link, a
    /// reused or missing sequence number.
    pub problems: Vec<String>,
}

/// Re-check every stored audit chain: each event's hash against its
/// content, each link, each sequence. Reads the whole table.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    params(("proxy_id" = Option<String>, Query, description = "only this proxy's chains")),
    responses((status = 200, body = VerifyView), (status = 400, body = ErrorBody)))]
async fn verify(State(state): State<AppState>, mut params: Params) -> Result<Json<VerifyView>> {
    let proxy_id = params.string("proxy_id");
    params.finish()?;
    let VerifyReport {
        chains,
        events,
        problems,
    } = state.store.verify_chains(proxy_id.as_deref()).await?;
    Ok(Json(VerifyView {
        ok: problems.is_empty(),
        chains,
        events,
        problems,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub proxy_id: String,
    pub event_id: String,
    /// Why ingest refused the event, naming the field.
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
}

/// Audit events refused on ingest, newest first, with the reason.
#[utoipa::path(get, path = "/api/v1/audit/dead-letters", tag = "audit",
    params(("limit" = Option<u32>, Query, description = "1..=1000, default 100")),
    responses((status = 200, body = DeadLetterList), (status = 400, body = ErrorBody)))]
async fn dead_letters(
    State(state): State<AppState>,
    mut params: Params,
) -> Result<Json<DeadLetterList>> {
    let limit = params.u32("limit").unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        params.reject("limit", format!("must be between 1 and {MAX_PAGE}"));
    }
    params.finish()?;
    let rows = state.store.dead_letters(limit).await?;
    Ok(Json(DeadLetterList {
        dead_letters: rows
            .into_iter()
            .map(|(proxy_id, event_id, reason)| DeadLetterView {
                proxy_id,
                event_id,
                reason,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let mut out = Vec::new();
        Cell::Text("plain".into()).write(&mut out);
        out.push(b'|');
        Cell::Text("a,\"b\"".into()).write(&mut out);
        out.push(b'|');
        Cell::Text("=HYPERLINK(\"x\")".into()).write(&mut out);
        out.push(b'|');
        Cell::Number("-32600".into()).write(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain|\"a,\"\"b\"\"\"|\"'=HYPERLINK(\"\"x\"\")\"|-32600"
        );
    }

    #[test]
    fn positions_round_trip() {
        let id = uuid::Uuid::now_v7();
        let s = position_id(42, &id.to_string());
        assert_eq!(parse_position(&s), Some((42, id)));
        assert_eq!(parse_position("nope"), None);
    }
}
