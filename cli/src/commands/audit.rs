//! `rekey audit`: the audit log, or `--verify` of its MAC chain (a broken
//! chain, or a missing expected head, is a failure: exit 1, after the JSON
//! report when asked for one).
//!
//! Events are fetched a page at a time, so a log of any size, or with
//! unusually large events, never meets a message limit; table cells are
//! cut and made safe for the terminal.

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::{Value, json};

use super::Ctx;
use crate::args::AuditArgs;
use crate::error::CliError;
use crate::output::{print_json, safe, table, version_or_dash};

/// Events per `ListAudit` call.
const PAGE: u32 = 200;

pub async fn audit(cx: &Ctx, a: &AuditArgs) -> Result<(), CliError> {
    if a.verify {
        return verify(cx, a.expect_head.as_deref()).await;
    }
    // The newest `limit` events, read newest first a page at a time and
    // shown oldest first.
    let mut client = cx.connect().await?;
    let mut events: Vec<pb::AuditEvent> = Vec::new();
    let mut before = 0;
    while events.len() < a.limit as usize {
        let want = PAGE.min(a.limit - u32::try_from(events.len()).unwrap_or(u32::MAX));
        let page = client
            .list_audit(pb::ListAuditRequest {
                secret_id: a.secret.clone().unwrap_or_default(),
                limit: want,
                newest_first: true,
                before_seq: before,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        let done = page.len() < want as usize;
        before = page.last().map_or(before, |e| e.seq);
        events.extend(page);
        if done || before <= 1 {
            break;
        }
    }
    events.reverse();
    if cx.json {
        print_json(&Value::Array(events.iter().map(event_json).collect()));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = events
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

fn event_json(e: &pb::AuditEvent) -> Value {
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
}

/// `SEQ:MAC` as `--verify` prints it.
fn parse_head(text: &str) -> Result<(u64, String), CliError> {
    let bad = || {
        CliError::usage(format!(
            "--expect-head {:?} is not SEQ:MAC as `rekey audit --verify` prints it",
            safe(text)
        ))
    };
    let (seq, mac) = text.trim().split_once(':').ok_or_else(bad)?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    if seq == 0 || mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((seq, mac.to_ascii_lowercase()))
}

async fn verify(cx: &Ctx, expect: Option<&str>) -> Result<(), CliError> {
    let (expect_head_seq, expect_head_mac) = match expect {
        Some(t) => parse_head(t)?,
        None => (0, String::new()),
    };
    let r = cx
        .connect()
        .await?
        .verify_audit(pb::VerifyAuditRequest {
            expect_head_seq,
            expect_head_mac,
        })
        .await?
        .into_inner();
    let head = (r.head_seq > 0).then(|| format!("{}:{}", r.head_seq, r.head_mac));
    if cx.json {
        print_json(&json!({
            "ok": r.ok,
            "checked": r.checked,
            "head": head,
            "first_bad_seq": if r.ok || r.first_bad_seq == 0 { Value::Null } else { json!(r.first_bad_seq) },
            "problem": if r.ok { Value::Null } else { json!(r.problem) },
        }));
    } else if r.ok {
        println!(
            "audit log intact: {} events verified; head {}",
            r.checked,
            head.as_deref().unwrap_or("- (empty)")
        );
    }
    if r.ok {
        return Ok(());
    }
    Err(CliError::failed(if r.first_bad_seq == 0 {
        format!(
            "audit log tampered: {} ({} events verified)",
            r.problem, r.checked
        )
    } else {
        format!(
            "audit log broken at event {}: {} ({} events before it verified)",
            r.first_bad_seq, r.problem, r.checked
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expected_head_is_seq_colon_mac() {
        let mac = "ab".repeat(32);
        assert_eq!(parse_head(&format!("7:{mac}")).unwrap(), (7, mac.clone()));
        for bad in [
            "7",
            "x:ab",
            &format!("0:{mac}"),
            "7:abc",
            &format!("7:{}", "zz".repeat(32)),
        ] {
            let e = parse_head(bad).unwrap_err();
            assert!(e.to_string().contains("SEQ:MAC"), "{e}");
        }
    }
}
