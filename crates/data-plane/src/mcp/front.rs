//! The Streamable HTTP endpoint toward agents (`/mcp`), for both eras.
//!
//! Each POST is handled in this order: edge checks (Origin 403, Host 421),
//! body limit (413), the 2026-07-28 header/body agreement (400, -32020,
//! before any policy is consulted), the policy (503 without one), JSON-RPC
//! framing (-32700, -32600), authentication (401), the legacy session
//! (404 unknown, 403 another principal's), then the method. Tool calls go
//! through [`crate::stack`]; everything else is answered here or forwarded.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use futures::stream::BoxStream;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Value, json};

use crate::audit::AuditSink;
use crate::audit::event::CallAudit;
use crate::clock::Clock;
use crate::error::ProxyError;
use crate::gate::authn::{Principal, authenticate};
use crate::gate::rate_limit::RateLimiter;
use crate::mcp::edge::{EdgeRefusal, EdgeRules};
use crate::mcp::federation::{self, ListKind, Owners};
use crate::mcp::jsonrpc::{
    self, BATCH_VERSION, Kind, LEGACY_VERSIONS, META_CLIENT_INFO, META_VERSION, MODERN_VERSION,
    error_body, result_body,
};
use crate::mcp::raw;
use crate::mcp::session::{SessionState, audit_id};
use crate::policy::watch::Backend;
use crate::policy::{PolicyReader, Snapshot};
use crate::stack;
use crate::upstream::{Reply, Route, TextStream, UpstreamError};

/// Shared by every request of one server (HTTP or stdio front).
pub struct AppState {
    pub reader: PolicyReader,
    pub sink: Arc<dyn AuditSink>,
    pub limiter: RateLimiter,
    pub clock: Arc<dyn Clock>,
    pub edge: EdgeRules,
    pub max_body: usize,
    pub public_url: String,
    pub mcp_path: String,
    pub owners: Owners,
}

impl AppState {
    pub fn new(
        config: &crate::config::Config,
        reader: PolicyReader,
        sink: Arc<dyn AuditSink>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            reader,
            sink,
            limiter: RateLimiter::new(clock.clone()),
            clock,
            edge: EdgeRules::from_config(config),
            max_body: config.max_body_bytes,
            public_url: config.public_url.clone(),
            mcp_path: config.mcp_path.clone(),
            owners: Owners::default(),
        }
    }
}

