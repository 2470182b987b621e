//! `rekey revoke`: revokes a version that is not current; `--force` (with a
//! reason) before the decommission conditions hold.

use rekey_proto::v1 as pb;

use super::Ctx;
use crate::args::RevokeArgs;
use crate::error::CliError;
use crate::output::{print_json, version_json, version_label};

pub async fn revoke(cx: &Ctx, a: &RevokeArgs) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .revoke(pb::RevokeRequest {
            secret_id: a.secret.clone(),
            version: a.version,
            force: a.force,
            reason: a.reason.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    let v = r.version.unwrap_or_default();
    if cx.json {
        print_json(&version_json(&a.secret, &v));
    } else {
        println!("revoked {} {}", a.secret, version_label(&v));
    }
    Ok(())
}
