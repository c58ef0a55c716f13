//! Start-up of a whole proxy: policy (local file, cache, control plane),
//! the audit spool and its shipper, then the HTTP server. `main` and the
//! whole-system tests both come through [`start`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use sentinel_shared::proto::ProxyStats;
use sentinel_spool::shipper::{self, ShipperConfig};
use sentinel_spool::{Durability, Spool, SpoolConfig, WhenFull};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::audit::AuditSink;
use crate::audit::spool::SpoolSink;
use crate::config::Config;
use crate::control::{self, SyncClient};
use crate::policy::file::PolicyFile;
use crate::policy::policy_channel;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The configuration is wrong; the text names the field.
    #[error("invalid configuration:\n  {0}")]
    Config(String),
    #[error("audit spool: {0}")]
    Spool(#[from] sentinel_spool::OpenError),
    #[error("server: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs a proxy until `shutdown` resolves.
pub async fn start(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BootError> {
    let parts = parts(&config)?;
    let served = crate::server::run(
        config,
        listener,
        parts.reader.clone(),
        parts.sink.clone(),
        shutdown,
    )
    .await;
    parts.drain(DRAIN).await;
    parts.stop().await;
    served.map_err(BootError::from)
}

/// Runs the proxy as a local MCP server on stdin/stdout (for agents that
/// launch their MCP servers as processes), with `credential` as the
/// client's API key or token, until stdin closes.
pub async fn start_stdio(config: Config, credential: String) -> Result<(), BootError> {
    let parts = parts(&config)?;
    let served = crate::server::run_stdio(
        &config,
        parts.reader.clone(),
        parts.sink.clone(),
        &credential,
    )
    .await;
    parts.drain(DRAIN).await;
    parts.stop().await;
    served.map_err(BootError::from)
}

/// How long a stopping proxy waits for its spool to be shipped. What is
/// not shipped by then stays on disk and goes at the next start.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What a running proxy is made of besides its front.
struct Parts {
    reader: crate::policy::PolicyReader,
    sink: Arc<dyn AuditSink>,
    spool: Spool,
    /// The shipper, when one runs (a control plane is configured).
    shipper: Option<tokio::task::JoinHandle<()>>,
    publisher: Arc<crate::policy::PolicyPublisher>,
    stop_tx: watch::Sender<bool>,
}

impl Parts {
    /// Writes what is queued for the spool, then waits (bounded) until the
    /// control plane acked everything spooled.
    async fn drain(&self, limit: std::time::Duration) {
        let spool = &self.spool;
        let deadline = tokio::time::Instant::now() + limit;
        // Outcomes are appended without waiting: written before exit, a
        // call answered before the stop is not recorded as `unknown`.
        let _ = tokio::time::timeout_at(deadline, spool.flush()).await;
        if self.shipper.is_none() {
            return;
        }
        while spool.stats().backlog > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = spool.stats().backlog;
        if left > 0 {
            tracing::warn!(
                backlog = left,
                "stopping with audit not yet shipped; it stays in the spool for the next start"
            );
        }
    }

    /// Stops the background tasks (sync client, shipper) and gives the
    /// shipper a moment to record its last ack.
    async fn stop(self) {
        let _ = self.stop_tx.send(true);
        drop(self.publisher);
        if let Some(shipper) = self.shipper {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), shipper).await;
        }
    }
}

