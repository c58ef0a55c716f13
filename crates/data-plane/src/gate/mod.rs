//! The gates every tools/call passes, one file each, composed in order by
//! [`crate::stack`]. Each gate returns a typed refusal that
//! [`crate::error::ProxyError`] maps to a status, a JSON-RPC code and an
//! audit outcome.

pub mod authn;
pub mod authz;
pub mod rate_limit;
