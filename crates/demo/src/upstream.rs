//! The demo upstream: a small MCP server with four tools (`echo`, `add`,
//! `time`, `lookup_customer`), served over Streamable HTTP at `/mcp` in both
//! protocol eras. The demo puts it behind the proxy; the benchmark uses it as
//! an upstream that costs next to nothing per call.
//!
//! Era is decided per request, the way the proxy decides it
//! (`crates/data-plane/src/upstream/http.rs`):
//! - **2026-07-28** when the `MCP-Protocol-Version` header or the request's
//!   `_meta` says so. No session; `server/discover` lists the versions this
//!   server speaks (the proxy probes it once to learn the era), and results
//!   carry `resultType`.
//! - **legacy** (2025-03-26, 2025-06-18, 2025-11-25) otherwise: `initialize`
//!   issues an `Mcp-Session-Id`, which every later request carries; DELETE
//!   ends it.
//!
//! Answers are `application/json`; with [`Options::sse`] (for measuring a
//! proxy's SSE relay) a `tools/call` result is sent as a one-event
//! `text/event-stream` instead. A request
//! is parsed into borrowed views of the body and the answer is written
//! straight into one buffer, so a call allocates little beyond its response.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::any;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, ORIGIN};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpListener;

/// The stateless protocol version.
pub const MODERN: &str = "2026-07-28";
/// Session-based versions, oldest first; the last is offered by default.
pub const LEGACY: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];
/// Largest request body read.
const MAX_BODY: usize = 1024 * 1024;
/// Sessions remembered at once; the oldest is forgotten past this, so a
/// client that never says goodbye cannot grow the server without bound.
const MAX_SESSIONS: usize = 100_000;

const SERVER_INFO: &str = concat!(
    r#"{"name":"sentinel-demo-upstream","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#""}"#
);

/// The tool list, written once by hand: it never changes.
const TOOLS: &str = r#"[
{"name":"echo","title":"Echo","description":"Returns its message unchanged.","inputSchema":{"type":"object","properties":{"message":{"type":"string","description":"Text to send back"}},"required":["message"]}},
{"name":"add","title":"Add","description":"Adds two numbers.","inputSchema":{"type":"object","properties":{"a":{"type":"number"},"b":{"type":"number"}},"required":["a","b"]}},
{"name":"time","title":"Current time","description":"The current UTC time (RFC 3339).","inputSchema":{"type":"object","properties":{}}},
{"name":"lookup_customer","title":"Look up a customer","description":"Finds a (fictional) customer record by id (e.g. C-1001) or by email.","inputSchema":{"type":"object","properties":{"customer_id":{"type":"string"},"email":{"type":"string","format":"email"}}}}
]"#;

/// The fictional customers `lookup_customer` knows: (id, name, email, plan).
const CUSTOMERS: [(&str, &str, &str, &str); 3] = [
    ("C-1001", "Ada Lovelace", "ada@example.com", "enterprise"),
    ("C-1002", "Grace Hopper", "grace@example.com", "team"),
    ("C-1003", "Alan Turing", "alan@example.com", "free"),
];

/// How the upstream answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Answer `tools/call` as `text/event-stream` (one `message` event,
    /// then the end of the stream) instead of `application/json`.
    pub sse: bool,
}

/// Serves the demo upstream on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, Options::default(), shutdown).await
}

