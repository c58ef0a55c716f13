//! Audit ingest: a proxy streams batches of audit events; each batch is
//! answered only after its transaction committed, so a proxy may forget
//! (reclaim) exactly what was answered. Batches are stored in order, one
//! transaction at a time per stream, while the next one is being prepared
//! (a two-stage pipeline, see `ingest`). A database failure ends the stream
//! with `UNAVAILABLE`: the proxy reconnects and resends, and event ids
//! absorb the replay.

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use sentinel_shared::proto::audit_ingest_server::AuditIngest;
use sentinel_shared::proto::{IngestRequest, IngestResponse, ingest_request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{check_join_token, check_proxy_id, read_hello};
use crate::state::AppState;
use crate::store::audit::PreparedBatch;

pub struct IngestService {
    pub state: AppState,
    /// Ends every stream when the server shuts down: a proxy then
    /// reconnects elsewhere and resends what was not acked.
    pub shutdown: CancellationToken,
}

type Out = Pin<Box<dyn Stream<Item = Result<IngestResponse, Status>> + Send>>;

/// Prepared batches waiting for the writer, per stream. Two: one is
/// prepared while another waits, so the writer never waits for the CPU
/// stage, and memory stays bounded at a few batches per stream.
const PIPELINE_DEPTH: usize = 2;

/// A batch ready to store.
struct Prepared {
    batch_id: u64,
    /// Events in the batch, for the log.
    n: usize,
    /// When the batch was taken off the stream.
    started: Instant,
    prepared: PreparedBatch,
}

/// What the reader hands the writer: a batch, or the status that ends the
/// stream after the batches before it are answered.
type Ready = Result<Prepared, Status>;

#[tonic::async_trait]
impl AuditIngest for IngestService {
    type IngestStream = Out;

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = request.into_inner();
        let hello = read_hello(
            &mut inbound,
            |m| match m.msg {
                Some(ingest_request::Msg::Hello(h)) => Some(h),
                _ => None,
            },
            "an IngestHello",
        )
        .await?;
        check_proxy_id(&hello.proxy_id)?;
        check_join_token(&self.state, &hello.join_token).await?;
        let proxy_id = hello.proxy_id;
        tracing::debug!(%proxy_id, "audit ingest stream opened");

        let (tx, rx) = mpsc::channel(16);
        // Two stages joined by a short queue. The reader takes batches off
        // the stream and prepares them (decode, validation, each event's
        // SHA-256): CPU work that needs no database. The writer stores them
        // one at a time, in order, and acks each after its commit. So the
        // next batch is ready by the time the previous one committed, and
        // acks keep the order of the batches. The queue holds at most
        // `PIPELINE_DEPTH` prepared batches: a slow database pushes back
        // on the proxy through the stream's flow control.
        let (ready_tx, mut ready_rx) = mpsc::channel::<Ready>(PIPELINE_DEPTH);
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let reader_proxy = proxy_id.clone();
        tokio::spawn(async move {
            let proxy_id = reader_proxy;
            let max = state.config.audit.max_batch_events;
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = ready_tx.send(Err(Status::unavailable("control plane shutting down"))).await;
                        return;
                    }
                    m = inbound.next() => match m {
                        Some(m) => m,
                        None => return,
                    },
                };
                let batch = match msg {
                    Ok(IngestRequest {
                        msg: Some(ingest_request::Msg::Batch(b)),
                    }) => b,
                    Ok(_) => {
                        let _ = ready_tx
                            .send(Err(Status::invalid_argument(
                                "batch: expected an AuditBatch after the hello",
                            )))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                if batch.events.len() > max {
                    let _ = ready_tx
                        .send(Err(Status::invalid_argument(format!(
                            "batch.events: {} events, at most {max} per batch",
                            batch.events.len()
                        ))))
                        .await;
                    return;
                }
                let started = Instant::now();
                let n = batch.events.len();
                let batch_id = batch.batch_id;
                // Hashing a batch takes milliseconds: off the async workers.
                let p = proxy_id.clone();
                let prepared =
                    tokio::task::spawn_blocking(move || PreparedBatch::new(&p, batch.events))
                        .await
                        .map_err(|_| Status::internal("audit batch preparation failed"));
                let ready = prepared.map(|prepared| Prepared {
                    batch_id,
                    n,
                    started,
                    prepared,
                });
                let failed = ready.is_err();
                if ready_tx.send(ready).await.is_err() || failed {
                    return;
                }
            }
        });
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            while let Some(ready) = ready_rx.recv().await {
                if shutdown.is_cancelled() {
                    let _ = tx
                        .send(Err(Status::unavailable("control plane shutting down")))
                        .await;
                    return;
                }
                let Prepared {
                    batch_id,
                    n,
                    started,
                    prepared,
                } = match ready {
                    Ok(p) => p,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                match state.store.ingest_prepared(prepared).await {
                    Ok(r) => {
                        metrics::histogram!("sentinel_audit_batch_seconds")
                            .record(started.elapsed().as_secs_f64());
                        let resp = IngestResponse {
                            batch_id,
                            inserted: r.inserted,
                            duplicates: r.duplicates,
                            dead_lettered: r.dead_lettered,
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%proxy_id, events = n, error = %e, "audit batch not stored");
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
