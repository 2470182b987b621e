//! `rekey versions`: every version of a secret, newest first.

use rekey_proto::v1 as pb;
use serde_json::Value;

use super::Ctx;
use crate::error::CliError;
use crate::output::{VERSION_HEADERS, print_json, table, version_json, version_row};

pub async fn versions(cx: &Ctx, secret: &str) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .list_versions(pb::ListVersionsRequest {
            secret_id: secret.to_string(),
        })
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(
            r.versions.iter().map(|v| version_json(secret, v)).collect(),
        ));
    } else {
        let rows: Vec<_> = r.versions.iter().map(version_row).collect();
        table(&VERSION_HEADERS, &rows);
    }
    Ok(())
}
