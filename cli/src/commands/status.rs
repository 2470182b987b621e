//! `rekey status`: stages, the rotation step, consumers and what holds
//! decommission back, for one secret or all.

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::Value;

use super::Ctx;
use crate::error::CliError;
use crate::output::safe;
use crate::output::{print_json, provider_label, status_json, version_label};
use rekey_proto::json::eta;

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

fn print_status(st: &pb::SecretStatus) {
    for line in status_lines(st) {
        println!("{line}");
    }
}

/// The table form of one secret's status, a line each.
fn status_lines(st: &pb::SecretStatus) -> Vec<String> {
    let s = st.secret.clone().unwrap_or_default();
    // A version, and the servers its value is on for kinds that keep it
    // on several (a Redis deployment).
    let label = |n: u64| {
        st.versions.iter().find(|v| v.version == n).map_or_else(
            || "-".into(),
            |v| match v.nodes.as_slice() {
                [] => version_label(v),
                [one] => format!("{} on {}", version_label(v), safe(one)),
                many => format!(
                    "{} on {} servers: {}",
                    version_label(v),
                    many.len(),
                    many.iter().map(|n| safe(n)).collect::<Vec<_>>().join(", ")
                ),
            },
        )
    };
    let mut out = Vec::new();
    out.push(format!("{} ({})", safe(&s.id), safe(&s.kind)));
    // Right under the id: what rekey serves may not be what the provider
    // holds until this is fixed.
    if !st.provider_problem.is_empty() {
        out.push(format!(
            "  provider problem: {}",
            safe(&st.provider_problem)
        ));
    }
    out.push(format!("  current:   {}", label(s.current_version)));
    out.push(format!("  previous:  {}", label(s.previous_version)));
    if s.pending_version > 0 {
        out.push(format!("  pending:   {}", label(s.pending_version)));
    }
    out.push(format!("  provider:  {}", provider_label(&s)));
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
    out.push(format!("  schedule:  {}{next}", safe(spec)));
    if let Some(rot) = &st.rotation {
        let error = if rot.error.is_empty() {
            String::new()
        } else {
            format!(": {}", safe(&rot.error))
        };
        out.push(format!(
            "  rotation:  v{} {}{error}",
            rot.target_version,
            safe(&rot.step)
        ));
    }
    out.push(format!(
        "  consumers: {}/{} live on current",
        st.converged, st.live_consumers
    ));
    for k in &st.consumers {
        out.push(format!(
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
        ));
    }
    if let Some(r) = &st.reencryption {
        out.push(format!(
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
        ));
    }
    if s.previous_version > 0 {
        if st.decommission_blockers.is_empty() {
            out.push("  decommission: previous may be revoked now".into());
        } else {
            out.push("  decommission held back by:".into());
            for b in &st.decommission_blockers {
                out.push(format!("    - {}", safe(b)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(provider: &str, path: &str, problem: &str) -> pb::SecretStatus {
        pb::SecretStatus {
            secret: Some(pb::Secret {
                id: "prod/db".into(),
                kind: "static".into(),
                current_version: 1,
                provider: provider.into(),
                provider_path: path.into(),
                ..Default::default()
            }),
            versions: vec![pb::Version {
                version: 1,
                created_at_ms: 1_795_000_000_123,
                ..Default::default()
            }],
            provider_problem: problem.into(),
            ..Default::default()
        }
    }

    #[test]
    fn status_names_the_provider_and_puts_its_problem_first() {
        assert_eq!(
            status_lines(&status("", "", "")),
            [
                "prod/db (static)",
                "  current:   v1 (2026-11-18T11:06:40.123Z)",
                "  previous:  -",
                "  provider:  embedded",
                "  schedule:  manual",
                "  consumers: 0/0 live on current",
            ]
        );
        let lines = status_lines(&status(
            "vault-main",
            "secret/rekey/prod/db",
            "KV version 4 was deleted outside rekey\n",
        ));
        assert_eq!(
            lines[..2],
            [
                "prod/db (static)",
                "  provider problem: KV version 4 was deleted outside rekey\\n",
            ]
        );
        assert!(
            lines.contains(&"  provider:  vault-main (secret/rekey/prod/db)".to_string()),
            "{lines:?}"
        );
    }

    #[test]
    fn status_lists_the_servers_each_password_is_on() {
        let mut st = status("", "", "");
        st.versions[0].nodes = vec!["10.0.0.1:6379".into(), "10.0.0.2:6379".into()];
        assert_eq!(
            status_lines(&st)[1],
            "  current:   v1 (2026-11-18T11:06:40.123Z) on 2 servers: 10.0.0.1:6379, 10.0.0.2:6379"
        );
        st.versions[0].nodes.truncate(1);
        assert_eq!(
            status_lines(&st)[1],
            "  current:   v1 (2026-11-18T11:06:40.123Z) on 10.0.0.1:6379"
        );
    }
}
