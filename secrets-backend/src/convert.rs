//! Conversions between store rows, keyring values and `rekey.v1` messages.

use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use rekey_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::store::{REVOKED, SecretRow, VersionRow};

pub fn secret(s: &SecretRow) -> pb::Secret {
    let random = serde_json::from_str::<serde_json::Value>(&s.options)
        .ok()
        .and_then(|o| o.get("random").cloned())
        .map(|r| pb::RandomOptions {
            length: r.get("length").and_then(|l| l.as_u64()).unwrap_or(0) as u32,
            encoding: r
                .get("encoding")
                .and_then(|e| e.as_str())
                .unwrap_or_default()
                .to_string(),
        });
    pb::Secret {
        id: s.id.clone(),
        kind: s.kind.clone(),
        random,
        schedule: Some(pb::Schedule {
            spec: s.schedule_spec.clone(),
            rotation_window_ms: s.rotation_window_ms,
            jitter_ms: s.jitter_ms,
            min_interval_ms: s.min_interval_ms,
            next_rotation_at_ms: s.next_override_ms,
        }),
        validation_window_ms: s.validation_window_ms,
        created_at_ms: s.created_at_ms,
        current_version: s.current_version as u64,
        previous_version: s.previous_version as u64,
        pending_version: s.pending_version as u64,
        next_rotation_at_ms: s.next_rotation_at_ms,
        last_rotated_at_ms: s.last_rotated_at_ms,
        revision: s.revision as u64,
    }
}

/// The stages that point at version `v` of secret `s`.
pub fn stages(s: &SecretRow, v: i64) -> Vec<i32> {
    let mut out = Vec::new();
    if s.current_version == v {
        out.push(pb::Stage::Current as i32);
    }
    if s.previous_version == v {
        out.push(pb::Stage::Previous as i32);
    }
    if s.pending_version == v {
        out.push(pb::Stage::Pending as i32);
    }
    out
}

pub fn version(s: &SecretRow, v: &VersionRow, value: Option<&SecretValue>) -> pb::Version {
    pb::Version {
        version: v.version as u64,
        created_at_ms: v.created_at_ms,
        stages: stages(s, v.version),
        state: if v.state == REVOKED {
            pb::VersionState::Revoked as i32
        } else {
            pb::VersionState::Active as i32
        },
        revoked_at_ms: v.revoked_at_ms,
        value: value.map(value_to_pb),
    }
}

pub fn value_to_pb(v: &SecretValue) -> pb::SecretValue {
    pb::SecretValue {
        value: Some(match v {
            SecretValue::Raw(b) => pb::secret_value::Value::Raw(b.expose().to_vec()),
            SecretValue::Fields(m) => pb::secret_value::Value::Fields(pb::StructuredValue {
                fields: m
                    .iter()
                    .map(|(k, v)| (k.clone(), v.expose().to_string()))
                    .collect(),
            }),
        }),
    }
}

pub fn value_from_pb(v: &pb::SecretValue) -> Result<SecretValue> {
    match &v.value {
        Some(pb::secret_value::Value::Raw(b)) => Ok(SecretValue::Raw(SecretBytes::new(b.clone()))),
        Some(pb::secret_value::Value::Fields(f)) => Ok(SecretValue::Fields(
            f.fields
                .iter()
                .map(|(k, v)| (k.clone(), SecretString::new(v.clone())))
                .collect(),
        )),
        None => Err(Error::InvalidArgument("the value is empty".into())),
    }
}