/// What the request path answers, before it becomes HTTP.
pub enum Answer {
    Json {
        status: StatusCode,
        body: Value,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// One JSON-RPC message already written out (status 200): a plain
    /// result passed through (see [`crate::mcp::raw`]).
    Raw(Bytes),
    /// Messages relayed as SSE events, one by one, as they come, each
    /// already written out as one line of JSON.
    Stream(BoxStream<'static, Bytes>),
    Accepted,
}

impl Answer {
    pub fn ok(body: Value) -> Self {
        Answer::Json {
            status: StatusCode::OK,
            body,
            headers: Vec::new(),
        }
    }

    pub fn error(id: Value, err: ProxyError) -> Self {
        let mut headers = Vec::new();
        if let ProxyError::RateLimited(r) = &err
            && let Ok(v) = HeaderValue::from_str(&r.retry_after_secs().to_string())
        {
            headers.push((http::header::RETRY_AFTER, v));
        }
        if !matches!(err, ProxyError::Upstream(_)) {
            tracing::debug!(error = %err, "request refused");
        } else {
            tracing::warn!(error = %err, "upstream failed");
        }
        Answer::Json {
            status: err.status(),
            body: error_body(id, err.code(), &err.client_message()),
            headers,
        }
    }

    fn into_response(self, session: Option<&str>) -> Response {
        let mut resp = match self {
            Answer::Json {
                status,
                body,
                headers,
            } => {
                let mut r = (status, json_bytes(&body)).into_response();
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                for (k, v) in headers {
                    r.headers_mut().insert(k, v);
                }
                r
            }
            Answer::Raw(body) => {
                let mut r = (StatusCode::OK, body).into_response();
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Answer::Stream(s) => sse_response(s),
            Answer::Accepted => StatusCode::ACCEPTED.into_response(),
        };
        if let Some(s) = session
            && let Ok(v) = HeaderValue::from_str(s)
        {
            resp.headers_mut().insert("mcp-session-id", v);
        }
        resp
    }

    /// The single message of this answer, for batches (streams are read to
    /// their last message).
    async fn into_message(self) -> Option<Value> {
        match self {
            Answer::Json { body, .. } => Some(body),
            Answer::Raw(body) => serde_json::from_slice(&body).ok(),
            Answer::Accepted => None,
            Answer::Stream(s) => s
                .take(10_000)
                .collect::<Vec<_>>()
                .await
                .pop()
                .and_then(|b| serde_json::from_slice(&b).ok()),
        }
    }
}

fn json_bytes(v: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn sse_response(s: BoxStream<'static, Bytes>) -> Response {
    let body = Body::from_stream(s.map(|json| {
        let mut out = Vec::with_capacity(json.len() + 24);
        out.extend_from_slice(b"event: message\ndata: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Ok::<_, Infallible>(Bytes::from(out))
    }));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    // Tells nginx-style intermediaries not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// One request, authenticated, with its policy version and session.
pub struct Call<'a> {
    pub st: &'a AppState,
    pub snap: Arc<Snapshot>,
    pub principal: Principal,
    /// The legacy session and its audit id; `None` in the stateless era.
    pub session: Option<(SessionState, String)>,
    pub request_id: &'a str,
    pub protocol_version: String,
    pub client_name: String,
    /// The client's `Mcp-Param-*` headers (2026-07-28), passed on as sent.
    pub param_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Call<'_> {
    pub fn is_modern(&self) -> bool {
        self.session.is_none()
    }

    pub fn audit(&self, method: &str) -> CallAudit {
        let mut a = CallAudit::new(
            self.st.sink.clone(),
            self.request_id,
            method,
            self.st.clock.now_us(),
        );
        a.principal(&self.principal);
        if let Some((_, id)) = &self.session {
            a.session(id);
        }
        a.client(&self.protocol_version, &self.client_name);
        a
    }

    pub fn route<'b>(&'b self, backend: &Backend) -> Result<Route<'b>, UpstreamError> {
        match &self.session {
            None => Ok(Route::Stateless(&self.param_headers)),
            Some((s, _)) => s
                .upstream(&backend.name)
                .map(Route::Session)
                .ok_or(UpstreamError::NotInSession),
        }
    }

    /// The backend and upstream name behind a name the client used; lists
    /// the upstreams once if the name is not known yet.
    pub async fn resolve(&self, kind: ListKind, shown: &str) -> Option<(&Backend, String)> {
        if let Some(found) = federation::resolve(&self.snap, &self.st.owners, kind, shown) {
            return Some(found);
        }
        let probe =
            json!({"jsonrpc":"2.0","id":"sentinel-resolve","method":kind.method(),"params":{}});
        let lists = self.fan_out(kind, &probe).await;
        federation::merge(&self.snap, &self.principal, &self.st.owners, kind, lists);
        federation::resolve(&self.snap, &self.st.owners, kind, shown)
    }

    /// The lists of every backend (following pagination up to 20 pages).
    async fn fan_out(&self, kind: ListKind, msg: &Value) -> Vec<(String, Vec<Value>)> {
        let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
        let futs = self.snap.backends.iter().map(|b| {
            let mut params = params.clone();
            async move {
                let route = self.route(b).ok()?;
                let mut items = Vec::new();
                if let Some(p) = params.as_object_mut() {
                    p.remove("cursor");
                }
                for page in 0..20 {
                    let m = json!({"jsonrpc":"2.0","id":format!("sentinel-list-{page}"),"method":kind.method(),"params":params});
                    let reply = match b.upstream.send(&m, route).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(backend = %b.name, error = %e, method = kind.method(), "list failed");
                            break;
                        }
                    };
                    let Ok(v) = reply.response_to(&m["id"], b.timeout).await else {
                        break;
                    };
                    let Some(result) = v.get("result") else { break };
                    if let Some(a) = result.get(kind.field()).and_then(Value::as_array) {
                        items.extend(a.iter().cloned());
                    }
                    match result.get("nextCursor") {
                        Some(c) if !c.is_null() => params["cursor"] = c.clone(),
                        _ => break,
                    }
                }
                Some((b.name.clone(), items))
            }
        });
        futures::future::join_all(futs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn list(&self, kind: ListKind, msg: Value) -> Answer {
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        let lists = self.fan_out(kind, &msg).await;
        let merged = federation::merge(&self.snap, &self.principal, &self.st.owners, kind, lists);
        let mut result = json!({ kind.field(): merged });
        if self.is_modern() {
            // 2026-07-28 list results carry caching directives; the merged
            // list is filtered per principal, so it is private and not cached.
            result["resultType"] = json!("complete");
            result["ttlMs"] = json!(0);
            result["cacheScope"] = json!("private");
        }
        Answer::ok(result_body(id, result))
    }

    /// Sends `msg` to every backend of the session, answers nothing.
    async fn broadcast(&self, msg: &Value) {
        let futs = self.snap.backends.iter().map(|b| async move {
            if let Ok(route) = self.route(b)
                && let Err(e) = b.upstream.send(msg, route).await
            {
                tracing::debug!(backend = %b.name, error = %e, "notification not delivered");
            }
        });
        futures::future::join_all(futs).await;
    }

    /// One message of the request (a batch has several).
    pub(crate) async fn dispatch(&self, msg: Value, kind: Kind) -> Answer {
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        match kind {
            Kind::Notification => {
                if jsonrpc::method(&msg) != "notifications/initialized" {
                    self.broadcast(&msg).await;
                }
                return Answer::Accepted;
            }
            Kind::Response => {
                self.answer_upstream(msg).await;
                return Answer::Accepted;
            }
            Kind::Request => {}
        }
        let method = jsonrpc::method(&msg).to_string();
        if method == "tools/call" {
            return stack::tools_call(self, msg).await;
        }
        // Methods other than tools/call are audited only when the policy
        // asks, and rate limited only by limits that name them.
        let mut audit = self.snap.audit.extra_methods.contains(&method).then(|| {
            let mut a = self.audit(&method);
            a.verdict(
                "authenticate",
                true,
                format!(
                    "{} {}",
                    self.principal.method().as_str(),
                    self.principal.binding()
                ),
            );
            a
        });
        if let Err(r) = self
            .st
            .limiter
            .check(&self.principal, &self.snap, &method, None)
        {
            let err = ProxyError::RateLimited(r);
            if let Some(mut a) = audit {
                a.verdict("rate_limit", false, err.to_string());
                a.refuse(&err);
            }
            return Answer::error(id, err);
        }
        let answer = match method.as_str() {
            "prompts/get" => {
                return stack::route_named(self, ListKind::Prompts, msg, audit).await;
            }
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                return stack::route_named(self, ListKind::Resources, msg, audit).await;
            }
            m => match ListKind::from_method(m) {
                Some(kind) => self.list(kind, msg).await,
                None => self.local(&method, id, &msg).await,
            },
        };
        if let (Some(a), Answer::Json { status, body, .. }) = (audit.take(), &answer) {
            a.finish(status.as_u16(), body);
        }
        answer
    }

    /// A 2026-07-28 `subscriptions/listen`: the union of the streams of the
    /// upstreams that speak 2026-07-28, relayed as they come (closing the
    /// client's stream closes the upstreams'). Legacy upstreams have no such
    /// stream for a stateless client.
    async fn listen_modern(&self, id: Value, msg: &Value) -> Answer {
        let mut streams = Vec::new();
        let mut single = None;
        for b in &self.snap.backends {
            if b.upstream.stateless_is_legacy().await {
                continue;
            }
            match b.upstream.send(msg, Route::Stateless(&[])).await {
                Ok(Reply::Stream(s)) => streams.push(
                    s.filter_map(|text| async move {
                        let v: Value = serde_json::from_str(&text.ok()?).ok()?;
                        Some(json_bytes(&v))
                    })
                    .boxed(),
                ),
                Ok(Reply::Json(v)) => single = Some(v),
                Ok(Reply::Raw(b)) => single = crate::upstream::parse_message(&b).ok(),
                Ok(Reply::Accepted) => {}
                Err(e) => tracing::warn!(backend = %b.name, error = %e, "listen failed"),
            }
        }
        if streams.is_empty() {
            return match single {
                Some(v) => Answer::ok(v),
                None => Answer::error(
                    id,
                    ProxyError::MethodNotFound(
                        "subscriptions/listen (no upstream offers it)".into(),
                    ),
                ),
            };
        }
        Answer::Stream(futures::stream::select_all(streams).boxed())
    }

    /// Methods the proxy answers itself.
    async fn local(&self, method: &str, id: Value, msg: &Value) -> Answer {
        match method {
            "ping" => Answer::ok(result_body(id, json!({}))),
            "server/discover" => Answer::ok(result_body(id, discover_result())),
            "subscriptions/listen" if self.is_modern() => self.listen_modern(id, msg).await,
            "logging/setLevel" => {
                self.broadcast(msg).await;
                Answer::ok(result_body(id, json!({})))
            }
            "initialize" => Answer::error(
                id,
                ProxyError::InvalidRequest("session already initialized".into()),
            ),
            other => Answer::error(id, ProxyError::MethodNotFound(other.to_string())),
        }
    }

    /// A client's answer to a request an upstream sent it: the id names the
    /// upstream (see [`Relay`]).
    async fn answer_upstream(&self, mut msg: Value) {
        let Some((backend, original)) = msg
            .get("id")
            .and_then(Value::as_str)
            .and_then(decode_upstream_id)
        else {
            tracing::debug!("client answered a request no upstream sent");
            return;
        };
        let Some(b) = self.snap.backend(&backend) else {
            return;
        };
        msg["id"] = original;
        if let Ok(route) = self.route(b)
            && let Err(e) = b.upstream.send(&msg, route).await
        {
            tracing::warn!(backend = %b.name, error = %e, "client answer not delivered");
        }
    }
}

const UPSTREAM_ID_PREFIX: &str = "sntl~";

/// Ids of upstream-to-client requests carry the upstream's name, so the
/// client's answer finds its way back without any state in the proxy.
fn encode_upstream_id(backend: &str, id: &Value) -> Value {
    Value::String(format!("{UPSTREAM_ID_PREFIX}{backend}~{id}"))
}

fn decode_upstream_id(s: &str) -> Option<(String, Value)> {
    let rest = s.strip_prefix(UPSTREAM_ID_PREFIX)?;
    let (backend, original) = rest.split_once('~')?;
    Some((backend.to_string(), serde_json::from_str(original).ok()?))
}

/// Relays an upstream's reply to one request to the client.
pub struct Relay {
    pub backend: String,
    /// The client's request id.
    pub id: Value,
    /// Adds `resultType: complete` (the client is 2026-07-28, the upstream
    /// legacy).
    pub add_result_type: bool,
    /// With `add_result_type`: the result is a cacheable one (resources/read)
    /// and needs the 2026-07-28 caching directives.
    pub cacheable: bool,
    /// The call's audit, finished when the response passes by.
    pub audit: Option<CallAudit>,
    pub timeout: std::time::Duration,
    /// Where `notifications/cancelled` goes if the client leaves before the
    /// answer: the upstream and its legacy session. (In 2026-07-28, closing
    /// the stream is itself the cancellation.) Taken once the answer passed.
    pub cancel: Option<(
        Arc<crate::upstream::Upstream>,
        crate::mcp::session::UpstreamSession,
    )>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let Some((upstream, session)) = self.cancel.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
            "params": {"requestId": self.id, "reason": "the client closed the stream"}});
        rt.spawn(async move {
            if let Err(e) = upstream.send(&note, Route::Session(&session)).await {
                tracing::debug!(error = %e, "cancellation not delivered");
            }
        });
    }
}

