//! The contract and models that both Sentinel planes share.
//!
//! Modules:
//! - [`proto`]: the generated protobuf types and gRPC stubs (the only
//!   `include_proto!` in the workspace);
//! - [`spec`]: the declarative policy document, its validation and its
//!   conversion to and from the contract;
//! - [`policy`]: a snapshot compiled for fast matching, RBAC decisions and
//!   snapshot deltas;
//! - [`audit`]: outcomes, redaction, bounding, the hash chain, ingest checks;
//! - [`keys`]: the API-key and join-token format and hashing;
//! - [`error`]: the error codes both planes map to gRPC and HTTP statuses.
//!
//! Architecture invariant: this crate performs no IO. It depends on neither
//! plane, and both depend on it.

pub mod audit;
pub mod error;
pub mod keys;
pub mod pem;
pub mod policy;
pub mod spec;

/// Generated from `proto/sentinel/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("sentinel.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("sentinel_descriptor");
}

/// Unix microseconds now. The one place both planes read the wall clock for
/// timestamps that travel between them.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
