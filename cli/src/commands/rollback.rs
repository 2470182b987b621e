//! `rekey rollback`: previous becomes current again.

use rekey_proto::v1 as pb;

use super::Ctx;
use crate::error::CliError;
use crate::output::{print_json, version_json, version_label};

pub async fn rollback(cx: &Ctx, secret: &str) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .rollback(pb::RollbackRequest {
            secret_id: secret.to_string(),
        })
        .await?
        .into_inner();
    let s = r.secret.unwrap_or_default();
    let v = r.version.unwrap_or_default();
    if cx.json {
        print_json(&version_json(&s.id, &v));
    } else {
        println!(
            "rolled back {} to {}; v{} is previous",
            s.id,
            version_label(&v),
            s.previous_version
        );
    }
    Ok(())
}
