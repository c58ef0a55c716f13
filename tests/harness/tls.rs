//! TLS for the system tests: throwaway certificates (a CA, a server
//! certificate for 127.0.0.1 and localhost, a client certificate it signed,
//! a self-signed "foreign" client certificate, and a second CA that signed
//! nothing here) and helpers that start the real control plane and proxy
//! binaries with TLS configured.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sentinel_shared::proto::admin_client::AdminClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::peers::free_port;
use crate::procs::{CpProc, Proc, ProxyProc, bin, target_dir};
use crate::{ADMIN, Admin, JOIN};

/// Certificate and key files, PEM, in a directory under `target/` that is
/// removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA the control plane's certificate and the good client
    /// certificate chain to.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Signed by `ca`, for client authentication.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Self-signed: chains to nothing the control plane trusts.
    pub foreign_cert: PathBuf,
    pub foreign_key: PathBuf,
    /// A CA that signed neither the server nor the clients.
    pub other_ca: PathBuf,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn leaf_params(name: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> CertificateParams {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![purpose];
    p
}

impl Pki {
    /// Generates everything into a fresh directory under `target/`.
    pub fn generate() -> Pki {
        let dir = target_dir().join(format!("tls-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create pki dir");
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };

        let ca = CertifiedIssuer::self_signed(
            ca_params("sentinel test CA"),
            KeyPair::generate().expect("ca key"),
        )
        .expect("ca certificate");
        let other = CertifiedIssuer::self_signed(
            ca_params("some other CA"),
            KeyPair::generate().expect("other ca key"),
        )
        .expect("other ca certificate");

        let server_key = KeyPair::generate().expect("server key");
        let server = leaf_params(
            "sentinel-control-plane",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
        .signed_by(&server_key, &*ca)
        .expect("server certificate");

        let client_key = KeyPair::generate().expect("client key");
        let client = leaf_params("proxy-client", &[], ExtendedKeyUsagePurpose::ClientAuth)
            .signed_by(&client_key, &*ca)
            .expect("client certificate");

        let foreign_key = KeyPair::generate().expect("foreign key");
        let foreign = leaf_params("proxy-foreign", &[], ExtendedKeyUsagePurpose::ClientAuth)
            .self_signed(&foreign_key)
            .expect("foreign certificate");

        Pki {
            ca: write("ca.crt", ca.pem()),
            other_ca: write("other-ca.crt", other.pem()),
            server_cert: write("server.crt", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            client_cert: write("client.crt", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            foreign_cert: write("foreign.crt", foreign.pem()),
            foreign_key: write("foreign.key", foreign_key.serialize_pem()),
            dir,
        }
    }
}

/// Starts the control plane binary with TLS on its gRPC listener (and
/// mutual TLS when `mutual`), and waits until its (plain HTTP) `/readyz`
/// answers 200.
pub fn start_tls_cp(database_url: &str, log_dir: &Path, pki: &Pki, mutual: bool) -> CpProc {
    let (grpc_port, http_port) = (free_port(), free_port());
    let log = log_dir.join("control-plane.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let mut cmd = Command::new(bin("sentinel-control-plane"));
    cmd.env("DATABASE_URL", database_url)
        .env("SENTINEL_CP_GRPC__LISTEN", format!("127.0.0.1:{grpc_port}"))
        .env("SENTINEL_CP_HTTP__LISTEN", format!("127.0.0.1:{http_port}"))
        .env("SENTINEL_CP_GRPC__TLS__CERT_PEM", &pki.server_cert)
        .env("SENTINEL_CP_GRPC__TLS__KEY_PEM", &pki.server_key)
        .env("SENTINEL_CP_ADMIN_TOKENS", format!("[\"{ADMIN}\"]"))
        .env("SENTINEL_CP_JOIN_TOKENS", format!("[\"{JOIN}\"]"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file);
    if mutual {
        cmd.env("SENTINEL_CP_GRPC__TLS__CLIENT_CA_PEM", &pki.ca);
    }
    let child = cmd.spawn().expect("spawn control plane");
    let mut cp = CpProc {
        proc: Proc { child: Some(child) },
        database_url: database_url.into(),
        grpc_port,
        http_port,
        log,
    };
    let ready = format!("http://127.0.0.1:{http_port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&ready) != Some(200) {
        if let Some(Ok(Some(status))) = cp.proc.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "control plane exited ({status}):\n{}",
                std::fs::read_to_string(&cp.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "control plane not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    cp
}

/// The status of a plain HTTP GET on 127.0.0.1, or `None` when nothing
/// answers.
pub fn http_status(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: std::net::SocketAddr = hostport.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).ok()?;
    if n < 12 {
        return None;
    }
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// The `https://` gRPC URL of a control plane started by [`start_tls_cp`].
pub fn tls_grpc_url(cp: &CpProc) -> String {
    format!("https://127.0.0.1:{}", cp.grpc_port)
}

/// The admin gRPC client over TLS, trusting `pki.ca`, presenting the good
/// client certificate when `client_cert`.
pub async fn tls_admin(cp: &CpProc, pki: &Pki, client_cert: bool) -> Admin {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
        std::fs::read(&pki.ca).expect("read ca"),
    ));
    if client_cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&pki.client_cert).expect("read client cert"),
            std::fs::read(&pki.client_key).expect("read client key"),
        ));
    }
    let ch = Channel::from_shared(tls_grpc_url(cp))
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("connect admin over tls");
    Admin(AdminClient::new(ch))
}

/// Starts the proxy binary joined to `cp_url`, with `tls` (TOML lines for
/// the `[control_plane]` table: `ca_file`, `cert_file`, `key_file`), its
/// files in `dir`. Does not wait for a policy: a proxy the control plane
/// refuses never gets one. Waits until `/healthz` answers.
pub fn start_tls_proxy(proxy_id: &str, cp_url: &str, dir: &Path, tls: &str) -> ProxyProc {
    std::fs::create_dir_all(dir).expect("proxy dir");
    let port = free_port();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "proxy_id = \"{proxy_id}\"\nlisten = \"127.0.0.1:{port}\"\nupstream_timeout_ms = 10000\n\
             [control_plane]\nurl = \"{cp_url}\"\njoin_token = \"{JOIN}\"\ncache_file = \"{}\"\n{tls}\n\
             [spool]\ndir = \"{}\"\n",
            dir.join("policy.cache").display(),
            dir.join("spool").display(),
        ),
    )
    .expect("write proxy config");
    let log = dir.join("proxy.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("log file");
    let child = Command::new(bin("sentinel-proxy"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn proxy");
    let mut p = ProxyProc {
        proc: Proc { child: Some(child) },
        port,
        config,
        log,
    };
    let health = format!("http://127.0.0.1:{port}/healthz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_status(&health) != Some(200) {
        if let Some(Ok(Some(status))) = p.proc.child.as_mut().map(|c| c.try_wait()) {
            panic!(
                "proxy exited ({status}):\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "proxy not serving");
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// The TOML lines of a proxy trusting `ca`, presenting `cert`/`key`.
pub fn proxy_tls(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> String {
    let mut s = String::new();
    if let Some(ca) = ca {
        s.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    }
    if let Some((cert, key)) = identity {
        s.push_str(&format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    s
}
