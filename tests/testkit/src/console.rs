//! Terminal sessions written in Markdown (`console` blocks), run for real.
//!
//! A block holds `$ command` lines, each followed by the output it shows.
//! [`sessions`] reads them; [`Console`] runs each command with `sh -c` in
//! one directory and compares what it prints with what the document shows
//! ([`same`]): RFC 3339 times stand for any time, `…` for any text, and
//! everything else must match line for line. A command whose trailing
//! comment (` # ...`) says `refused` must fail, and the lines under it are
//! its error (stderr); every other one must succeed, and the lines under it
//! are its stdout. A command line that ends with `\` goes on on the next
//! line.
//!
//! Documents that operators run in their own environment declare what is
//! environment-specific once, as `$ export NAME=VALUE` lines. The runner
//! keeps every export and replays it before each later command (each runs
//! in a fresh shell). A test that cannot use the document's value (an
//! address, a file, a role name) sets its own with [`Console::set`]; the
//! document's value is then a placeholder: the test's value is exported
//! instead, and written back as the document's value in what commands
//! print before it is compared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::process::{stderr, stdout};

/// One `$ command` of a session and the output shown under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub command: String,
    /// Its comment says `refused`: it must fail.
    pub refused: bool,
    /// The lines shown under it (none: its output is not checked).
    pub expected: Vec<String>,
}

/// The `console` blocks of a Markdown text, in order, as steps.
#[must_use]
pub fn sessions(markdown: &str) -> Vec<Vec<Step>> {
    let mut out = Vec::new();
    let mut block: Option<Vec<Step>> = None;
    // The step whose command line ended with `\`.
    let mut continued = false;
    for line in markdown.lines() {
        match &mut block {
            None if line.trim_start().starts_with("```console") => block = Some(Vec::new()),
            None => {}
            Some(steps) if line.trim_start().starts_with("```") => {
                out.push(std::mem::take(steps));
                block = None;
                continued = false;
            }
            Some(steps) => {
                let cmd = if continued {
                    Some(line)
                } else {
                    line.strip_prefix("$ ")
                };
                if let Some(cmd) = cmd {
                    let (command, comment) = cmd.split_once(" # ").unwrap_or((cmd, ""));
                    let command = command.trim();
                    let refused = comment.contains("refused");
                    match steps.last_mut().filter(|_| continued) {
                        Some(step) => {
                            step.command.push('\n');
                            step.command.push_str(command);
                            step.refused |= refused;
                        }
                        None => steps.push(Step {
                            command: command.to_string(),
                            refused,
                            expected: Vec::new(),
                        }),
                    }
                    continued = command.ends_with('\\');
                } else if let Some(step) = steps.last_mut() {
                    step.expected.push(line.to_string());
                }
            }
        }
    }
    out
}

