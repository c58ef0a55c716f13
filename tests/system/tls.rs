//! TLS and mutual TLS between proxies and the control plane, with the real
//! binaries: a proxy that trusts the control plane's CA joins, enforces the
//! policy and ships its audit over TLS; one that does not trust it, or
//! (under mutual TLS) has no certificate the control plane trusts, gets no
//! policy, serves nothing, ships nothing, and stays up, as does the control
//! plane.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sentinel_control_plane::testing::TestDb;
use sentinel_tests::modern_call;
use sentinel_tests::peers::{Running, peers};
use sentinel_tests::procs::{CpProc, ProxyProc};
use sentinel_tests::tls::{
    Pki, http_status, proxy_tls, start_tls_cp, start_tls_proxy, tls_admin, tls_grpc_url,
};
use serde_json::json;
use sqlx::PgPool;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A TLS control plane with a backend, a role and a key; the Python
/// upstream behind it.
struct Rig {
    dir: tempfile::TempDir,
    pki: Arc<Pki>,
    cp: CpProc,
    _upstream: Running,
    key: String,
}

async fn rig(db: &TestDb, mutual: bool) -> Rig {
    sentinel_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Arc::new(blocking(Pki::generate).await);
    let upstream = blocking(|| peers().python_upstream()).await;
    let (url, d, p) = (db.url.clone(), dir.path().to_path_buf(), pki.clone());
    let cp = blocking(move || start_tls_cp(&url, &d, &p, mutual)).await;
    let mut admin = tls_admin(&cp, &pki, mutual).await;
    admin.put_http_backend("py", &upstream.url()).await;
    admin.put_role("dev", &["py/*"], &[]).await;
    let (_, key, _) = admin.create_key("dev", "alice").await;
    Rig {
        dir,
        pki,
        cp,
        _upstream: upstream,
        key,
    }
}

impl Rig {
    async fn proxy(&self, id: &str, tls: String) -> ProxyProc {
        let (id, url, dir) = (
            id.to_string(),
            tls_grpc_url(&self.cp),
            self.dir.path().join(id),
        );
        blocking(move || start_tls_proxy(&id, &url, &dir, &tls)).await
    }
}

