//! Control-plane configuration: a TOML file plus `SENTINEL_CP_*` environment
//! overrides (`SENTINEL_CP_GRPC__LISTEN=...`; `__` separates levels), and
//! `DATABASE_URL`. Every problem is collected and reported at once, naming
//! the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use sentinel_shared::pem::{Pem, check_pem};
use sentinel_shared::spec::ValidationErrors;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Postgres connection URL. `DATABASE_URL` overrides it.
    pub database_url: String,
    /// Names this control-plane instance in the fleet view; default
    /// `<hostname>-<pid>`.
    pub instance_id: String,
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    /// Bearer tokens admitted on the admin APIs (gRPC and REST).
    pub admin_tokens: Vec<String>,
    /// Join tokens admitted from proxies, besides those created through the
    /// admin API. Meant for bootstrap.
    pub join_tokens: Vec<String>,
    pub db: DbConfig,
    pub sync: SyncConfig,
    pub audit: AuditConfig,
    /// `text` or `json`.
    pub log_format: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: String,
    /// TLS for the gRPC listener; with `client_ca_pem`, proxies must present
    /// a certificate it signed (mutual TLS).
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    #[serde(default)]
    pub client_ca_pem: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// REST API, OpenAPI document, dashboard, health and metrics.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// How often the policy snapshot is reloaded even without a
    /// notification (a safety net for a lost LISTEN connection), seconds.
    pub reload_interval_secs: u64,
    /// A proxy not heard from for this long is shown disconnected, seconds.
    pub stale_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Largest batch accepted on the ingest stream, events.
    pub max_batch_events: usize,
    /// How often retention runs, seconds.
    pub retention_interval_secs: u64,
    /// Day partitions created ahead of time.
    pub partitions_ahead_days: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            instance_id: String::new(),
            grpc: GrpcConfig::default(),
            http: HttpConfig::default(),
            admin_tokens: Vec::new(),
            join_tokens: Vec::new(),
            db: DbConfig::default(),
            sync: SyncConfig::default(),
            audit: AuditConfig::default(),
            log_format: "text".into(),
        }
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            tls: None,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
        }
    }
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout_secs: 5,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            reload_interval_secs: 5,
            stale_after_secs: 30,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            max_batch_events: 10_000,
            retention_interval_secs: 3600,
            partitions_ahead_days: 2,
        }
    }
}

/// Tokens shorter than this are refused: they guard admin and fleet access.
pub const MIN_TOKEN_LEN: usize = 16;