/// Replaces every RFC 3339 time (`2026-11-26T12:28:15.123Z`) with a
/// marker.
fn mark_times(s: &str) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        let t: String = c[i..(i + 24).min(c.len())].iter().collect();
        let is_time = t.len() == 24
            && t.as_bytes()[4] == b'-'
            && t.as_bytes()[10] == b'T'
            && t.ends_with('Z');
        if is_time {
            out.push(TIME);
            i += 24;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

const TIME: char = '\u{1}';
const ANY: char = '…';

/// Whether `got` is what a document shows: times stand for any time, and
/// `…` for any text.
#[must_use]
pub fn same(shown: &str, got: &str) -> bool {
    fn go(g: &[char], t: &[char]) -> bool {
        match g.first() {
            None => t.is_empty(),
            Some(&ANY) => (0..=t.len()).any(|i| go(&g[1..], &t[i..])),
            Some(c) => t.first() == Some(c) && go(&g[1..], &t[1..]),
        }
    }
    let g: Vec<char> = mark_times(shown.trim_end()).chars().collect();
    let t: Vec<char> = mark_times(got.trim_end()).chars().collect();
    go(&g, &t)
}

/// Whether printed lines are what a document shows, line by line
/// ([`same`]); a shown line that is only `…` stands for any number of
/// lines, none included.
#[must_use]
pub fn same_lines(shown: &[String], got: &[&str]) -> bool {
    match shown.split_first() {
        None => got.is_empty(),
        Some((s, rest)) if s.trim() == ANY.to_string() => {
            (0..=got.len()).any(|i| same_lines(rest, &got[i..]))
        }
        Some((s, rest)) => got
            .split_first()
            .is_some_and(|(g, more)| same(s, g) && same_lines(rest, more)),
    }
}

/// The first shown line that the printed ones do not match, for messages.
fn first_difference(shown: &[String], got: &[&str]) -> String {
    let n = shown
        .iter()
        .zip(got)
        .take_while(|(s, g)| s.trim() == ANY.to_string() || same(s, g))
        .count();
    match (shown.get(n), got.get(n)) {
        (Some(s), Some(g)) => format!("line {}: shown {s:?}, printed {g:?}", n + 1),
        (Some(s), None) => format!("line {}: shown {s:?}, nothing printed", n + 1),
        (None, Some(g)) => format!("line {}: printed {g:?}, nothing shown", n + 1),
        (None, None) => "around an elided `…` line".to_string(),
    }
}

/// `export NAME=VALUE` (one assignment): the name and the value as
/// written, without its quotes.
fn parse_export(command: &str) -> Option<(&str, &str)> {
    let (name, value) = command.strip_prefix("export ")?.trim().split_once('=')?;
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let unquoted = ['\'', '"']
        .iter()
        .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
        .unwrap_or(value);
    ok.then_some((name, unquoted))
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs sessions' steps one after another in one directory and asserts
/// that each prints what the document shows.
pub struct Console {
    /// What the document is called in failure messages (`README`).
    doc: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    env_remove: Vec<String>,
    /// Variables the test sets instead of the document.
    overrides: BTreeMap<String, String>,
    /// The document's exports so far, as shell lines replayed before each
    /// command.
    exports: Vec<String>,
    /// (the test's value, the document's value) of each overridden
    /// export, longest test value first.
    placeholders: Vec<(String, String)>,
}

impl Console {
    /// Commands will run in `dir`; `doc` names the document in messages.
    #[must_use]
    pub fn new(doc: &str, dir: &Path) -> Self {
        Console {
            doc: doc.to_string(),
            dir: dir.to_path_buf(),
            env: Vec::new(),
            env_remove: Vec::new(),
            overrides: BTreeMap::new(),
            exports: Vec::new(),
            placeholders: Vec::new(),
        }
    }

    /// Sets an environment variable for every command.
    #[must_use]
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Removes an environment variable for every command.
    #[must_use]
    pub fn env_remove(mut self, name: &str) -> Self {
        self.env_remove.push(name.to_string());
        self
    }

    /// Gives a variable that the document exports this machine's value
    /// instead of the document's (see the module's documentation).
    #[must_use]
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.overrides.insert(name.to_string(), value.to_string());
        self
    }

    /// Runs every step of a session in order.
    ///
    /// # Panics
    ///
    /// When a step fails (or succeeds when it must be refused), or prints
    /// other than what the document shows.
    pub fn run_session(&mut self, steps: &[Step]) {
        for step in steps {
            self.run(step);
        }
    }

    /// Runs one step.
    ///
    /// # Panics
    ///
    /// As [`Console::run_session`].
    pub fn run(&mut self, step: &Step) {
        let command = match parse_export(&step.command) {
            Some((name, shown)) => {
                let line = match self.overrides.get(name) {
                    Some(value) => {
                        if value != shown {
                            self.placeholders.push((value.clone(), shown.to_string()));
                            self.placeholders
                                .sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
                        }
                        format!("export {name}={}", sh_quote(value))
                    }
                    None => step.command.clone(),
                };
                self.exports.push(line);
                String::new()
            }
            None => step.command.clone(),
        };
        let out = self.shell(&command);
        assert_eq!(
            out.status.success(),
            !step.refused,
            "`{}`: {}{}",
            step.command,
            stderr(&out),
            stdout(&out)
        );
        if step.expected.is_empty() {
            return;
        }
        // What a refused command shows is its error, on stderr.
        let printed = if step.refused {
            stderr(&out)
        } else {
            stdout(&out)
        };
        let got = self.as_shown(&printed);
        let got: Vec<&str> = got.lines().collect();
        assert!(
            same_lines(&step.expected, &got),
            "`{}` printed:\n{}\n\n{} shows:\n{}\n\nfirst difference: {}",
            step.command,
            got.join("\n"),
            self.doc,
            step.expected.join("\n"),
            first_difference(&step.expected, &got)
        );
    }

    /// Asserts that the document exported every variable the test set, so
    /// that a renamed variable in the document cannot leave the test's
    /// value unused.
    ///
    /// # Panics
    ///
    /// When one was never exported.
    pub fn finish(&self) {
        for name in self.overrides.keys() {
            let prefix = format!("export {name}=");
            assert!(
                self.exports.iter().any(|e| e.starts_with(&prefix)),
                "{} never exports {name}, which the test sets",
                self.doc
            );
        }
    }

    /// The test's values written back as the document's.
    fn as_shown(&self, printed: &str) -> String {
        self.placeholders
            .iter()
            .fold(printed.to_string(), |s, (value, shown)| {
                s.replace(value.as_str(), shown)
            })
    }

    fn shell(&self, command: &str) -> Output {
        let mut script = self.exports.join("\n");
        script.push('\n');
        script.push_str(command);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        for k in &self.env_remove {
            cmd.env_remove(k);
        }
        cmd.output().expect("run sh")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matcher_ignores_times_and_elisions_only() {
        assert!(same(
            "created a at v1 (2026-11-26T12:28:15.123Z)",
            "created a at v1 (2027-01-02T03:04:05.678Z)"
        ));
        assert!(same("head 7:5f0c…e91a", "head 7:5f0c0000e91a"));
        assert!(!same("head 7:5f0c…e91a", "head 8:5f0c0000e91a"));
        assert!(!same("7 events verified", "5 events verified"));
    }

    #[test]
    fn a_line_of_only_an_ellipsis_stands_for_any_lines() {
        let shown: Vec<String> = ["a", "…", "z"].map(String::from).to_vec();
        assert!(same_lines(&shown, &["a", "z"]));
        assert!(same_lines(&shown, &["a", "b", "c", "z"]));
        assert!(!same_lines(&shown, &["a", "b"]));
        let one: Vec<String> = vec!["…".into()];
        assert!(same_lines(&one, &["x"]));
    }

    #[test]
    fn sessions_read_commands_comments_continuations_and_output() {
        let md = "text\n```console\n$ a --x \\\n    --y   # refused: why\nout 1\nout 2\n$ b # note\n```\n```sh\n$ c\n```\n";
        let s = sessions(md);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0][0].command, "a --x \\\n--y");
        assert!(s[0][0].refused);
        assert_eq!(s[0][0].expected, ["out 1", "out 2"]);
        assert_eq!(s[0][1].command, "b");
        assert!(!s[0][1].refused);
        assert!(s[0][1].expected.is_empty());
    }

    #[test]
    fn exports_are_parsed_with_or_without_quotes() {
        assert_eq!(parse_export("export A=b"), Some(("A", "b")));
        assert_eq!(parse_export("export A=\"b c\""), Some(("A", "b c")));
        assert_eq!(parse_export("export A='$b'"), Some(("A", "$b")));
        assert_eq!(parse_export("exporter A=b"), None);
        assert_eq!(parse_export("export A-B=c"), None);
    }
}
