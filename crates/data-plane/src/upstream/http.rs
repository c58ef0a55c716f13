//! A Streamable HTTP upstream.
//!
//! Connections are pooled by one shared [`UpstreamClient`] (hyper's pooled
//! client, no layers above it). The upstream's era is learned once with a
//! `server/discover` probe: a 2026-07-28 upstream gets stateless requests
//! as they are; a legacy one gets them inside a service session the proxy
//! opens for itself (any replica can open its own, so this is not state
//! another replica would miss).
//!
//! Only the policy's headers and the MCP transport headers are sent: the
//! client's own credentials and hop-by-hop headers never reach an upstream,
//! and `Host` is the upstream's own (hyper derives it from the URL).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
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

const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");

/// The pooled client every HTTP upstream shares: HTTP/1.1, and HTTP/2 where
/// TLS negotiates it (ALPN); no system proxy (upstreams are reached
/// directly); no redirects: the policy names where a backend is, and an
/// upstream answering 3xx must not steer calls (and the policy's upstream
/// headers) somewhere else, so a 3xx is an upstream error like any other
/// non-2xx status. TLS certificates are checked by the platform verifier
/// (the system's trust store), as for the proxy's other HTTPS clients.
///
/// This is hyper's client without reqwest's layers over it: on the hot
/// path those cost a URL parse and a few allocations per call.
#[derive(Clone)]
pub struct UpstreamClient(Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>);

impl UpstreamClient {
    pub fn new() -> Self {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        Self(
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_max_idle_per_host(64)
                .pool_timer(TokioTimer::new())
                .build(connector),
        )
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, UpstreamError> {
        self.0
            .request(req)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))
    }
}