impl Relay {
    fn transform(&mut self, mut msg: Value) -> Value {
        let is_answer = msg.get("result").is_some() || msg.get("error").is_some();
        if msg.get("method").is_some() {
            if let Some(id) = msg.get("id").cloned() {
                msg["id"] = encode_upstream_id(&self.backend, &id);
            }
        } else if is_answer && msg.get("id") == Some(&self.id) {
            if self.add_result_type
                && let Some(r) = msg.get_mut("result").and_then(Value::as_object_mut)
            {
                r.entry("resultType").or_insert(json!("complete"));
                if self.cacheable {
                    r.entry("ttlMs").or_insert(json!(0));
                    r.entry("cacheScope").or_insert(json!("private"));
                }
            }
            if let Some(a) = self.audit.take() {
                a.finish(200, &msg);
            }
            self.cancel = None;
        }
        msg
    }

    pub fn answer(mut self, reply: Reply) -> Answer {
        match reply {
            Reply::Raw(body) => {
                // The common answer: its result goes to the client and to
                // the audit record as the upstream wrote it.
                if !self.add_result_type
                    && let Some(p) = raw::plain(&body)
                {
                    self.cancel = None;
                    if let Some(a) = self.audit.take() {
                        a.finish_result(200, p.result.get());
                    }
                    return Answer::Raw(raw::result_message(&self.id, p.result));
                }
                match crate::upstream::parse_message(&body) {
                    Ok(v) => self.answer(Reply::Json(v)),
                    Err(e) => self.failed(e),
                }
            }
            Reply::Json(mut v) if v.is_object() => {
                // A JSON reply is the answer to this request, whatever id
                // the upstream put on it (some answer errors with a null id).
                if (v.get("result").is_some() || v.get("error").is_some())
                    && v.get("method").is_none()
                    && v.get("id") != Some(&self.id)
                {
                    v["id"] = self.id.clone();
                }
                Answer::ok(self.transform(v))
            }
            Reply::Json(_) | Reply::Accepted => {
                self.failed(UpstreamError::Garbage("no response to the request".into()))
            }
            Reply::Stream(s) => Answer::Stream(self.stream(s)),
        }
    }

