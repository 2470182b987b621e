//! The connection to `rekey-backend`: one Watch stream for every configured
//! secret, reports of the versions served, and reconnection with
//! exponential backoff and jitter. While the backend is unreachable the
//! sidecar keeps serving what it has (fail static); on reconnect the
//! snapshot of an unchanged secret causes no write and no reload.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_client::RekeyClient;
use tokio::sync::watch;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::config::{Config, Output};
use crate::error::Error;
use crate::reload::Reloader;
use crate::state::{Served, State, Versioned};

type Client = RekeyClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Connects with the token read from its file now (so a rotated token file
/// is picked up on the next connect).
///
/// # Errors
/// No or an unreadable token file, a token that cannot be a header, a bad
/// backend address, or a backend that cannot be reached.
pub async fn connect(cfg: &Config) -> Result<Client, Error> {
    let token = match &cfg.token_file {
        Some(p) => zeroize::Zeroizing::new(
            std::fs::read_to_string(p)
                .map_err(|reason| Error::TokenFile {
                    path: p.clone(),
                    reason,
                })?
                .trim()
                .to_string(),
        ),
        None => return Err(Error::NoTokenFile),
    };
    let mut header: tonic::metadata::MetadataValue<_> =
        zeroize::Zeroizing::new(format!("Bearer {}", token.as_str()))
            .parse()
            .map_err(|_| Error::TokenNotAHeader)?;
    header.set_sensitive(true);
    let channel = Endpoint::from_shared(cfg.backend.clone())
        .map_err(|reason| Error::BackendAddress {
            backend: cfg.backend.clone(),
            reason,
        })?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|reason| Error::BackendUnreachable {
            backend: cfg.backend.clone(),
            reason,
        })?;
    Ok(RekeyClient::with_interceptor(channel, Auth(header)))
}

fn value(v: Option<pb::SecretValue>) -> Option<SecretValue> {
    match v?.value? {
        pb::secret_value::Value::Raw(b) => Some(SecretValue::Raw(SecretBytes::new(b))),
        pb::secret_value::Value::Fields(f) => Some(SecretValue::Fields(
            f.fields
                .into_iter()
                .map(|(k, v)| (k, SecretString::new(v)))
                .collect(),
        )),
    }
}

fn versioned(v: Option<pb::Version>) -> Option<Versioned> {
    let v = v?;
    Some(Versioned {
        version: v.version,
        created_at_ms: v.created_at_ms,
        value: value(v.value)?,
    })
}

/// A Watch event as (secret id, what to serve, when it was published).
pub fn offered(ev: pb::WatchEvent) -> Option<(String, Served, Option<i64>)> {
    let id = ev.secret?.id;
    let current = versioned(ev.current)?;
    let published = (!ev.snapshot && ev.published_at_ms > 0).then_some(ev.published_at_ms);
    Some((
        id,
        Served {
            current,
            previous: versioned(ev.previous),
        },
        published,
    ))
}

/// Delay before reconnect attempt `attempt`: exponential from 200ms up to
/// `max`, with jitter in the upper half so a fleet does not reconnect in
/// lock step.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1u32 << attempt.min(16));
    let cap = base.min(max);
    let r = rekey_keyring::random_bytes(4)
        .map(|b| u32::from_le_bytes([b.expose()[0], b.expose()[1], b.expose()[2], b.expose()[3]]))
        .unwrap_or(0);
    let frac = 0.5 + (r as f64 / u32::MAX as f64) * 0.5;
    cap.mul_f64(frac)
}

/// What a start-up check of the backend found.
pub enum Probe {
    /// Snapshots of every secret, each already checked to render.
    Snapshots(Vec<pb::WatchEvent>),
    /// The backend did not answer; the sidecar starts and keeps trying.
    Unreachable(Error),
}

