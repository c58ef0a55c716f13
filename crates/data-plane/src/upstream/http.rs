//! A Streamable HTTP upstream.
//!
//! Connections are pooled by one shared `reqwest::Client`. The upstream's
//! era is learned once with a `server/discover` probe: a 2026-07-28 upstream
//! gets stateless requests as they are; a legacy one gets them inside a
//! service session the proxy opens for itself (any replica can open its
//! own, so this is not state another replica would miss).
//!
//! Only the policy's headers and the MCP transport headers are sent: the
//! client's own credentials and hop-by-hop headers never reach an upstream,
//! and `Host` is the upstream's own (reqwest derives it from the URL).

use std::sync::RwLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use sentinel_shared::proto;

use super::{MessageStream, Reply, Route, TextStream, UpstreamError};
use crate::mcp::jsonrpc::{MODERN_VERSION, name_param};
use crate::mcp::session::UpstreamSession;

/// Version the proxy asks for in its own service sessions.
const SERVICE_VERSION: &str = "2025-11-25";
/// Largest JSON answer read from an upstream.
const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

const ERA_UNKNOWN: u8 = 0;
const ERA_LEGACY: u8 = 1;
const ERA_MODERN: u8 = 2;

/// The shared HTTP client: pooled, HTTP/1.1 and HTTP/2, no system proxy
/// (upstreams are reached directly), no redirects: the policy names where
/// a backend is, and an upstream answering 3xx must not steer calls (and
/// the policy's upstream headers) somewhere else. A 3xx is an upstream
/// error like any other non-2xx status. (It also spares a URL re-parse per
/// request in the redirect layer.)
pub fn client() -> reqwest::Client {
    // reqwest is built without a default crypto provider; install ring's
    // once (a second install is refused harmlessly).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(64)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "http client with options failed; using defaults");
            reqwest::Client::new()
        })
}

pub struct HttpUpstream {
    name: String,
    url: reqwest::Url,
    /// Headers from policy (the upstream's own credential, etc.).
    headers: HeaderMap,
    client: reqwest::Client,
    timeout: Duration,
    era: AtomicU8,
    /// The proxy's own legacy session, for stateless clients.
    service: RwLock<Option<UpstreamSession>>,
    service_init: tokio::sync::Mutex<()>,
}

impl HttpUpstream {
    pub fn new(
        name: &str,
        def: &proto::HttpBackend,
        client: reqwest::Client,
        timeout: Duration,
    ) -> Result<Self, String> {
        let url = reqwest::Url::parse(&def.url).map_err(|e| format!("url: {e}"))?;
        let mut headers = HeaderMap::new();
        for h in &def.headers {
            let n = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header name '{}'", h.name))?;
            let v = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header value of '{}'", h.name))?;
            headers.insert(n, v);
        }
        Ok(Self {
            name: name.to_string(),
            url,
            headers,
            client,
            timeout,
            era: AtomicU8::new(ERA_UNKNOWN),
            service: RwLock::new(None),
            service_init: tokio::sync::Mutex::new(()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn send(&self, msg: &Value, route: Route<'_>) -> Result<Reply, UpstreamError> {
        match route {
            Route::Session(s) => self
                .post(
                    msg,
                    s.session_id.as_deref(),
                    &s.protocol_version,
                    false,
                    &[],
                )
                .await
                .map(|(r, _)| r),
            Route::Stateless(params) => {
                if self.is_modern().await {
                    return self
                        .post(msg, None, MODERN_VERSION, true, params)
                        .await
                        .map(|(r, _)| r);
                }
                let s = self.service_session().await?;
                match self
                    .post(
                        msg,
                        s.session_id.as_deref(),
                        &s.protocol_version,
                        false,
                        &[],
                    )
                    .await
                {
                    Err(UpstreamError::SessionGone) => {
                        self.drop_service_session(&s);
                        let s = self.service_session().await?;
                        self.post(
                            msg,
                            s.session_id.as_deref(),
                            &s.protocol_version,
                            false,
                            &[],
                        )
                        .await
                        .map(|(r, _)| r)
                    }
                    other => other.map(|(r, _)| r),
                }
            }
        }
    }

    /// Whether the upstream speaks 2026-07-28 (probed once; a failed probe
    /// is retried next time).
    pub async fn is_modern(&self) -> bool {
        match self.era.load(Ordering::Acquire) {
            ERA_MODERN => return true,
            ERA_LEGACY => return false,
            _ => {}
        }
        let probe = json!({
            "jsonrpc": "2.0",
            "id": "sentinel-discover",
            "method": "server/discover",
            "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "sentinel-proxy", "version": env!("CARGO_PKG_VERSION")}
            }}
        });
        let era = match self.post(&probe, None, MODERN_VERSION, true, &[]).await {
            Ok((reply, _)) => match reply.response_to(&probe["id"], self.timeout).await {
                Ok(v) => {
                    let modern = v["result"]["supportedVersions"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x == MODERN_VERSION));
                    if modern { ERA_MODERN } else { ERA_LEGACY }
                }
                Err(UpstreamError::Connect(_)) | Err(UpstreamError::Timeout) => ERA_UNKNOWN,
                Err(_) => ERA_LEGACY,
            },
            Err(UpstreamError::Connect(_)) | Err(UpstreamError::Timeout) => ERA_UNKNOWN,
            Err(_) => ERA_LEGACY,
        };
        if era != ERA_UNKNOWN {
            tracing::info!(backend = %self.name, modern = era == ERA_MODERN, "learned upstream era");
            self.era.store(era, Ordering::Release);
        }
        era == ERA_MODERN
    }

    async fn service_session(&self) -> Result<UpstreamSession, UpstreamError> {
        if let Some(s) = self.read_service() {
            return Ok(s);
        }
        let _guard = self.service_init.lock().await;
        if let Some(s) = self.read_service() {
            return Ok(s);
        }
        let params = json!({
            "protocolVersion": SERVICE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "sentinel-proxy", "version": env!("CARGO_PKG_VERSION")}
        });
        let s = self.open_session(&params).await?;
        match self.service.write() {
            Ok(mut w) => *w = Some(s.clone()),
            Err(p) => *p.into_inner() = Some(s.clone()),
        }
        Ok(s)
    }

