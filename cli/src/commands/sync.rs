//! `rekey sync`: look at where a secret's provider keeps it now.

use rekey_proto::v1 as pb;
use serde_json::json;

use super::Ctx;
use crate::error::CliError;
use crate::output::{print_json, safe};

pub async fn sync(cx: &Ctx, secret: &str) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .sync(pb::SyncRequest {
            secret_id: secret.to_string(),
            provider_path: String::new(),
        })
        .await?
        .into_inner();
    let s = r.secret.unwrap_or_default();
    if cx.json {
        print_json(&json!({
            "secret": s.id,
            "changed": r.changed,
            "current_version": s.current_version,
            "provider_problem": if r.provider_problem.is_empty() { None } else { Some(&r.provider_problem) },
        }));
    } else if !r.provider_problem.is_empty() {
        println!(
            "{} stays at v{}: {}",
            safe(&s.id),
            s.current_version,
            safe(&r.provider_problem)
        );
    } else if r.changed {
        println!(
            "{} took a change made in {}: v{} is current",
            safe(&s.id),
            safe(&s.provider),
            s.current_version
        );
    } else {
        println!(
            "{} is unchanged in {} (v{} is current)",
            safe(&s.id),
            safe(&s.provider),
            s.current_version
        );
    }
    Ok(())
}
