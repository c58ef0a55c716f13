//! The stdio front: the proxy as a local MCP server on stdin/stdout, for
//! agents that launch their MCP servers as processes.
//!
//! Newline-delimited JSON-RPC in both directions. The credential comes from
//! the proxy's environment (given here as `credential`) and every message
//! passes the same gates, federation and audit as over HTTP. The process is
//! one client, so its legacy session lives in memory instead of in a sealed
//! token; 2026-07-28 messages (with `_meta` versions) are served statelessly.
//! Messages are handled concurrently (a long tool call does not hold up a
//! ping), with at most [`MAX_IN_FLIGHT`] at once.

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc};

use crate::audit::event::CallAudit;
use crate::error::ProxyError;
use crate::gate::authn::authenticate;
use crate::mcp::front::{Answer, AppState, Call, listen_all, open_upstreams};
use crate::mcp::jsonrpc::{self, Kind, META_CLIENT_INFO, META_VERSION, MODERN_VERSION, error_body};
use crate::mcp::session::SessionState;
use crate::stack;

pub const MAX_IN_FLIGHT: usize = 64;
/// Longest line read from the client.
const MAX_LINE: usize = 4 * 1024 * 1024;

/// Serves one client on `input`/`output` until `input` ends.
pub async fn serve<R, W>(
    st: Arc<AppState>,
    credential: &str,
    input: R,
    output: W,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", credential.trim())) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let headers = Arc::new(headers);
    let session: Arc<RwLock<Option<SessionState>>> = Arc::new(RwLock::new(None));
    let session_id = format!("stdio:{}", sentinel_shared::audit::uuid_v7_now());
    let (tx, mut rx) = mpsc::channel::<Value>(256);
    let writer = tokio::spawn(async move {
        let mut out = output;
        while let Some(v) = rx.recv().await {
            let mut line = serde_json::to_vec(&v).unwrap_or_default();
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut reader = BufReader::new(input);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).await?;
        if n == 0 {
            break;
        }
        if line.len() > MAX_LINE {
            let _ = tx
                .send(error_body(
                    Value::Null,
                    crate::error::code::INVALID_REQUEST,
                    "message too large",
                ))
                .await;
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let msg: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = tx
                    .send(error_body(
                        Value::Null,
                        crate::error::code::PARSE_ERROR,
                        "parse error",
                    ))
                    .await;
                continue;
            }
        };
        let kind = match jsonrpc::classify(&msg) {
            Ok(k) => k,
            Err(why) => {
                let id = msg.get("id").cloned().unwrap_or(Value::Null);
                let err = ProxyError::InvalidRequest(why);
                let _ = tx
                    .send(error_body(id, err.code(), &err.client_message()))
                    .await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (st, headers, session, tx, sid) = (
            st.clone(),
            headers.clone(),
            session.clone(),
            tx.clone(),
            session_id.clone(),
        );
        tokio::spawn(async move {
            handle(&st, &headers, &session, &sid, msg, kind, &tx).await;
            drop(permit);
        });
    }
    drop(tx);
    // stdin closed: let the calls in flight finish (bounded), flush what
    // they wrote, then stop. Relays of upstream notifications hold senders
    // of their own, so waiting for the writer alone would never end.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        limit.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    let mut writer = writer;
    if tokio::time::timeout(std::time::Duration::from_millis(500), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    Ok(())
}

async fn handle(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    session: &RwLock<Option<SessionState>>,
    session_id: &str,
    msg: Value,
    kind: Kind,
    tx: &mpsc::Sender<Value>,
) {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let reply = |err: ProxyError| error_body(id.clone(), err.code(), &err.client_message());
    let Some(snap) = st.reader.current() else {
        if kind == Kind::Request {
            let _ = tx.send(reply(ProxyError::NoPolicy)).await;
        }
        return;
    };
    let rid = sentinel_shared::audit::uuid_v7_now().to_string();
    let principal = match authenticate(headers, &snap, st.clock.now_us()).await {
        Ok(p) => p,
        Err(u) => {
            let err = ProxyError::Unauthenticated(u);
            if jsonrpc::method(&msg) == "tools/call" {
                let mut a = CallAudit::new(st.sink.clone(), &rid, "tools/call", st.clock.now_us());
                a.arguments(msg["params"].get("arguments"), &snap);
                stack::refuse_unauthenticated(a, &msg, &err);
            }
            if kind == Kind::Request {
                let _ = tx.send(reply(err)).await;
            }
            return;
        }
    };
    let modern = msg["params"]["_meta"].get(META_VERSION).is_some();
    if !modern && kind == Kind::Request && jsonrpc::method(&msg) == "initialize" {
        let (state, result) = open_upstreams(st, &snap, &principal, &msg).await;
        // The upstreams' own messages (list changes, their requests) flow
        // to the client as they come.
        let mut streams = futures::stream::select_all(listen_all(&snap, &state).await);
        let notes = tx.clone();
        tokio::spawn(async move {
            while let Some(m) = streams.next().await {
                if notes.send(m).await.is_err() {
                    break;
                }
            }
        });
        match session.write() {
            Ok(mut w) => *w = Some(state),
            Err(p) => *p.into_inner() = Some(state),
        }
        let _ = tx.send(jsonrpc::result_body(id, result)).await;
        return;
    }
    let legacy = if modern {
        None
    } else {
        let s = match session.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match s {
            Some(s) => Some((s, session_id.to_string())),
            None => {
                if kind == Kind::Request {
                    let _ = tx
                        .send(reply(ProxyError::InvalidRequest(
                            "send initialize first, or use protocol 2026-07-28".into(),
                        )))
                        .await;
                }
                return;
            }
        }
    };
    let (protocol_version, client_name) = match &legacy {
        Some((s, _)) => (s.protocol_version.clone(), s.client_name.clone()),
        None => (
            MODERN_VERSION.to_string(),
            msg["params"]["_meta"][META_CLIENT_INFO]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        ),
    };
    let call = Call {
        st,
        snap,
        principal,
        session: legacy,
        request_id: &rid,
        protocol_version,
        client_name,
        param_headers: Vec::new(),
    };
    match call.dispatch(msg, kind).await {
        Answer::Json { body, .. } => {
            let _ = tx.send(body).await;
        }
        Answer::Raw(body) => {
            if let Ok(v) = serde_json::from_slice(&body) {
                let _ = tx.send(v).await;
            }
        }
        Answer::Stream(mut s) => {
            while let Some(m) = s.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&m) else {
                    continue;
                };
                if tx.send(v).await.is_err() {
                    break;
                }
            }
        }
        Answer::Accepted => {}
    }
}
