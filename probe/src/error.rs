//! The one error type of every probe. A message names the service, the
//! target (an address, never a URL with its credentials) and the step that
//! failed; it never carries a value: URLs are not repeated, server and
//! driver messages are scrubbed of what was sent, and a refused header
//! value is described, not shown.

use std::fmt;
use std::time::Duration;

/// What a probe talks to; every message starts with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Postgres,
    Redis,
    Http,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Postgres => "postgres",
            Service::Redis => "redis",
            Service::Http => "http",
        })
    }
}

/// Why a probe failed. `target` is `host:port` (Postgres adds the user and
/// database, HTTP the scheme and path); `step` is what was under way
/// (`connect`, `AUTH`, `the probe statement`, ...).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL cannot be used. It is not repeated: it may hold a password.
    #[error("{service}: {why}")]
    Url { service: Service, why: &'static str },
    /// A TLS setting cannot be used: a file that cannot be read or holds
    /// no PEM, a server name that is not one. Nothing was sent.
    #[error("{service}: {setting} {reason}")]
    Config {
        service: Service,
        setting: &'static str,
        reason: String,
    },
    /// The TLS handshake failed; the reason says which way (wrong CA,
    /// wrong host name, no TLS on the port, a refused client certificate).
    #[error("{service}: TLS with {target} failed: {reason}")]
    Tls {
        service: Service,
        target: String,
        reason: String,
    },
    /// A value cannot go into a header (CR, LF, other control or non-ASCII
    /// bytes). Nothing was sent.
    #[error("{service}: {what} holds bytes not allowed in a header; nothing was sent")]
    Header {
        service: Service,
        what: &'static str,
    },
    #[error("{service}: cannot connect to {target}: {reason}")]
    Connect {
        service: Service,
        target: String,
        reason: String,
    },
    #[error("{service}: no answer from {target} within {after:?} ({step})")]
    Timeout {
        service: Service,
        target: String,
        step: String,
        after: Duration,
    },
    /// The server said no: a wrong password, a missing permission.
    #[error("{service}: {step} refused by {target}: {reason}")]
    Refused {
        service: Service,
        target: String,
        step: String,
        reason: String,
    },
    /// The connection broke, or a statement failed.
    #[error("{service}: {step} failed at {target}: {reason}")]
    Failed {
        service: Service,
        target: String,
        step: String,
        reason: String,
    },
    /// The server answered something the protocol or the check does not
    /// allow.
    #[error("{service}: {target} answered {step} with {answer}")]
    Unexpected {
        service: Service,
        target: String,
        step: String,
        answer: String,
    },
}

/// Replaces every `secret` (of at least `min` bytes) in `msg`.
pub(crate) fn redact(msg: &str, secrets: &[&str], min: usize) -> String {
    let mut out = msg.to_string();
    for s in secrets {
        if s.len() >= min && out.contains(s) {
            out = out.replace(s, "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_start_with_the_service_and_redact() {
        let e = Error::Refused {
            service: Service::Redis,
            target: "127.0.0.1:6379".into(),
            step: "AUTH".into(),
            reason: "WRONGPASS".into(),
        };
        assert_eq!(
            e.to_string(),
            "redis: AUTH refused by 127.0.0.1:6379: WRONGPASS"
        );
        assert_eq!(
            redact("user hunter22 and x", &["hunter22", "x"], 4),
            "user [redacted] and x"
        );
    }
}
