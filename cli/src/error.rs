//! The CLI's one error type. Its variant decides the exit status: what the
//! user typed is wrong (2), or the backend or database refused or failed
//! (1). Either way the message is one line on stderr.

use std::process::ExitCode;

use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Something the user typed is wrong: a flag value that does not parse,
    /// a file named on the command line that cannot be read, a bad
    /// `--addr`. Found before anything is sent.
    #[error("invalid argument: {0}")]
    Usage(String),
    /// A refusal or failure from the backend or the database, already
    /// phrased as `what: detail`.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    pub fn usage(msg: impl Into<String>) -> Self {
        CliError::Usage(msg.into())
    }

    pub fn failed(msg: impl Into<String>) -> Self {
        CliError::Failed(msg.into())
    }

    /// 2 for a usage error, 1 for a refused or failed call.
    #[must_use]
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) => ExitCode::from(2),
            CliError::Failed(_) => ExitCode::from(1),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let what = match s.code() {
            Code::NotFound => "not found",
            Code::InvalidArgument => "invalid argument",
            Code::FailedPrecondition => "failed precondition",
            Code::AlreadyExists => "already exists",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission denied",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline exceeded",
            Code::ResourceExhausted => "resource exhausted",
            Code::OutOfRange => "out of range",
            Code::Unimplemented => "unimplemented",
            Code::Aborted => "aborted",
            Code::Cancelled => "cancelled",
            Code::Internal | Code::Unknown | Code::DataLoss | Code::Ok => "failed",
        };
        CliError::Failed(format!("{what}: {}", s.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_read_as_words_and_exit_1() {
        let e = CliError::from(tonic::Status::not_found("secret prod/x"));
        assert_eq!(e.to_string(), "not found: secret prod/x");
        assert_eq!(e.exit_code(), ExitCode::from(1));
        let e = CliError::from(tonic::Status::unauthenticated("no bearer token"));
        assert_eq!(e.to_string(), "unauthenticated: no bearer token");
        // Never a second "error:" after the one main prints.
        let e = CliError::from(tonic::Status::internal(
            "internal error; see the backend log",
        ));
        assert_eq!(e.to_string(), "failed: internal error; see the backend log");
        // The backend's own "invalid argument" is a refusal, not a usage
        // error: the command line parsed, the backend said no.
        let e = CliError::from(tonic::Status::invalid_argument("length"));
        assert_eq!(e.exit_code(), ExitCode::from(1));
    }

    #[test]
    fn usage_errors_exit_2() {
        let e = CliError::usage("--window \"soon\" is not a duration");
        assert_eq!(
            e.to_string(),
            "invalid argument: --window \"soon\" is not a duration"
        );
        assert_eq!(e.exit_code(), ExitCode::from(2));
    }
}