    /// The upstream's reply is no answer: the call fails as an upstream
    /// error, to the client and in the audit record.
    fn failed(mut self, e: UpstreamError) -> Answer {
        self.cancel = None;
        let err = ProxyError::Upstream(e);
        if let Some(a) = self.audit.take() {
            a.fail(&err);
        }
        Answer::error(self.id.clone(), err)
    }

    /// One message of an SSE reply, written out for the client: the
    /// plain response to this request as the upstream wrote it, anything
    /// else parsed and transformed.
    fn relay_text(&mut self, text: String) -> Result<Bytes, UpstreamError> {
        let passed = !self.add_result_type
            && raw::fits_one_line(&text)
            && match raw::plain(text.as_bytes()) {
                Some(p) if p.id.is_some_and(|id| raw::same_id(id, &self.id)) => {
                    self.cancel = None;
                    if let Some(a) = self.audit.take() {
                        a.finish_result(200, p.result.get());
                    }
                    true
                }
                _ => false,
            };
        if passed {
            return Ok(Bytes::from(text));
        }
        let v = crate::upstream::parse_event(&text)?;
        Ok(json_bytes(&self.transform(v)))
    }

    fn stream(self, s: TextStream) -> BoxStream<'static, Bytes> {
        futures::stream::unfold((s, Some(self)), |(mut s, relay)| async move {
            let mut relay = relay?;
            let item = match s.next().await {
                None => None,
                Some(Ok(text)) => Some(relay.relay_text(text)),
                Some(Err(e)) => Some(Err(e)),
            };
            match item {
                Some(Ok(out)) => Some((out, (s, Some(relay)))),
                Some(Err(e)) => {
                    relay.cancel = None;
                    let err = ProxyError::Upstream(e);
                    let body = error_body(relay.id.clone(), err.code(), &err.client_message());
                    if let Some(a) = relay.audit.take() {
                        a.fail(&err);
                        Some((json_bytes(&body), (s, None)))
                    } else {
                        // The response already went by; nothing to add.
                        None
                    }
                }
                None => {
                    relay.cancel = None;
                    if let Some(a) = relay.audit.take() {
                        let err = ProxyError::Upstream(UpstreamError::Garbage(
                            "stream ended without a response".into(),
                        ));
                        let body = error_body(relay.id.clone(), err.code(), &err.client_message());
                        a.fail(&err);
                        return Some((json_bytes(&body), (s, None)));
                    }
                    None
                }
            }
        })
        .boxed()
    }
}

