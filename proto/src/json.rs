//! The JSON shapes of the API's messages that scripts rely on: `rekey -o
//! json` prints them, and the OpenBao / Vault plugin answers with them.
//! Values appear only where a message carries one (a revealed version).

use std::time::Duration;

use serde_json::{Value, json};

use crate::format_time;
use crate::v1 as pb;

/// The stages' lower-case names: `current`, `previous`, `pending`.
pub fn stage_names(stages: &[i32]) -> Vec<&'static str> {
    stages
        .iter()
        .map(|s| {
            pb::Stage::try_from(*s)
                .unwrap_or(pb::Stage::Unspecified)
                .label()
        })
        .collect()
}

/// `active` or `revoked`.
pub fn state_name(s: i32) -> &'static str {
    pb::VersionState::try_from(s)
        .unwrap_or(pb::VersionState::Unspecified)
        .label()
}

/// The value as JSON: a string, or an object for structured kinds. Raw
/// bytes that are not UTF-8 are shown as `{"base64": "..."}`.
fn value_json(v: &pb::SecretValue) -> Value {
    use base64::Engine as _;
    match &v.value {
        Some(pb::secret_value::Value::Raw(b)) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
        },
        Some(pb::secret_value::Value::Fields(f)) => Value::Object(
            f.fields
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
        None => Value::Null,
    }
}

/// A version as JSON (the shape scripts rely on).
pub fn version_json(secret: &str, v: &pb::Version) -> Value {
    let mut o = json!({
        "secret": secret,
        "version": v.version,
        "created_at": format_time(v.created_at_ms),
        "stages": stage_names(&v.stages),
        "state": state_name(v.state),
    });
    if v.revoked_at_ms > 0 {
        o["revoked_at"] = Value::String(format_time(v.revoked_at_ms));
    }
    if !v.nodes.is_empty() {
        o["nodes"] = json!(v.nodes);
    }
    if let Some(val) = &v.value {
        o["value"] = value_json(val);
    }
    o
}

/// A secret's metadata as JSON.
pub fn secret_json(s: &pb::Secret) -> Value {
    let opt = |n: u64| if n == 0 { Value::Null } else { json!(n) };
    let t = |ms: i64| {
        if ms == 0 {
            Value::Null
        } else {
            json!(format_time(ms))
        }
    };
    let sched = s.schedule.clone().unwrap_or_default();
    let window = Duration::from_millis(u64::try_from(s.validation_window_ms).unwrap_or(0));
    let [provider, provider_path] = provider_json(s);
    json!({
        "id": s.id,
        "kind": s.kind,
        "current_version": opt(s.current_version),
        "previous_version": opt(s.previous_version),
        "pending_version": opt(s.pending_version),
        "created_at": t(s.created_at_ms),
        "last_rotated_at": t(s.last_rotated_at_ms),
        "next_rotation_at": t(s.next_rotation_at_ms),
        "schedule": if sched.spec.is_empty() { "manual".to_string() } else { sched.spec },
        "validation_window": humantime::format_duration(window).to_string(),
        "revision": s.revision,
        "provider": provider,
        "provider_path": provider_path,
    })
}

/// `provider` and `provider_path` for scripts: the provider's name and
/// path, or null for rekey's embedded store (whose provider and path the
/// wire leaves empty).
pub fn provider_json(s: &pb::Secret) -> [Value; 2] {
    let or_null = |t: &str| {
        if t.is_empty() { Value::Null } else { json!(t) }
    };
    [or_null(&s.provider), or_null(&s.provider_path)]
}

/// A secret's status as JSON: its metadata, versions, consumers, rotation
/// step and re-encryption progress.
pub fn status_json(st: &pb::SecretStatus) -> Value {
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
    o["provider_problem"] = if st.provider_problem.is_empty() {
        Value::Null
    } else {
        json!(st.provider_problem)
    };
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
pub fn eta(r: &pb::Reencryption) -> Option<f64> {
    let left = r.rows_total.saturating_sub(r.rows_done) as f64;
    (!r.finished && r.rate > 0.0).then(|| left / r.rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(provider: &str, path: &str, problem: &str) -> pb::SecretStatus {
        let secret = pb::Secret {
            provider: provider.into(),
            provider_path: path.into(),
            ..Default::default()
        };
        pb::SecretStatus {
            secret: Some(secret),
            provider_problem: problem.into(),
            ..Default::default()
        }
    }

    #[test]
    fn version_json_has_the_documented_fields() {
        let v = pb::Version {
            version: 7,
            created_at_ms: 1_795_000_000_123,
            stages: vec![pb::Stage::Current as i32, pb::Stage::Pending as i32],
            state: pb::VersionState::Active as i32,
            revoked_at_ms: 0,
            value: None,
            nodes: vec![],
        };
        let j = version_json("prod/x", &v);
        assert_eq!(j["version"], 7);
        assert_eq!(j["created_at"], "2026-11-18T11:06:40.123Z");
        assert_eq!(j["stages"], json!(["current", "pending"]));
        assert_eq!(j["state"], "active");
        assert!(j.get("value").is_none());
        assert!(j.get("nodes").is_none(), "only kinds on several servers");
        let on = pb::Version {
            nodes: vec!["10.0.0.1:6379".into(), "10.0.0.2:6379".into()],
            ..v
        };
        assert_eq!(
            version_json("prod/x", &on)["nodes"],
            json!(["10.0.0.1:6379", "10.0.0.2:6379"])
        );
    }

    #[test]
    fn values_are_strings_or_objects() {
        let raw = pb::SecretValue {
            value: Some(pb::secret_value::Value::Raw(b"abc".to_vec())),
        };
        assert_eq!(value_json(&raw), json!("abc"));
        let f = pb::SecretValue {
            value: Some(pb::secret_value::Value::Fields(pb::StructuredValue {
                fields: [("username".to_string(), "u".to_string())].into(),
            })),
        };
        assert_eq!(value_json(&f), json!({"username": "u"}));
        let bin = pb::SecretValue {
            value: Some(pb::secret_value::Value::Raw(vec![0xff, 0xfe])),
        };
        assert_eq!(value_json(&bin), json!({"base64": "//4="}));
    }

    #[test]
    fn a_negative_window_reads_as_zero() {
        let s = pb::Secret {
            validation_window_ms: -5,
            ..Default::default()
        };
        assert_eq!(secret_json(&s)["validation_window"], "0s");
    }

    #[test]
    fn status_json_carries_the_provider() {
        let j = status_json(&status("", "", ""));
        assert_eq!(j["provider"], Value::Null);
        assert_eq!(j["provider_path"], Value::Null);
        assert_eq!(j["provider_problem"], Value::Null);
        let j = status_json(&status("vault-main", "secret/rekey/prod/db", "drifted"));
        assert_eq!(j["provider"], "vault-main");
        assert_eq!(j["provider_path"], "secret/rekey/prod/db");
        assert_eq!(j["provider_problem"], "drifted");
    }
}
