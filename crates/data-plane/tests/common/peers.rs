//! Real MCP peers for tests: installed once per target directory from npm
//! and PyPI (guarded by a file lock so parallel test processes install
//! once), then started bound to 127.0.0.1. Reusable by the whole-system
//! tests: include this file with `#[path = ...] mod peers;`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const EVERYTHING: &str = "@modelcontextprotocol/server-everything@2026.8.31";
pub const TS_SDK: &str = "@modelcontextprotocol/sdk@1.32.2";
pub const PY_MCP: &str = "mcp==2.3.0";
const READY_MARK: &str = ".ready-v1";

/// Where the peers live and how to run them.
pub struct Peers {
    pub root: PathBuf,
}

/// The installed peers; installs them on first use.
pub fn peers() -> &'static Peers {
    static P: OnceLock<Peers> = OnceLock::new();
    P.get_or_init(|| {
        let root = target_dir().join("peers");
        install(&root)
            .unwrap_or_else(|e| panic!("installing MCP peers in {}: {e}", root.display()));
        Peers { root }
    })
}

/// The workspace's target directory, from whichever package includes this
/// file: `CARGO_TARGET_DIR`, else `target/` beside the workspace's
/// `Cargo.lock`.
fn target_dir() -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    for _ in 0..8 {
        if dir.join("Cargo.lock").exists() {
            return dir.join("target");
        }
        if !dir.pop() {
            break;
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target")
}

fn install(root: &Path) -> Result<(), String> {
    std::fs::create_dir_all(root.join("node")).map_err(|e| e.to_string())?;
    let lock = std::fs::File::create(root.join(".install.lock")).map_err(|e| e.to_string())?;
    // Blocks while another test process installs.
    lock.lock().map_err(|e| e.to_string())?;
    if root.join(READY_MARK).exists() {
        return Ok(());
    }
    std::fs::write(
        root.join("node/package.json"),
        r#"{"name":"sentinel-test-peers","private":true}"#,
    )
    .map_err(|e| e.to_string())?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", EVERYTHING, TS_SDK])
        .current_dir(root.join("node")))?;
    if !root.join("venv/bin/python").exists() {
        run(Command::new("python3")
            .args(["-m", "venv"])
            .arg(root.join("venv")))?;
    }
    run(Command::new(root.join("venv/bin/pip")).args(["install", "-q", PY_MCP]))?;
    std::fs::write(root.join(READY_MARK), b"ok").map_err(|e| e.to_string())?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A child process killed when dropped.
pub struct Running {
    pub child: Child,
    pub port: u16,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("peer exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("peer did not listen on {port} within 30 s");
}

impl Peers {
    pub fn everything_js(&self) -> PathBuf {
        self.root
            .join("node/node_modules/@modelcontextprotocol/server-everything/dist/index.js")
    }

    /// Forces every `listen` onto 127.0.0.1 (server-everything listens on
    /// every interface otherwise).
    fn loopback_preload(&self) -> PathBuf {
        let p = self.root.join("bind-loopback.cjs");
        let _ = std::fs::write(
            &p,
            r#"const net = require('net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\d+$/.test(args[0]))) {
    const rest = args.slice(1).filter((a) => typeof a === 'function');
    return listen.call(this, Number(args[0]), '127.0.0.1', ...rest);
  }
  if (args[0] && typeof args[0] === 'object') {
    args[0] = Object.assign({}, args[0], { host: '127.0.0.1' });
  }
  return listen.apply(this, args);
};
"#,
        );
        p
    }

    /// server-everything in streamableHttp mode.
    pub fn everything_http(&self) -> Running {
        let port = free_port();
        let mut child = Command::new("node")
            .arg("--require")
            .arg(self.loopback_preload())
            .arg(self.everything_js())
            .arg("streamableHttp")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server-everything");
        wait_for_port(port, &mut child);
        Running { child, port }
    }

    pub fn python(&self) -> PathBuf {
        self.root.join("venv/bin/python")
    }

    /// A small Python `mcp` 2.3 server (dual-era) with tools `add` and
    /// `shout`, on streamable HTTP.
    pub fn python_upstream(&self) -> Running {
        let script = self.root.join("py_upstream.py");
        let _ = std::fs::write(
            &script,
            r#"import sys
from typing import Annotated
from pydantic import BaseModel, Field
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve

mcp = MCPServer("py-upstream")

class Name(BaseModel):
    name: str

def ask_name() -> Elicit[Name]:
    return Elicit("What is your name?", Name)

@mcp.tool()
def region(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
    """Echoes its region, which 2026-07-28 clients mirror in Mcp-Param-Region."""
    return "region " + region

@mcp.tool()
def greet(who: Annotated[Name, Resolve(ask_name)]) -> str:
    """Greets whoever the client says it is (asks by elicitation)."""
    return "hello " + who.name

@mcp.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b

@mcp.tool()
def shout(text: str) -> str:
    """Upper-cases text."""
    return text.upper()

@mcp.tool()
def echo(message: str) -> str:
    """Echoes (a name shared with server-everything)."""
    return "py:" + message

mcp.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
"#,
        );
        let port = free_port();
        let mut child = Command::new(self.python())
            .arg(&script)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python upstream");
        wait_for_port(port, &mut child);
        Running { child, port }
    }

    /// Runs the Python `mcp` client against `url` in `mode` ("legacy" or
    /// "2026-07-28") with `headers`: lists tools, calls `tool` with
    /// `args`, prints one JSON line `{"tools": [...], "result": ...}`.
    pub fn python_client(
        &self,
        url: &str,
        mode: &str,
        headers: &[(&str, &str)],
        tool: &str,
        args: &str,
    ) -> Result<serde_json::Value, String> {
        let script = self.root.join("py_client.py");
        let _ = std::fs::write(
            &script,
            r#"import sys, json, anyio
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

async def elicit(context, params):
    return types.ElicitResult(action="accept", content={"name": "Ada"})

async def main():
    url, mode, headers, tool, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
    http = create_mcp_http_client(headers=headers)
    async with Client(streamable_http_client(url, http_client=http), mode=mode, elicitation_callback=elicit) as c:
        tools = await c.list_tools()
        names = [t.name for t in tools.tools]
        res = await c.call_tool(tool, args)
        print(json.dumps({"tools": names, "result": res.model_dump(mode="json", by_alias=True, exclude_none=True)}))

anyio.run(main)
"#,
        );
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let out = Command::new(self.python())
            .arg(&script)
            .args([
                url,
                mode,
                &serde_json::Value::Object(headers).to_string(),
                tool,
                args,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        parse_last_json(&out)
    }

    /// Runs the TypeScript SDK client: lists tools, calls `tool`, and
    /// terminates the session.
    pub fn ts_client(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        tool: &str,
        args: &str,
    ) -> Result<serde_json::Value, String> {
        let script = self.root.join("node/ts_client.mjs");
        let _ = std::fs::write(
            &script,
            r#"import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
const [url, headers, tool, args] = [process.argv[2], JSON.parse(process.argv[3]), process.argv[4], JSON.parse(process.argv[5])];
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: 'ts-test-client', version: '1.0.0' });
await client.connect(transport);
const tools = await client.listTools();
const result = await client.callTool({ name: tool, arguments: args });
const sessionId = transport.sessionId;
await transport.terminateSession();
await client.close();
console.log(JSON.stringify({ tools: tools.tools.map((t) => t.name), result, sessionId }));
"#,
        );
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let out = Command::new("node")
            .arg(&script)
            .args([
                url,
                &serde_json::Value::Object(headers).to_string(),
                tool,
                args,
            ])
            .output()
            .map_err(|e| e.to_string())?;
        parse_last_json(&out)
    }
}

impl Peers {
    /// The TypeScript client with the sampling capability: calls
    /// `trigger-sampling-request` (the upstream asks the client to sample,
    /// through the proxy, and gets its answer back through the proxy) and
    /// `trigger-long-running-operation` with a progress callback.
    pub fn ts_sampling_and_progress(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        prefix: &str,
    ) -> Result<serde_json::Value, String> {
        let script = self.root.join("node/ts_sampling.mjs");
        let _ = std::fs::write(
            &script,
            r#"import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { CreateMessageRequestSchema } from '@modelcontextprotocol/sdk/types.js';
const [url, headers, prefix] = [process.argv[2], JSON.parse(process.argv[3]), process.argv[4]];
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: 'ts-sampling-client', version: '1.0.0' }, { capabilities: { sampling: {} } });
let sampled = 0;
client.setRequestHandler(CreateMessageRequestSchema, async (req) => {
  sampled += 1;
  return { model: 'test-model', role: 'assistant', content: { type: 'text', text: 'sampled by the client' } };
});
await client.connect(transport);
const sampling = await client.callTool({ name: prefix + 'trigger-sampling-request', arguments: { prompt: 'hello', maxTokens: 5 } });
const progress = [];
const long = await client.callTool(
  { name: prefix + 'trigger-long-running-operation', arguments: { duration: 1, steps: 3 } },
  undefined,
  { onprogress: (p) => progress.push(p) },
);
await transport.terminateSession();
await client.close();
console.log(JSON.stringify({ sampling, sampled, progress, long }));
"#,
        );
        let headers: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
            .collect();
        let out = Command::new("node")
            .arg(&script)
            .args([url, &serde_json::Value::Object(headers).to_string(), prefix])
            .output()
            .map_err(|e| e.to_string())?;
        parse_last_json(&out)
    }
}

fn parse_last_json(out: &std::process::Output) -> Result<serde_json::Value, String> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find(|l| l.starts_with('{')) {
        Some(line) if out.status.success() => serde_json::from_str(line).map_err(|e| e.to_string()),
        _ => Err(format!(
            "client failed ({}): stdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}