/// At start-up: may this identity read its secrets, and do the outputs fit
/// the values (a template naming a field the value lacks)? Errors here stop
/// the sidecar before it binds its port.
///
/// # Errors
/// Every refusal and misfit found, one line per secret.
pub async fn probe(cfg: &Config) -> Result<Probe, Vec<String>> {
    if cfg.secrets.is_empty() {
        return Ok(Probe::Snapshots(vec![]));
    }
    let mut client = match connect(cfg).await {
        Ok(c) => c,
        Err(e) => return Ok(Probe::Unreachable(e)),
    };
    let ids: Vec<String> = cfg.secrets.iter().map(|s| s.id.clone()).collect();
    let mut errors = Vec::new();
    // One Watch per secret, so that every refusal is listed, not only the
    // first.
    let mut events = Vec::new();
    for id in &ids {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut s = client
                .watch(pb::WatchRequest {
                    secret_ids: vec![id.clone()],
                })
                .await?
                .into_inner();
            s.message().await
        })
        .await;
        match r {
            Err(_) => {
                return Ok(Probe::Unreachable(Error::BackendSilent {
                    after: Duration::from_secs(10),
                }));
            }
            Ok(Ok(Some(ev))) => events.push(ev),
            Ok(Ok(None)) => errors.push(format!("secret {id}: the backend closed the stream")),
            Ok(Err(st)) => match st.code() {
                Code::PermissionDenied
                | Code::NotFound
                | Code::Unauthenticated
                | Code::InvalidArgument => errors.push(format!("secret {id}: {}", Error::from(st))),
                _ => return Ok(Probe::Unreachable(st.into())),
            },
        }
    }
    for ev in &events {
        if let Some((id, served, _)) = offered(ev.clone())
            && let Some(sc) = cfg.secrets.iter().find(|s| s.id == id)
            && let Err(e) = crate::render::render(&sc.out, &served.current.value)
        {
            errors.push(format!("secret {id}: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(Probe::Snapshots(events))
    } else {
        Err(errors)
    }
}

/// Runs until shutdown: watch, deliver, report; reconnect on failure.
pub async fn run(
    cfg: Arc<Config>,
    state: Arc<State>,
    outputs: Arc<BTreeMap<String, Output>>,
    reloader: Reloader,
    mut shutdown: watch::Receiver<bool>,
) {
    if cfg.secrets.is_empty() {
        return;
    }
    let mut attempt = 0u32;
    loop {
        let r = session(
            &cfg,
            &state,
            &outputs,
            &reloader,
            &mut shutdown,
            &mut attempt,
        )
        .await;
        state.set_connected(false);
        if *shutdown.borrow() {
            return;
        }
        match r {
            Ok(()) => tracing::warn!("the backend closed the Watch stream; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, attempt, "backend unavailable; serving the last good versions")
            }
        }
        let delay = backoff(attempt, cfg.backoff_max);
        attempt = attempt.saturating_add(1);
        state.metrics.reconnects.inc();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
    }
}

async fn report(cfg: &Config, state: &State, client: &mut Client) {
    let secrets = state
        .report()
        .into_iter()
        .filter(|(id, ..)| cfg.secrets.iter().any(|s| &s.id == id))
        .map(|(secret_id, version, healthy, error)| pb::ServedSecret {
            secret_id,
            version,
            healthy,
            error,
        })
        .collect();
    let r = client
        .report_status(pb::ReportStatusRequest {
            consumer_id: cfg.consumer_id.clone(),
            pod: cfg.pod.clone(),
            namespace: cfg.namespace.clone(),
            secrets,
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(code = ?e.code(), message = e.message(), "cannot report served versions");
    }
}

async fn session(
    cfg: &Config,
    state: &State,
    outputs: &BTreeMap<String, Output>,
    reloader: &Reloader,
    shutdown: &mut watch::Receiver<bool>,
    attempt: &mut u32,
) -> Result<(), Error> {
    let mut client = connect(cfg).await?;
    let ids: Vec<String> = cfg.secrets.iter().map(|s| s.id.clone()).collect();
    let mut stream = client
        .watch(pb::WatchRequest { secret_ids: ids })
        .await?
        .into_inner();
    state.set_connected(true);
    *attempt = 0;
    tracing::info!(backend = %cfg.backend, "watching secrets");
    let mut tick = tokio::time::interval(cfg.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(ev)) => {
                    if let Some((id, served, published)) = offered(ev)
                        && let Some(out) = outputs.get(&id)
                    {
                        let changed = state.deliver(&id, out, served, published, reloader).await;
                        if changed || state.report().iter().any(|(i, _, ok, _)| i == &id && !ok) {
                            report(cfg, state, &mut client).await;
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(s) => return Err(s.into()),
            },
            _ = tick.tick() => report(cfg, state, &mut client).await,
            _ = crate::stopped(shutdown) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let max = Duration::from_secs(5);
        for attempt in 0..20 {
            let d = backoff(attempt, max);
            let cap = Duration::from_millis(200)
                .saturating_mul(1 << attempt.min(16))
                .min(max);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
        }
    }
}
