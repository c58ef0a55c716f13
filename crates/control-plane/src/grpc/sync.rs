//! Policy sync: each proxy holds one stream. It says hello (id, build, last
//! applied version, join token) and receives the whole snapshot, then every
//! later version as it is published: a delta when the proxy has exactly the
//! delta's base, else the whole snapshot again. The proxy acks or rejects
//! each version; both, and its heartbeats, are recorded in the fleet table.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sentinel_shared::proto::policy_sync_server::PolicySync;
use sentinel_shared::proto::{ControlMessage, ProxyMessage, control_message, proxy_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::{check_join_token, check_proxy_id, read_hello};
use crate::policy_bus::{PolicyBus, Published};
use crate::state::AppState;

pub struct SyncService {
    pub state: AppState,
    pub bus: PolicyBus,
    /// Ends every stream when the server shuts down.
    pub shutdown: CancellationToken,
}

type Out = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

fn snapshot_msg(p: &Published) -> ControlMessage {
    ControlMessage {
        msg: Some(control_message::Msg::Snapshot((*p.snapshot).clone())),
    }
}

/// What to send a stream that has applied `sent`, to bring it to `p`.
fn update_msg(p: &Published, sent: u64) -> ControlMessage {
    match &p.delta {
        Some(d) if d.base_version == sent => ControlMessage {
            msg: Some(control_message::Msg::Delta((**d).clone())),
        },
        _ => snapshot_msg(p),
    }
}

#[tonic::async_trait]
impl PolicySync for SyncService {
    type SyncStream = Out;

    async fn sync(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = request.into_inner();
        let hello = read_hello(
            &mut inbound,
            |m| match m.msg {
                Some(proxy_message::Msg::Hello(h)) => Some(h),
                _ => None,
            },
            "a Hello",
        )
        .await?;
        check_proxy_id(&hello.proxy_id)?;
        check_join_token(&self.state, &hello.join_token).await?;
        let store = self.state.store.clone();
        let proxy_id: Arc<str> = hello.proxy_id.into();
        let conn = store
            .proxy_connected(
                &proxy_id,
                &hello.build_version,
                &hello.labels,
                &self.state.config.instance_id,
            )
            .await?;
        tracing::info!(
            proxy_id = %proxy_id,
            build = %hello.build_version,
            last_applied = hello.last_applied_version,
            "proxy connected"
        );
        metrics::gauge!("sentinel_sync_streams").increment(1.0);

        // The snapshot on connect includes every change committed before
        // the hello: if this instance's bus has not published the latest
        // version yet (its notification is in flight), let it catch up.
        if let Ok(latest) = store.policy_version().await
            && self.bus.current().version() < latest
        {
            self.bus.poke();
            self.bus.wait_for(latest, Duration::from_secs(2)).await;
        }
        let mut rx = self.bus.subscribe();
        let first = rx.borrow_and_update().clone();
        let (tx, out) = mpsc::channel(8);
        tx.send(Ok(snapshot_msg(&first)))
            .await
            .map_err(|_| Status::cancelled("stream closed"))?;
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut sent = first.version();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    changed = rx.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let p = rx.borrow_and_update().clone();
                        if p.version() > sent {
                            if tx.send(Ok(update_msg(&p, sent))).await.is_err() {
                                break;
                            }
                            sent = p.version();
                        }
                    }
                    msg = inbound.next() => match msg {
                        Some(Ok(ProxyMessage { msg: Some(m) })) => match m {
                            proxy_message::Msg::Ack(a) => {
                                let (store, id) = (store.clone(), proxy_id.clone());
                                tokio::spawn(async move {
                                    if let Err(error) = store.proxy_acked(&id, a.version).await {
                                        tracing::warn!(proxy_id = %id, %error, "recording ack failed");
                                    }
                                });
                            }
                            proxy_message::Msg::Reject(r) => {
                                tracing::warn!(proxy_id = %proxy_id, version = r.version, reason = %r.reason, "policy update rejected by proxy");
                                let (store, id) = (store.clone(), proxy_id.clone());
                                let reason = r.reason.clone();
                                tokio::spawn(async move {
                                    if let Err(error) = store.proxy_rejected(&id, r.version, &reason).await {
                                        tracing::warn!(proxy_id = %id, %error, "recording reject failed");
                                    }
                                });
                                if r.resync {
                                    let p = rx.borrow_and_update().clone();
                                    if tx.send(Ok(snapshot_msg(&p))).await.is_err() {
                                        break;
                                    }
                                    sent = p.version();
                                }
                            }
                            proxy_message::Msg::Heartbeat(h) => {
                                let stats = h.stats.unwrap_or_default();
                                let (store, id) = (store.clone(), proxy_id.clone());
                                tokio::spawn(async move {
                                    if let Err(error) = store.proxy_heartbeat(&id, &stats).await {
                                        tracing::warn!(proxy_id = %id, %error, "recording heartbeat failed");
                                    }
                                });
                            }
                            proxy_message::Msg::Hello(_) => {
                                let _ = tx.send(Err(Status::invalid_argument("hello: sent twice"))).await;
                                break;
                            }
                        },
                        Some(Ok(ProxyMessage { msg: None })) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
            metrics::gauge!("sentinel_sync_streams").decrement(1.0);
            tracing::info!(proxy_id = %proxy_id, "proxy disconnected");
            if let Err(error) = store.proxy_disconnected(&proxy_id, conn).await {
                tracing::warn!(proxy_id = %proxy_id, %error, "recording disconnect failed");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
