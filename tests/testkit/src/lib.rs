//! What rekey's end-to-end tests and benchmarks share (package
//! `rekey-e2e`), as linkerd2-proxy keeps its integration-test support in a
//! crate of its own rather than a module compiled into every test binary.
//!
//! - [`bins`]: the real `rekey-backend`, `rekey` and `rekey-sidecar`
//!   binaries, found in the running test's target directory and rebuilt
//!   once when missing or older than their sources.
//! - [`Backend`] and [`Sidecar`]: those binaries started on free ports with
//!   their own data, logs and configuration; [`Backend::cli`] runs the real
//!   CLI against a backend.
//! - [`PgDb`], [`PgServer`], [`RedisUsers`]: the machine's Postgres and
//!   Redis, and a private Postgres with password authentication (TLS
//!   only, if asked).
//! - [`RedisServer`], [`SentinelSet`], [`RedisCluster`]: private Redis
//!   deployments (TLS only, a primary with replicas and Sentinels, a
//!   cluster) with an admin user.
//! - [`server_pki`], [`issue_cert`], [`LeaseApiServer`]: certificates and a
//!   stand-in for the Kubernetes Lease API.
//! - [`Bao`], [`BaoAgent`], [`TokenReviewServer`]: OpenBao (dev or
//!   persistent, sealable) with its CLI, tokens, policies, AppRole and
//!   Kubernetes auth, the agent rendering a template, and a stand-in for
//!   the Kubernetes `TokenReview` API; [`bao_binary`] finds `bao`.
//! - [`Moto`] and [`LambdaRuntime`]: moto's `moto_server` standing in for
//!   AWS Secrets Manager, with the environment an AWS SDK needs to reach
//!   it, and a stand-in for the Lambda Runtime API that invokes a
//!   custom-runtime function and returns its response or
//!   [`LambdaError`]; [`moto_binary`] finds `moto_server`.
//! - [`bench`]: the benchmarks' frame, statistics and table printer.
//! - [`console`]: Markdown terminal sessions (`console` blocks) run for
//!   real and compared with the output they show.
//! - Small helpers: [`TempDir`], [`eventually`], [`wait_for`],
//!   [`http_get`], [`free_port`] and the like.
//!
//! Everything panics with a message instead of returning errors: a test
//! that cannot set up its world has failed.

pub mod bench;
pub mod bins;
pub mod console;

mod aws;
mod backend;
mod bao;
mod lease;
mod pg;
mod pki;
mod process;
mod redis;
mod sidecar;

pub use aws::{LambdaError, LambdaFunction, LambdaRuntime, Moto, ROTATION_LAMBDA_ARN, moto_binary};
pub use backend::{Backend, BackendOpts, Client, TokenInterceptor, client};
pub use bao::{AGENT_RENDER_INTERVAL, Bao, BaoAgent, TokenReviewServer, bao_binary};
pub use bins::{BACKEND, Binary, CLI, LAMBDA, SIDECAR, VAULT_PLUGIN};
pub use lease::LeaseApiServer;
pub use pg::{HYVVE_TABLES, PgDb, PgServer, RedisUsers, redis_auth, redis_cli};
pub use pki::{issue_cert, server_pki};
pub use process::{
    KEY_HOOK, TempDir, eventually, free_port, http_get, http_request, hyvve_open_in_python, metric,
    sha256_hex, stderr, stdout, succeed, terminate, tool_binary, wait_for, write_exec, write_file,
    write_hook,
};
pub use redis::{
    MASTER_NAME, REDIS_ADMIN, RedisApp, RedisCluster, RedisOpts, RedisServer, SentinelSet,
    redis_pki,
};
pub use sidecar::{Sidecar, reencrypt_sidecar_config, sidecar_config};
