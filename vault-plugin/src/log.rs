//! The plugin's log: one JSON object a line on stderr, in the shape
//! go-plugin's host reads (`@level`, `@message`, `@timestamp`) and logs
//! as its own under the plugin's name. Messages name paths and ids, never
//! a value or the backend token.

use std::io::Write as _;

fn line(level: &str, message: &str) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let ts = i64::try_from(ts).map_or_else(|_| "-".into(), rekey_proto::format_time);
    let v = serde_json::json!({
        "@level": level,
        "@message": message,
        "@module": "rekey",
        "@timestamp": ts,
    });
    let _ = writeln!(std::io::stderr().lock(), "{v}");
}

pub fn info(message: &str) {
    line("info", message);
}

pub fn warn(message: &str) {
    line("warn", message);
}

pub fn error(message: &str) {
    line("error", message);
}
