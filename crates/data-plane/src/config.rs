//! The proxy's configuration: a TOML file plus `SENTINEL_PROXY_*` environment
//! overrides, validated once at start with every problem reported at once.
//!
//! Environment overrides use `__` to reach nested keys, e.g.
//! `SENTINEL_PROXY_CONTROL_PLANE__URL=https://cp:7443`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use sentinel_shared::pem::{Pem, check_pem};
use serde::{Deserialize, Serialize};

/// Exit code for a configuration error (`EX_CONFIG` would be 78; sysexits'
/// `EX_USAGE`, 64, is what operators of our other tools expect).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Most runtime threads `workers` may ask for.
pub const MAX_WORKERS: usize = 256;

/// Everything the proxy reads at start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Stable identity of this proxy toward the control plane and in audit.
    pub proxy_id: String,
    /// Address the MCP endpoint, health and metrics are served on.
    pub listen: SocketAddr,
    /// Path of the MCP endpoint.
    pub mcp_path: String,
    /// Public base URL of this proxy (e.g. `https://mcp.example.com`), used
    /// in the RFC 9728 metadata; when empty it is derived from `Host`.
    pub public_url: String,
    /// Where policy comes from in production.
    pub control_plane: ControlPlaneConfig,
    /// Local audit spool (written by the spool, owned by `audit::spool`).
    pub spool: SpoolConfig,
    /// A policy snapshot read from disk at start (tests, standalone use).
    /// JSON or TOML in the format of [`crate::policy::file::PolicyFile`].
    pub policy_file: Option<PathBuf>,
    /// Largest request body accepted on `/mcp`, bytes.
    pub max_body_bytes: usize,
    /// `Origin` values accepted (exact match, or `*`). Requests without an
    /// `Origin` (non-browser clients) are always accepted. Loopback origins
    /// (`http://localhost:*`, `http://127.0.0.1:*`) are accepted unless
    /// `allow_loopback_origins` is false.
    pub allowed_origins: Vec<String>,
    pub allow_loopback_origins: bool,
    /// `Host` names accepted (port ignored; `*` accepts any). Empty: the
    /// loopback names only, the DNS-rebinding-safe default.
    pub allowed_hosts: Vec<String>,
    /// Default per-request timeout toward upstreams, milliseconds.
    pub upstream_timeout_ms: u64,
    /// Stdio upstream commands this proxy may run, by name. The policy refers
    /// to them (`command_ref`); it can never add one.
    pub stdio: BTreeMap<String, StdioCommand>,
    /// Runtime threads serving requests. 1 (the default): one event loop,
    /// as a sidecar next to its agents wants it: no hand-offs and wake-ups
    /// between threads, which cost a quarter of the CPU per call and doubled
    /// the added latency at low rates (docs/PERFORMANCE.md). More threads,
    /// or 0 for one per available core, for a proxy shared by many agents.
    pub workers: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// gRPC URL of the control plane; empty: run from `policy_file` only.
    pub url: String,
    /// Join token (`sntj_...`) proving this proxy may join.
    pub join_token: String,
    /// PEM CA bundle to verify the control plane with (optional).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key this proxy presents when the control
    /// plane requires mutual TLS (`grpc.tls.client_ca_pem`). Both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Where the last applied snapshot is cached.
    pub cache_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// `fsync` or `os`.
    pub durability: String,
    /// `reject` or `drop`.
    pub on_full: String,
    pub max_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("sentinel-spool"),
            durability: "fsync".into(),
            on_full: "reject".into(),
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// A command the proxy may run as a stdio upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StdioCommand {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_id: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            mcp_path: "/mcp".into(),
            public_url: String::new(),
            control_plane: ControlPlaneConfig::default(),
            spool: SpoolConfig::default(),
            policy_file: None,
            max_body_bytes: 4 * 1024 * 1024,
            allowed_origins: Vec::new(),
            allow_loopback_origins: true,
            allowed_hosts: Vec::new(),
            upstream_timeout_ms: 30_000,
            stdio: BTreeMap::new(),
            workers: 1,
        }
    }
}

/// Every problem found in a configuration, each naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration:\n{}", .0.iter().map(|(f, m)| format!("  {f}: {m}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError(pub Vec<(String, String)>);

