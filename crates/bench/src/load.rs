//! The overhead benchmark's load generator: C keep-alive HTTP/1.1
//! connections (hyper's client connection, no pool), each opened once, then
//! `tools/call` of the echo tool with a 1 KB argument in a loop.
//!
//! - **fixed rate** (open loop): call k is due at `start + k / R`, the calls
//!   dealt round-robin to the connections. A call that could not be sent
//!   when due because its connection was still busy is timed from when it
//!   was due, so a stall shows in the latency instead of thinning the
//!   schedule (coordinated omission). A call sent late only because the
//!   timer woke late (tokio's timer has 1 ms granularity) is timed from
//!   when it was sent: that lateness is the client's, not the server's.
//! - **saturation** (closed loop): every connection calls back to back for
//!   a fixed time.
//!
//! Every answer is checked to be a successful `tools/call` result (status
//! 200, a JSON-RPC `result`, not `isError`); anything else is counted as an
//! error and the first one is kept for the report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// The stateless protocol version.
pub const MODERN: &str = "2026-07-28";
/// The legacy version the client asks for.
pub const LEGACY: &str = "2025-11-25";
/// Size of the echo tool's argument.
pub const ARG_BYTES: usize = 1024;
/// No single call may take longer than this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Era {
    /// Session-based: `initialize`, then `Mcp-Session-Id` on every call.
    Legacy,
    /// 2026-07-28: no handshake, the version in `_meta` and headers.
    Modern,
}

impl Era {
    pub fn name(self) -> &'static str {
        match self {
            Era::Legacy => "legacy",
            Era::Modern => "2026-07-28",
        }
    }
}

/// Where the calls go.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Path of the MCP endpoint, e.g. `/mcp`.
    pub path: String,
    /// Tool name as this endpoint lists it (`echo` or `<backend>__echo`).
    pub tool: String,
    /// API key sent as a bearer token, if the endpoint wants one.
    pub key: Option<String>,
    pub era: Era,
}

/// What one run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Successful calls.
    pub calls: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of each successful call, microseconds, sorted.
    pub latency_us: Vec<f64>,
    /// Wall time of the measured part.
    pub elapsed: Duration,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: ConnOutcome) {
        self.calls += other.calls;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency_us.extend(other.latency_us);
    }
}

#[derive(Default)]
struct ConnOutcome {
    calls: u64,
    errors: u64,
    first_error: Option<String>,
    latency_us: Vec<f64>,
}

impl ConnOutcome {
    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// One client connection, with its session when the era has one.
pub struct Conn {
    send: SendRequest<Full<Bytes>>,
    target: Arc<Target>,
    host: HeaderValue,
    auth: Option<HeaderValue>,
    session: Option<HeaderValue>,
    next_id: u64,
    /// The request body after `"id":<n>`.
    call_tail: Bytes,
}

impl Conn {
    /// Connects and, for the legacy era, opens a session.
    pub async fn open(target: Arc<Target>) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(target.addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let host = HeaderValue::from_str(&target.addr.to_string())?;
        let auth = match &target.key {
            Some(k) => Some(HeaderValue::from_str(&format!("Bearer {k}"))?),
            None => None,
        };
        let call_tail = Bytes::from(call_tail(&target.tool, target.era));
        let mut c = Conn {
            send,
            target,
            host,
            auth,
            session: None,
            next_id: 1,
            call_tail,
        };
        if c.target.era == Era::Legacy {
            c.handshake().await?;
        }
        Ok(c)
    }

