//! What every admin surface (gRPC, REST) shares, and the admin credential
//! check both use.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sentinel_shared::keys::secrets_equal;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    /// Renders `/metrics`; `None` where no recorder is installed (tests).
    pub metrics: Option<PrometheusHandle>,
}

impl AppState {
    /// Checks an admin bearer token against every configured one, in
    /// constant time for each, without stopping at the first match.
    pub fn check_admin(&self, presented: Option<&str>) -> Result<()> {
        let Some(token) = presented.filter(|t| !t.is_empty()) else {
            return Err(Error::Unauthenticated(
                "admin credential required: Authorization: Bearer <admin token>".into(),
            ));
        };
        let mut ok = false;
        for admin in &self.config.admin_tokens {
            ok |= secrets_equal(token.as_bytes(), admin.as_bytes());
        }
        if ok {
            Ok(())
        } else {
            Err(Error::Unauthenticated("invalid admin credential".into()))
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}
