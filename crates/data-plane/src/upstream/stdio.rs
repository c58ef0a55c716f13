//! A stdio upstream: a child process speaking newline-delimited JSON-RPC.
//!
//! The command comes only from the proxy's local config (`[stdio.<name>]`);
//! the policy can refer to it but never supply one. One child per backend
//! serves every client of this proxy: the proxy initializes it once,
//! renumbers request ids so clients cannot collide, and restarts it on the
//! next call after it exits. Requests the child sends to a client cannot be
//! routed back to one client, so they are answered here (`ping`) or refused,
//! and of its notifications only list changes are passed on (to every
//! listening client).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{broadcast, oneshot};

use super::{MessageStream, Reply, UpstreamError};
use crate::config::StdioCommand;
use crate::mcp::session::UpstreamSession;

const VERSION: &str = "2025-11-25";

pub struct StdioUpstream {
    name: String,
    cmd: StdioCommand,
    timeout: Duration,
    child: tokio::sync::Mutex<Option<Arc<Child>>>,
    notes: broadcast::Sender<Value>,
}

struct Child {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Value>>>,
    next_id: AtomicU64,
    alive: Arc<AtomicBool>,
    protocol_version: Mutex<String>,
    _process: Mutex<tokio::process::Child>,
}

impl StdioUpstream {
    pub fn new(name: &str, cmd: StdioCommand, timeout: Duration) -> Self {
        Self {
            name: name.to_string(),
            cmd,
            timeout,
            child: tokio::sync::Mutex::new(None),
            notes: broadcast::channel(256).0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn open_session(&self) -> Result<UpstreamSession, UpstreamError> {
        let child = self.child().await?;
        let version = match child.protocol_version.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Ok(UpstreamSession {
            backend: self.name.clone(),
            session_id: None,
            protocol_version: version,
        })
    }

    pub async fn send(&self, msg: &Value) -> Result<Reply, UpstreamError> {
        let child = self.child().await?;
        if msg.get("method").is_some() && msg.get("id").is_some() {
            let answer = child.request(msg, self.timeout).await?;
            Ok(Reply::Json(answer))
        } else if msg.get("method").is_some() {
            child.write(msg).await?;
            Ok(Reply::Accepted)
        } else {
            // A client's answer to a request this child never sent to it.
            Ok(Reply::Accepted)
        }
    }

    /// Notifications of the child (list changes and the like), for GET
    /// listen streams.
    pub fn notifications(&self) -> MessageStream {
        let rx = self.notes.subscribe();
        futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(v) => return Some((Ok(v), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    async fn child(&self) -> Result<Arc<Child>, UpstreamError> {
        let mut slot = self.child.lock().await;
        if let Some(c) = slot.as_ref()
            && c.alive.load(Ordering::Acquire)
        {
            return Ok(c.clone());
        }
        let c = self.spawn().await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn spawn(&self) -> Result<Arc<Child>, UpstreamError> {
        let mut cmd = Command::new(&self.cmd.command);
        cmd.args(&self.cmd.args)
            .envs(&self.cmd.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(cwd) = &self.cmd.cwd {
            cmd.current_dir(cwd);
        }
        let mut process = cmd
            .spawn()
            .map_err(|e| UpstreamError::Connect(format!("spawn {}: {e}", self.cmd.command)))?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            return Err(UpstreamError::Connect("child has no stdio".into()));
        };
        let alive = Arc::new(AtomicBool::new(true));
        let child = Arc::new(Child {
            stdin: tokio::sync::Mutex::new(stdin),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            alive: alive.clone(),
            protocol_version: Mutex::new(VERSION.to_string()),
            _process: Mutex::new(process),
        });
        let reader_child = Arc::downgrade(&child);
        let notes = self.notes.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(child) = reader_child.upgrade() else {
                    break;
                };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    tracing::debug!(backend = %name, "stdio upstream wrote a non-JSON line");
                    continue;
                };
                child.dispatch(msg, &notes).await;
            }
            alive.store(false, Ordering::Release);
            if let Some(child) = reader_child.upgrade() {
                // Wake every waiter: their senders are dropped.
                match child.pending.lock() {
                    Ok(mut p) => p.clear(),
                    Err(p) => p.into_inner().clear(),
                }
            }
            tracing::info!(backend = %name, "stdio upstream exited");
        });
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{
            "protocolVersion": VERSION,
            "capabilities": {},
            "clientInfo": {"name": "sentinel-proxy", "version": env!("CARGO_PKG_VERSION")}
        }});
        let answer = child.request(&init, self.timeout).await?;
        let Some(result) = answer.get("result") else {
            return Err(UpstreamError::Garbage("initialize refused".into()));
        };
        if let Some(v) = result["protocolVersion"].as_str() {
            match child.protocol_version.lock() {
                Ok(mut g) => *g = v.to_string(),
                Err(p) => *p.into_inner() = v.to_string(),
            }
        }
        child
            .write(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}))
            .await?;
        Ok(child)
    }
}

impl Child {
    async fn write(&self, msg: &Value) -> Result<(), UpstreamError> {
        let mut line =
            serde_json::to_vec(msg).map_err(|e| UpstreamError::Garbage(e.to_string()))?;
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        stdin
            .write_all(&line)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        stdin
            .flush()
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))
    }

    async fn request(&self, msg: &Value, timeout: Duration) -> Result<Value, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let original = msg.get("id").cloned().unwrap_or(Value::Null);
        let mut renumbered = msg.clone();
        renumbered["id"] = json!(id);
        let (tx, rx) = oneshot::channel();
        self.pending_map().insert(id, tx);
        if let Err(e) = self.write(&renumbered).await {
            self.pending_map().remove(&id);
            return Err(e);
        }
        let mut answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => return Err(UpstreamError::Connect("child exited".into())),
            Err(_) => {
                self.pending_map().remove(&id);
                return Err(UpstreamError::Timeout);
            }
        };
        answer["id"] = original;
        Ok(answer)
    }

    fn pending_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Value>>> {
        match self.pending.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    async fn dispatch(&self, msg: Value, notes: &broadcast::Sender<Value>) {
        let is_answer = msg.get("result").is_some() || msg.get("error").is_some();
        match (msg.get("id").and_then(Value::as_u64), msg.get("method")) {
            (Some(id), None) if is_answer => {
                if let Some(tx) = self.pending_map().remove(&id) {
                    let _ = tx.send(msg);
                }
            }
            (_, Some(method)) if msg.get("id").is_some() => {
                let reply = if method == "ping" {
                    json!({"jsonrpc":"2.0","id":msg["id"],"result":{}})
                } else {
                    json!({"jsonrpc":"2.0","id":msg["id"],"error":{"code":-32601,"message":"requests from a stdio upstream are not relayed by sentinel"}})
                };
                let _ = self.write(&reply).await;
            }
            // Only list changes are shared: the child serves every client
            // of this proxy, and a progress or log message of one client's
            // call must not reach another client.
            (_, Some(method))
                if matches!(
                    method.as_str(),
                    Some(
                        "notifications/tools/list_changed"
                            | "notifications/prompts/list_changed"
                            | "notifications/resources/list_changed"
                    )
                ) =>
            {
                let _ = notes.send(msg);
            }
            _ => {}
        }
    }
}
