//! `rekey status`: stages, the rotation step, consumers and what holds
//! decommission back, for one secret or all.

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::{Value, json};

use super::Ctx;
use crate::error::CliError;
use crate::output::safe;
use crate::output::{print_json, secret_json, version_json, version_label};

pub async fn status(cx: &Ctx, secret: Option<&str>) -> Result<(), CliError> {
    let r = cx
        .connect()
        .await?
        .get_status(pb::GetStatusRequest {
            secret_id: secret.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    if cx.json {
        print_json(&Value::Array(r.secrets.iter().map(status_json).collect()));
    } else {
        for (i, st) in r.secrets.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_status(st);
        }
    }
    Ok(())
}

fn status_json(st: &pb::SecretStatus) -> Value {
    let s = st.secret.clone().unwrap_or_default();
    let mut o = secret_json(&s);
    o["versions"] = Value::Array(st.versions.iter().map(|v| version_json(&s.id, v)).collect());
    o["consumers"] = Value::Array(
        st.consumers
            .iter()
            .map(|k| {
                json!({
                    "consumer_id": k.consumer_id,
                    "pod": k.pod,
                    "namespace": k.namespace,
                    "identity": k.identity,
                    "version": k.version,
                    "healthy": k.healthy,
                    "error": k.error,
                    "reported_at": format_time(k.reported_at_ms),
                    "live": k.live,
                })
            })
            .collect(),
    );
    o["live_consumers"] = json!(st.live_consumers);
    o["converged_consumers"] = json!(st.converged);
    o["decommission_blockers"] = json!(st.decommission_blockers);
    o["reencryption"] = match &st.reencryption {
        Some(r) => json!({
            "version": r.version,
            "consumer_id": r.consumer_id,
            "rows_done": r.rows_done,
            "rows_total": r.rows_total,
            "rows_remaining": r.rows_total.saturating_sub(r.rows_done),
            "rate": r.rate,
            "eta_seconds": eta(r),
            "finished": r.finished,
            "phase": r.phase,
            "updated_at": format_time(r.updated_at_ms),
        }),
        None => Value::Null,
    };
    o["rotation"] = match &st.rotation {
        Some(r) => json!({
            "target_version": r.target_version,
            "step": r.step,
            "error": r.error,
            "started_at": format_time(r.started_at_ms),
            "updated_at": format_time(r.updated_at_ms),
        }),
        None => Value::Null,
    };
    o
}

/// Seconds left at the reported rate, while unfinished.
#[allow(
    clippy::cast_precision_loss,
    reason = "an estimate; row counts stay far below 2^52"
)]
fn eta(r: &pb::Reencryption) -> Option<f64> {
    let left = r.rows_total.saturating_sub(r.rows_done) as f64;
    (!r.finished && r.rate > 0.0).then(|| left / r.rate)
}

fn print_status(st: &pb::SecretStatus) {
    let s = st.secret.clone().unwrap_or_default();
    let label = |n: u64| {
        st.versions
            .iter()
            .find(|v| v.version == n)
            .map_or_else(|| "-".into(), version_label)
    };
    println!("{} ({})", safe(&s.id), safe(&s.kind));
    println!("  current:   {}", label(s.current_version));
    println!("  previous:  {}", label(s.previous_version));
    if s.pending_version > 0 {
        println!("  pending:   {}", label(s.pending_version));
    }
    let spec = s
        .schedule
        .as_ref()
        .map(|x| x.spec.as_str())
        .filter(|x| !x.is_empty())
        .unwrap_or("manual");
    let next = if s.next_rotation_at_ms > 0 {
        format!(", next at {}", format_time(s.next_rotation_at_ms))
    } else {
        String::new()
    };
    println!("  schedule:  {}{next}", safe(spec));
    if let Some(rot) = &st.rotation {
        let error = if rot.error.is_empty() {
            String::new()
        } else {
            format!(": {}", safe(&rot.error))
        };
        println!(
            "  rotation:  v{} {}{error}",
            rot.target_version,
            safe(&rot.step)
        );
    }
    println!(
        "  consumers: {}/{} live on current",
        st.converged, st.live_consumers
    );
    for k in &st.consumers {
        println!(
            "    {} {}/{} v{}{}{}",
            safe(&k.consumer_id),
            safe(&k.namespace),
            safe(&k.pod),
            k.version,
            if k.live { "" } else { " (not live)" },
            if k.error.is_empty() {
                String::new()
            } else {
                format!(" error: {}", safe(&k.error))
            }
        );
    }
    if let Some(r) = &st.reencryption {
        println!(
            "  re-encryption to v{}: {} of {} rows, {} remaining, {:.0} rows/s{}, {}{}",
            r.version,
            r.rows_done,
            r.rows_total,
            r.rows_total.saturating_sub(r.rows_done),
            r.rate,
            eta(r)
                .map(|e| format!(", ETA {e:.0} s"))
                .unwrap_or_default(),
            safe(&r.phase),
            if r.finished { " (finished)" } else { "" }
        );
    }
    if s.previous_version > 0 {
        if st.decommission_blockers.is_empty() {
            println!("  decommission: previous may be revoked now");
        } else {
            println!("  decommission held back by:");
            for b in &st.decommission_blockers {
                println!("    - {}", safe(b));
            }
        }
    }
}
