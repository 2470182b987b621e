//! The plugin's log: one JSON object a line on stderr, in the shape
//! go-plugin's host reads (`@level`, `@message`, `@timestamp`) and logs
//! as its own under the plugin's name. Messages name paths and ids, never
//! a value or the backend token.

use std::io::Write as _;

fn line(level: &str, message: &str) {
    // go-plugin's host reads `@timestamp` with six fractional digits; a
    // line it cannot parse is logged as raw text at debug level.
    let ts = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
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

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_have_the_six_digits_the_host_parses() {
        let ts = chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let frac = ts.rsplit('.').next().unwrap();
        assert_eq!(frac.len(), 7, "{ts}");
    }
}