/// The answer to `server/discover`: this proxy as one virtual server.
fn discover_result() -> Value {
    let info = server_info();
    json!({
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "supportedVersions": [MODERN_VERSION],
        "capabilities": capabilities(),
        "serverInfo": info,
        "_meta": {"io.modelcontextprotocol/serverInfo": info},
    })
}

fn server_info() -> Value {
    json!({"name": "sentinel", "version": env!("CARGO_PKG_VERSION")})
}

fn capabilities() -> Value {
    json!({
        "tools": {"listChanged": true},
        "prompts": {"listChanged": true},
        "resources": {"listChanged": true, "subscribe": true},
        "logging": {},
    })
}

// ---------------------------------------------------------------------------
// HTTP handlers
// ---------------------------------------------------------------------------

fn request_id() -> String {
    sentinel_shared::audit::uuid_v7_now().to_string()
}

fn with_request_id(mut r: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-request-id", v);
    }
    r
}

fn plain_error(status: StatusCode, code: i64, message: &str) -> Response {
    Answer::Json {
        status,
        body: error_body(Value::Null, code, message),
        headers: Vec::new(),
    }
    .into_response(None)
}

fn edge_refusal(e: EdgeRefusal) -> Response {
    match e {
        EdgeRefusal::Origin(o) => {
            tracing::info!(origin = %o, "origin refused");
            plain_error(
                StatusCode::FORBIDDEN,
                crate::error::code::FORBIDDEN,
                "origin not allowed",
            )
        }
        EdgeRefusal::Host(h) => {
            tracing::info!(host = %h, "host refused");
            plain_error(
                StatusCode::MISDIRECTED_REQUEST,
                crate::error::code::INVALID_REQUEST,
                "host not allowed",
            )
        }
    }
}

/// 401 with the RFC 9728 pointer MCP clients follow to find how to log in.
fn unauthorized(st: &AppState, headers: &HeaderMap, id: Value, err: &ProxyError) -> Response {
    let mut www = format!("Bearer resource_metadata=\"{}\"", metadata_url(st, headers));
    if let ProxyError::Unauthenticated(u) = err
        && u.presented()
    {
        www.push_str(", error=\"invalid_token\"");
    }
    let mut r = Answer::Json {
        status: StatusCode::UNAUTHORIZED,
        body: error_body(id, err.code(), &err.client_message()),
        headers: Vec::new(),
    }
    .into_response(None);
    if let Ok(v) = HeaderValue::from_str(&www) {
        r.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    r
}

fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    if !st.public_url.is_empty() {
        return st.public_url.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn metadata_url(st: &AppState, headers: &HeaderMap) -> String {
    format!(
        "{}/.well-known/oauth-protected-resource{}",
        base_url(st, headers),
        st.mcp_path
    )
}

/// RFC 9728 protected-resource metadata.
pub async fn resource_metadata(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let servers: Vec<String> = st
        .reader
        .current()
        .map(|s| s.jwt.iter().map(|j| j.issuer.clone()).collect())
        .unwrap_or_default();
    let body = json!({
        "resource": format!("{}{}", base_url(&st, &headers), st.mcp_path),
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "Sentinel MCP gateway",
    });
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        json_bytes(&body),
    )
        .into_response()
}

/// The 2026-07-28 rule: headers that mirror the body must agree with it.
/// Checked before any policy, so a proxy never authorizes from headers.
fn check_modern_headers(headers: &HeaderMap, msg: &Value) -> Result<(), ProxyError> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let method = jsonrpc::method(msg);
    let meta_version = msg["params"]["_meta"][META_VERSION].as_str();
    if header("mcp-protocol-version") != meta_version {
        return Err(ProxyError::HeaderMismatch(
            "MCP-Protocol-Version header does not match the request's protocol version".into(),
        ));
    }
    if header("mcp-method") != Some(method) {
        return Err(ProxyError::HeaderMismatch(
            "Mcp-Method header does not match the request body's method".into(),
        ));
    }
    if let Some(body_name) = jsonrpc::name_param(method, msg) {
        let shown = header("mcp-name").map(decode_header_value);
        if shown.as_deref() != Some(body_name) {
            return Err(ProxyError::HeaderMismatch(
                "Mcp-Name header does not match the request body".into(),
            ));
        }
    }
    Ok(())
}

