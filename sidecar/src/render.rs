//! Renders a secret value into the bytes of the file an app reads: raw,
//! JSON, `.env`, a `{{field}}` template, or a keyring of current and
//! previous. Every buffer is zeroed on drop; errors name fields, never
//! values.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rekey_keyring::{SecretBytes, SecretValue};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::config::{Format, Output, template_fields};
use crate::error::Error;

fn text(b: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(b).map_err(|_| Error::NotText)
}

/// The value's fields: a raw value is the single field `value`.
fn fields(v: &SecretValue) -> Result<BTreeMap<&str, &str>, Error> {
    match v {
        SecretValue::Raw(b) => Ok([("value", text(b.expose())?)].into()),
        SecretValue::Fields(m) => Ok(m.iter().map(|(k, v)| (k.as_str(), v.expose())).collect()),
    }
}

fn env_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' => out.push_str("\\$"),
            '`' => out.push_str("\\`"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON form of a value: its fields as an object, or `{"value": ...}`.
///
/// # Errors
/// [`Error::NotText`] for a raw value that is not UTF-8.
pub fn json_value(v: &SecretValue) -> Result<Value, Error> {
    Ok(Value::Object(
        fields(v)?
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect::<Map<_, _>>(),
    ))
}

/// Renders one value as the output's format asks.
///
/// # Errors
/// The value does not fit the format: fields for `raw`, a field the
/// template names is missing, or bytes that are not text.
pub fn render(out: &Output, value: &SecretValue) -> Result<SecretBytes, Error> {
    let bytes = match &out.format {
        Format::Raw => match value {
            SecretValue::Raw(raw) => raw.expose().to_vec(),
            SecretValue::Fields(fields) => {
                return Err(Error::RawNeedsOneValue {
                    fields: fields.keys().cloned().collect(),
                });
            }
        },
        Format::Json => {
            let json = Zeroizing::new(json_value(value)?.to_string());
            json.as_bytes().to_vec()
        }
        Format::Env => {
            let mut env = Zeroizing::new(String::new());
            match value {
                SecretValue::Raw(raw) => {
                    let _ = writeln!(env, "{}={}", out.env_name, env_quote(text(raw.expose())?));
                }
                SecretValue::Fields(fields) => {
                    for (name, val) in fields {
                        let key: String = name
                            .chars()
                            .map(|c| {
                                if c.is_ascii_alphanumeric() {
                                    c.to_ascii_uppercase()
                                } else {
                                    '_'
                                }
                            })
                            .collect();
                        let _ = writeln!(env, "{key}={}", env_quote(val.expose()));
                    }
                }
            }
            env.as_bytes().to_vec()
        }
        Format::Template(template) => {
            let have = fields(value)?;
            let mut missing = Vec::new();
            for name in template_fields(template)? {
                if !have.contains_key(name.as_str()) {
                    missing.push(name);
                }
            }
            if !missing.is_empty() {
                return Err(Error::MissingFields {
                    missing,
                    has: have.keys().map(|k| (*k).to_string()).collect(),
                });
            }
            let mut doc = Zeroizing::new(String::with_capacity(template.len() + 64));
            let mut rest = template.as_str();
            while let Some(open) = rest.find("{{") {
                doc.push_str(&rest[..open]);
                let after = &rest[open + 2..];
                let close = after.find("}}").unwrap_or(after.len());
                doc.push_str(have.get(after[..close].trim()).copied().unwrap_or_default());
                rest = after.get(close + 2..).unwrap_or_default();
            }
            doc.push_str(rest);
            doc.as_bytes().to_vec()
        }
    };
    Ok(SecretBytes::new(bytes))
}

/// A keyring file: `{"current": {"version": N, "value": ...}, "previous":
/// {...} | null}`. Apps that must still decrypt old data read both keys.
///
/// # Errors
/// [`Error::NotText`] for a raw value that is not UTF-8.
pub fn render_keyring(
    current: (u64, &SecretValue),
    previous: Option<(u64, &SecretValue)>,
) -> Result<SecretBytes, Error> {
    let entry = |(n, v): (u64, &SecretValue)| -> Result<Value, Error> {
        let value = match v {
            SecretValue::Raw(b) => Value::String(text(b.expose())?.to_string()),
            fields @ SecretValue::Fields(_) => json_value(fields)?,
        };
        Ok(serde_json::json!({"version": n, "value": value}))
    };
    let doc = serde_json::json!({
        "current": entry(current)?,
        "previous": match previous { Some(p) => entry(p)?, None => Value::Null },
    });
    let s = Zeroizing::new(doc.to_string());
    Ok(SecretBytes::new(s.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Validate;
    use rekey_keyring::SecretString;

    fn out(format: Format) -> Output {
        Output {
            path: "/x".into(),
            directory: None,
            format,
            env_name: "JWT_SECRET".into(),
            mode: 0o400,
            owner: None,
            keyring_path: None,
            validate: Validate::None,
            validate_timeout: std::time::Duration::from_secs(1),
            reload: vec![],
            dirs: crate::write::Dirs::NoSymlinks,
        }
    }

    fn db() -> SecretValue {
        SecretValue::Fields(
            [
                ("username".to_string(), SecretString::new("app_a".into())),
                ("password".to_string(), SecretString::new("p\"w$".into())),
                ("host".to_string(), SecretString::new("db".into())),
            ]
            .into(),
        )
    }

    #[allow(
        clippy::needless_pass_by_value,
        reason = "takes what render returns, to keep the assertions short"
    )]
    fn s(b: SecretBytes) -> String {
        String::from_utf8(b.expose().to_vec()).unwrap()
    }

    #[test]
    fn formats() {
        let raw = SecretValue::Raw(SecretBytes::new(b"tok".to_vec()));
        assert_eq!(s(render(&out(Format::Raw), &raw).unwrap()), "tok");
        assert_eq!(
            s(render(&out(Format::Json), &raw).unwrap()),
            r#"{"value":"tok"}"#
        );
        assert_eq!(
            s(render(&out(Format::Env), &raw).unwrap()),
            "JWT_SECRET=\"tok\"\n"
        );
        let j: Value =
            serde_json::from_slice(render(&out(Format::Json), &db()).unwrap().expose()).unwrap();
        assert_eq!(j["password"], "p\"w$");
        assert_eq!(
            s(render(&out(Format::Env), &db()).unwrap()),
            "HOST=\"db\"\nPASSWORD=\"p\\\"w\\$\"\nUSERNAME=\"app_a\"\n"
        );
        let t = out(Format::Template(
            "postgres://{{username}}:{{ password }}@{{host}}/app".into(),
        ));
        assert_eq!(
            s(render(&t, &db()).unwrap()),
            "postgres://app_a:p\"w$@db/app"
        );
    }

    #[test]
    fn errors_name_fields_not_values() {
        let e = render(&out(Format::Raw), &db()).unwrap_err().to_string();
        assert!(e.contains("username") && !e.contains("app_a"), "{e}");
        let t = out(Format::Template("{{user}}@{{host}}".into()));
        let e = render(&t, &db()).unwrap_err().to_string();
        assert!(
            e.starts_with("the template names field(s) the value lacks: user (it has: "),
            "{e}"
        );
        assert!(!e.contains("p\"w"), "{e}");
    }

    #[test]
    fn keyring_holds_current_and_previous() {
        let a = SecretValue::Raw(SecretBytes::new(b"new".to_vec()));
        let b = SecretValue::Raw(SecretBytes::new(b"old".to_vec()));
        let k: Value =
            serde_json::from_slice(render_keyring((3, &a), Some((2, &b))).unwrap().expose())
                .unwrap();
        assert_eq!(k["current"]["version"], 3);
        assert_eq!(k["previous"]["value"], "old");
        let k: Value =
            serde_json::from_slice(render_keyring((3, &a), None).unwrap().expose()).unwrap();
        assert!(k["previous"].is_null());
    }
}
