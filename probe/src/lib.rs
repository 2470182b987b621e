//! `rekey-probe`: proves that a credential works, for the backend's
//! rotation kinds and the sidecar's validation alike. One module per
//! target: [`postgres`] (connect without statement logging, run a probe
//! statement), [`redis`] (a small RESP2 client: AUTH, PING, ACL) and
//! [`http`] (one request, status code only, headers built from checked
//! types); [`tls`] configures the TLS the Redis client speaks and puts
//! every TLS failure, Postgres's too, into words.
//!
//! Every failure is one [`Error`], whose message names the service, the
//! target address and the step, and never a value: no URL with its
//! password, no token, no server reply that echoes what was sent.

mod error;
pub mod http;
pub mod postgres;
pub mod redis;
pub mod tls;

pub use error::{Error, Service};
