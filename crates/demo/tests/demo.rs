//! System tests of the README's first command: the real `sentinel demo`
//! binary as a process, used only through what it prints — the MCP URL and
//! keys with a real MCP client (the Python SDK), the REST URL and admin
//! token for the audit log, and the copy-paste curl command — then stopped
//! with SIGINT, as a user would with Ctrl-C.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test set-up fails loudly

#[path = "../../data-plane/tests/common/peers.rs"]
mod peers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const MODERN: &str = "2026-07-28";
/// Start-up includes initdb and migrations in a debug build on a busy
/// machine.
const START_LIMIT: Duration = Duration::from_secs(180);
const STOP_LIMIT: Duration = Duration::from_secs(40);

/// A running `sentinel demo`, and what it printed.
struct Demo {
    child: Option<Child>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    mcp: String,
    rest: String,
    grpc: String,
    admin_token: String,
    developer_key: String,
    analyst_key: String,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

/// A data directory, removed when dropped (after the demo using it).
struct DataDir(PathBuf);

impl std::ops::Deref for DataDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh data directory under the target directory, traversable by the
/// `postgres` user (Postgres runs as it when the tests run as root).
fn data_dir() -> DataDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    DataDir(dir)
}

impl Demo {
    fn start(data_dir: &Path, database_url: Option<&str>) -> Demo {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sentinel"));
        cmd.args(["demo", "--port-base", "0", "--data-dir"])
            .arg(data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match database_url {
            Some(url) => cmd.env("DATABASE_URL", url),
            None => cmd.env_remove("DATABASE_URL"),
        };
        let mut child = cmd.spawn().expect("spawn sentinel demo");
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if out.lock().unwrap().contains("Press Ctrl-C to stop.") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "sentinel demo exited early ({status}):\nstdout:\n{}\nstderr:\n{}",
                    out.lock().unwrap(),
                    err.lock().unwrap()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "sentinel demo not ready within {START_LIMIT:?}:\nstderr:\n{}",
                    err.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let printed = out.lock().unwrap().clone();
        let line_with = |marker: &str| -> &str {
            printed
                .lines()
                .find(|l| l.contains(marker))
                .unwrap_or_else(|| panic!("no line with {marker:?} in:\n{printed}"))
        };
        let token = |line: &str, prefix: &str| -> String {
            line.split_whitespace()
                .find(|w| w.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix}... in {line:?}"))
                .to_string()
        };
        let mcp = token(line_with("MCP endpoint"), "http://");
        let rest = token(line_with("REST API"), "http://")
            .trim_end_matches("/api/v1")
            .to_string();
        let grpc = token(line_with("gRPC (admin)"), "http://");
        let admin_token = line_with("Admin token")
            .split_whitespace()
            .last()
            .unwrap()
            .to_string();
        let developer_key = token(line_with("developer (alice)"), "sntl_");
        let analyst_key = token(line_with("analyst (bob)"), "sntl_");
        assert!(mcp.starts_with("http://127.0.0.1:") && mcp.ends_with("/mcp"));
        Demo {
            child: Some(child),
            out,
            err,
            mcp,
            rest,
            grpc,
            admin_token,
            developer_key,
            analyst_key,
        }
    }

    fn printed(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Ctrl-C, and the exit status (bounded).
    fn interrupt(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sentinel demo did not stop within {STOP_LIMIT:?} of SIGINT:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn python(&self, key: &str, mode: &str, tool: &str, args: Value) -> Result<Value, String> {
        let auth = format!("Bearer {key}");
        peers::peers().python_client(
            &self.mcp,
            mode,
            &[("Authorization", &auth)],
            tool,
            &args.to_string(),
        )
    }

    /// Waits until the audit log (REST) holds an event matching `pred`.
    async fn find_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let client = http_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let r = client
                .get(format!("{}/api/v1/audit?limit=200", self.rest))
                .bearer_auth(&self.admin_token)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(r) = r
                && r.status().is_success()
            {
                last = r.json().await.unwrap_or(Value::Null);
                if let Some(e) = last["events"]
                    .as_array()
                    .and_then(|es| es.iter().find(|e| pred(e)))
                {
                    return e.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no audit event for {what}; last page: {last:#}");
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // A failed test still stops the demo (and so its Postgres).
        if self.child.is_some() && !std::thread::panicking() {
            let _ = self.interrupt();
        } else if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + STOP_LIMIT;
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn http_client() -> reqwest::Client {
    // reqwest is built without a default TLS provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// One modern `tools/call` over plain HTTP: (status, body).
async fn raw_call(url: &str, key: &str, tool: &str, args: Value) -> (u16, Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": args,
        "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                  "io.modelcontextprotocol/clientCapabilities": {}}
    }});
    let r = http_client()
        .post(url)
        .bearer_auth(key)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "tools/call")
        .header("mcp-name", tool)
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("proxy answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// What every run must offer: the printed key works with a real client in
/// both eras, the limited key is refused where the policy says, and the
/// calls are in the audit log with the e-mail redacted.
async fn exercise(demo: &Demo) {
    let v = demo
        .python(
            &demo.developer_key,
            MODERN,
            "demo__lookup_customer",
            json!({"email": "ada@example.com"}),
        )
        .expect("python client, 2026-07-28");
    let tools: Vec<&str> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for t in [
        "demo__echo",
        "demo__add",
        "demo__time",
        "demo__lookup_customer",
    ] {
        assert!(tools.contains(&t), "{t} missing from {tools:?}");
    }
    assert_eq!(
        v["result"]["structuredContent"]["customer_id"], "C-1001",
        "{v}"
    );

    let v = demo
        .python(
            &demo.developer_key,
            "legacy",
            "demo__add",
            json!({"a": 2, "b": 3}),
        )
        .expect("python client, legacy");
    assert_eq!(v["result"]["content"][0]["text"], "5", "{v}");

    // The analyst sees only its tools, and is refused the denied one.
    let v = demo
        .python(
            &demo.analyst_key,
            MODERN,
            "demo__echo",
            json!({"message": "hi"}),
        )
        .expect("python client as analyst");
    assert_eq!(v["tools"], json!(["demo__echo", "demo__time"]), "{v}");
    assert_eq!(v["result"]["content"][0]["text"], "hi");
    let (status, body) = raw_call(
        &demo.mcp,
        &demo.analyst_key,
        "demo__lookup_customer",
        json!({"customer_id": "C-1001"}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.get("error").is_some(), "{body}");

    let ok = demo
        .find_audit("alice's lookup", |e| {
            e["subject"] == "alice" && e["tool"] == "lookup_customer" && e["outcome"] == "ok"
        })
        .await;
    let args = ok["arguments"].as_str().unwrap();
    assert!(args.contains("email"), "{ok}");
    assert!(
        !args.contains("ada@example.com"),
        "e-mail not redacted: {ok}"
    );
    assert_eq!(ok["role"], "developer");
    assert_eq!(ok["backend"], "demo");
    demo.find_audit("bob's refusal", |e| {
        e["subject"] == "bob" && e["tool"] == "lookup_customer" && e["outcome"] == "forbidden"
    })
    .await;
}

/// `sentinelctl audit query`, with the address and token the demo printed,
/// when the workspace's `sentinelctl` is built next to `sentinel` (as
/// `cargo test --workspace` does; it belongs to another package).
fn sentinelctl_audit(demo: &Demo) -> Option<String> {
    let ctl = Path::new(env!("CARGO_BIN_EXE_sentinel")).with_file_name("sentinelctl");
    if !ctl.exists() {
        eprintln!("{} not built: sentinelctl is not tried", ctl.display());
        return None;
    }
    let out = Command::new(&ctl)
        .args(["--addr", &demo.grpc, "--http", &demo.rest])
        .env("SENTINEL_TOKEN", &demo.admin_token)
        .args(["audit", "query", "--limit", "50"])
        .stdin(Stdio::null())
        .output()
        .expect("run sentinelctl");
    assert!(out.status.success(), "{out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the printed curl command and returns what it wrote.
fn run_printed_curl(printed: &str) -> Option<String> {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl not installed: the printed command is not tried");
        return None;
    }
    let start = printed.find("curl -sS http://")?;
    let rest = &printed[start..];
    let end = rest.find("}}}}'")? + "}}}}'".len();
    let out = Command::new("sh")
        .arg("-c")
        .arg(&rest[..end])
        .output()
        .expect("sh");
    assert!(out.status.success(), "{:?}", out);
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_database_url() {
    let server = sentinel_control_plane::testing::server_url().await;
    let name = format!("sentinel_demo_t_{}", uuid::Uuid::new_v4().simple());
    let (base, _) = server
        .rsplit_once('/')
        .expect("server URL names a database");
    // The demo creates the database it is given if it does not exist.
    let url = format!("{base}/{name}");
    let dir = data_dir();
    let mut demo = Demo::start(&dir, Some(&url));

    exercise(&demo).await;
    let answer = run_printed_curl(&demo.printed());
    if let Some(answer) = answer {
        let v: Value = serde_json::from_str(&answer).expect("curl got JSON");
        assert_eq!(v["result"]["content"][0]["text"], "hello", "{v}");
    }

    if let Some(table) = sentinelctl_audit(&demo) {
        assert!(
            table
                .lines()
                .any(|l| l.contains("alice") && l.contains("lookup_customer")),
            "{table}"
        );
    }

    let status = demo.interrupt();
    assert!(status.success(), "exit {status}:\n{}", demo.stderr());
    let log = demo.stderr();
    assert!(log.contains("proxy stopped"), "{log}");
    assert!(log.contains("control plane stopped"), "{log}");

    drop(demo);
    use sqlx::Connection;
    if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut c)
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_its_own_cluster_and_a_second_run_reuses_it() {
    if sentinel_control_plane::local_pg::find_bin_dir().is_err() {
        eprintln!("no PostgreSQL binaries on this machine: skipped");
        return;
    }
    let dir = data_dir();

    let mut first = Demo::start(&dir, None);
    exercise(&first).await;
    let old_key = first.developer_key.clone();
    let status = first.interrupt();
    assert!(status.success(), "exit {status}:\n{}", first.stderr());
    assert!(
        first.stderr().contains("Postgres stopped"),
        "{}",
        first.stderr()
    );
    assert!(
        !dir.join("pg/postmaster.pid").exists(),
        "the cluster was left running"
    );
    drop(first);

    // Same directory: the cluster and its data are reused, the policy is
    // re-applied, new keys are made and the old ones no longer work.
    let mut second = Demo::start(&dir, None);
    assert!(
        second.stderr().contains("revoked 2 demo key(s)"),
        "{}",
        second.stderr()
    );
    let v = second
        .python(&second.developer_key, MODERN, "demo__time", json!({}))
        .expect("python client on the second run");
    assert!(v["result"]["structuredContent"]["utc"].is_string(), "{v}");
    let (status, _) = raw_call(&second.mcp, &old_key, "demo__echo", json!({"message": "x"})).await;
    assert_eq!(status, 401, "a key of the first run still works");
    // The first run's calls are still in the audit log.
    second
        .find_audit("the first run's lookup", |e| {
            e["subject"] == "alice" && e["tool"] == "lookup_customer"
        })
        .await;
    let status = second.interrupt();
    assert!(status.success(), "exit {status}:\n{}", second.stderr());
    drop(second);
}

/// Runs `sentinel demo` without `DATABASE_URL`, with `env` set, until it
/// exits on its own (bounded): its exit code and stderr.
fn demo_until_exit(data_dir: &Path, env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sentinel"));
    cmd.args(["demo", "--port-base", "0", "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("SENTINEL_PG_BIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn sentinel demo");
    let err = collect(child.stderr.take().unwrap());
    let _out = collect(child.stdout.take().unwrap());
    let deadline = Instant::now() + STOP_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sentinel demo did not give up within {STOP_LIMIT:?}:\n{}",
                err.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader thread finishes at EOF, right after the exit.
    std::thread::sleep(Duration::from_millis(200));
    let text = err.lock().unwrap().clone();
    (status.code(), text)
}

#[test]
fn without_database_url_or_postgres_binaries_the_demo_says_what_to_install() {
    let dir = data_dir();
    let empty = dir.join("no-binaries-here");
    std::fs::create_dir_all(&empty).unwrap();

    // Nothing anywhere: no versioned install under the search root, nothing
    // on PATH (the demo needs no other program before Postgres).
    let (code, stderr) = demo_until_exit(
        &dir,
        &[("SENTINEL_PG_SEARCH_ROOT", &empty), ("PATH", &empty)],
    );
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains("no PostgreSQL server binaries found"),
        "{stderr}"
    );
    assert!(
        stderr.contains("apt-get install postgresql"),
        "names the Debian package: {stderr}"
    );
    assert!(stderr.contains("DATABASE_URL="), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.join("pg/PG_VERSION").exists(), "no cluster was made");

    // An explicit SENTINEL_PG_BIN without the binaries is an error naming
    // it, even though this machine may have PostgreSQL installed elsewhere.
    let (code, stderr) = demo_until_exit(&dir, &[("SENTINEL_PG_BIN", &empty)]);
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("SENTINEL_PG_BIN={}", empty.display())),
        "{stderr}"
    );
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
    assert!(!dir.join("pg/PG_VERSION").exists(), "no cluster was made");
}
