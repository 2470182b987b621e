//! `rekey create`: a new secret with version 1 as current.

use std::path::Path;

use rekey_proto::v1 as pb;
use serde_json::json;

use super::{Ctx, duration_ms, read_value};
use crate::args::CreateArgs;
use crate::error::CliError;
use crate::output::{print_json, provider_json, provider_label, version_json, version_label};

pub async fn create(cx: &Ctx, args: &CreateArgs) -> Result<(), CliError> {
    let req = request(args)?;
    let resp = cx.connect().await?.create_secret(req).await?.into_inner();
    let secret = resp.secret.unwrap_or_default();
    let version = resp.version.unwrap_or_default();
    if cx.json {
        let mut o = version_json(&secret.id, &version);
        o["kind"] = json!(secret.kind);
        let [provider, path] = provider_json(&secret);
        o["provider"] = provider;
        o["provider_path"] = path;
        print_json(&o);
    } else {
        println!("{}", created_line(&secret, &version));
    }
    Ok(())
}

/// `created ID (KIND) at v1 (TIME)`, and where a provider keeps the
/// values (the embedded store is not named: the line stays as it was).
fn created_line(secret: &pb::Secret, version: &pb::Version) -> String {
    let place = if secret.provider.is_empty() {
        String::new()
    } else {
        format!(" in {}", provider_label(secret))
    };
    format!(
        "created {} ({}) at {}{place}",
        secret.id,
        secret.kind,
        version_label(version)
    )
}

fn path_str(p: Option<&Path>) -> String {
    p.map(|p| p.display().to_string()).unwrap_or_default()
}

/// The request, built from the flags alone: every error is a usage error.
fn request(a: &CreateArgs) -> Result<pb::CreateSecretRequest, CliError> {
    let next_override = match &a.next_rotation_at {
        None => 0,
        Some(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|_| {
                CliError::usage(format!("--next-rotation-at {s:?} is not an RFC 3339 time"))
            })?
            .timestamp_millis(),
    };
    if a.length == Some(0) {
        return Err(CliError::usage("--length must be at least 1"));
    }
    Ok(pb::CreateSecretRequest {
        id: a.secret.clone(),
        kind: a.kind.clone(),
        random: (a.length.is_some() || a.encoding.is_some()).then(|| pb::RandomOptions {
            length: a.length.unwrap_or(0),
            encoding: a.encoding.clone().unwrap_or_default(),
        }),
        schedule: Some(pb::Schedule {
            spec: a.schedule.clone().unwrap_or_default(),
            rotation_window_ms: duration_ms("--rotation-window", a.rotation_window.as_deref())?,
            jitter_ms: duration_ms("--jitter", a.jitter.as_deref())?,
            min_interval_ms: duration_ms("--min-interval", a.min_interval.as_deref())?,
            next_rotation_at_ms: next_override,
        }),
        validation_window_ms: Some(duration_ms("--window", Some(&a.window))?),
        value: a.value_file.as_deref().map(read_value).transpose()?,
        provider: a.provider.clone().unwrap_or_default(),
        provider_path: a.provider_path.clone().unwrap_or_default(),
        postgres: (a.kind == "postgres").then(|| pb::PostgresOptions {
            admin_url_file: path_str(a.admin_url_file.as_deref()),
            group_role: a.group_role.clone().unwrap_or_default(),
            role_base: a.role_base.clone().unwrap_or_default(),
            database: a.database.clone().unwrap_or_default(),
            host: a.host.clone().unwrap_or_default(),
            port: a.port.map_or(0, u32::from),
            probe: a.probe.clone().unwrap_or_default(),
            terminate_sessions: a.terminate_sessions,
            sslmode: a.sslmode.clone().unwrap_or_default(),
            sslrootcert: a.sslrootcert.clone().unwrap_or_default(),
        }),
        redis: (a.kind == "redis").then(|| pb::RedisOptions {
            admin_url_file: path_str(a.admin_url_file.as_deref()),
            username: a.username.clone().unwrap_or_default(),
            address: a.address.clone().unwrap_or_default(),
            topology: a.topology.clone().unwrap_or_default(),
            nodes: a.nodes.clone(),
            sentinels: a.sentinels.clone(),
            master_name: a.master_name.clone().unwrap_or_default(),
            tls_ca_file: path_str(a.tls_ca_file.as_deref()),
            tls_cert_file: path_str(a.tls_cert_file.as_deref()),
            tls_key_file: path_str(a.tls_key_file.as_deref()),
            tls_server_name: a.tls_server_name.clone().unwrap_or_default(),
        }),
        exec: if a.kind == "exec" {
            Some(pb::ExecOptions {
                create: path_str(a.hook_create.as_deref()),
                set: path_str(a.hook_set.as_deref()),
                test: path_str(a.hook_test.as_deref()),
                revoke: path_str(a.hook_revoke.as_deref()),
                timeout_ms: duration_ms("--hook-timeout", a.hook_timeout.as_deref())?
                    .unsigned_abs(),
            })
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};

    fn req(args: &[&str]) -> pb::CreateSecretRequest {
        let all = [&["rekey", "create", "prod/db", "--kind", "static"], args].concat();
        let m = Cli::command_line().try_get_matches_from(all).unwrap();
        match <Cli as clap::FromArgMatches>::from_arg_matches(&m)
            .unwrap()
            .command
        {
            Command::Create(a) => request(&a).unwrap(),
            c => panic!("parsed as {c:?}"),
        }
    }

    #[test]
    fn the_provider_flags_reach_the_request() {
        let r = req(&[]);
        assert_eq!((r.provider.as_str(), r.provider_path.as_str()), ("", ""));
        let r = req(&["--provider", "vault-main"]);
        assert_eq!(
            (r.provider.as_str(), r.provider_path.as_str()),
            ("vault-main", "")
        );
        let r = req(&["--provider", "vault-main", "--provider-path", "kv/db"]);
        assert_eq!(
            (r.provider.as_str(), r.provider_path.as_str()),
            ("vault-main", "kv/db")
        );
    }

    #[test]
    fn the_created_line_names_a_provider_only() {
        let mut s = pb::Secret {
            id: "prod/db".into(),
            kind: "static".into(),
            ..Default::default()
        };
        let v = pb::Version {
            version: 1,
            created_at_ms: 1_795_000_000_123,
            ..Default::default()
        };
        assert_eq!(
            created_line(&s, &v),
            "created prod/db (static) at v1 (2026-11-18T11:06:40.123Z)"
        );
        s.provider = "vault-main".into();
        s.provider_path = "secret/rekey/prod/db".into();
        assert_eq!(
            created_line(&s, &v),
            "created prod/db (static) at v1 (2026-11-18T11:06:40.123Z) in vault-main (secret/rekey/prod/db)"
        );
    }
}
