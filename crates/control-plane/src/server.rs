//! Start-up and the listeners. `main` parses the configuration, binds the
//! sockets and calls [`run`]; tests call [`run`] with listeners on
//! `127.0.0.1:0`, so they exercise the real servers.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use metrics_exporter_prometheus::PrometheusHandle;
use sentinel_shared::proto::admin_server::AdminServer;
use sentinel_shared::proto::audit_ingest_server::AuditIngestServer;
use sentinel_shared::proto::policy_sync_server::PolicySyncServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::{Config, TlsConfig};
use crate::db;
use crate::grpc::AdminAuth;
use crate::grpc::admin::AdminService;
use crate::grpc::ingest::IngestService;
use crate::grpc::sync::SyncService;
use crate::policy_bus::PolicyBus;
use crate::state::AppState;
use crate::store::Store;

/// Largest gRPC message accepted: a full audit batch or policy snapshot.
const MAX_GRPC_MESSAGE: usize = 64 * 1024 * 1024;

/// The sockets the control plane serves on.
pub struct Listeners {
    /// Policy sync, audit ingest and the admin service.
    pub grpc: TcpListener,
    /// REST, OpenAPI, health and metrics.
    pub http: TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("policy could not be loaded: {0}")]
    Policy(#[from] crate::error::Error),
    #[error("grpc.tls: {0}")]
    Tls(String),
    #[error("server failed: {0}")]
    Serve(String),
}

/// Connects to Postgres, migrates, then serves until `shutdown`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    // TLS is loaded first: a certificate and key that do not go together
    // are a configuration error before anything is started, never a
    // control plane serving REST without its gRPC listener.
    let grpc_server = grpc_server(config.grpc.tls.as_ref())?;
    let pool = db::connect(
        &config.database_url,
        config.db.max_connections,
        Duration::from_secs(config.db.connect_timeout_secs),
    )
    .await?;
    db::migrate(&pool).await?;
    let store = Store::new(pool);
    store
        .ensure_upcoming_partitions(config.audit.partitions_ahead_days)
        .await?;
    let bus = PolicyBus::start(
        store.clone(),
        Duration::from_secs(config.sync.reload_interval_secs),
        shutdown.clone(),
    )
    .await?;
    let state = AppState {
        store: store.clone(),
        config: Arc::new(config),
        metrics,
    };
    tracing::info!(
        instance = %state.config.instance_id,
        policy_version = bus.current().version(),
        "control plane ready"
    );

    // One listener failing stops the other (and the process with it),
    // rather than leaving a half-served control plane running.
    let stop = shutdown.child_token();
    tokio::spawn(retention(state.clone(), bus.clone(), stop.clone()));

    let grpc = async {
        let r = serve_grpc(
            grpc_server,
            state.clone(),
            bus,
            listeners.grpc,
            stop.clone(),
        )
        .await;
        stop.cancel();
        r
    };
    let http = async {
        let r = serve_http(state.clone(), listeners.http, stop.clone()).await;
        stop.cancel();
        r
    };
    let (g, h) = tokio::join!(grpc, http);
    g.and(h)
}

async fn serve_grpc(
    mut builder: tonic::transport::Server,
    state: AppState,
    bus: PolicyBus,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PolicySyncServer<SyncService>>()
        .await;
    health_reporter
        .set_serving::<AuditIngestServer<IngestService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let descriptors = [
        sentinel_shared::proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    // Both reflection versions: older grpcurl builds only speak v1alpha.
    let mut reflect_v1 = tonic_reflection::server::Builder::configure();
    let mut reflect_v1alpha = tonic_reflection::server::Builder::configure();
    for d in descriptors {
        reflect_v1 = reflect_v1.register_encoded_file_descriptor_set(d);
        reflect_v1alpha = reflect_v1alpha.register_encoded_file_descriptor_set(d);
    }
    let reflect_v1 = reflect_v1
        .build_v1()
        .map_err(|e| StartError::Serve(e.to_string()))?;
    let reflect_v1alpha = reflect_v1alpha
        .build_v1alpha()
        .map_err(|e| StartError::Serve(e.to_string()))?;

    let sync = PolicySyncServer::new(SyncService {
        state: state.clone(),
        bus: bus.clone(),
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MAX_GRPC_MESSAGE)
    .max_encoding_message_size(MAX_GRPC_MESSAGE);
    let ingest = AuditIngestServer::new(IngestService {
        state: state.clone(),
        shutdown: shutdown.clone(),
    })
    .max_decoding_message_size(MAX_GRPC_MESSAGE);
    let admin = AdminServer::with_interceptor(
        AdminService {
            state: state.clone(),
            bus,
        },
        AdminAuth(state.clone()),
    );

    builder
        .add_service(health)
        .add_service(reflect_v1)
        .add_service(reflect_v1alpha)
        .add_service(sync)
        .add_service(ingest)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // `tcp_nodelay` above only applies to listeners tonic binds
            // itself: without it a policy delta waits on Nagle for the
            // proxy's delayed ACK (~40 ms).
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|e| StartError::Serve(format!("grpc: {e}")))
}

/// The gRPC server with its transport settings and, when configured, TLS.
fn grpc_server(tls: Option<&TlsConfig>) -> Result<tonic::transport::Server, StartError> {
    let builder = tonic::transport::Server::builder()
        // Dead peers are found by keepalive, not by waiting on TCP.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .tcp_nodelay(true);
    match tls {
        // Parses the files and pairs the key with the certificate.
        Some(tls) => builder
            .tls_config(tls_config(tls)?)
            .map_err(|e| StartError::Tls(format!("cert_pem and key_pem: {}", error_chain(&e)))),
        None => Ok(builder),
    }
}

/// An error with its sources: tonic's own message alone says only
/// "transport error".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn tls_config(tls: &TlsConfig) -> Result<ServerTlsConfig, StartError> {
    let read = |p: &std::path::Path, field: &str| {
        std::fs::read(p).map_err(|e| StartError::Tls(format!("{field}: {}: {e}", p.display())))
    };
    let identity = Identity::from_pem(
        read(&tls.cert_pem, "cert_pem")?,
        read(&tls.key_pem, "key_pem")?,
    );
    let mut cfg = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_pem {
        cfg = cfg.client_ca_root(Certificate::from_pem(read(ca, "client_ca_pem")?));
    }
    Ok(cfg)
}

async fn serve_http(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let app = crate::rest::router_until(state, shutdown.clone());
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| StartError::Serve(format!("http: {e}")))
}

/// Keeps day partitions ahead of time and drops those older than the
/// policy's retention (whole partitions only: rows are never deleted).
async fn retention(state: AppState, bus: PolicyBus, shutdown: CancellationToken) {
    let every = Duration::from_secs(state.config.audit.retention_interval_secs.max(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ahead = state.config.audit.partitions_ahead_days;
        if let Err(error) = state.store.ensure_upcoming_partitions(ahead).await {
            tracing::warn!(%error, "creating audit partitions failed");
        }
        let days = bus
            .current()
            .snapshot
            .audit
            .as_ref()
            .map_or(0, |a| a.retention_days);
        if days > 0 {
            match state.store.drop_expired_partitions(days).await {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::info!(?dropped, retention_days = days, "audit partitions dropped");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "audit retention failed"),
            }
        }
    }
}
