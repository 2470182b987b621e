//! `rekey list`: the secrets the caller may read, optionally under a
//! prefix.

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::Value;

use super::Ctx;
use crate::error::CliError;
use crate::output::{print_json, secret_json, table, version_or_dash};

pub async fn list(cx: &Ctx, prefix: Option<&str>) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .list_secrets(pb::ListSecretsRequest {
            prefix: prefix.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(r.secrets.iter().map(secret_json).collect()));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .secrets
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.kind.clone(),
                format!("v{}", s.current_version),
                version_or_dash(s.previous_version),
                if s.next_rotation_at_ms > 0 {
                    format_time(s.next_rotation_at_ms)
                } else {
                    "manual".into()
                },
            ]
        })
        .collect();
    table(
        &["SECRET", "KIND", "CURRENT", "PREVIOUS", "NEXT ROTATION"],
        &rows,
    );
    Ok(())
}