fn decode_header_value(v: &str) -> String {
    if let Some(inner) = v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
        && let Ok(bytes) = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(inner)
        }
        && let Ok(s) = String::from_utf8(bytes)
    {
        return s;
    }
    v.to_string()
}

fn is_modern_request(headers: &HeaderMap, msg: &Value) -> bool {
    headers
        .get("mcp-protocol-version")
        .is_some_and(|v| v.as_bytes() == MODERN_VERSION.as_bytes())
        || msg["params"]["_meta"].get(META_VERSION).is_some()
}

pub async fn post(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let rid = request_id();
    let resp = handle_post(&st, &headers, body, &rid).await;
    with_request_id(resp, &rid)
}

async fn handle_post(st: &AppState, headers: &HeaderMap, body: Body, rid: &str) -> Response {
    if let Err(e) = st.edge.check(headers) {
        return edge_refusal(e);
    }
    let bytes = match axum::body::to_bytes(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return plain_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                crate::error::code::INVALID_REQUEST,
                "request body too large",
            );
        }
    };
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            let err = ProxyError::Parse(e.to_string());
            return plain_error(
                err.status(),
                err.code(),
                "parse error: body is not valid JSON",
            );
        }
    };
    let batch = value.is_array();
    let messages: Vec<Value> = match value {
        Value::Array(items) if !items.is_empty() && items.len() <= 100 => items,
        Value::Array(_) => {
            return plain_error(
                StatusCode::BAD_REQUEST,
                crate::error::code::INVALID_REQUEST,
                "a batch must hold 1 to 100 messages",
            );
        }
        other => vec![other],
    };
    let mut kinds = Vec::with_capacity(messages.len());
    for m in &messages {
        match jsonrpc::classify(m) {
            Ok(k) => kinds.push(k),
            Err(why) => {
                let err = ProxyError::InvalidRequest(why);
                let id = m.get("id").cloned().unwrap_or(Value::Null);
                return Answer::error(id, err).into_response(None);
            }
        }
    }
    let first = &messages[0];
    let modern = !batch && is_modern_request(headers, first);
    if modern && let Err(err) = check_modern_headers(headers, first) {
        let id = first.get("id").cloned().unwrap_or(Value::Null);
        return Answer::error(id, err).into_response(None);
    }
    let Some(snap) = st.reader.current() else {
        let err = ProxyError::NoPolicy;
        return plain_error(err.status(), err.code(), &err.client_message());
    };

    // Authenticate. A tools/call refused here still leaves its audit event.
    let principal = match authenticate(headers, &snap, st.clock.now_us()).await {
        Ok(p) => p,
        Err(u) => {
            let err = ProxyError::Unauthenticated(u);
            for m in messages
                .iter()
                .filter(|m| jsonrpc::method(m) == "tools/call")
            {
                let mut a = CallAudit::new(st.sink.clone(), rid, "tools/call", st.clock.now_us());
                if modern {
                    a.client(
                        MODERN_VERSION,
                        m["params"]["_meta"][META_CLIENT_INFO]["name"]
                            .as_str()
                            .unwrap_or(""),
                    );
                }
                a.arguments(m["params"].get("arguments"), &snap);
                stack::refuse_unauthenticated(a, m, &err);
            }
            let id = first.get("id").cloned().unwrap_or(Value::Null);
            return unauthorized(st, headers, id, &err);
        }
    };

    if modern {
        let call = Call {
            st,
            client_name: first["params"]["_meta"][META_CLIENT_INFO]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            snap,
            principal,
            session: None,
            request_id: rid,
            protocol_version: MODERN_VERSION.into(),
            param_headers: headers
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("mcp-param-"))
                .take(64)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let kind = kinds[0];
        let msg = messages.into_iter().next().unwrap_or(Value::Null);
        return call.dispatch(msg, kind).await.into_response(None);
    }

    // Legacy era. A version header, when sent, must name a version served.
    if let Some(v) = headers.get("mcp-protocol-version")
        && !LEGACY_VERSIONS.iter().any(|l| v.as_bytes() == l.as_bytes())
    {
        return plain_error(
            StatusCode::BAD_REQUEST,
            crate::error::code::INVALID_REQUEST,
            "unsupported MCP-Protocol-Version",
        );
    }
    let token = headers.get("mcp-session-id").and_then(|v| v.to_str().ok());
    let Some(token) = token else {
        if !batch && jsonrpc::method(first) == "initialize" && kinds[0] == Kind::Request {
            return initialize(st, &snap, &principal, first).await;
        }
        return plain_error(
            StatusCode::BAD_REQUEST,
            crate::error::code::INVALID_REQUEST,
            "missing Mcp-Session-Id: send initialize first, or use protocol 2026-07-28",
        );
    };
    let state = match open_session(&snap, &principal, token) {
        Ok(s) => s,
        Err(err) => {
            let id = first.get("id").cloned().unwrap_or(Value::Null);
            return Answer::error(id, err).into_response(None);
        }
    };
    if batch && state.protocol_version != BATCH_VERSION {
        return plain_error(
            StatusCode::BAD_REQUEST,
            crate::error::code::INVALID_REQUEST,
            "batches are only allowed in protocol version 2025-03-26",
        );
    }
    let call = Call {
        st,
        snap,
        principal,
        request_id: rid,
        protocol_version: state.protocol_version.clone(),
        client_name: state.client_name.clone(),
        session: Some((state, audit_id(token))),
        param_headers: Vec::new(),
    };
    if !batch {
        let msg = messages.into_iter().next().unwrap_or(Value::Null);
        return call.dispatch(msg, kinds[0]).await.into_response(None);
    }
    // A 2025-03-26 batch: every element is gated and audited on its own.
    let mut answers = Vec::new();
    for (m, k) in messages.into_iter().zip(kinds) {
        if let Some(a) = call.dispatch(m, k).await.into_message().await {
            answers.push(a);
        }
    }
    if answers.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    Answer::ok(Value::Array(answers)).into_response(None)
}