/// [`serve`] with [`Options`].
pub async fn serve_with(
    listener: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Small JSON answers: waiting to coalesce them only adds latency.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router_with(options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The upstream's routes: `/mcp` only.
pub fn router() -> Router {
    router_with(Options::default())
}

/// [`router`] with [`Options`].
pub fn router_with(options: Options) -> Router {
    Router::new()
        .route("/mcp", any(mcp))
        .with_state(Arc::new(Sessions {
            sse: options.sse,
            ..Sessions::default()
        }))
}

/// Legacy sessions in issue order, and how to frame tool results.
#[derive(Default)]
struct Sessions {
    set: Mutex<SessionSet>,
    sse: bool,
}

/// Marks a response as a `tools/call` answer, which [`Options::sse`]
/// re-frames as an event stream.
#[derive(Clone, Copy)]
struct ToolAnswer;

#[derive(Default)]
struct SessionSet {
    live: HashSet<u128>,
    order: VecDeque<u128>,
}

impl Sessions {
    fn open(&self) -> u128 {
        let id = uuid::Uuid::new_v4().as_u128();
        let mut s = self.lock();
        if s.order.len() >= MAX_SESSIONS
            && let Some(old) = s.order.pop_front()
        {
            s.live.remove(&old);
        }
        s.live.insert(id);
        s.order.push_back(id);
        id
    }

    fn contains(&self, id: u128) -> bool {
        self.lock().live.contains(&id)
    }

    fn end(&self, id: u128) -> bool {
        let mut s = self.lock();
        let found = s.live.remove(&id);
        if found {
            s.order.retain(|x| *x != id);
        }
        found
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionSet> {
        // A panic while holding the lock leaves a set that is still valid.
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the `Mcp-Session-Id` header says.
enum SessionHeader {
    Missing,
    Known,
    Unknown,
}

fn session_header(headers: &HeaderMap, sessions: &Sessions) -> SessionHeader {
    match headers.get("mcp-session-id") {
        None => SessionHeader::Missing,
        Some(v) => match v
            .to_str()
            .ok()
            .and_then(|s| u128::from_str_radix(s, 16).ok())
        {
            Some(id) if sessions.contains(id) => SessionHeader::Known,
            _ => SessionHeader::Unknown,
        },
    }
}

fn session_id_of(headers: &HeaderMap) -> Option<u128> {
    headers
        .get("mcp-session-id")?
        .to_str()
        .ok()
        .and_then(|s| u128::from_str_radix(s, 16).ok())
}

async fn mcp(State(sessions): State<Arc<Sessions>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if !origin_allowed(&parts.headers) {
        return error_response(StatusCode::FORBIDDEN, None, -32600, "origin not allowed");
    }
    match parts.method {
        Method::POST => {}
        Method::DELETE => {
            return match session_id_of(&parts.headers) {
                Some(id) if sessions.end(id) => status_only(StatusCode::OK),
                Some(_) => status_only(StatusCode::NOT_FOUND),
                None => status_only(StatusCode::BAD_REQUEST),
            };
        }
        _ => {
            // No listen stream: this server never sends anything unasked.
            let mut r = status_only(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST, DELETE"));
            return r;
        }
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                -32600,
                "request body too large",
            );
        }
    };
    let answer = handle(&sessions, &parts.headers, &body);
    if sessions.sse && answer.extensions().get::<ToolAnswer>().is_some() {
        return as_event_stream(answer).await;
    }
    answer
}

/// A JSON answer re-sent as one SSE `message` event; the stream then ends.
async fn as_event_stream(answer: Response) -> Response {
    let (mut parts, body) = answer.into_parts();
    let Ok(json) = axum::body::to_bytes(body, MAX_BODY).await else {
        return error_response(StatusCode::INTERNAL_SERVER_ERROR, None, -32603, "internal");
    };
    let mut out = Vec::with_capacity(json.len() + 24);
    out.extend_from_slice(b"event: message\ndata: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    parts
        .headers
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    Response::from_parts(parts, Body::from(out))
}

/// Browsers may only reach this loopback server from loopback pages
/// (DNS-rebinding defence); clients without an `Origin` are not browsers.
fn origin_allowed(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(o) = origin.to_str() else { return false };
    let authority = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))
        .unwrap_or("");
    if authority == "[::1]" || authority.starts_with("[::1]:") {
        return true;
    }
    let host = authority.split(':').next().unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost")
}

/// One JSON-RPC message, viewed in place.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "protocolVersion")]
    protocol_version: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "_meta")]
    meta: Option<Meta<'a>>,
}

#[derive(Deserialize, Default)]
struct Meta<'a> {
    #[serde(default, borrow, rename = "io.modelcontextprotocol/protocolVersion")]
    version: Option<Cow<'a, str>>,
}

