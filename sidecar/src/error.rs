//! The sidecar's runtime failures: talking to the backend, rendering,
//! validating and writing a version, and running reload actions. (Problems
//! in the configuration are collected into `config::ConfigErrors` instead,
//! so that all of them are listed at once.)
//!
//! Messages name what failed (a file, an address, a field, a program) and
//! never a value: they reach logs, `/readyz` and the backend's status of
//! this consumer.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The backend.
    #[error("no token_file")]
    NoTokenFile,
    #[error("cannot read token file {path}: {reason}")]
    TokenFile {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("the token holds characters not allowed in a header")]
    TokenNotAHeader,
    #[error("backend {backend:?}: {reason}")]
    BackendAddress {
        backend: String,
        reason: tonic::transport::Error,
    },
    #[error("cannot reach the backend at {backend}: {reason}")]
    BackendUnreachable {
        backend: String,
        reason: tonic::transport::Error,
    },
    #[error("the backend did not answer within {after:?}")]
    BackendSilent { after: Duration },
    /// A gRPC status from the backend (its message names ids, not values).
    #[error("{}: {message}", code_name(*code))]
    Backend { code: Code, message: String },
    /// A Watch event over `max_event_bytes`; `size` is what its length
    /// prefix declared (the event itself is never read).
    #[error(
        "the backend sent an event of {} bytes; max_event_bytes is {max}",
        size.map_or_else(|| format!("more than {max}"), |n| n.to_string())
    )]
    EventTooLarge { size: Option<usize>, max: usize },

    // Rendering.
    #[error("the value is not UTF-8 text")]
    NotText,
    #[error(
        "format raw needs a single value, but this secret has fields ({}); use json, env or template",
        fields.join(", ")
    )]
    RawNeedsOneValue { fields: Vec<String> },
    #[error(
        "the template names field(s) the value lacks: {} (it has: {})",
        missing.join(", "),
        has.join(", ")
    )]
    MissingFields {
        missing: Vec<String>,
        has: Vec<String>,
    },
    #[error("a {{{{ has no closing }}}}")]
    TemplateUnclosed,
    #[error("{{{{{name}}}}} is not a field name")]
    TemplateName { name: String },

    // Validation.
    #[error("{check} validation needs a url field")]
    NoUrl { check: &'static str },
    #[error("redis validation supports redis:// and rediss:// URLs")]
    NotARedisUrl,
    #[error("http validation needs a single value, or a password or token field")]
    NoToken,
    #[error("validation timed out after {after:?}")]
    ValidationTimeout { after: Duration },
    /// A Postgres, Redis or HTTP check failed (the probe's message).
    #[error(transparent)]
    Probe(#[from] rekey_probe::Error),
    /// An HTTP endpoint answered, but not 2xx.
    #[error("http: {target} answered {status}")]
    HttpStatus { target: String, status: u16 },
    /// A version that failed its validation, as `/readyz` and the backend
    /// are told.
    #[error("validation failed: {0}")]
    Rejected(Box<Error>),

    // Writing.
    #[error("cannot write {}: {reason}", path.display())]
    Write {
        path: PathBuf,
        reason: std::io::Error,
    },
    /// A directory on the way to an output is a symlink, and
    /// `allow_symlinked_dirs` is off: it may have been swapped to send the
    /// secret elsewhere.
    #[error(
        "cannot write {}: {} is a symlink, which is not followed (allow_symlinked_dirs is off)",
        path.display(),
        dir.display()
    )]
    SymlinkedDir { path: PathBuf, dir: PathBuf },
    /// A kubelet-style directory whose `..data` is not a link to a
    /// generation beside it.
    #[error(
        "cannot write in {}: its ..data is not a link to a generation in it; not followed",
        dir.display()
    )]
    DataLink { dir: PathBuf },

    // Reload actions.
    #[error("cannot read pid file {path}: {reason}")]
    PidFile {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("pid file {path} does not hold a process id")]
    NotAPid { path: PathBuf },
    #[error("no process to signal")]
    NoProcess,
    #[error("invalid process id {pid}")]
    InvalidPid { pid: i32 },
    #[error("cannot send {signal} to {pid}: {reason}")]
    Signal {
        signal: String,
        pid: i32,
        reason: rustix::io::Errno,
    },
    #[error("empty command")]
    EmptyCommand,
    #[error("cannot run {program}: {reason}")]
    Spawn {
        program: String,
        reason: std::io::Error,
    },
    #[error("{program} exited with {status}")]
    CommandFailed { program: String, status: ExitStatus },
}

impl Error {
    /// Whether the backend could not be reached or the connection broke,
    /// as opposed to the backend answering with something the sidecar
    /// cannot use (a refusal, an event over `max_event_bytes`). A broken
    /// HTTP/2 connection surfaces as INTERNAL or UNKNOWN.
    #[must_use]
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::BackendUnreachable { .. } | Error::BackendSilent { .. } => true,
            Error::Backend { code, .. } => matches!(
                code,
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Internal
            ),
            _ => false,
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Backend {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// How a gRPC code reads in a message.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::PermissionDenied => "permission denied",
        Code::NotFound => "not found",
        Code::Unauthenticated => "unauthenticated",
        Code::InvalidArgument => "invalid argument",
        Code::Unavailable => "unavailable",
        Code::ResourceExhausted => "resource exhausted",
        Code::Internal => "internal error",
        Code::OutOfRange => "out of range",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_documented_wording() {
        assert_eq!(
            Error::TemplateName { name: "a b".into() }.to_string(),
            "{{a b}} is not a field name"
        );
        assert_eq!(
            Error::TemplateUnclosed.to_string(),
            "a {{ has no closing }}"
        );
        assert_eq!(
            Error::from(tonic::Status::permission_denied(
                "pod-a may not watch prod/billing/jwt"
            ))
            .to_string(),
            "permission denied: pod-a may not watch prod/billing/jwt"
        );
        assert_eq!(
            Error::ValidationTimeout {
                after: Duration::from_secs(5)
            }
            .to_string(),
            "validation timed out after 5s"
        );
        assert_eq!(
            Error::BackendSilent {
                after: Duration::from_secs(10)
            }
            .to_string(),
            "the backend did not answer within 10s"
        );
        assert_eq!(
            Error::EventTooLarge {
                size: Some(2_621_500),
                max: 1_048_576
            }
            .to_string(),
            "the backend sent an event of 2621500 bytes; max_event_bytes is 1048576"
        );
        assert_eq!(
            Error::EventTooLarge {
                size: None,
                max: 4096
            }
            .to_string(),
            "the backend sent an event of more than 4096 bytes; max_event_bytes is 4096"
        );
    }
}