fn parts(config: &Config) -> Result<Parts, BootError> {
    // tonic's TLS client needs a process-wide provider (the upstream
    // client names its own).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (publisher, reader) = policy_channel(config);
    if let Some(path) = &config.policy_file {
        let snapshot =
            PolicyFile::read(path).map_err(|e| BootError::Config(format!("policy_file: {e}")))?;
        publisher
            .publish(snapshot)
            .map_err(|e| BootError::Config(format!("policy_file: {e}")))?;
    }
    let cp = &config.control_plane;
    if let Some(cache) = &cp.cache_file
        && config.policy_file.is_none()
    {
        control::load_cache(cache, &publisher);
    }
    let publisher = Arc::new(publisher);
    // One signal for every background task.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // The control plane's address is checked before the spool is opened:
    // a configuration error leaves the spool untouched (no new epoch).
    let channel = if cp.url.is_empty() {
        None
    } else {
        Some(channel(config)?)
    };
    let spool = Spool::open(spool_config(config)?)?;
    let mut shipper_task = None;
    if let Some(channel) = channel {
        shipper_task = Some(tokio::spawn(shipper::run(
            spool.clone(),
            channel.clone(),
            ShipperConfig::new(cp.join_token.clone()),
            stopped(),
        )));
        let stats_spool = spool.clone();
        let stats_reader = reader.clone();
        let sync = SyncClient {
            proxy_id: config.proxy_id.clone(),
            join_token: cp.join_token.clone(),
            labels: HashMap::new(),
            cache_file: cp.cache_file.clone(),
            stats: Arc::new(move || {
                let s = stats_spool.stats();
                ProxyStats {
                    audit_backlog: s.backlog,
                    spool_bytes: s.spool_bytes,
                    audit_dropped: s.dropped,
                    audit_rejected: s.rejected,
                    open_sessions: 0,
                    tool_catalog_hash: String::new(),
                    policy_version: stats_reader.version(),
                    boot_epoch: s.epoch,
                }
            }),
        };
        tokio::spawn(sync.run(channel, publisher.clone(), stopped()));
    } else {
        // Recorded on disk, bounded by spool.max_bytes and spool.on_full
        // like any other; shipped once the proxy starts with a control plane.
        tracing::warn!(
            spool = %config.spool.dir.display(),
            "no control_plane.url: audit events stay in the spool until a control plane is configured"
        );
    }
    let sink: Arc<dyn AuditSink> = Arc::new(SpoolSink(spool.clone()));

    Ok(Parts {
        reader,
        sink,
        spool,
        shipper: shipper_task,
        publisher,
        stop_tx,
    })
}

fn spool_config(config: &Config) -> Result<SpoolConfig, BootError> {
    let s = &config.spool;
    let mut c = SpoolConfig::new(&s.dir, config.proxy_id.clone());
    c.durability = match s.durability.as_str() {
        "fsync" => Durability::Fsync,
        "os" => Durability::Os,
        other => {
            return Err(BootError::Config(format!(
                "spool.durability: '{other}' is not one of fsync, os"
            )));
        }
    };
    c.when_full = match s.on_full.as_str() {
        "reject" => WhenFull::Reject,
        "drop" => WhenFull::Drop,
        other => {
            return Err(BootError::Config(format!(
                "spool.on_full: '{other}' is not one of reject, drop"
            )));
        }
    };
    c.max_bytes = s.max_bytes;
    c.segment_bytes = (s.max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024);
    Ok(c)
}

fn channel(config: &Config) -> Result<tonic::transport::Channel, BootError> {
    let cp = &config.control_plane;
    let bad = |m: String| BootError::Config(format!("control_plane.url: {m}"));
    let mut ep = Endpoint::from_shared(cp.url.clone())
        .map_err(|e| bad(e.to_string()))?
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .connect_timeout(std::time::Duration::from_secs(5));
    if cp.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &cp.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                BootError::Config(format!("control_plane.ca_file: {}: {e}", ca.display()))
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        match (&cp.cert_file, &cp.key_file) {
            (Some(cert), Some(key)) => {
                let read = |p: &std::path::Path, field: &str| {
                    std::fs::read(p).map_err(|e| {
                        BootError::Config(format!("control_plane.{field}: {}: {e}", p.display()))
                    })
                };
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert, "cert_file")?,
                    read(key, "key_file")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(BootError::Config(
                    "control_plane.cert_file: cert_file and key_file go together".into(),
                ));
            }
        }
        // Parses the CA and the client certificate and key.
        ep = ep.tls_config(tls).map_err(|e| {
            let mut m = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                m.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            BootError::Config(format!("control_plane.ca_file, cert_file, key_file: {m}"))
        })?;
    }
    Ok(ep.connect_lazy())
}