fn open_session(
    snap: &Snapshot,
    principal: &Principal,
    token: &str,
) -> Result<SessionState, ProxyError> {
    let sealer = snap.sealer.as_ref().ok_or(ProxyError::SessionNotFound)?;
    let state = sealer.open(token).map_err(|e| {
        tracing::debug!(error = %e, "session id refused");
        ProxyError::SessionNotFound
    })?;
    if state.binding != principal.binding() {
        tracing::warn!(presented_by = %principal.binding(), "session presented by another principal");
        return Err(ProxyError::SessionPrincipal);
    }
    Ok(state)
}

/// A legacy `initialize`: opens a session with every upstream and hands
/// the client their sealed sum.
async fn initialize(
    st: &AppState,
    snap: &Snapshot,
    principal: &Principal,
    msg: &Value,
) -> Response {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let Some(sealer) = snap.sealer.as_ref() else {
        return Answer::error(
            id,
            ProxyError::InvalidRequest(
                "this proxy has no session key; use protocol 2026-07-28".into(),
            ),
        )
        .into_response(None);
    };
    let (state, result) = open_upstreams(st, snap, principal, msg).await;
    let token = match sealer.seal(&state) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot seal session");
            return Answer::error(
                id,
                ProxyError::InvalidRequest("cannot open a session".into()),
            )
            .into_response(None);
        }
    };
    Answer::ok(result_body(id, result)).into_response(Some(&token))
}

