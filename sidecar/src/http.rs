//! The sidecar's one HTTP port: `/livez`, `/readyz`, `/metrics`, and a read
//! API compatible with the AWS Secrets Manager Agent for apps that fetch
//! rather than read files.
//!
//! Like that agent, the read API requires the `X-Aws-Parameters-Secrets-Token`
//! header (compared in constant time with the configured token; 403
//! without it), refuses any request carrying `X-Forwarded-For` (400: the
//! API is for the pod itself, never for proxied callers), answers with
//! GetSecretValue's field names, and serves `GET /ping` without a token.

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

fn error(code: StatusCode, kind: &str, msg: String) -> Response {
    (code, axum::Json(json!({"__type": kind, "message": msg}))).into_response()
}

/// The read API's guard: X-Forwarded-For first, then the token. `Some` is
/// the refusal to send.
fn refusal(h: &Http, headers: &HeaderMap) -> Option<Response> {
    if headers.contains_key("x-forwarded-for") {
        return Some(error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "X-Forwarded-For is not accepted: the read API serves the pod itself".into(),
        ));
    }
    let Some(given) = headers.get(TOKEN_HEADER) else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("missing {TOKEN_HEADER} header"),
        ));
    };
    let Some(file) = &h.api_token_file else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "the read API is off: start the sidecar with --api-token-file".into(),
        ));
    };
    let expected = zeroize::Zeroizing::new(std::fs::read_to_string(file).unwrap_or_default());
    let expected = expected.trim();
    if expected.is_empty() || !rekey_keyring::ct_eq(given.as_bytes(), expected.as_bytes()) {
        return Some(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "wrong token".into(),
        ));
    }
    None
}

fn answer(h: &Http, id: &str, stage: Option<&str>, version_id: Option<&str>) -> Response {
    let Some(served) = h.state.served(id) else {
        let known = h.state.ids().iter().any(|i| i == id);
        let msg = if known {
            format!("{id} has not been delivered yet")
        } else {
            format!("this sidecar does not serve {id}")
        };
        return error(StatusCode::NOT_FOUND, "ResourceNotFoundException", msg);
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
                return error(
                    StatusCode::NOT_FOUND,
                    "ResourceNotFoundException",
                    format!("{id} has no served version {vid}"),
                );
            }
        }
        (None, None) => (&served.current, "AWSCURRENT"),
        (Some(s), None) => match s {
            "AWSCURRENT" | "current" => (&served.current, "AWSCURRENT"),
            "AWSPREVIOUS" | "previous" => match &served.previous {
                Some(p) => (p, "AWSPREVIOUS"),
                None => {
                    return error(
                        StatusCode::NOT_FOUND,
                        "ResourceNotFoundException",
                        format!("{id} has no previous version"),
                    );
                }
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameterException",
                    format!("unknown versionStage {other:?} (AWSCURRENT or AWSPREVIOUS)"),
                );
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
                    json!(base64::engine::general_purpose::STANDARD.encode(b.expose()))
            }
        },
        other => {
            body["SecretString"] = json!(
                crate::render::json_value(other)
                    .map(|j| j.to_string())
                    .unwrap_or_default()
            )
        }
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn get_query(
    AxState(h): AxState<Http>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    let Some(id) = q.get("secretId") else {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterException",
            "secretId is required".into(),
        );
    };
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
) -> Response {
    if let Some(r) = refusal(&h, &headers) {
        return r;
    }
    answer(
        &h,
        &id,
        q.get("versionStage").map(String::as_str),
        q.get("versionId").map(String::as_str),
    )
}