impl Config {
    /// Loads the file (if any) and the environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ValidationErrors> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            if !p.exists() {
                return Err(ValidationErrors::single(
                    "config",
                    format!("file {} does not exist", p.display()),
                ));
            }
            fig = fig.merge(Toml::file(p));
        }
        fig = fig.merge(
            Env::prefixed("SENTINEL_CP_")
                .split("__")
                .ignore(&["config"]),
        );
        let mut cfg: Config = fig.extract().map_err(figment_errors)?;
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            cfg.database_url = url;
        }
        cfg.finish()?;
        Ok(cfg)
    }

    /// Fills defaults that depend on the environment and validates.
    pub fn finish(&mut self) -> Result<(), ValidationErrors> {
        if self.instance_id.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            let host = host.trim();
            self.instance_id = format!(
                "{}-{}",
                if host.is_empty() {
                    "control-plane"
                } else {
                    host
                },
                std::process::id()
            );
        }
        self.validate()
    }

    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = ValidationErrors::default();
        if self.database_url.is_empty() {
            errs.push("database_url", "is required (or set DATABASE_URL)");
        } else if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            errs.push("database_url", "must be a postgres:// URL");
        }
        if self.grpc.listen.parse::<SocketAddr>().is_err() {
            errs.push("grpc.listen", "must be an address such as 127.0.0.1:50051");
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            errs.push("http.listen", "must be an address such as 127.0.0.1:8080");
        }
        if self.admin_tokens.is_empty() {
            errs.push("admin_tokens", "at least one admin token is required");
        }
        for (i, t) in self.admin_tokens.iter().enumerate() {
            if t.len() < MIN_TOKEN_LEN {
                errs.push(
                    format!("admin_tokens[{i}]"),
                    format!("must be at least {MIN_TOKEN_LEN} characters"),
                );
            }
        }
        for (i, t) in self.join_tokens.iter().enumerate() {
            if t.len() < MIN_TOKEN_LEN {
                errs.push(
                    format!("join_tokens[{i}]"),
                    format!("must be at least {MIN_TOKEN_LEN} characters"),
                );
            }
        }
        if let Some(tls) = &self.grpc.tls {
            for (field, p, kind) in [
                ("grpc.tls.cert_pem", Some(&tls.cert_pem), Pem::Certificates),
                ("grpc.tls.key_pem", Some(&tls.key_pem), Pem::PrivateKey),
            ]
            .into_iter()
            .chain([(
                "grpc.tls.client_ca_pem",
                tls.client_ca_pem.as_ref(),
                Pem::Certificates,
            )]) {
                if let Some(p) = p
                    && let Err(m) = check_pem(p, kind)
                {
                    errs.push(field, m);
                }
            }
        }
        if self.db.max_connections == 0 {
            errs.push("db.max_connections", "must be at least 1");
        }
        if self.sync.reload_interval_secs == 0 {
            errs.push("sync.reload_interval_secs", "must be at least 1");
        }
        if self.audit.max_batch_events == 0 {
            errs.push("audit.max_batch_events", "must be at least 1");
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            errs.push("log_format", "must be 'text' or 'json'");
        }
        errs.into_result()
    }
}

/// Turns figment's errors into field-named ones.
pub fn figment_errors(e: figment::Error) -> ValidationErrors {
    let mut errs = ValidationErrors::default();
    for err in e {
        let field = if err.path.is_empty() {
            "config".to_string()
        } else {
            err.path.join(".")
        };
        errs.push(field, err.kind.to_string());
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_database_and_an_admin_token() {
        let errs = Config::default().validate().unwrap_err();
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"database_url"));
        assert!(fields.contains(&"admin_tokens"));
    }

    #[test]
    fn file_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp.toml");
        std::fs::write(&p, "database_url = 'postgres://x'\nadmin_tokens = ['short']\n[grpc]\nlisten = 'nope'\nbogus = 1\n")
            .unwrap();
        let errs = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(errs.contains("bogus") || errs.contains("grpc"), "{errs}");
    }

    #[test]
    fn tls_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let c = Config {
            database_url: "postgres://postgres@127.0.0.1/x".into(),
            admin_tokens: vec!["a".repeat(20)],
            grpc: GrpcConfig {
                tls: Some(TlsConfig {
                    cert_pem: dir.path().join("missing.crt"),
                    key_pem: empty.clone(),
                    client_ca_pem: Some(empty),
                }),
                ..GrpcConfig::default()
            },
            ..Default::default()
        };
        let errs = c.validate().unwrap_err();
        let got: Vec<_> = errs
            .0
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].0, "grpc.tls.cert_pem");
        assert!(got[0].1.contains("does not exist"), "{got:?}");
        assert_eq!(got[1].0, "grpc.tls.key_pem");
        assert!(got[1].1.contains("no PEM private key"), "{got:?}");
        assert_eq!(got[2].0, "grpc.tls.client_ca_pem");
        assert!(got[2].1.contains("no PEM certificate"), "{got:?}");
    }

    #[test]
    fn a_good_config_validates() {
        let mut c = Config {
            database_url: "postgres://postgres@127.0.0.1/x".into(),
            admin_tokens: vec!["a".repeat(20)],
            ..Default::default()
        };
        c.finish().unwrap();
        assert!(!c.instance_id.is_empty());
    }
}