impl Config {
    /// The number of runtime threads to start: `workers`, with 0 meaning one
    /// per core this process may run on.
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// Reads `path` (if any) and then `SENTINEL_PROXY_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(p) = path {
            if !p.exists() {
                return Err(ConfigError(vec![(
                    "config".into(),
                    format!("file {} does not exist", p.display()),
                )]));
            }
            fig = fig.merge(Toml::file(p));
        }
        fig = fig.merge(
            Env::prefixed("SENTINEL_PROXY_")
                .split("__")
                .ignore(&["config"]),
        );
        Self::from_figment(fig)
    }

    /// Parses TOML text (no environment), for tests.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| {
                        let field = if e.path.is_empty() {
                            "config".to_string()
                        } else {
                            e.path.join(".")
                        };
                        (field, e.kind.to_string())
                    })
                    .collect(),
            )
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: every problem is collected.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut push = |f: &str, m: &str| errs.push((f.to_string(), m.to_string()));
        if self.proxy_id.is_empty() {
            push("proxy_id", "is required (a stable name for this proxy)");
        } else if !sentinel_shared::spec::valid_name(&self.proxy_id, 128) {
            push("proxy_id", "must be letters, digits, '_', '-', '.'");
        }
        if !self.mcp_path.starts_with('/') {
            push("mcp_path", "must start with '/'");
        }
        if self.max_body_bytes < 1024 {
            push("max_body_bytes", "must be at least 1024");
        }
        if self.upstream_timeout_ms == 0 {
            push("upstream_timeout_ms", "must be positive");
        }
        if self.workers > MAX_WORKERS {
            push(
                "workers",
                &format!("must be 0 (one per core) to {MAX_WORKERS}"),
            );
        }
        if self.control_plane.url.is_empty() && self.policy_file.is_none() {
            push(
                "control_plane.url",
                "either control_plane.url or policy_file is required",
            );
        }
        if !self.control_plane.url.is_empty() && self.control_plane.join_token.is_empty() {
            push(
                "control_plane.join_token",
                "is required with control_plane.url",
            );
        }
        if !matches!(self.spool.durability.as_str(), "fsync" | "os") {
            push("spool.durability", "must be 'fsync' or 'os'");
        }
        if !matches!(self.spool.on_full.as_str(), "reject" | "drop") {
            push("spool.on_full", "must be 'reject' or 'drop'");
        }
        for (name, c) in &self.stdio {
            if !sentinel_shared::spec::valid_name(name, 64) {
                errs.push((
                    format!("stdio.{name}"),
                    "name must be letters, digits, '_', '-', '.'".into(),
                ));
            }
            if c.command.is_empty() {
                errs.push((format!("stdio.{name}.command"), "is required".into()));
            }
        }
        self.validate_tls(&mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errs))
        }
    }
}