/// The work of a legacy `initialize`: a session with every upstream (those
/// that fail are left out and their calls fail later), and the result the
/// client gets.
pub(crate) async fn open_upstreams(
    st: &AppState,
    snap: &Snapshot,
    principal: &Principal,
    msg: &Value,
) -> (SessionState, Value) {
    let requested = msg["params"]["protocolVersion"].as_str().unwrap_or("");
    let version = if LEGACY_VERSIONS.contains(&requested) {
        requested
    } else {
        LEGACY_VERSIONS[LEGACY_VERSIONS.len() - 1]
    };
    let mut params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
    params["protocolVersion"] = json!(version);
    let opened = futures::future::join_all(snap.backends.iter().map(|b| {
        let params = &params;
        async move { (b.name.clone(), b.upstream.open_session(params).await) }
    }))
    .await;
    let mut upstreams = Vec::with_capacity(opened.len());
    for (name, r) in opened {
        match r {
            Ok(s) => upstreams.push(s),
            Err(e) => {
                tracing::warn!(backend = %name, error = %e, "upstream left out of the session")
            }
        }
    }
    let state = SessionState {
        binding: principal.binding().to_string(),
        protocol_version: version.to_string(),
        client_name: msg["params"]["clientInfo"]["name"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(128)
            .collect(),
        upstreams,
        created_us: st.clock.now_us(),
    };
    let result = json!({
        "protocolVersion": version,
        "capabilities": capabilities(),
        "serverInfo": server_info(),
        "instructions": "Sentinel: tools of several MCP servers, with policy and audit.",
    });
    (state, result)
}

/// The upstreams' own streams of a legacy session (GET listen streams; a
/// stdio child's notifications), with request ids marked by upstream.
pub(crate) async fn listen_all(
    snap: &Snapshot,
    state: &SessionState,
) -> Vec<BoxStream<'static, Value>> {
    let opened = futures::future::join_all(state.upstreams.iter().filter_map(|u| {
        let b = snap.backend(&u.backend)?;
        Some(async move {
            b.upstream.listen(u).await.map(|s| {
                let name = b.name.clone();
                s.filter_map(move |m| {
                    let name = name.clone();
                    async move {
                        let mut m = m.ok()?;
                        if m.get("method").is_some()
                            && let Some(id) = m.get("id").cloned()
                        {
                            m["id"] = encode_upstream_id(&name, &id);
                        }
                        Some(m)
                    }
                })
                .boxed()
            })
        })
    }))
    .await;
    opened.into_iter().flatten().collect()
}

/// GET: the legacy listen stream, the union of the upstreams' streams.
pub async fn get(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let rid = request_id();
    let resp = handle_get(&st, &headers).await;
    with_request_id(resp, &rid)
}

async fn handle_get(st: &AppState, headers: &HeaderMap) -> Response {
    let (snap, _principal, state) = match session_request(st, headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let streams = listen_all(&snap, &state).await;
    if streams.is_empty() {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    sse_response(
        futures::stream::select_all(streams)
            .map(|m| json_bytes(&m))
            .boxed(),
    )
}

/// DELETE: ends the upstream sessions.
pub async fn delete(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let (snap, _principal, state) = match session_request(&st, &headers).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    futures::future::join_all(state.upstreams.iter().filter_map(|u| {
        let b = snap.backend(&u.backend)?;
        Some(async move { b.upstream.end(u).await })
    }))
    .await;
    StatusCode::OK.into_response()
}

/// The common start of GET and DELETE: edge, policy, credential, session.
#[allow(clippy::result_large_err)]
async fn session_request(
    st: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<Snapshot>, Principal, SessionState), Response> {
    st.edge.check(headers).map_err(edge_refusal)?;
    let snap = st.reader.current().ok_or_else(|| {
        let err = ProxyError::NoPolicy;
        plain_error(err.status(), err.code(), &err.client_message())
    })?;
    let principal = authenticate(headers, &snap, st.clock.now_us())
        .await
        .map_err(|u| unauthorized(st, headers, Value::Null, &ProxyError::Unauthenticated(u)))?;
    let Some(token) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) else {
        return Err(StatusCode::METHOD_NOT_ALLOWED.into_response());
    };
    let state = open_session(&snap, &principal, token)
        .map_err(|e| Answer::error(Value::Null, e).into_response(None))?;
    Ok((snap, principal, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_ids_round_trip() {
        for id in [json!(1), json!("a~b"), json!(-3.5)] {
            let enc = encode_upstream_id("every-thing", &id);
            let (b, back) = decode_upstream_id(enc.as_str().unwrap()).unwrap();
            assert_eq!((b.as_str(), back), ("every-thing", id));
        }
        assert!(decode_upstream_id("7").is_none());
    }

    #[test]
    fn modern_header_rules() {
        let msg = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"b__echo","_meta":{META_VERSION: MODERN_VERSION}}});
        let mut h = HeaderMap::new();
        h.insert(
            "mcp-protocol-version",
            HeaderValue::from_static(MODERN_VERSION),
        );
        h.insert("mcp-method", HeaderValue::from_static("tools/call"));
        h.insert("mcp-name", HeaderValue::from_static("b__echo"));
        assert!(check_modern_headers(&h, &msg).is_ok());
        let mut wrong = h.clone();
        wrong.insert("mcp-name", HeaderValue::from_static("b__other"));
        assert!(matches!(
            check_modern_headers(&wrong, &msg),
            Err(ProxyError::HeaderMismatch(_))
        ));
        let mut missing = h.clone();
        missing.remove("mcp-name");
        assert!(check_modern_headers(&missing, &msg).is_err());
        let mut method = h.clone();
        method.insert("mcp-method", HeaderValue::from_static("tools/list"));
        assert!(check_modern_headers(&method, &msg).is_err());
        let mut b64 = h;
        b64.insert(
            "mcp-name",
            HeaderValue::from_static("=?base64?Yl9fZWNobw==?="),
        );
        assert!(check_modern_headers(&b64, &msg).is_ok());
    }
}
