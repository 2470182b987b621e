//! A request's parameters: the JSON object the host passes, whose values
//! are strings when they come from `bao write KEY=VALUE` and JSON types
//! when they come from the HTTP API. Both are accepted.

use serde_json::{Map, Value};
use zeroize::Zeroize as _;

use crate::error::PluginError;

pub struct Params(Map<String, Value>);

impl Params {
    /// Parses the request's data (empty: no parameters) and wipes the text.
    pub fn parse(mut data: String) -> Result<Params, PluginError> {
        let parsed = if data.trim().is_empty() || data.trim() == "null" {
            Ok(Map::new())
        } else {
            serde_json::from_str::<Map<String, Value>>(&data)
        };
        data.zeroize();
        parsed
            .map(Params)
            .map_err(|_| PluginError::bad_request("the request's data is not a JSON object"))
    }

    #[cfg(test)]
    pub fn from_json(v: Value) -> Params {
        match v {
            Value::Object(m) => Params(m),
            _ => Params(Map::new()),
        }
    }

    /// Refuses parameters the path does not take, naming them and the
    /// ones it does.
    pub fn only(&self, path: &str, allowed: &[&str]) -> Result<(), PluginError> {
        let mut unknown: Vec<&str> = self
            .0
            .keys()
            .map(String::as_str)
            .filter(|k| !allowed.contains(k))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        let takes = if allowed.is_empty() {
            "no parameters".to_string()
        } else {
            allowed.join(", ")
        };
        Err(PluginError::bad_request(format!(
            "unknown parameter {} for {path}; it takes {takes}",
            unknown
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, PluginError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(PluginError::bad_request(format!("{key} must be a string"))),
        }
    }

    /// A non-empty string.
    pub fn text(&self, key: &str) -> Result<Option<String>, PluginError> {
        Ok(self.string(key)?.filter(|s| !s.is_empty()))
    }

    /// A list: a JSON array of strings, or one comma-separated string
    /// (the CLI's `key=a,b`), empty items dropped.
    pub fn list(&self, key: &str) -> Result<Vec<String>, PluginError> {
        let bad = || PluginError::bad_request(format!("{key} must be a list of strings"));
        let items: Vec<String> = match self.0.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.split(',').map(str::to_string).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad()),
        };
        Ok(items
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, PluginError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(Some(true)),
                "false" | "0" | "no" | "" => Ok(Some(false)),
                _ => Err(PluginError::bad_request(format!(
                    "{key} must be true or false, not {s:?}"
                ))),
            },
            Some(_) => Err(PluginError::bad_request(format!(
                "{key} must be true or false"
            ))),
        }
    }

    pub fn unsigned(&self, key: &str) -> Result<Option<u64>, PluginError> {
        let bad = || PluginError::bad_request(format!("{key} must be a whole number"));
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    }

    /// A duration as milliseconds: "45m", "1h30m", "30d", or a number of
    /// seconds (the host's convention for durations).
    pub fn duration_ms(&self, key: &str) -> Result<Option<i64>, PluginError> {
        let bad = |s: &str| {
            PluginError::bad_request(format!(
                "{key} must be a duration such as 45m, 12h or 30d, not {s:?}"
            ))
        };
        let secs = |n: u64| i64::try_from(n.saturating_mul(1000)).map_err(|_| bad(&n.to_string()));
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map_or_else(|| Err(bad(&n.to_string())), secs)
                .map(Some),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => {
                if let Ok(n) = s.trim().parse::<u64>() {
                    return secs(n).map(Some);
                }
                let d = humantime::parse_duration(s.trim()).map_err(|_| bad(s))?;
                i64::try_from(d.as_millis()).map(Some).map_err(|_| bad(s))
            }
            Some(other) => Err(bad(&other.to_string())),
        }
    }

    /// Takes a parameter out (a value to import), so that it is not kept
    /// anywhere else.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }
}

impl Drop for Params {
    fn drop(&mut self) {
        for (_, v) in &mut self.0 {
            if let Value::String(s) = v {
                s.zeroize();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_from_the_cli_and_json_types_both_work() {
        let p = Params::from_json(json!({
            "window": "45m", "n": "3", "m": 4, "force": "true", "f2": false,
            "secs": 90, "s": "x"
        }));
        assert_eq!(p.duration_ms("window").unwrap(), Some(45 * 60 * 1000));
        assert_eq!(p.duration_ms("secs").unwrap(), Some(90_000));
        assert_eq!(p.unsigned("n").unwrap(), Some(3));
        assert_eq!(p.unsigned("m").unwrap(), Some(4));
        assert_eq!(p.boolean("force").unwrap(), Some(true));
        assert_eq!(p.boolean("f2").unwrap(), Some(false));
        assert_eq!(p.string("s").unwrap().as_deref(), Some("x"));
        assert_eq!(p.string("absent").unwrap(), None);
        assert!(p.duration_ms("s").is_err());
        assert!(p.boolean("s").is_err());
    }

    #[test]
    fn unknown_parameters_are_named() {
        let p = Params::from_json(json!({"windw": "1h", "kind": "random"}));
        let e = p.only("rekey/secrets/x", &["kind", "window"]).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("\"windw\"") && e.message.contains("kind, window"),
            "{e}"
        );
        assert!(Params::parse(String::new()).unwrap().only("p", &[]).is_ok());
        assert!(Params::parse("null".into()).unwrap().only("p", &[]).is_ok());
        assert!(Params::parse("[1]".into()).is_err());
    }
}
