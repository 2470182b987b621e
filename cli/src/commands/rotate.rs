//! `rekey rotate`: one rotation (optionally after waiting for previous to
//! be decommissioned), or `--cancel` of a parked one.

use std::time::Duration;

use rekey_proto::v1 as pb;
use serde_json::json;

use super::{Ctx, read_value};
use crate::args::RotateArgs;
use crate::client::Client;
use crate::error::CliError;
use crate::output::{print_json, secret_json, version_json, version_label};

pub async fn rotate(cx: &Ctx, args: &RotateArgs) -> Result<(), CliError> {
    let req = pb::RotateRequest {
        secret_id: args.secret.clone(),
        request_token: args.request_token.clone().unwrap_or_default(),
        value: args.value_file.as_deref().map(read_value).transpose()?,
        cancel: args.cancel,
    };
    let mut client = cx.connect().await?;
    if args.wait {
        wait_for_decommission(&mut client, &args.secret).await?;
    }
    let resp = client.rotate(req).await?.into_inner();
    let secret = resp.secret.unwrap_or_default();
    if args.cancel {
        if cx.json {
            print_json(&secret_json(&secret));
        } else {
            println!(
                "cancelled: {} stays at v{}",
                secret.id, secret.current_version
            );
        }
        return Ok(());
    }
    let version = resp.version.unwrap_or_default();
    if cx.json {
        let mut o = version_json(&secret.id, &version);
        o["replayed"] = json!(resp.replayed);
        print_json(&o);
    } else if resp.replayed {
        // The first call's version, as it stands now: later rotations may
        // have moved it on.
        let stages = crate::output::stage_names(&version.stages);
        println!(
            "repeated request: {} was rotated to {} by the first call with this token; it is now {}{}; current is v{}",
            secret.id,
            version_label(&version),
            crate::output::state_name(version.state),
            if stages.is_empty() {
                String::new()
            } else {
                format!(" ({})", stages.join(", "))
            },
            secret.current_version
        );
    } else {
        let prev = if secret.previous_version > 0 {
            format!("; previous is v{}", secret.previous_version)
        } else {
            String::new()
        };
        println!("rotated {} to {}{prev}", secret.id, version_label(&version));
    }
    Ok(())
}

/// Polls status until the secret has no previous version and no rotation
/// in flight (one rotation at a time for postgres, redis and exec).
async fn wait_for_decommission(client: &mut Client, secret: &str) -> Result<(), CliError> {
    let mut said = false;
    loop {
        let st = client
            .get_status(pb::GetStatusRequest {
                secret_id: secret.to_string(),
            })
            .await?
            .into_inner();
        let s = st.secrets.first().cloned().unwrap_or_default();
        let sec = s.secret.unwrap_or_default();
        if sec.previous_version == 0 && sec.pending_version == 0 {
            return Ok(());
        }
        if !said {
            eprintln!(
                "waiting: previous v{} of {secret} is not decommissioned yet ({})",
                sec.previous_version,
                crate::output::safe(&s.decommission_blockers.join("; "))
            );
            said = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
