//! How results are printed: aligned tables for people, and the JSON shapes
//! scripts rely on (`-o json`).

use rekey_proto::format_time;
pub use rekey_proto::json::{
    provider_json, secret_json, stage_names, state_name, status_json, version_json,
};
use rekey_proto::v1 as pb;
use serde_json::Value;

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

/// `v7 (2026-11-26T12:28:15.123Z)`.
pub fn version_label(v: &pb::Version) -> String {
    format!("v{} ({})", v.version, format_time(v.created_at_ms))
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
    fn stored_text_cannot_drive_the_terminal_and_cells_are_cut() {
        assert_eq!(safe("ok"), "ok");
        assert_eq!(safe("a\u{1b}[2K\rb"), "a\\u{1b}[2K\\rb");
        assert_eq!(safe("two\nlines"), "two\\nlines");
        let long = cell(&"x".repeat(5000));
        assert_eq!(long.chars().count(), MAX_CELL);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn a_version_label_names_it_and_its_time() {
        let v = pb::Version {
            version: 7,
            created_at_ms: 1_795_000_000_123,
            ..Default::default()
        };
        assert_eq!(version_label(&v), "v7 (2026-11-18T11:06:40.123Z)");
    }
}
