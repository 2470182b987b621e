//! Conversions between the `rekey.v1` wire messages and the engine's types:
//! rows out, values and kind options in. The only place that knows both.

use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use rekey_proto::v1 as pb;

use crate::audit;
use crate::engine::SecretStatus;
use crate::error::{Error, Result};
use crate::kinds::exec::ExecOptions;
use crate::kinds::postgres::PgOptions;
use crate::kinds::redis::{RedisOptions, RedisTls};
use crate::kinds::{DEFAULT_RANDOM_LENGTH, Encoding, InlineUrl, KindOptions, RandomOptions};
use crate::store::{SecretRow, TokenRow, VersionRow, VersionState};

/// Protobuf counts are unsigned; rekey's are non-negative `i64` (the type
/// both SQLite and Postgres store).
fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A wire count back to the store's type; anything beyond `i64::MAX` is
/// no version or count rekey ever issued.
pub(crate) fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn secret(s: &SecretRow) -> pb::Secret {
    pb::Secret {
        id: s.id.clone(),
        kind: s.kind.clone(),
        random: s.options.random.as_ref().map(|r| pb::RandomOptions {
            length: r.length,
            encoding: r.encoding.as_str().into(),
        }),
        schedule: Some(pb::Schedule {
            spec: s.schedule_spec.clone(),
            rotation_window_ms: s.rotation_window_ms,
            jitter_ms: s.jitter_ms,
            min_interval_ms: s.min_interval_ms,
            next_rotation_at_ms: s.next_override_ms,
        }),
        validation_window_ms: s.validation_window_ms,
        created_at_ms: s.created_at_ms,
        current_version: unsigned(s.current_version),
        previous_version: unsigned(s.previous_version),
        pending_version: unsigned(s.pending_version),
        next_rotation_at_ms: s.next_rotation_at_ms,
        last_rotated_at_ms: s.last_rotated_at_ms,
        revision: unsigned(s.revision),
        provider: s.provider.clone(),
        provider_path: s.provider_path.clone(),
    }
}

/// The stages that point at version `v` of secret `s`.
fn stages(s: &SecretRow, v: i64) -> Vec<i32> {
    [
        (s.current_version, pb::Stage::Current),
        (s.previous_version, pb::Stage::Previous),
        (s.pending_version, pb::Stage::Pending),
    ]
    .into_iter()
    .filter(|(n, _)| *n == v)
    .map(|(_, st)| st as i32)
    .collect()
}

pub(crate) fn version(s: &SecretRow, v: &VersionRow, value: Option<&SecretValue>) -> pb::Version {
    pb::Version {
        version: unsigned(v.version),
        created_at_ms: v.created_at_ms,
        stages: stages(s, v.version),
        state: match v.state {
            VersionState::Active => pb::VersionState::Active,
            VersionState::Revoked => pb::VersionState::Revoked,
        } as i32,
        revoked_at_ms: v.revoked_at_ms,
        value: value.map(value_to_pb),
        nodes: v.nodes.clone(),
    }
}

