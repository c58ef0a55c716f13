//! Connections to the control plane, and the one-line errors made from what
//! went wrong: the server's own message when it answered (it names the
//! field at fault), the deepest cause when it could not be reached.

use std::error::Error as StdError;
use std::time::Duration;

use sentinel_shared::proto::admin_client::AdminClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::{Ctx, Error, Result, fail};

/// How long to wait for a TCP/TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one unary admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer accepted. A page of 1000 audit events with the default
/// bounds on arguments is past tonic's default of 4 MiB; bigger pages are
/// asked for in halves (see `audit query`), so this bounds memory.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// `host:port` is taken to mean `http://host:port`.
fn with_scheme(s: &str) -> String {
    let s = s.trim();
    if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    }
}

/// Puts the admin token on every call.
#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin = AdminClient<InterceptedService<Channel, Auth>>;

fn read_ca(ctx: &Ctx) -> Result<Option<Vec<u8>>> {
    match &ctx.ca_cert {
        None => Ok(None),
        Some(p) => std::fs::read(p)
            .map(Some)
            .map_err(|e| Error::Message(format!("cannot read --ca-cert {}: {e}", p.display()))),
    }
}

/// Connects to the gRPC admin service.
pub async fn admin(ctx: &Ctx) -> Result<Admin> {
    let token = ctx.token()?;
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
        Error::Message("the admin token contains characters not allowed in a header".into())
    })?;
    // Kept out of any debug output of the request.
    value.set_sensitive(true);
    let addr = with_scheme(&ctx.addr);
    if !(addr.starts_with("http://") || addr.starts_with("https://")) {
        return fail(format!(
            "--addr '{addr}' must be an http:// or https:// URL such as http://127.0.0.1:50051"
        ));
    }
    let mut ep = Endpoint::from_shared(addr.clone())
        .map_err(|e| Error::Message(format!("--addr '{addr}' is not a valid URL: {}", root(&e))))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    if addr.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(pem) = read_ca(ctx)? {
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep
            .tls_config(tls)
            .map_err(|e| Error::Message(format!("TLS set-up for {addr} failed: {}", root(&e))))?;
    }
    let channel = ep.connect().await.map_err(|e| {
        Error::Message(format!(
            "cannot reach the control plane at {addr}: {}",
            root(&e)
        ))
    })?;
    Ok(AdminClient::with_interceptor(channel, Auth(value)).max_decoding_message_size(MAX_MESSAGE))
}

/// The innermost cause of an error: the one that says what happened
/// ("Connection refused"), not "transport error".
pub fn root(e: &(dyn StdError + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// One line from a gRPC status: the server's message, which names the field
/// at fault for invalid input.
pub fn status(s: tonic::Status) -> Error {
    use tonic::Code;
    let msg = s.message().trim();
    let line = match s.code() {
        Code::Unauthenticated => format!(
            "{} (check --token or SENTINEL_TOKEN)",
            if msg.is_empty() {
                "unauthenticated"
            } else {
                msg
            }
        ),
        Code::Unavailable if s.source().is_some() => format!(
            "control plane unavailable: {}",
            s.source().map(root).unwrap_or_default()
        ),
        Code::DeadlineExceeded => "the control plane did not answer in time".to_string(),
        _ if msg.is_empty() => format!("request failed: {}", s.code().description()),
        _ => msg.to_string(),
    };
    Error::Message(line)
}

/// The REST API, for streams and reports only REST serves.
pub struct Rest {
    client: reqwest::Client,
    base: reqwest::Url,
    token: String,
}

impl Rest {
    pub fn new(ctx: &Ctx) -> Result<Rest> {
        let token = ctx.token()?.to_string();
        let raw = with_scheme(&ctx.http);
        let base = reqwest::Url::parse(&raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                Error::Message(format!(
                    "--http '{raw}' must be an http:// or https:// URL such as http://127.0.0.1:8080"
                ))
            })?;
        let mut b = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        if let Some(pem) = read_ca(ctx)? {
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                Error::Message(format!("--ca-cert is not a PEM certificate: {}", root(&e)))
            })?;
            b = b.add_root_certificate(cert);
        }
        let client = b
            .build()
            .map_err(|e| Error::Message(format!("cannot set up the HTTP client: {}", root(&e))))?;
        Ok(Rest {
            client,
            base,
            token,
        })
    }

    /// The URL of `path` (under the base) with the given query pairs.
    pub fn url(&self, path: &str, query: &[(&str, String)]) -> reqwest::Url {
        let mut u = self.base.clone();
        let joined = format!("{}{}", u.path().trim_end_matches('/'), path);
        u.set_path(&joined);
        u.set_query(None);
        if !query.is_empty() {
            let mut q = u.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        u
    }

    /// GET `path`; a non-2xx answer becomes the server's error message.
    pub async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .client
            .get(self.url(path, query))
            .bearer_auth(&self.token);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req.send().await.map_err(|e| {
            Error::Message(format!(
                "cannot reach the control plane's REST API at {}: {}",
                self.base,
                root(&e)
            ))
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(rest_error(resp).await)
    }

    /// GET `path` and parse the JSON body.
    pub async fn get_json(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<serde_json::Value> {
        let resp = self.get(path, query, &[], Some(CALL_TIMEOUT)).await?;
        resp.json()
            .await
            .map_err(|e| Error::Message(format!("unreadable answer from {path}: {}", root(&e))))
    }
}

/// The message of our REST error shape
/// (`{"error": {"code", "message", "fields"}}`), or the status line.
async fn rest_error(resp: reqwest::Response) -> Error {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message"))
        .and_then(|m| m.as_str())
        .map(str::to_string);
    match message {
        Some(m) if status == reqwest::StatusCode::UNAUTHORIZED => {
            Error::Message(format!("{m} (check --token or SENTINEL_TOKEN)"))
        }
        Some(m) => Error::Message(m),
        None => Error::Message(format!("the control plane answered {status}")),
    }
}
