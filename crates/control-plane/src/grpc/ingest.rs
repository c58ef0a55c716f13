//! Audit ingest: a proxy streams batches of audit events; each batch is
//! answered only after its transaction committed, so a proxy may forget
//! (reclaim) exactly what was answered. Batches are handled in order, one at
//! a time per stream. A database failure ends the stream with `UNAVAILABLE`:
//! the proxy reconnects and resends, and event ids absorb the replay.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use sentinel_shared::proto::audit_ingest_server::AuditIngest;
use sentinel_shared::proto::{IngestRequest, IngestResponse, ingest_request};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{check_join_token, check_proxy_id, read_hello};
use crate::state::AppState;

pub struct IngestService {
    pub state: AppState,
    /// Ends every stream when the server shuts down: a proxy then
    /// reconnects elsewhere and resends what was not acked.
    pub shutdown: CancellationToken,
}

type Out = Pin<Box<dyn Stream<Item = Result<IngestResponse, Status>> + Send>>;

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
        let state = self.state.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let max = state.config.audit.max_batch_events;
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("control plane shutting down"))).await;
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
                        let _ = tx
                            .send(Err(Status::invalid_argument(
                                "batch: expected an AuditBatch after the hello",
                            )))
                            .await;
                        return;
                    }
                    Err(_) => return,
                };
                if batch.events.len() > max {
                    let _ = tx
                        .send(Err(Status::invalid_argument(format!(
                            "batch.events: {} events, at most {max} per batch",
                            batch.events.len()
                        ))))
                        .await;
                    return;
                }
                let n = batch.events.len();
                let started = std::time::Instant::now();
                match state.store.ingest_batch(&proxy_id, batch.events).await {
                    Ok(r) => {
                        metrics::histogram!("sentinel_audit_batch_seconds")
                            .record(started.elapsed().as_secs_f64());
                        let resp = IngestResponse {
                            batch_id: batch.batch_id,
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
