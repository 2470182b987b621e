//! The sidecar's one HTTP port: `/livez`, `/readyz`, `/metrics`, and a read
//! API compatible with the AWS Secrets Manager Agent for apps that fetch
//! rather than read files.
//!
//! Like that agent, the read API requires the `X-Aws-Parameters-Secrets-Token`
//! header (compared in constant time with the configured token; 403
//! without it), refuses any request carrying `X-Forwarded-For` (400: the
//! API is for the pod itself, never for proxied callers), answers with
//! `GetSecretValue`'s field names, and serves `GET /ping` without a token.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use rekey_keyring::SecretValue;
use serde_json::json;

use crate::state::{State, Versioned};

pub const TOKEN_HEADER: &str = "x-aws-parameters-secrets-token";

#[derive(Clone)]
pub struct Http {
    pub state: Arc<State>,
    pub api_token_file: Option<PathBuf>,
    pub backend_needed: bool,
}

pub fn router(h: Http) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ping", get(|| async { "healthy" }))
        .route("/secretsmanager/get", get(get_query))
        .route("/v1/{*id}", get(get_path))
        .with_state(h)
}

async fn readyz(AxState(h): AxState<Http>) -> Response {
    let (ready, body) = h.state.readiness(h.backend_needed);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn metrics(AxState(h): AxState<Http>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.state.metrics.encode(),
    )
        .into_response()
}

/// Why the read API refuses a request. Each maps to the status and
/// `__type` the AWS Secrets Manager Agent would answer with.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("X-Forwarded-For is not accepted: the read API serves the pod itself")]
    Forwarded,
    #[error("missing {} header", TOKEN_HEADER)]
    NoToken,
    #[error("the read API is off: start the sidecar with --api-token-file")]
    Off,
    #[error("wrong token")]
    WrongToken,
    #[error("secretId is required")]
    NoSecretId,
    #[error("{id} has not been delivered yet")]
    NotDelivered { id: String },
    #[error("this sidecar does not serve {id}")]
    NotServed { id: String },
    #[error("{id} has no served version {version}")]
    NoSuchVersion { id: String, version: String },
    #[error("{id} has no previous version")]
    NoPrevious { id: String },
    #[error("unknown versionStage {stage:?} (AWSCURRENT or AWSPREVIOUS)")]
    UnknownStage { stage: String },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (code, kind) = match &self {
            Refusal::Forwarded => (StatusCode::BAD_REQUEST, "BadRequest"),
            Refusal::NoToken | Refusal::Off | Refusal::WrongToken => {
                (StatusCode::FORBIDDEN, "Forbidden")
            }
            Refusal::NoSecretId | Refusal::UnknownStage { .. } => {
                (StatusCode::BAD_REQUEST, "InvalidParameterException")
            }
            Refusal::NotDelivered { .. }
            | Refusal::NotServed { .. }
            | Refusal::NoSuchVersion { .. }
            | Refusal::NoPrevious { .. } => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
        };
        let body = json!({"__type": kind, "message": self.to_string()});
        (code, axum::Json(body)).into_response()
    }
}

/// The read API's guard: X-Forwarded-For first, then the token.
fn admit(h: &Http, headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.contains_key("x-forwarded-for") {
        return Err(Refusal::Forwarded);
    }
    let given = headers.get(TOKEN_HEADER).ok_or(Refusal::NoToken)?;
    let file = h.api_token_file.as_ref().ok_or(Refusal::Off)?;
    let expected = zeroize::Zeroizing::new(std::fs::read_to_string(file).unwrap_or_default());
    let expected = expected.trim();
    if expected.is_empty() || !rekey_keyring::ct_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(Refusal::WrongToken);
    }
    Ok(())
}

fn answer(
    h: &Http,
    id: &str,
    stage: Option<&str>,
    version_id: Option<&str>,
) -> Result<Response, Refusal> {
    let Some(served) = h.state.served(id) else {
        let id = id.to_string();
        return Err(if h.state.ids().contains(&id) {
            Refusal::NotDelivered { id }
        } else {
            Refusal::NotServed { id }
        });
    };
    let (v, stages): (&Versioned, &str) = match (stage, version_id) {
        (_, Some(vid)) => {
            let want = vid.trim_start_matches('v');
            if served.current.version.to_string() == want {
                (&served.current, "AWSCURRENT")
            } else if let Some(p) = served
                .previous
                .as_ref()
                .filter(|p| p.version.to_string() == want)
            {
                (p, "AWSPREVIOUS")
            } else {
                return Err(Refusal::NoSuchVersion {
                    id: id.to_string(),
                    version: vid.to_string(),
                });
            }
        }
        (None, None) => (&served.current, "AWSCURRENT"),
        (Some(s), None) => match s {
            "AWSCURRENT" | "current" => (&served.current, "AWSCURRENT"),
            "AWSPREVIOUS" | "previous" => match &served.previous {
                Some(p) => (p, "AWSPREVIOUS"),
                None => return Err(Refusal::NoPrevious { id: id.to_string() }),
            },
            other => {
                return Err(Refusal::UnknownStage {
                    stage: other.to_string(),
                });
            }
        },
    };
    let mut body = json!({
        "ARN": format!("arn:rekey:secret:{id}"),
        "Name": id,
        "VersionId": v.version.to_string(),
        "VersionStages": [stages],
        "CreatedDate": format!("{}.{:03}", v.created_at_ms / 1000, v.created_at_ms % 1000),
    });
    match &v.value {
        SecretValue::Raw(b) => match std::str::from_utf8(b.expose()) {
            Ok(s) => body["SecretString"] = json!(s),
            Err(_) => {
                body["SecretBinary"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(b.expose()));
            }
        },
        fields @ SecretValue::Fields(_) => {
            body["SecretString"] = json!(
                crate::render::json_value(fields)
                    .map(|j| j.to_string())
                    .unwrap_or_default()
            );
        }
    }
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

async fn get_query(
    AxState(h): AxState<Http>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    admit(&h, &headers)?;
    let id = q.get("secretId").ok_or(Refusal::NoSecretId)?;
    answer(
        &h,
        id,
        q.get("versionStage").map(String::as_str),
        q.get("versionId").map(String::as_str),
    )
}

async fn get_path(
    AxState(h): AxState<Http>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, Refusal> {
    admit(&h, &headers)?;
    answer(
        &h,
        &id,
        q.get("versionStage").map(String::as_str),
        q.get("versionId").map(String::as_str),
    )
}