pub(crate) fn value_to_pb(v: &SecretValue) -> pb::SecretValue {
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

pub(crate) fn value_from_pb(v: &pb::SecretValue) -> Result<SecretValue> {
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

/// A request's optional value.
pub(crate) fn opt_value(v: Option<&pb::SecretValue>) -> Result<Option<SecretValue>> {
    v.map(value_from_pb).transpose()
}

/// The kind options of a `CreateSecret` request, typed. Zero and empty
/// fields mean "the default" on the wire; the kind fills them in.
pub(crate) fn kind_options(r: &pb::CreateSecretRequest) -> Result<KindOptions> {
    let random = match &r.random {
        None => None,
        Some(o) => Some(RandomOptions {
            length: if o.length == 0 {
                DEFAULT_RANDOM_LENGTH
            } else {
                o.length
            },
            encoding: match o.encoding.as_str() {
                "" => Encoding::Base64url,
                e => e.parse()?,
            },
        }),
    };
    let postgres = match &r.postgres {
        None => None,
        Some(p) => Some(PgOptions {
            admin_url_file: p.admin_url_file.clone(),
            group_role: p.group_role.clone(),
            role_base: p.role_base.clone(),
            database: p.database.clone(),
            host: p.host.clone(),
            port: u16::try_from(p.port).map_err(|_| {
                Error::InvalidArgument(format!("port {} is not a TCP port", p.port))
            })?,
            probe: p.probe.clone(),
            terminate_sessions: p.terminate_sessions,
            sslmode: p.sslmode.clone(),
            sslrootcert: p.sslrootcert.clone(),
            admin_url: InlineUrl::default(),
        }),
    };
    let redis = match &r.redis {
        None => None,
        Some(p) => Some(RedisOptions {
            admin_url_file: p.admin_url_file.clone(),
            username: p.username.clone(),
            address: p.address.clone(),
            topology: p.topology.parse().map_err(Error::InvalidArgument)?,
            nodes: p.nodes.clone(),
            sentinels: p.sentinels.clone(),
            master_name: p.master_name.clone(),
            tls: RedisTls {
                ca_file: p.tls_ca_file.clone(),
                cert_file: p.tls_cert_file.clone(),
                key_file: p.tls_key_file.clone(),
                server_name: p.tls_server_name.clone(),
            },
            admin_url: InlineUrl::default(),
        }),
    };
    Ok(KindOptions {
        random,
        postgres,
        redis,
        exec: r.exec.as_ref().map(|p| ExecOptions {
            create: p.create.clone(),
            set: p.set.clone(),
            test: p.test.clone(),
            revoke: p.revoke.clone(),
            timeout_ms: p.timeout_ms,
        }),
    })
}

pub(crate) fn status(st: &SecretStatus) -> pb::SecretStatus {
    let s = &st.secret;
    let consumers: Vec<pb::Consumer> = st
        .consumers
        .iter()
        .map(|(k, live)| pb::Consumer {
            live: *live,
            consumer_id: k.consumer_id.clone(),
            pod: k.pod.clone(),
            namespace: k.namespace.clone(),
            identity: k.identity.clone(),
            version: unsigned(k.version),
            healthy: k.healthy,
            error: k.error.clone(),
            reported_at_ms: k.reported_at_ms,
        })
        .collect();
    let live = consumers.iter().filter(|k| k.live).count();
    let converged = consumers
        .iter()
        .filter(|k| k.live && k.version == unsigned(s.current_version))
        .count();
    pb::SecretStatus {
        secret: Some(secret(s)),
        versions: st.versions.iter().map(|v| version(s, v, None)).collect(),
        consumers,
        rotation: st.rotation.as_ref().map(|r| pb::RotationState {
            target_version: unsigned(r.target_version),
            step: r.step.as_str().into(),
            error: r.error.clone(),
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
        }),
        converged: u32::try_from(converged).unwrap_or(u32::MAX),
        live_consumers: u32::try_from(live).unwrap_or(u32::MAX),
        decommission_blockers: st.decommission_blockers.clone(),
        reencryption: st.reencryption.as_ref().map(|r| pb::Reencryption {
            version: unsigned(r.version),
            consumer_id: r.consumer_id.clone(),
            rows_done: unsigned(r.rows_done),
            rows_total: unsigned(r.rows_total),
            // Rows per second, stored in thousandths.
            #[allow(clippy::cast_precision_loss, reason = "rates far below 2^53")]
            rate: r.rate_milli as f64 / 1000.0,
            finished: r.finished,
            phase: r.phase.clone(),
            updated_at_ms: r.updated_at_ms,
        }),
        provider_problem: st.provider_problem.clone().unwrap_or_default(),
    }
}

pub(crate) fn token_info(t: &TokenRow) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        identity: t.identity.clone(),
        prefixes: t.prefixes.clone(),
        operations: t.operations.clone(),
        created_at_ms: t.created_at_ms,
        created_by: t.created_by.clone(),
        expires_at_ms: t.expires_at_ms,
        revoked_at_ms: t.revoked_at_ms,
    }
}

pub(crate) fn audit_event(e: audit::Event) -> pb::AuditEvent {
    pb::AuditEvent {
        seq: unsigned(e.seq),
        time_ms: e.time_ms,
        actor: e.actor,
        action: e.action,
        secret_id: e.secret_id,
        version: unsigned(e.version),
        outcome: e.outcome,
        request_id: e.request_id,
        detail: e.detail,
        prev_hash: e.prev_hash,
        hash: e.hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_options_become_typed_once() {
        let req = pb::CreateSecretRequest {
            random: Some(pb::RandomOptions {
                length: 0,
                encoding: String::new(),
            }),
            postgres: Some(pb::PostgresOptions {
                port: 5433,
                ..Default::default()
            }),
            ..Default::default()
        };
        let o = kind_options(&req).unwrap();
        assert_eq!(
            o.random,
            Some(RandomOptions {
                length: DEFAULT_RANDOM_LENGTH,
                encoding: Encoding::Base64url
            })
        );
        assert_eq!(o.postgres.unwrap().port, 5433);
        assert!(o.redis.is_none() && o.exec.is_none());

        let bad = pb::CreateSecretRequest {
            random: Some(pb::RandomOptions {
                length: 8,
                encoding: "rot13".into(),
            }),
            ..Default::default()
        };
        let e = kind_options(&bad).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("rot13"),
            "{e}"
        );
        let bad_port = pb::CreateSecretRequest {
            postgres: Some(pb::PostgresOptions {
                port: 70_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(kind_options(&bad_port).is_err());
    }

    #[test]
    fn where_the_values_live_reaches_the_wire() {
        let row = SecretRow {
            id: "prod/db".into(),
            provider: "vault-main".into(),
            provider_path: "secret/rekey/prod/db".into(),
            ..Default::default()
        };
        let s = secret(&row);
        assert_eq!(s.provider, "vault-main");
        assert_eq!(s.provider_path, "secret/rekey/prod/db");
        let embedded = secret(&SecretRow::default());
        assert!(embedded.provider.is_empty() && embedded.provider_path.is_empty());

        let mut st = SecretStatus {
            secret: row,
            versions: Vec::new(),
            consumers: Vec::new(),
            rotation: None,
            decommission_blockers: Vec::new(),
            reencryption: None,
            provider_problem: None,
        };
        assert_eq!(status(&st).provider_problem, "");
        st.provider_problem = Some("KV version 4 was deleted outside rekey".into());
        assert_eq!(
            status(&st).provider_problem,
            "KV version 4 was deleted outside rekey"
        );
    }
}