impl UpstreamClient {
    /// GET of a small JSON document off the call path (a JWT issuer's key
    /// set): its body if the status is 2xx and it is at most `max` bytes.
    /// The error says what failed (for the log; it names no secret).
    pub async fn get(&self, url: &str, max: usize, timeout: Duration) -> Result<Vec<u8>, String> {
        sentinel_shared::spec::validate_http_url(url)?;
        let uri: Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let req = request(Method::GET, uri, headers, Bytes::new());
        let fetch = async {
            let resp = self.send(req).await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            read_bounded(resp, max).await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

impl Default for UpstreamClient {
    fn default() -> Self {
        Self::new()
    }
}

/// TLS toward upstreams: ring, TLS 1.2 and 1.3, the platform verifier. If
/// the platform has no usable verifier the proxy still starts and serves
/// plain-HTTP upstreams, but trusts no certificate (fails closed).
fn tls_config() -> rustls::ClientConfig {
    use rustls_platform_verifier::BuilderVerifierExt;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring offers the default TLS versions");
    match builder.clone().with_platform_verifier() {
        Ok(b) => b.with_no_client_auth(),
        Err(e) => {
            tracing::error!(error = %e, "no platform certificate verifier: https upstreams will be refused");
            builder
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    }
}

/// An error with its causes (hyper's own message is terse: "client error
/// (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

pub struct HttpUpstream {
    name: String,
    uri: Uri,
    /// Headers from policy (the upstream's own credential, etc.).
    headers: HeaderMap,
    /// The same with `Content-Type` and `Accept` of a POST.
    post_headers: HeaderMap,
    client: UpstreamClient,
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
        client: UpstreamClient,
        timeout: Duration,
    ) -> Result<Self, String> {
        sentinel_shared::spec::validate_http_url(&def.url).map_err(|e| format!("url: {e}"))?;
        let uri: Uri = def.url.parse().map_err(|e| format!("url: {e}"))?;
        let mut headers = HeaderMap::new();
        for h in &def.headers {
            let n = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("header name '{}'", h.name))?;
            let v = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("header value of '{}'", h.name))?;
            headers.insert(n, v);
        }
        let mut post_headers = headers.clone();
        post_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        post_headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        Ok(Self {
            name: name.to_string(),
            uri,
            headers,
            post_headers,
            client,
            timeout,
            era: AtomicU8::new(ERA_UNKNOWN),
            service: RwLock::new(None),
            service_init: tokio::sync::Mutex::new(()),
        })
    }

    /// A request to the upstream's URL with these headers and this body.
    fn request(&self, method: Method, headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
        request(method, self.uri.clone(), headers, body)
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
        let mut headers = self.headers.clone();
        headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
        headers.insert(
            MCP_PROTOCOL_VERSION,
            header_value(&s.protocol_version).ok()?,
        );
        if let Some(id) = &s.session_id {
            headers.insert(MCP_SESSION_ID, header_value(id).ok()?);
        }
        let req = self.request(Method::GET, headers, Bytes::new());
        let resp = tokio::time::timeout(self.timeout, self.client.send(req))
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
        let mut headers = self.headers.clone();
        let (Ok(id), Ok(version)) = (header_value(id), header_value(&s.protocol_version)) else {
            return;
        };
        headers.insert(MCP_SESSION_ID, id);
        headers.insert(MCP_PROTOCOL_VERSION, version);
        let req = self.request(Method::DELETE, headers, Bytes::new());
        match tokio::time::timeout(self.timeout, self.client.send(req)).await {
            Err(_) => tracing::debug!(backend = %self.name, "session delete timed out"),
            Ok(Err(e)) => {
                tracing::debug!(backend = %self.name, error = %e, "session delete failed")
            }
            Ok(Ok(_)) => {}
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
        let mut headers = self.post_headers.clone();
        headers.insert(MCP_PROTOCOL_VERSION, header_value(version)?);
        if let Some(s) = session {
            headers.insert(MCP_SESSION_ID, header_value(s)?);
        }
        if modern && let Some(method) = msg.get("method").and_then(Value::as_str) {
            headers.insert(MCP_METHOD, header_value(method)?);
            if let Some(name) = name_param(method, msg) {
                headers.insert(MCP_NAME, header_value(&encode_header_value(name))?);
            }
            for (k, v) in extra {
                headers.append(k.clone(), v.clone());
            }
        }
        let req = self.request(Method::POST, headers, Bytes::from(body));
        let resp = tokio::time::timeout(self.timeout, self.client.send(req))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        let status = resp.status();
        let session_id = resp
            .headers()
            .get(MCP_SESSION_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status == StatusCode::ACCEPTED {
            return Ok((Reply::Accepted, session_id));
        }
        if status.is_success() && is_sse(resp.headers()) {
            // A subscription stream is quiet for as long as nothing changes:
            // no idle timeout for it.
            let idle = (msg.get("method").and_then(Value::as_str) != Some("subscriptions/listen"))
                .then_some(self.timeout);
            return Ok((Reply::Stream(sse_texts(resp, idle)), session_id));
        }
        let bytes = tokio::time::timeout(self.timeout, read_bounded(resp, MAX_ANSWER_BYTES))
            .await
            .map_err(|_| UpstreamError::Timeout)??;
        if !status.is_success() {
            if session.is_some()
                && (status == StatusCode::NOT_FOUND
                    || (status == StatusCode::BAD_REQUEST
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

fn request(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req
}

/// A header value from text the proxy forwards (a session id, a version,
/// a method name): one that is not a valid header value is refused here
/// rather than sent.
fn header_value(v: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(v).map_err(|_| UpstreamError::Connect("invalid header value".into()))
}

async fn read_bounded(resp: Response<Incoming>, max: usize) -> Result<Vec<u8>, UpstreamError> {
    let mut body = resp.into_body();
    let hint = http_body::Body::size_hint(&body).lower() as usize;
    let mut out = Vec::with_capacity(hint.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        if out.len() + chunk.len() > max {
            return Err(UpstreamError::Garbage("answer too large".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The `data` of each event of an SSE body, as the events arrive (empty
/// ones skipped). With `idle`, a gap longer than that between events ends
/// the stream with a timeout.
fn sse_texts(resp: Response<Incoming>, idle: Option<Duration>) -> TextStream {
    let events = sse_stream::SseStream::new(resp.into_body());
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
fn sse_messages(resp: Response<Incoming>) -> MessageStream {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTPS upstream whose certificate chains to nothing the platform
    /// trusts is refused in the handshake: nothing is sent to it.
    #[tokio::test]
    async fn an_untrusted_upstream_certificate_is_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.is_ok()
        });
        let def = proto::HttpBackend {
            url: format!("https://{addr}/mcp"),
            ..Default::default()
        };
        let up =
            HttpUpstream::new("tls", &def, UpstreamClient::new(), Duration::from_secs(5)).unwrap();
        let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
        match up.post(&ping, None, SERVICE_VERSION, false, &[]).await {
            Err(UpstreamError::Connect(m)) => {
                assert!(m.to_lowercase().contains("certificate"), "{m}")
            }
            Err(e) => panic!("expected a certificate error, got {e}"),
            Ok(_) => panic!("an untrusted certificate was accepted"),
        }
        assert!(!server.await.unwrap(), "the handshake completed");
    }

    /// A backend URL that is not http(s) or carries no host is refused when
    /// the upstream is built, naming the field.
    #[test]
    fn backend_urls_are_checked() {
        for bad in ["ftp://x/mcp", "/mcp", "http://", "not a url"] {
            let def = proto::HttpBackend {
                url: bad.to_string(),
                ..Default::default()
            };
            match HttpUpstream::new("b", &def, UpstreamClient::new(), Duration::from_secs(1)) {
                Err(e) => assert!(e.starts_with("url: "), "{bad}: {e}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
    }
}