impl Config {
    /// The control plane's TLS settings: they only make sense with an
    /// `https://` URL, which in turn needs `ca_file` (this build trusts no
    /// system certificate store); the files must exist; a client
    /// certificate needs its key.
    fn validate_tls(&self, errs: &mut Vec<(String, String)>) {
        let cp = &self.control_plane;
        let https = cp.url.starts_with("https://");
        let mut push = |f: &str, m: String| errs.push((format!("control_plane.{f}"), m));
        if https && cp.ca_file.is_none() {
            push(
                "ca_file",
                "is required with an https:// url: the CA that signed the control plane's \
                 certificate (no system certificate store is used)"
                    .into(),
            );
        }
        for (field, path, kind) in [
            ("ca_file", &cp.ca_file, Pem::Certificates),
            ("cert_file", &cp.cert_file, Pem::Certificates),
            ("key_file", &cp.key_file, Pem::PrivateKey),
        ] {
            let Some(path) = path else { continue };
            if !https && !cp.url.is_empty() {
                push(
                    field,
                    "is only used with an https:// url; this url is plaintext".into(),
                );
            } else if let Err(m) = check_pem(path, kind) {
                push(field, m);
            }
        }
        match (&cp.cert_file, &cp.key_file) {
            (Some(_), None) => push("key_file", "is required with cert_file".into()),
            (None, Some(_)) => push("cert_file", "is required with key_file".into()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let cfg = Config::from_toml(
            r#"
            proxy_id = "p1"
            listen = "127.0.0.1:0"
            policy_file = "policy.json"
            allowed_origins = ["https://app.example.com"]
            [control_plane]
            url = "http://127.0.0.1:7443"
            join_token = "sntj_x"
            [stdio.everything]
            command = "node"
            args = ["index.js", "stdio"]
            env = { A = "b" }
            "#,
        )
        .unwrap();
        assert_eq!(cfg.proxy_id, "p1");
        assert_eq!(cfg.stdio["everything"].args, vec!["index.js", "stdio"]);
        assert_eq!(cfg.stdio["everything"].env["A"], "b");
        assert_eq!(cfg.max_body_bytes, 4 * 1024 * 1024);
    }

    #[test]
    fn errors_name_every_field() {
        let err = Config::from_toml(
            r#"
            mcp_path = "mcp"
            [spool]
            durability = "sometimes"
            [stdio.x]
            args = []
            "#,
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
        assert!(fields.contains(&"proxy_id"), "{err}");
        assert!(fields.contains(&"mcp_path"), "{err}");
        assert!(fields.contains(&"spool.durability"), "{err}");
        assert!(fields.contains(&"stdio.x.command"), "{err}");
        assert!(fields.contains(&"control_plane.url"), "{err}");
    }

    #[test]
    fn control_plane_tls_settings_are_checked() {
        let fields = |toml: &str| -> Vec<String> {
            match Config::from_toml(&format!("proxy_id = \"p\"\n[control_plane]\n{toml}")) {
                Ok(_) => Vec::new(),
                Err(e) => e.0.into_iter().map(|(f, _)| f).collect(),
            }
        };
        // Any base64 between the markers parses as a PEM certificate.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("empty.crt"), "").unwrap();
        let here = dir.path().display();
        // https without a CA can never connect: no system roots are used.
        assert_eq!(
            fields("url = \"https://cp:50051\"\njoin_token = \"t\""),
            ["control_plane.ca_file"]
        );
        assert_eq!(
            fields(&format!(
                "url = \"https://cp:50051\"\njoin_token = \"t\"\nca_file = \"{here}/ca.crt\""
            )),
            Vec::<String>::new()
        );
        // A CA or client certificate with a plaintext url is a mistake.
        assert_eq!(
            fields(&format!(
                "url = \"http://cp:50051\"\njoin_token = \"t\"\nca_file = \"{here}/ca.crt\""
            )),
            ["control_plane.ca_file"]
        );
        // An empty CA file.
        assert_eq!(
            fields(&format!(
                "url = \"https://cp:50051\"\njoin_token = \"t\"\nca_file = \"{here}/empty.crt\""
            )),
            ["control_plane.ca_file"]
        );
        // Missing files, and a certificate without its key.
        assert_eq!(
            fields(
                "url = \"https://cp:50051\"\njoin_token = \"t\"\nca_file = \"/nonexistent/ca.crt\"\n\
                 cert_file = \"/nonexistent/c.crt\""
            ),
            [
                "control_plane.ca_file",
                "control_plane.cert_file",
                "control_plane.key_file"
            ]
        );
    }

    #[test]
    fn workers_default_to_one_event_loop_and_zero_means_one_per_core() {
        let base = "proxy_id = \"p\"\npolicy_file = \"p.json\"\n";
        let cfg = Config::from_toml(base).unwrap();
        assert_eq!((cfg.workers, cfg.worker_threads()), (1, 1));
        let cfg = Config::from_toml(&format!("{base}workers = 0\n")).unwrap();
        assert!(cfg.worker_threads() >= 1);
        let cfg = Config::from_toml(&format!("{base}workers = 4\n")).unwrap();
        assert_eq!(cfg.worker_threads(), 4);
        let err = Config::from_toml(&format!("{base}workers = 100000\n")).unwrap_err();
        assert_eq!(err.0[0].0, "workers", "{err}");
        let err = Config::from_toml(&format!("{base}workers = -1\n")).unwrap_err();
        assert_eq!(err.0[0].0, "workers", "{err}");
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let err = Config::from_toml("proxy_id = \"p\"\nlisten = 5\n").unwrap_err();
        assert_eq!(err.0[0].0, "listen", "{err}");
        let err = Config::from_toml("proxy_id = \"p\"\nlisten_addr = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }
}