    async fn handshake(&mut self) -> anyhow::Result<()> {
        let init = format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{LEGACY}","capabilities":{{}},"clientInfo":{{"name":"sentinel-bench","version":"1"}}}}}}"#
        );
        let resp = self.post(Bytes::from(init), "initialize").await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        anyhow::ensure!(
            parts.status == 200,
            "initialize: status {} {}",
            parts.status,
            String::from_utf8_lossy(&body)
        );
        let sid = parts
            .headers
            .get("mcp-session-id")
            .ok_or_else(|| anyhow::anyhow!("initialize: no Mcp-Session-Id"))?;
        self.session = Some(sid.clone());
        let resp = self
            .post(
                Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
                "notifications/initialized",
            )
            .await?;
        let status = resp.status();
        let _ = resp.into_body().collect().await?;
        anyhow::ensure!(status == 202, "notifications/initialized: status {status}");
        Ok(())
    }

    async fn post(
        &mut self,
        body: Bytes,
        method: &str,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let mut req = hyper::Request::post(self.target.path.as_str())
            .header(hyper::header::HOST, self.host.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json, text/event-stream");
        if let Some(a) = &self.auth {
            req = req.header(hyper::header::AUTHORIZATION, a.clone());
        }
        match self.target.era {
            Era::Legacy => {
                if let Some(s) = &self.session {
                    req = req
                        .header("mcp-session-id", s.clone())
                        .header("mcp-protocol-version", LEGACY);
                }
            }
            Era::Modern => {
                req = req
                    .header("mcp-protocol-version", MODERN)
                    .header("mcp-method", method);
                if method == "tools/call" {
                    req = req.header("mcp-name", self.target.tool.as_str());
                }
            }
        }
        self.send.ready().await?;
        Ok(self.send.send_request(req.body(Full::new(body))?).await?)
    }

    /// One `tools/call` of echo; Ok when the answer is a successful result.
    pub async fn call(&mut self) -> Result<(), String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = Vec::with_capacity(self.call_tail.len() + 32);
        body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
        body.extend_from_slice(id.to_string().as_bytes());
        body.extend_from_slice(&self.call_tail);
        let fut = async {
            let resp = self
                .post(Bytes::from(body), "tools/call")
                .await
                .map_err(|e| format!("send: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            check(parts.status.as_u16(), &body)
        };
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err("timed out".into()),
        }
    }
}

/// `,"method":"tools/call",...}` with a 1 KB message.
fn call_tail(tool: &str, era: Era) -> Vec<u8> {
    // Printable, no characters JSON must escape, not all one letter.
    let message: String = (0..ARG_BYTES)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let meta = match era {
        Era::Legacy => String::new(),
        Era::Modern => {
            format!(r#","_meta":{{"io.modelcontextprotocol/protocolVersion":"{MODERN}"}}"#)
        }
    };
    format!(
        r#","method":"tools/call","params":{{"name":"{tool}","arguments":{{"message":"{message}"}}{meta}}}}}"#
    )
    .into_bytes()
}

/// Whether an answer is a successful `tools/call` result, as JSON or as
/// an SSE stream whose (first) event carries it. Only the head and the
/// tail are looked at: the result's key comes first in every answer seen
/// here, `isError` last, and the client's CPU is shared with the servers.
fn check(status: u16, body: &[u8]) -> Result<(), String> {
    let snippet = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status != 200 {
        return Err(format!("status {status}: {}", snippet()));
    }
    let Some(open) = body.iter().position(|b| *b == b'{') else {
        return Err(format!("no JSON in the answer: {}", snippet()));
    };
    let head = &body[open..body.len().min(open + 80)];
    if !contains(head, br#""result":"#) {
        return Err(format!("not a result: {}", snippet()));
    }
    let tail = &body[body.len().saturating_sub(48)..];
    if contains(tail, br#""isError":true"#) {
        return Err(format!("tool error: {}", snippet()));
    }
    if body.len() < ARG_BYTES {
        return Err(format!("short answer ({} bytes)", body.len()));
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Opens `n` connections (sessions opened too), all at once.
pub async fn open(target: &Arc<Target>, n: usize) -> anyhow::Result<Vec<Conn>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let t = target.clone();
        set.spawn(async move { Conn::open(t).await });
    }
    let mut conns = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        conns.push(r??);
    }
    Ok(conns)
}

/// A few calls on every connection, so that the first measured calls do
/// not pay for upstream connections and caches warming.
pub async fn warm(conns: &mut [Conn], per_conn: usize) -> Result<(), String> {
    for c in conns.iter_mut() {
        for _ in 0..per_conn {
            c.call().await?;
        }
    }
    Ok(())
}

/// Open loop: `rate` calls/s over `conns` for `duration`.
pub async fn fixed_rate(conns: Vec<Conn>, rate: f64, duration: Duration) -> Outcome {
    let n = conns.len();
    let total = (rate * duration.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let interval = 1.0 / rate;
    let mut set = tokio::task::JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        set.spawn(async move {
            let mut out = ConnOutcome::default();
            let mut k = i as u64;
            let mut prev_done = start;
            while k < total {
                let due = start + Duration::from_secs_f64(k as f64 * interval);
                tokio::time::sleep_until(due).await;
                let sent = Instant::now();
                // Busy past the due time: the wait counts (see the module
                // documentation); otherwise only timer slack, which does not.
                let from = if prev_done > due { due } else { sent };
                match c.call().await {
                    Ok(()) => {
                        out.calls += 1;
                        out.latency_us.push(from.elapsed().as_secs_f64() * 1e6);
                    }
                    Err(e) => out.error(e),
                }
                prev_done = Instant::now();
                k += n as u64;
            }
            out
        });
    }
    let mut o = collect(set).await;
    o.elapsed = duration;
    o
}

/// Closed loop: every connection calls back to back for `duration`.
pub async fn saturate(conns: Vec<Conn>, duration: Duration) -> Outcome {
    let start = Instant::now();
    let end = start + duration;
    let mut set = tokio::task::JoinSet::new();
    for mut c in conns {
        set.spawn(async move {
            let mut out = ConnOutcome::default();
            out.latency_us.reserve(16 * 1024);
            while Instant::now() < end {
                let t = Instant::now();
                match c.call().await {
                    Ok(()) => {
                        out.calls += 1;
                        out.latency_us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    Err(e) => {
                        out.error(e);
                        // A dead connection would otherwise spin.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            out
        });
    }
    let mut o = collect(set).await;
    o.elapsed = start.elapsed();
    o
}

async fn collect(mut set: tokio::task::JoinSet<ConnOutcome>) -> Outcome {
    let mut o = Outcome::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(c) => o.merge(c),
            Err(e) => o.merge(ConnOutcome {
                errors: 1,
                first_error: Some(format!("client task: {e}")),
                ..Default::default()
            }),
        }
    }
    o.latency_us.sort_by(|a, b| a.total_cmp(b));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked() {
        let ok = format!(
            r#"{{"jsonrpc":"2.0","id":3,"result":{{"content":[{{"type":"text","text":"{}"}}]}}}}"#,
            "a".repeat(ARG_BYTES)
        );
        assert_eq!(check(200, ok.as_bytes()), Ok(()));
        let sse = format!("event: message\ndata: {ok}\n\n");
        assert_eq!(check(200, sse.as_bytes()), Ok(()));
        assert!(check(403, ok.as_bytes()).is_err());
        let err = r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"denied"}}"#;
        assert!(check(200, err.as_bytes()).is_err());
        let tool_err = ok.replace("}]}}", r#"}],"isError":true}}"#);
        assert!(check(200, tool_err.as_bytes()).is_err());
    }

    #[test]
    fn the_call_body_is_json() {
        for era in [Era::Legacy, Era::Modern] {
            let mut body = br#"{"jsonrpc":"2.0","id":1"#.to_vec();
            body.extend_from_slice(&call_tail("up__echo", era));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["params"]["name"], "up__echo");
            assert_eq!(
                v["params"]["arguments"]["message"].as_str().unwrap().len(),
                ARG_BYTES
            );
            assert_eq!(v["params"]["_meta"].is_object(), era == Era::Modern, "{v}");
        }
    }
}