fn handle(sessions: &Sessions, headers: &HeaderMap, body: &Bytes) -> Response {
    let trimmed = body.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        return error_response(
            StatusCode::BAD_REQUEST,
            None,
            -32600,
            "batches are not supported",
        );
    }
    let msg: Message<'_> = match serde_json::from_slice(body) {
        Ok(m) => m,
        Err(_) => return error_response(StatusCode::BAD_REQUEST, None, -32700, "parse error"),
    };
    let (Some(id), Some(method)) = (msg.id, msg.method.as_deref()) else {
        // A notification, or a client's answer to a request: nothing to say.
        return status_only(StatusCode::ACCEPTED);
    };
    let params: Params<'_> = match msg.params {
        None => Params::default(),
        Some(raw) => match serde_json::from_str(raw.get()) {
            Ok(p) => p,
            Err(_) => {
                return error_response(StatusCode::OK, Some(id), -32602, "invalid params");
            }
        },
    };
    let header_version = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    let meta_version = params.meta.as_ref().and_then(|m| m.version.as_deref());
    let modern = header_version == Some(MODERN) || meta_version == Some(MODERN);

    match method {
        "initialize" => return initialize(sessions, id, params.protocol_version.as_deref()),
        "server/discover" => return ok(id, write_discover),
        "ping" => return ok(id, |out| out.extend_from_slice(b"{}")),
        _ => {}
    }
    if !modern {
        match session_header(headers, sessions) {
            SessionHeader::Known => {}
            SessionHeader::Missing => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    Some(id),
                    -32600,
                    "missing Mcp-Session-Id: send initialize first, or use protocol version 2026-07-28",
                );
            }
            SessionHeader::Unknown => {
                return error_response(
                    StatusCode::NOT_FOUND,
                    Some(id),
                    -32001,
                    "session not found",
                );
            }
        }
    }
    match method {
        "tools/list" => ok(id, |out| {
            if modern {
                out.extend_from_slice(
                    br#"{"resultType":"complete","ttlMs":0,"cacheScope":"public","tools":"#,
                );
            } else {
                out.extend_from_slice(br#"{"tools":"#);
            }
            out.extend_from_slice(TOOLS.as_bytes());
            out.push(b'}');
        }),
        "tools/call" => {
            let mut r = call_tool(id, &params, modern);
            r.extensions_mut().insert(ToolAnswer);
            r
        }
        _ => error_response(StatusCode::OK, Some(id), -32601, "method not found"),
    }
}