    fn read_service(&self) -> Option<UpstreamSession> {
        match self.service.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn drop_service_session(&self, s: &UpstreamSession) {
        let mut w = match self.service.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        if w.as_ref() == Some(s) {
            *w = None;
        }
    }

    /// `initialize` + `notifications/initialized`, legacy era.
    pub async fn open_session(&self, params: &Value) -> Result<UpstreamSession, UpstreamError> {
        let requested = params["protocolVersion"]
            .as_str()
            .unwrap_or(SERVICE_VERSION)
            .to_string();
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params});
        let (reply, session_id) = self.post(&init, None, &requested, false, &[]).await?;
        let answer = reply.response_to(&init["id"], self.timeout).await?;
        let Some(result) = answer.get("result") else {
            return Err(UpstreamError::Garbage(format!(
                "initialize refused: {}",
                answer["error"]["message"].as_str().unwrap_or("no message")
            )));
        };
        let version = result["protocolVersion"]
            .as_str()
            .unwrap_or(&requested)
            .to_string();
        let session = UpstreamSession {
            backend: self.name.clone(),
            session_id,
            protocol_version: version,
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(
            &note,
            session.session_id.as_deref(),
            &session.protocol_version,
            false,
            &[],
        )
        .await?;
        Ok(session)
    }

    /// The GET listen stream of a legacy session.
    pub async fn listen(&self, s: &UpstreamSession) -> Option<MessageStream> {
        let mut req = self
            .client
            .get(self.url.clone())
            .headers(self.headers.clone())
            .header(ACCEPT, "text/event-stream")
            .header("mcp-protocol-version", &s.protocol_version);
        if let Some(id) = &s.session_id {
            req = req.header("mcp-session-id", id);
        }
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .ok()?
            .ok()?;
        if !resp.status().is_success() || !is_sse(resp.headers()) {
            return None;
        }
        Some(sse_messages(resp))
    }

    /// DELETE of a legacy session; failures are only logged.
    pub async fn end(&self, s: &UpstreamSession) {
        let Some(id) = &s.session_id else { return };
        let req = self
            .client
            .delete(self.url.clone())
            .headers(self.headers.clone())
            .header("mcp-session-id", id)
            .header("mcp-protocol-version", &s.protocol_version);
        if let Err(e) = tokio::time::timeout(self.timeout, req.send()).await {
            tracing::debug!(backend = %self.name, error = %e, "session delete timed out");
        }
    }

