//! The backend's error type and its mapping to gRPC status codes.
//!
//! Messages name what failed (secret id, version, setting) so that a user can
//! act on them; none ever carries a secret value.

use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A rotation step (set, test, revoke) failed at its target.
    #[error("{step} failed for {secret}: {message}")]
    Step {
        secret: String,
        step: &'static str,
        message: String,
    },
    /// A value provider (Vault, AWS Secrets Manager) failed or refused;
    /// `unavailable` when trying again later may work (unreachable,
    /// sealed).
    #[error("provider {provider}: {message}")]
    Provider {
        provider: String,
        message: String,
        unavailable: bool,
    },
    /// Not a source: sqlx's message already holds its cause, and a chain
    /// printed as well would say it a second and a third time.
    #[error("store: {0}")]
    Store(sqlx::Error),
    /// The store's database cannot be reached: which way, in words.
    #[error("store: {0}")]
    StoreUnreachable(String),
    #[error("migration: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    #[error("crypto: {0}")]
    Key(#[from] rekey_keyring::KeyError),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Store(e)
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Migrate(e)
    }
}

impl Error {
    pub fn not_found_secret(id: &str) -> Self {
        Error::NotFound(format!("secret {id}"))
    }

    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_)
            | Error::Step { .. }
            | Error::Provider {
                unavailable: false, ..
            } => Code::FailedPrecondition,
            Error::Provider {
                unavailable: true, ..
            } => Code::Unavailable,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Store(_)
            | Error::StoreUnreachable(_)
            | Error::Migrate(_)
            | Error::Key(_)
            | Error::Internal(_) => Code::Internal,
        }
    }

    /// Short outcome label for audit events and metrics.
    pub fn outcome(&self) -> &'static str {
        match self.code() {
            Code::NotFound => "not_found",
            Code::InvalidArgument => "invalid_argument",
            Code::FailedPrecondition => "failed_precondition",
            Code::AlreadyExists => "already_exists",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::Unavailable => "unavailable",
            _ => "error",
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if code == Code::Internal {
            // The detail stays in the log; the client gets a stable message.
            tracing::error!(error = %e, "internal error");
            return Status::new(code, "internal error; see the backend log");
        }
        let detail = match e {
            // The variant's prefix ("not found: ") repeats the code.
            Error::NotFound(m)
            | Error::InvalidArgument(m)
            | Error::FailedPrecondition(m)
            | Error::AlreadyExists(m)
            | Error::Unauthenticated(m)
            | Error::PermissionDenied(m) => m,
            other => other.to_string(),
        };
        Status::new(code, detail)
    }
}

/// The deepest cause of an error (the OS's "connection refused"): clients
/// wrap it in layers that say only "dispatch failure" or "request error".
pub(crate) fn innermost(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// anyhow prints a chain of sources after the message; a store error's
    /// message holds its cause already, so the cause must not follow it
    /// again (it used to be printed three times).
    #[test]
    fn a_store_error_says_its_cause_once() {
        let e = anyhow::Error::from(Error::Store(sqlx::Error::Protocol("the cause".into())))
            .context("cannot open the store");
        let shown = format!("{e:#}");
        assert_eq!(shown.matches("the cause").count(), 1, "{shown}");
    }
}
