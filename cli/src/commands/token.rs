//! `rekey token`: tokens for identities, issued and revoked through the
//! backend (it keeps only their digests). `create` prints the token once.

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::{Value, json};

use super::{Ctx, duration_ms};
use crate::args::{TokenCommand, TokenCreateArgs};
use crate::error::CliError;
use crate::output::{print_json, safe, table};

pub async fn token(cx: &Ctx, c: &TokenCommand) -> Result<(), CliError> {
    match c {
        TokenCommand::Create(a) => create(cx, a).await,
        TokenCommand::List => list(cx).await,
        TokenCommand::Revoke { id } => revoke(cx, id).await,
    }
}

fn info_json(t: &pb::TokenInfo) -> Value {
    let time = |ms: i64| {
        if ms > 0 {
            json!(format_time(ms))
        } else {
            Value::Null
        }
    };
    json!({
        "id": t.id,
        "identity": t.identity,
        "prefixes": t.prefixes,
        "operations": t.operations,
        "created_at": format_time(t.created_at_ms),
        "created_by": t.created_by,
        "expires_at": time(t.expires_at_ms),
        "revoked_at": time(t.revoked_at_ms),
    })
}

async fn create(cx: &Ctx, a: &TokenCreateArgs) -> Result<(), CliError> {
    let expires_at_ms = match duration_ms("--expires", a.expires.as_deref())? {
        0 if a.expires.is_some() => {
            return Err(CliError::usage("--expires must be longer than 0s"));
        }
        0 => 0,
        d => chrono::Utc::now().timestamp_millis().saturating_add(d),
    };
    let ops: Vec<String> = a
        .ops
        .iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    let r = cx
        .connect()
        .await?
        .create_token(pb::CreateTokenRequest {
            identity: a.identity.clone(),
            prefixes: a.prefixes.clone(),
            operations: ops,
            expires_at_ms,
        })
        .await?
        .into_inner();
    let info = r.info.unwrap_or_default();
    if cx.json {
        let mut o = info_json(&info);
        o["token"] = json!(r.token);
        print_json(&o);
    } else {
        // The token alone on stdout, so that it can go straight to a file;
        // what it is, on stderr.
        eprintln!(
            "issued {} for {} ({} on {}{}); it is shown once:",
            info.id,
            safe(&info.identity),
            info.operations.join(","),
            info.prefixes
                .iter()
                .map(|p| format!("{:?}", safe(p)))
                .collect::<Vec<_>>()
                .join(","),
            if info.expires_at_ms > 0 {
                format!(", until {}", format_time(info.expires_at_ms))
            } else {
                String::new()
            }
        );
        println!("{}", r.token);
    }
    Ok(())
}

async fn list(cx: &Ctx) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .list_tokens(pb::ListTokensRequest {})
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(r.tokens.iter().map(info_json).collect()));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .tokens
        .iter()
        .map(|t| {
            let state = if t.revoked_at_ms > 0 {
                format!("revoked {}", format_time(t.revoked_at_ms))
            } else if t.expires_at_ms > 0 {
                format!("until {}", format_time(t.expires_at_ms))
            } else {
                "in force".into()
            };
            vec![
                t.id.clone(),
                t.identity.clone(),
                t.operations.join(","),
                t.prefixes
                    .iter()
                    .map(|p| format!("{p:?}"))
                    .collect::<Vec<_>>()
                    .join(","),
                format_time(t.created_at_ms),
                state,
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "IDENTITY",
            "OPERATIONS",
            "PREFIXES",
            "CREATED",
            "STATE",
        ],
        &rows,
    );
    Ok(())
}

async fn revoke(cx: &Ctx, id: &str) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .revoke_token(pb::RevokeTokenRequest { id: id.to_string() })
        .await?
        .into_inner();
    let info = r.info.unwrap_or_default();
    if cx.json {
        print_json(&info_json(&info));
    } else {
        println!("revoked {} for {}", info.id, safe(&info.identity));
    }
    Ok(())
}