/// Waits (bounded) until the proxy's `/readyz` says a policy is applied.
async fn wait_ready(p: &ProxyProc, limit: Duration) -> bool {
    let url = format!("http://127.0.0.1:{}/readyz", p.port);
    let deadline = Instant::now() + limit;
    loop {
        let u = url.clone();
        if blocking(move || http_status(&u)).await == Some(200) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn audited(pool: &PgPool, proxy_id: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM audit_events WHERE proxy_id = $1")
        .bind(proxy_id)
        .fetch_one(pool)
        .await
        .expect("count audit");
    n
}

async fn wait_audited(pool: &PgPool, proxy_id: &str, n: i64, limit: Duration) -> i64 {
    let deadline = Instant::now() + limit;
    loop {
        let c = audited(pool, proxy_id).await;
        if c >= n || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_of(p: &ProxyProc) -> String {
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

/// A proxy the control plane's TLS refuses: alive, not ready, MCP requests
/// refused with 503, the failure logged, nothing audited.
async fn assert_refused(rig: &Rig, db: &TestDb, p: &mut ProxyProc, id: &str, log_says: &[&str]) {
    assert!(
        !wait_ready(p, Duration::from_secs(4)).await,
        "{id} got a policy:\n{}",
        log_of(p)
    );
    let child = p.proc.child.as_mut().expect("proxy running");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "{id} exited:\n{}",
        log_of(p)
    );
    let (status, body) = modern_call(
        &format!("http://127.0.0.1:{}/mcp", p.port),
        &rig.key,
        "py__add",
        json!({"a": 1, "b": 2}),
    )
    .await;
    assert_eq!(status, 503, "{id}: {body}");
    let log = log_of(p);
    assert!(log.contains("policy stream failed"), "{id}:\n{log}");
    assert!(
        log_says.iter().any(|s| log.contains(s)),
        "{id}: the log names the TLS failure ({log_says:?}):\n{log}"
    );
    assert!(!log.contains("panicked"), "{id}:\n{log}");
    assert_eq!(audited(&db.pool, id).await, 0, "{id} shipped audit");
}

/// The good proxy's call goes through and its audit event arrives.
async fn assert_serves(rig: &Rig, db: &TestDb, p: &ProxyProc, id: &str, calls_before: i64) {
    assert!(
        wait_ready(p, Duration::from_secs(30)).await,
        "{id} never got a policy:\n{}",
        log_of(p)
    );
    let (status, body) = modern_call(
        &format!("http://127.0.0.1:{}/mcp", p.port),
        &rig.key,
        "py__add",
        json!({"a": 2, "b": 3}),
    )
    .await;
    assert_eq!(status, 200, "{id}: {body}");
    assert!(body["result"].to_string().contains('5'), "{id}: {body}");
    let n = wait_audited(&db.pool, id, calls_before + 1, Duration::from_secs(20)).await;
    assert_eq!(n, calls_before + 1, "{id}: audit ingested over TLS");
}

fn cp_alive(cp: &mut CpProc) {
    let child = cp.proc.child.as_mut().expect("cp running");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "control plane exited:\n{}",
        std::fs::read_to_string(&cp.log).unwrap_or_default()
    );
    assert_eq!(
        http_status(&format!("http://127.0.0.1:{}/readyz", cp.http_port)),
        Some(200)
    );
}

fn path(p: &Path) -> Option<&Path> {
    Some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_proxy_with_the_ca_joins_and_ships_audit_one_with_the_wrong_ca_is_refused() {
    let db = TestDb::new().await;
    let mut rig = rig(&db, false).await;

    let good = rig
        .proxy("tls-good", proxy_tls(path(&rig.pki.ca), None))
        .await;
    assert_serves(&rig, &db, &good, "tls-good", 0).await;

    // A CA that did not sign the control plane's certificate.
    let mut wrong = rig
        .proxy("tls-wrong-ca", proxy_tls(path(&rig.pki.other_ca), None))
        .await;
    assert_refused(
        &rig,
        &db,
        &mut wrong,
        "tls-wrong-ca",
        &["UnknownIssuer", "certificate"],
    )
    .await;

    // The control plane and the good proxy are unaffected.
    cp_alive(&mut rig.cp);
    assert_serves(&rig, &db, &good, "tls-good", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_proxies_with_a_certificate_the_control_plane_trusts() {
    let db = TestDb::new().await;
    let mut rig = rig(&db, true).await;
    let pki = rig.pki.clone();

    let good = rig
        .proxy(
            "mtls-good",
            proxy_tls(path(&pki.ca), Some((&pki.client_cert, &pki.client_key))),
        )
        .await;
    assert_serves(&rig, &db, &good, "mtls-good", 0).await;

    let mut anonymous = rig
        .proxy("mtls-no-cert", proxy_tls(path(&pki.ca), None))
        .await;
    let mut foreign = rig
        .proxy(
            "mtls-foreign",
            proxy_tls(path(&pki.ca), Some((&pki.foreign_cert, &pki.foreign_key))),
        )
        .await;
    // The server refuses the handshake after the client sent (or did not
    // send) its certificate; the client sees an alert or a reset.
    let says = [
        "certificate",
        "alert",
        "tls",
        "TLS",
        "connection reset",
        "broken pipe",
    ];
    assert_refused(&rig, &db, &mut anonymous, "mtls-no-cert", &says).await;
    assert_refused(&rig, &db, &mut foreign, "mtls-foreign", &says).await;

    cp_alive(&mut rig.cp);
    let cp_log = std::fs::read_to_string(&rig.cp.log).unwrap_or_default();
    assert!(!cp_log.contains("panicked"), "{cp_log}");
    // Only the admitted proxy is in the fleet view.
    let mut admin = tls_admin(&rig.cp, &rig.pki, true).await;
    let fleet = admin.proxies().await;
    let ids: Vec<&str> = fleet.proxies.iter().map(|p| p.proxy_id.as_str()).collect();
    assert_eq!(ids, ["mtls-good"], "{fleet:?}");
    assert_serves(&rig, &db, &good, "mtls-good", 1).await;
}

/// Runs a binary to its exit (bounded): exit code and stderr.
fn run_to_exit(cmd: &mut std::process::Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_misconfiguration_exits_64_naming_the_field() {
    use sentinel_tests::procs::bin;
    let pki = Pki::generate();
    let cp = |cert: &Path, key: &Path| {
        let mut c = std::process::Command::new(bin("sentinel-control-plane"));
        // Unreachable: TLS problems must be found before the database is
        // tried (that would be exit 69).
        c.env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/sentinel")
            .env("SENTINEL_CP_DB__CONNECT_TIMEOUT_SECS", "2")
            .env(
                "SENTINEL_CP_ADMIN_TOKENS",
                "[\"admin-token-0123456789abcdef\"]",
            )
            .env("SENTINEL_CP_GRPC__LISTEN", "127.0.0.1:0")
            .env("SENTINEL_CP_HTTP__LISTEN", "127.0.0.1:0")
            .env("SENTINEL_CP_GRPC__TLS__CERT_PEM", cert)
            .env("SENTINEL_CP_GRPC__TLS__KEY_PEM", key);
        c
    };

    let missing = pki.dir.join("missing.crt");
    let (code, stderr) = run_to_exit(&mut cp(&missing, &pki.server_key));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("grpc.tls.cert_pem"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    // A key that is not the certificate's.
    let (code, stderr) = run_to_exit(&mut cp(&pki.server_cert, &pki.client_key));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("grpc.tls"), "{stderr}");
    assert!(
        !stderr.contains("Postgres"),
        "checked before the database: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A certificate file given as the key.
    let (code, stderr) = run_to_exit(&mut cp(&pki.server_cert, &pki.server_cert));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("grpc.tls.key_pem"), "{stderr}");

    // A proxy with an https:// control plane but no CA to verify it by.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "proxy_id = \"p\"\nlisten = \"127.0.0.1:0\"\n[control_plane]\nurl = \"https://127.0.0.1:1\"\n\
             join_token = \"{}\"\n[spool]\ndir = \"{}\"\n",
            sentinel_tests::JOIN,
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let (code, stderr) = run_to_exit(
        std::process::Command::new(bin("sentinel-proxy"))
            .arg("--config")
            .arg(&config),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("control_plane.ca_file"), "{stderr}");
}
