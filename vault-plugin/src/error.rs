//! Errors as the host shows them: an HTTP status and a message. They reach
//! OpenBao / Vault as go-plugin "coded errors", which the host answers with
//! that status and the message under `errors`.

use tonic::Code;

use crate::proto::pb::ProtoError;

/// The SDK's error type for an error with an HTTP status.
const ERR_TYPE_CODED: u32 = 3;
/// The SDK's `ErrUnsupportedOperation`: the host has its own answer for
/// it (and asks some operations of every backend, expecting it).
const ERR_TYPE_UNSUPPORTED_OPERATION: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub status: u16,
    pub message: String,
}

impl PluginError {
    pub fn new(status: u16, message: impl Into<String>) -> PluginError {
        PluginError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> PluginError {
        Self::new(400, message)
    }

    pub fn unsupported(operation: &str, path: &str) -> PluginError {
        Self::new(
            405,
            format!("{path:?} does not support the {operation:?} operation"),
        )
    }

    pub fn internal(message: impl Into<String>) -> PluginError {
        Self::new(500, message)
    }

    /// A `rekey.v1` call's failure. The backend's messages name ids and
    /// versions, never values.
    pub fn from_status(status: &tonic::Status, backend: &str) -> PluginError {
        let msg = status.message();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => {
                Self::bad_request(msg)
            }
            Code::NotFound => Self::new(404, msg),
            Code::FailedPrecondition | Code::Aborted => Self::new(412, msg),
            Code::Unavailable => Self::new(
                502,
                format!("the rekey backend at {backend} is unreachable: {msg}"),
            ),
            // Not a 5xx: Vault's clients send a 5xx again, and this call
            // may have taken effect.
            Code::DeadlineExceeded | Code::Cancelled => Self::new(
                408,
                format!(
                    "the rekey backend at {backend} did not answer in time ({msg}); the call may have taken effect: read the secret's status before trying again, or retry a rotation with the same request_token"
                ),
            ),
            Code::Unauthenticated => Self::new(
                502,
                format!(
                    "the rekey backend at {backend} refused the plugin's token ({msg}); write a valid token to the mount's config path"
                ),
            ),
            Code::PermissionDenied => Self::new(
                403,
                format!("the rekey backend does not allow the plugin's token this: {msg}"),
            ),
            Code::ResourceExhausted => Self::new(429, msg),
            _ => Self::internal(format!("the rekey backend failed: {msg}")),
        }
    }

    pub fn to_proto(&self) -> ProtoError {
        ProtoError {
            err_type: if self.status == 405 {
                ERR_TYPE_UNSUPPORTED_OPERATION
            } else {
                ERR_TYPE_CODED
            },
            err_msg: self.message.clone(),
            err_code: i64::from(self.status),
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_codes_become_the_documented_statuses() {
        let s = |c| PluginError::from_status(&tonic::Status::new(c, "m"), "http://b:1").status;
        assert_eq!(s(Code::InvalidArgument), 400);
        assert_eq!(s(Code::AlreadyExists), 400);
        assert_eq!(s(Code::NotFound), 404);
        assert_eq!(s(Code::FailedPrecondition), 412);
        assert_eq!(s(Code::Unavailable), 502);
        assert_eq!(s(Code::DeadlineExceeded), 408);
        assert_eq!(s(Code::Unauthenticated), 502);
        assert_eq!(s(Code::Internal), 500);
        let e = PluginError::from_status(
            &tonic::Status::unavailable("tcp connect error"),
            "http://b:1",
        );
        assert_eq!(
            e.message,
            "the rekey backend at http://b:1 is unreachable: tcp connect error"
        );
        let p = e.to_proto();
        assert_eq!((p.err_type, p.err_code), (3, 502));
    }
}
