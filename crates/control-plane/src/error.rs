//! The control plane's one error type. Every failure maps to an
//! [`ErrorCode`], and from there to a gRPC status or an HTTP response with a
//! safe message: the detail of an internal failure goes to the log only.

use sentinel_shared::error::ErrorCode;
use sentinel_shared::spec::{FieldError, ValidationErrors};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong; each entry names a field.
    #[error("{0}")]
    Invalid(ValidationErrors),
    #[error("{what} '{name}' not found")]
    NotFound { what: &'static str, name: String },
    #[error("{0}")]
    AlreadyExists(String),
    /// Well-formed, but refused by the current state.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// Postgres is unreachable or the connection broke: worth a retry.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("internal error")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(ValidationErrors::single(field, message))
    }

    pub fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound {
            what,
            name: name.into(),
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Invalid(_) => ErrorCode::InvalidArgument,
            Error::NotFound { .. } => ErrorCode::NotFound,
            Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Error::Conflict(_) => ErrorCode::FailedPrecondition,
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The field errors, for bodies that list them.
    pub fn fields(&self) -> &[FieldError] {
        match self {
            Error::Invalid(v) => &v.0,
            _ => &[],
        }
    }

    /// The message a client may see. Internal detail stays in the log.
    pub fn public_message(&self) -> String {
        match self {
            Error::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    fn log(&self) {
        match self {
            Error::Internal(detail) => tracing::error!(%detail, "internal error"),
            Error::Unavailable(e) => tracing::warn!(error = %e, "database unavailable"),
            _ => {}
        }
    }
}

impl From<ValidationErrors> for Error {
    fn from(v: ValidationErrors) -> Self {
        Error::Invalid(v)
    }
}

/// Maps Postgres errors: the one place SQLSTATE codes are read.
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("23505") => Error::AlreadyExists(db.message().to_string()),
                Some("23503") => Error::Conflict(db.message().to_string()),
                // A NUL or an invalid byte sequence in text the caller sent:
                // their input, not our failure.
                Some("22021" | "22P05") => Error::invalid(
                    "request",
                    "text contains a character Postgres cannot store (e.g. NUL)",
                ),
                // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now,
                // 08xxx connection exceptions, 53300 too_many_connections.
                Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "53300" => {
                    Error::Unavailable(e)
                }
                _ => Error::Internal(e.to_string()),
            },
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Error::Unavailable(e),
            _ => Error::Internal(e.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.log();
        tonic::Status::new(e.code().grpc(), e.public_message())
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        self.log();
        let status = self.code().http();
        let body = serde_json::json!({
            "error": {
                "code": self.code().as_str(),
                "message": self.public_message(),
                "fields": self.fields(),
            }
        });
        (status, axum::Json(body)).into_response()
    }
}
