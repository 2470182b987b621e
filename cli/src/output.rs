//! How results are printed: aligned tables for people, and the JSON shapes
//! scripts rely on (`-o json`).

use std::time::Duration;

use rekey_proto::format_time;
use rekey_proto::v1 as pb;
use serde_json::{Value, json};

/// The widest a table cell gets; longer text ends in `…`.
const MAX_CELL: usize = 80;

/// Text that came from the backend (ids, reasons, errors a sidecar
/// reported), made safe for a terminal: control characters are escaped
/// (`\n`, `\u{1b}`), so stored data can neither forge a line nor move the
/// cursor.
pub fn safe(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_debug().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect()
    } else {
        text.to_string()
    }
}

/// A table cell: safe for a terminal, and at most [`MAX_CELL`] characters.
fn cell(text: &str) -> String {
    let text = safe(text);
    if text.chars().count() > MAX_CELL {
        let mut cut: String = text.chars().take(MAX_CELL - 1).collect();
        cut.push('…');
        cut
    } else {
        text
    }
}

/// Prints rows as aligned columns; cells are made safe and cut to
/// [`MAX_CELL`] characters.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| cell(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(&headers.iter().map(ToString::to_string).collect::<Vec<_>>());
    for r in &rows {
        line(r);
    }
}

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

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
    if let Some(val) = &v.value {
        o["value"] = value_json(val);
    }
    o
}

/// `v7 (2026-11-26T12:28:15.123Z)`.
pub fn version_label(v: &pb::Version) -> String {
    format!("v{} ({})", v.version, format_time(v.created_at_ms))
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

/// Where a secret's values live, for people: `vault-main
/// (secret/rekey/db)`, or `embedded` for rekey's own store.
pub fn provider_label(s: &pb::Secret) -> String {
    match (s.provider.as_str(), s.provider_path.as_str()) {
        ("", _) => "embedded".into(),
        (name, "") => safe(name),
        (name, path) => format!("{} ({})", safe(name), safe(path)),
    }
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

/// One row of a versions table: VERSION, CREATED, STAGES, STATE.
pub fn version_row(v: &pb::Version) -> Vec<String> {
    vec![
        format!("v{}", v.version),
        format_time(v.created_at_ms),
        stage_names(&v.stages).join(","),
        state_name(v.state).to_string(),
    ]
}

/// The header that goes with [`version_row`].
pub const VERSION_HEADERS: [&str; 4] = ["VERSION", "CREATED", "STAGES", "STATE"];

/// `v7`, or `-` for no version.
pub fn version_or_dash(n: u64) -> String {
    if n > 0 { format!("v{n}") } else { "-".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_json_has_the_documented_fields() {
        let v = pb::Version {
            version: 7,
            created_at_ms: 1_795_000_000_123,
            stages: vec![pb::Stage::Current as i32, pb::Stage::Pending as i32],
            state: pb::VersionState::Active as i32,
            revoked_at_ms: 0,
            value: None,
        };
        let j = version_json("prod/x", &v);
        assert_eq!(j["version"], 7);
        assert_eq!(j["created_at"], "2026-11-18T11:06:40.123Z");
        assert_eq!(j["stages"], json!(["current", "pending"]));
        assert_eq!(j["state"], "active");
        assert!(j.get("value").is_none());
        assert_eq!(version_label(&v), "v7 (2026-11-18T11:06:40.123Z)");
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
    fn stored_text_cannot_drive_the_terminal_and_cells_are_cut() {
        assert_eq!(safe("ok"), "ok");
        assert_eq!(safe("a\u{1b}[2K\rb"), "a\\u{1b}[2K\\rb");
        assert_eq!(safe("two\nlines"), "two\\nlines");
        let long = cell(&"x".repeat(5000));
        assert_eq!(long.chars().count(), MAX_CELL);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn a_negative_window_reads_as_zero() {
        let s = pb::Secret {
            validation_window_ms: -5,
            ..Default::default()
        };
        assert_eq!(secret_json(&s)["validation_window"], "0s");
    }
}
