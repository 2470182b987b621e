//! `exec`: operator hooks for credentials held elsewhere (an agent API key
//! at its provider, a service token in another system).
//!
//! Each step runs an executable the operator names. Input is one JSON
//! object on stdin (`step`, `secret_id`, and `new` / `old` / `current`
//! values), never argv or the environment; the hook prints JSON on stdout
//! (for `create`, the value: a string or an object of strings) and exits 0.
//! A hook that exits non-zero, prints invalid JSON or outlives its timeout
//! fails the step. Its stderr is not logged: it may hold a value.

use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use super::{Kind, KindOptions, Nodes, SecretCtx, step};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecOptions {
    pub(crate) create: String,
    pub(crate) set: String,
    pub(crate) test: String,
    pub(crate) revoke: String,
    /// Per hook run; 0 on the wire means the default, 30 s.
    pub(crate) timeout_ms: u64,
}

const MAX_OUTPUT: usize = 1 << 20;

fn to_json(v: &SecretValue) -> serde_json::Value {
    match v {
        SecretValue::Raw(b) => {
            serde_json::Value::String(String::from_utf8_lossy(b.expose()).to_string())
        }
        SecretValue::Fields(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
                .collect(),
        ),
    }
}

fn from_json(v: serde_json::Value) -> Option<SecretValue> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => {
            Some(SecretValue::Raw(SecretBytes::new(s.into_bytes())))
        }
        serde_json::Value::Object(m) if !m.is_empty() => {
            let mut out = std::collections::BTreeMap::new();
            for (k, v) in m {
                out.insert(k, SecretString::new(v.as_str()?.to_string()));
            }
            Some(SecretValue::Fields(out))
        }
        _ => None,
    }
}

/// Runs one hook with `input` on stdin; its stdout parsed as JSON.
async fn run_hook(
    secret: &str,
    step_name: &'static str,
    path: &str,
    timeout: Duration,
    input: serde_json::Value,
) -> Result<serde_json::Value> {
    let body = Zeroizing::new(input.to_string());
    let fut = async {
        let mut child = tokio::process::Command::new(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| step(secret, step_name, format!("cannot run hook {path}: {e}")))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| step(secret, step_name, "no stdin"))?;
        // A hook may exit without reading its input; that is its business.
        let _ = stdin.write_all(body.as_bytes()).await;
        drop(stdin);
        let mut out = Zeroizing::new(Vec::new());
        if let Some(mut so) = child.stdout.take() {
            let _ = (&mut so)
                .take(MAX_OUTPUT as u64)
                .read_to_end(&mut out)
                .await;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| step(secret, step_name, format!("hook {path}: {e}")))?;
        if !status.success() {
            return Err(step(
                secret,
                step_name,
                format!("hook {path} exited with {status}"),
            ));
        }
        serde_json::from_slice(&out).map_err(|_| {
            step(
                secret,
                step_name,
                format!("hook {path} did not print valid JSON"),
            )
        })
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        step(
            secret,
            step_name,
            format!("hook {path} did not finish within {timeout:?}"),
        )
    })?
}

pub(crate) struct Exec;

#[async_trait]
impl Kind for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn check_options(&self, raw: &KindOptions) -> Result<KindOptions> {
        let e = raw.exec.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let mut hook = |name: &str, path: &str| {
            let p = path.trim().to_string();
            if p.is_empty() {
                problems.push(format!("--hook-{name} is required"));
            } else {
                use std::os::unix::fs::PermissionsExt;
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                    Ok(_) => problems.push(format!("--hook-{name} {p} is not an executable file")),
                    Err(err) => problems.push(format!("--hook-{name} {p}: {err}")),
                }
            }
            p
        };
        let o = ExecOptions {
            create: hook("create", &e.create),
            set: hook("set", &e.set),
            test: hook("test", &e.test),
            revoke: hook("revoke", &e.revoke),
            timeout_ms: if e.timeout_ms == 0 {
                30_000
            } else {
                e.timeout_ms
            },
        };
        if !problems.is_empty() {
            return Err(Error::InvalidArgument(problems.join("; ")));
        }
        Ok(o.into())
    }

    async fn create(
        &self,
        ctx: &SecretCtx<'_>,
        current: Option<&SecretValue>,
        _: Option<SecretValue>,
    ) -> Result<SecretValue> {
        let o = ctx.options.exec(ctx.id)?;
        let out = run_hook(
            ctx.id,
            "create",
            &o.create,
            Duration::from_millis(o.timeout_ms),
            serde_json::json!({"step": "create", "secret_id": ctx.id, "current": current.map(to_json)}),
        )
        .await?;
        from_json(out).ok_or_else(|| {
            step(
                ctx.id,
                "create",
                format!(
                    "hook {} must print a string or an object of strings",
                    o.create
                ),
            )
        })
    }

    async fn set(
        &self,
        ctx: &SecretCtx<'_>,
        new: &SecretValue,
        old: Option<&SecretValue>,
    ) -> Result<Nodes> {
        let o = ctx.options.exec(ctx.id)?;
        run_hook(
            ctx.id,
            "set",
            &o.set,
            Duration::from_millis(o.timeout_ms),
            serde_json::json!({"step": "set", "secret_id": ctx.id, "new": to_json(new), "old": old.map(to_json)}),
        )
        .await
        .map(|_| None)
    }

    async fn test(&self, ctx: &SecretCtx<'_>, new: &SecretValue) -> Result<()> {
        let o = ctx.options.exec(ctx.id)?;
        run_hook(
            ctx.id,
            "test",
            &o.test,
            Duration::from_millis(o.timeout_ms),
            serde_json::json!({"step": "test", "secret_id": ctx.id, "new": to_json(new)}),
        )
        .await
        .map(drop)
    }

    async fn revoke(
        &self,
        ctx: &SecretCtx<'_>,
        old: &SecretValue,
        _current: Option<&SecretValue>,
    ) -> Result<Nodes> {
        let o = ctx.options.exec(ctx.id)?;
        run_hook(
            ctx.id,
            "revoke",
            &o.revoke,
            Duration::from_millis(o.timeout_ms),
            serde_json::json!({"step": "revoke", "secret_id": ctx.id, "old": to_json(old)}),
        )
        .await
        .map(|_| None)
    }

    async fn restore(&self, ctx: &SecretCtx<'_>, previous: &SecretValue) -> Result<Nodes> {
        // The set hook makes a value valid again; `step` tells it why.
        let o = ctx.options.exec(ctx.id)?;
        run_hook(
            ctx.id,
            "restore",
            &o.set,
            Duration::from_millis(o.timeout_ms),
            serde_json::json!({"step": "restore", "secret_id": ctx.id, "new": to_json(previous)}),
        )
        .await
        .map(|_| None)
    }

    fn one_rotation_at_a_time(&self) -> bool {
        true
    }
}
