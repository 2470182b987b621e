//! `rekey audit`: the audit log, or `--verify` of its hash chain (a broken
//! chain is a failure: exit 1, after the JSON report when asked for one).

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::{Value, json};

use super::Ctx;
use crate::args::AuditArgs;
use crate::error::CliError;
use crate::output::{print_json, table, version_or_dash};

pub async fn audit(cx: &Ctx, a: &AuditArgs) -> Result<(), CliError> {
    let mut client = cx.connect().await?;
    if a.verify {
        let r = client
            .verify_audit(pb::VerifyAuditRequest::default())
            .await?
            .into_inner();
        if cx.json {
            print_json(&json!({
                "ok": r.ok,
                "checked": r.checked,
                "first_bad_seq": if r.ok { Value::Null } else { json!(r.first_bad_seq) },
                "problem": if r.ok { Value::Null } else { json!(r.problem) },
            }));
        } else if r.ok {
            println!("audit log intact: {} events verified", r.checked);
        }
        if !r.ok {
            return Err(CliError::failed(format!(
                "audit log broken at event {}: {} ({} events before it verified)",
                r.first_bad_seq, r.problem, r.checked
            )));
        }
        return Ok(());
    }
    let r = client
        .list_audit(pb::ListAuditRequest {
            secret_id: a.secret.clone().unwrap_or_default(),
            after_seq: 0,
            limit: a.limit,
        })
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(
            r.events
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "time": format_time(e.time_ms),
                        "actor": e.actor,
                        "action": e.action,
                        "secret": e.secret_id,
                        "version": e.version,
                        "outcome": e.outcome,
                        "request_id": e.request_id,
                        "detail": e.detail,
                        "hash": e.hash,
                    })
                })
                .collect(),
        ));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = r
        .events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                format_time(e.time_ms),
                e.actor.clone(),
                e.action.clone(),
                e.secret_id.clone(),
                version_or_dash(e.version),
                e.outcome.clone(),
                e.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "SEQ", "TIME", "ACTOR", "ACTION", "SECRET", "VERSION", "OUTCOME", "DETAIL",
        ],
        &rows,
    );
    Ok(())
}