    /// One POST. Returns the reply and the `Mcp-Session-Id` it carried.
    async fn post(
        &self,
        msg: &Value,
        session: Option<&str>,
        version: &str,
        modern: bool,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<(Reply, Option<String>), UpstreamError> {
        let body = serde_json::to_vec(msg).map_err(|e| UpstreamError::Garbage(e.to_string()))?;
        let mut req = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .header("mcp-protocol-version", version);
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
        }
        if modern && let Some(method) = msg.get("method").and_then(Value::as_str) {
            req = req.header("mcp-method", method);
            if let Some(name) = name_param(method, msg) {
                req = req.header("mcp-name", encode_header_value(name));
            }
            for (k, v) in extra {
                req = req.header(k, v);
            }
        }
        let resp = tokio::time::timeout(self.timeout, req.body(body).send())
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let status = resp.status();
        let session_id = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status == reqwest::StatusCode::ACCEPTED {
            return Ok((Reply::Accepted, session_id));
        }
        if status.is_success() && is_sse(resp.headers()) {
            // A subscription stream is quiet for as long as nothing changes:
            // no idle timeout for it.
            let idle = (msg.get("method").and_then(Value::as_str) != Some("subscriptions/listen"))
                .then_some(self.timeout);
            return Ok((Reply::Stream(sse_texts(resp, idle)), session_id));
        }
        let bytes = tokio::time::timeout(self.timeout, read_bounded(resp))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        if !status.is_success() {
            if session.is_some()
                && (status == reqwest::StatusCode::NOT_FOUND
                    || (status == reqwest::StatusCode::BAD_REQUEST
                        && String::from_utf8_lossy(&bytes)
                            .to_ascii_lowercase()
                            .contains("session")))
            {
                return Err(UpstreamError::SessionGone);
            }
            // A JSON-RPC error with a 4xx status (e.g. a 2026-07-28 server's
            // header check) is passed on as an answer.
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && v.get("error").is_some()
                && v.get("jsonrpc").is_some()
                && !modern_probe(msg)
            {
                return Ok((Reply::Json(v), session_id));
            }
            return Err(UpstreamError::Status(status.as_u16()));
        }
        if bytes.is_empty() {
            return Ok((Reply::Accepted, session_id));
        }
        // One object is read by whoever takes the reply (the relay passes a
        // plain result through unparsed); a batch is parsed here.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            return Ok((Reply::Raw(bytes), session_id));
        }
        Ok((Reply::Json(super::parse_message(&bytes)?), session_id))
    }
}

fn modern_probe(msg: &Value) -> bool {
    msg.get("id").and_then(Value::as_str) == Some("sentinel-discover")
}

fn is_sse(h: &HeaderMap) -> bool {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

async fn read_bounded(resp: reqwest::Response) -> Result<Vec<u8>, UpstreamError> {
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| UpstreamError::Connect(e.to_string()))?;
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(UpstreamError::Garbage("answer too large".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The `data` of each event of an SSE body, as the events arrive (empty
/// ones skipped). With `idle`, a gap longer than that between events ends
/// the stream with a timeout.
fn sse_texts(resp: reqwest::Response, idle: Option<Duration>) -> TextStream {
    let events = sse_stream::SseByteStream::new(resp.bytes_stream());
    let stream = futures::stream::unfold(
        (Box::pin(events), false),
        move |(mut events, done)| async move {
            if done {
                return None;
            }
            loop {
                let next = match idle {
                    Some(d) => match tokio::time::timeout(d, events.next()).await {
                        Ok(n) => n,
                        Err(_) => return Some((Err(UpstreamError::Timeout), (events, true))),
                    },
                    None => events.next().await,
                };
                match next {
                    None => return None,
                    Some(Err(e)) => {
                        return Some((Err(UpstreamError::Connect(e.to_string())), (events, true)));
                    }
                    Some(Ok(ev)) => match ev.data {
                        Some(data) if !data.trim().is_empty() => {
                            return Some((Ok(data), (events, false)));
                        }
                        _ => continue,
                    },
                }
            }
        },
    );
    stream.boxed()
}

/// An SSE body parsed into JSON-RPC messages; an event that is not JSON
/// ends the stream with an error.
fn sse_messages(resp: reqwest::Response) -> MessageStream {
    futures::stream::unfold(
        (sse_texts(resp, None), false),
        |(mut texts, done)| async move {
            if done {
                return None;
            }
            let item = texts
                .next()
                .await?
                .and_then(|text| super::parse_event(&text));
            let failed = item.is_err();
            Some((item, (texts, failed)))
        },
    )
    .boxed()
}

/// Header values must be visible ASCII; anything else is sent in the
/// `=?base64?...?=` form MCP 2026-07-28 defines.
pub fn encode_header_value(v: &str) -> String {
    if v.bytes().all(|b| (0x20..0x7f).contains(&b)) && v.trim() == v {
        v.to_string()
    } else {
        use base64::Engine;
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    }
}
