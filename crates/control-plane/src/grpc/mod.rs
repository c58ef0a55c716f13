//! The gRPC services: policy sync and audit ingest for proxies (join token),
//! the admin service for operators (admin token).

pub mod admin;
pub mod ingest;
pub mod sync;

use sentinel_shared::keys::secrets_equal;
use std::time::Duration;

use futures::StreamExt;
use tonic::{Status, Streaming};

use crate::state::{AppState, bearer};

/// Longest proxy id accepted: it names rows and metric labels.
const MAX_PROXY_ID: usize = 128;

/// Time a new stream has to say who it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the hello every proxy stream must open with: `pick` returns it
/// from the first message, or `None` when that message is something else
/// (`expected` names it in the error).
pub(crate) async fn read_hello<M, H>(
    inbound: &mut Streaming<M>,
    pick: impl FnOnce(M) -> Option<H>,
    expected: &str,
) -> Result<H, Status> {
    match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
        Ok(Some(Ok(m))) => pick(m).ok_or_else(|| {
            Status::invalid_argument(format!("hello: the first message must be {expected}"))
        }),
        Ok(Some(Err(status))) => Err(status),
        Ok(None) => Err(Status::invalid_argument(
            "hello: stream closed before hello",
        )),
        Err(_) => Err(Status::deadline_exceeded("hello: not received in time")),
    }
}

/// Checks a proxy's join token: a bootstrap token from the configuration
/// (constant-time) or one created through the admin API (stored hashed).
pub(crate) async fn check_join_token(state: &AppState, token: &str) -> Result<(), Status> {
    if token.is_empty() {
        return Err(Status::unauthenticated("join_token: required"));
    }
    let mut ok = false;
    for t in &state.config.join_tokens {
        ok |= secrets_equal(t.as_bytes(), token.as_bytes());
    }
    if ok || state.store.check_join_token(token).await? {
        Ok(())
    } else {
        Err(Status::unauthenticated("join_token: not valid"))
    }
}

/// A proxy id names fleet rows, audit chains and metric labels: keep it
/// short and printable.
pub(crate) fn check_proxy_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > MAX_PROXY_ID {
        return Err(Status::invalid_argument(format!(
            "proxy_id: must be 1..={MAX_PROXY_ID} characters"
        )));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(Status::invalid_argument(
            "proxy_id: only letters, digits, '-', '_', '.', ':' are allowed",
        ));
    }
    Ok(())
}

/// The admin credential check for gRPC, as a tonic interceptor.
#[derive(Clone)]
pub struct AdminAuth(pub AppState);

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        self.0.check_admin(token)?;
        Ok(req)
    }
}