fn initialize(sessions: &Sessions, id: &RawValue, asked: Option<&str>) -> Response {
    let version = asked
        .and_then(|a| LEGACY.iter().find(|v| **v == a))
        .copied()
        .unwrap_or(LEGACY[LEGACY.len() - 1]);
    let session = sessions.open();
    let mut r = ok(id, |out| {
        out.extend_from_slice(br#"{"protocolVersion":""#);
        out.extend_from_slice(version.as_bytes());
        out.extend_from_slice(br#"","capabilities":{"tools":{}},"serverInfo":"#);
        out.extend_from_slice(SERVER_INFO.as_bytes());
        out.push(b'}');
    });
    if let Ok(v) = HeaderValue::from_str(&format!("{session:032x}")) {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}

fn write_discover(out: &mut Vec<u8>) {
    out.extend_from_slice(
        br#"{"resultType":"complete","ttlMs":0,"cacheScope":"public","supportedVersions":["#,
    );
    for v in LEGACY {
        out.push(b'"');
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.push(b'"');
    out.extend_from_slice(MODERN.as_bytes());
    out.extend_from_slice(br#""],"capabilities":{"tools":{}},"serverInfo":"#);
    out.extend_from_slice(SERVER_INFO.as_bytes());
    out.extend_from_slice(br#","_meta":{"io.modelcontextprotocol/serverInfo":"#);
    out.extend_from_slice(SERVER_INFO.as_bytes());
    out.extend_from_slice(b"}}");
}

#[derive(Deserialize)]
struct EchoArgs<'a> {
    #[serde(borrow)]
    message: Cow<'a, str>,
}

#[derive(Deserialize)]
struct AddArgs {
    a: f64,
    b: f64,
}

#[derive(Deserialize)]
struct LookupArgs<'a> {
    #[serde(default, borrow)]
    customer_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    email: Option<Cow<'a, str>>,
}

fn call_tool(id: &RawValue, params: &Params<'_>, modern: bool) -> Response {
    let args = params.arguments.map_or("{}", RawValue::get);
    let open: &[u8] = if modern {
        br#"{"resultType":"complete","content":[{"type":"text","text":"#
    } else {
        br#"{"content":[{"type":"text","text":"#
    };
    match params.name.as_deref() {
        Some("echo") => match serde_json::from_str::<EchoArgs<'_>>(args) {
            Ok(a) => ok(id, |out| {
                out.extend_from_slice(open);
                write_json_str(out, &a.message);
                out.extend_from_slice(b"}]}");
            }),
            Err(_) => tool_error(id, open, "echo needs a string 'message'"),
        },
        Some("add") => match serde_json::from_str::<AddArgs>(args) {
            Ok(AddArgs { a, b }) if (a + b).is_finite() => ok(id, |out| {
                let sum = a + b;
                out.extend_from_slice(open);
                out.push(b'"');
                write_number(out, sum);
                out.extend_from_slice(br#""}],"structuredContent":{"sum":"#);
                write_number(out, sum);
                out.extend_from_slice(b"}}");
            }),
            _ => tool_error(id, open, "add needs two finite numbers 'a' and 'b'"),
        },
        Some("time") => ok(id, |out| {
            let now = time::OffsetDateTime::now_utc();
            out.extend_from_slice(open);
            out.push(b'"');
            write_time(out, now);
            out.extend_from_slice(br#""}],"structuredContent":{"utc":""#);
            write_time(out, now);
            out.extend_from_slice(br#""}}"#);
        }),
        Some("lookup_customer") => {
            let Ok(a) = serde_json::from_str::<LookupArgs<'_>>(args) else {
                return tool_error(id, open, "lookup_customer takes 'customer_id' or 'email'");
            };
            let found = CUSTOMERS.iter().find(|(cid, _, email, _)| {
                a.customer_id
                    .as_deref()
                    .is_some_and(|x| x.eq_ignore_ascii_case(cid))
                    || a.email
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(email))
            });
            match found {
                Some(&(cid, name, email, plan)) => ok(id, |out| {
                    // The record as text (for models) and as structured content.
                    let mut record = Vec::with_capacity(128);
                    let _ = write!(
                        record,
                        r#"{{"customer_id":"{cid}","name":"{name}","email":"{email}","plan":"{plan}"}}"#
                    );
                    out.extend_from_slice(open);
                    write_json_str(out, std::str::from_utf8(&record).unwrap_or("{}"));
                    out.extend_from_slice(br#"}],"structuredContent":"#);
                    out.extend_from_slice(&record);
                    out.push(b'}');
                }),
                None => tool_error(id, open, "no customer with that id or email (try C-1001)"),
            }
        }
        Some(_) => error_response(StatusCode::OK, Some(id), -32602, "unknown tool"),
        None => error_response(
            StatusCode::OK,
            Some(id),
            -32602,
            "tools/call needs a 'name'",
        ),
    }
}

/// A tool that ran and failed: a result with `isError`, as the spec asks for
/// bad arguments, so a model can read the message and try again.
fn tool_error(id: &RawValue, open: &[u8], message: &str) -> Response {
    ok(id, |out| {
        out.extend_from_slice(open);
        write_json_str(out, message);
        out.extend_from_slice(br#"}],"isError":true}"#);
    })
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing a string into a Vec cannot fail; keep the JSON valid anyway.
        out.extend_from_slice(b"\"\"");
    }
}

fn write_number(out: &mut Vec<u8>, n: f64) {
    // Whole numbers print without a fraction (5, not 5.0).
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        let _ = write!(out, "{}", n as i64);
    } else {
        let _ = write!(out, "{n}");
    }
}

fn write_time(out: &mut Vec<u8>, t: time::OffsetDateTime) {
    if t.format_into(out, &time::format_description::well_known::Rfc3339)
        .is_err()
    {
        out.extend_from_slice(b"1970-01-01T00:00:00Z");
    }
}

/// `{"jsonrpc":"2.0","id":<id>,"result":<written by f>}` with status 200.
fn ok(id: &RawValue, f: impl FnOnce(&mut Vec<u8>)) -> Response {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    out.extend_from_slice(id.get().as_bytes());
    out.extend_from_slice(br#","result":"#);
    f(&mut out);
    out.push(b'}');
    json_response(StatusCode::OK, out)
}

fn error_response(status: StatusCode, id: Option<&RawValue>, code: i64, message: &str) -> Response {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    out.extend_from_slice(id.map_or("null", RawValue::get).as_bytes());
    let _ = write!(out, r#","error":{{"code":{code},"message":"#);
    write_json_str(&mut out, message);
    out.extend_from_slice(b"}}");
    json_response(status, out)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn status_only(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use http_body_util::BodyExt;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    async fn post(
        app: &Router,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = http::Request::post("/mcp").header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("answer is JSON")
        };
        (status, headers, v)
    }

    fn modern_call(name: &str, args: Value) -> String {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": name, "arguments": args,
            "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN}
        }})
        .to_string()
    }

    const MODERN_H: &[(&str, &str)] = &[("mcp-protocol-version", MODERN)];

    #[test]
    fn the_tool_list_is_valid_json() {
        let tools: Vec<Value> = serde_json::from_str(TOOLS).unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["echo", "add", "time", "lookup_customer"]);
        assert!(tools.iter().all(|t| t["inputSchema"]["type"] == "object"));
        let info: Value = serde_json::from_str(SERVER_INFO).unwrap();
        assert_eq!(info["name"], "sentinel-demo-upstream");
    }

    #[tokio::test]
    async fn modern_discover_list_and_call() {
        let app = router();
        let (s, _, v) = post(
            &app,
            MODERN_H,
            r#"{"jsonrpc":"2.0","id":"sentinel-discover","method":"server/discover","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["id"], "sentinel-discover");
        let versions = v["result"]["supportedVersions"].as_array().unwrap();
        assert!(versions.iter().any(|x| x == MODERN));
        assert_eq!(v["result"]["capabilities"], json!({"tools": {}}));
        assert_eq!(v["result"]["serverInfo"]["name"], "sentinel-demo-upstream");

        let (s, _, v) = post(
            &app,
            MODERN_H,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["result"]["resultType"], "complete");
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 4);

        let (_, _, v) = post(
            &app,
            MODERN_H,
            &modern_call("echo", json!({"message": "hé \"x\"\n"})),
        )
        .await;
        assert_eq!(v["id"], 7);
        assert_eq!(v["result"]["resultType"], "complete");
        assert_eq!(v["result"]["content"][0]["text"], "hé \"x\"\n");

        let (_, _, v) = post(&app, MODERN_H, &modern_call("add", json!({"a": 2, "b": 3}))).await;
        assert_eq!(v["result"]["content"][0]["text"], "5");
        assert_eq!(v["result"]["structuredContent"]["sum"], 5);
        let (_, _, v) = post(
            &app,
            MODERN_H,
            &modern_call("add", json!({"a": 0.5, "b": 0.25})),
        )
        .await;
        assert_eq!(v["result"]["structuredContent"]["sum"], 0.75);
        let (_, _, v) = post(&app, MODERN_H, &modern_call("add", json!({"a": "x"}))).await;
        assert_eq!(v["result"]["isError"], true);

        let (_, _, v) = post(&app, MODERN_H, &modern_call("time", json!({}))).await;
        let t = v["result"]["structuredContent"]["utc"].as_str().unwrap();
        assert!(
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
        );

        let (_, _, v) = post(
            &app,
            MODERN_H,
            &modern_call("lookup_customer", json!({"email": "GRACE@example.com"})),
        )
        .await;
        assert_eq!(v["result"]["structuredContent"]["customer_id"], "C-1002");
        let text: Value =
            serde_json::from_str(v["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
        assert_eq!(text["name"], "Grace Hopper");
        let (_, _, v) = post(
            &app,
            MODERN_H,
            &modern_call("lookup_customer", json!({"customer_id": "C-9"})),
        )
        .await;
        assert_eq!(v["result"]["isError"], true);

        // The era can also come from `_meta` alone.
        let (s, _, v) = post(&app, &[], &modern_call("echo", json!({"message": "m"}))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["result"]["content"][0]["text"], "m");
    }

    #[tokio::test]
    async fn legacy_session_lifecycle() {
        let app = router();
        let (s, h, v) = post(
            &app,
            &[],
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["result"]["protocolVersion"], "2025-06-18");
        assert_eq!(v["result"]["capabilities"], json!({"tools": {}}));
        let sid = h["mcp-session-id"].to_str().unwrap().to_string();
        let sh = [
            ("mcp-session-id", sid.as_str()),
            ("mcp-protocol-version", "2025-06-18"),
        ];

        let (s, _, _) = post(
            &app,
            &sh,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let (_, _, v) = post(
            &app,
            &sh,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )
        .await;
        assert!(v["result"].get("resultType").is_none());
        assert_eq!(v["result"]["tools"][0]["name"], "echo");
        let (_, _, v) = post(
            &app,
            &sh,
            r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        )
        .await;
        assert_eq!(v["id"], "a");
        assert_eq!(v["result"]["content"][0]["text"], "hi");
        let (_, _, v) = post(&app, &sh, r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#).await;
        assert_eq!(v["result"], json!({}));

        // An unknown version gets the newest legacy one.
        let (_, _, v) = post(
            &app,
            &[],
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"1999-01-01"}}"#,
        )
        .await;
        assert_eq!(v["result"]["protocolVersion"], "2025-11-25");

        // Without a session, or with an unknown one, legacy requests fail.
        let (s, _, _) = post(
            &app,
            &[],
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _, v) = post(
            &app,
            &[("mcp-session-id", "00ff")],
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"]["code"], -32001);

        let del = |sid: String| {
            let app = app.clone();
            async move {
                app.oneshot(
                    http::Request::delete("/mcp")
                        .header("mcp-session-id", sid)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
            }
        };
        assert_eq!(del(sid.clone()).await, StatusCode::OK);
        assert_eq!(del(sid.clone()).await, StatusCode::NOT_FOUND);
        let (s, _, _) = post(
            &app,
            &sh,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn sse_option_streams_tool_results_only() {
        let app = router_with(Options { sse: true });
        let resp = app
            .clone()
            .oneshot(
                http::Request::post("/mcp")
                    .header("content-type", "application/json")
                    .header("mcp-protocol-version", MODERN)
                    .body(Body::from(modern_call("echo", json!({"message": "s"}))))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = std::str::from_utf8(&bytes).unwrap();
        let data = text
            .strip_prefix("event: message\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("one message event");
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["result"]["content"][0]["text"], "s");
        // Everything else stays JSON.
        let (s, h, v) = post(
            &app,
            MODERN_H,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[CONTENT_TYPE], "application/json");
        assert_eq!(v["result"], json!({}));
    }

    #[tokio::test]
    async fn errors_are_json_rpc() {
        let app = router();
        let (s, _, v) = post(&app, MODERN_H, "{not json").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["code"], -32700);
        assert_eq!(v["id"], Value::Null);
        let (_, _, v) = post(
            &app,
            MODERN_H,
            r#"{"jsonrpc":"2.0","id":3,"method":"nope/nothing"}"#,
        )
        .await;
        assert_eq!(v["error"]["code"], -32601);
        assert_eq!(v["id"], 3);
        let (_, _, v) = post(&app, MODERN_H, &modern_call("missing", json!({}))).await;
        assert_eq!(v["error"]["code"], -32602);
        let (s, _, v) = post(&app, MODERN_H, "[]").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["code"], -32600);
        let (s, _, _) = post(&app, &[("origin", "http://evil.example")], "{}").await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _, _) = post(
            &app,
            &[
                ("origin", "http://localhost:6274"),
                ("mcp-protocol-version", MODERN),
            ],
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let get = app
            .clone()
            .oneshot(http::Request::get("/mcp").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
