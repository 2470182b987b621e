//! The connection to `rekey-backend`: one Watch stream for every configured
//! secret, reports of the versions served, and reconnection with
//! exponential backoff and jitter. While the backend is unreachable the
//! sidecar keeps serving what it has (fail static); on reconnect the
//! snapshot of an unchanged secret causes no write and no reload.
//!
//! The backoff starts over only once a stream has delivered every
//! secret's snapshot: a stream that is accepted and then fails (an event
//! over `max_event_bytes`, a protocol error, a refusal under the backend's
//! stream limits) counts as a failed attempt, so a fleet facing a backend
//! it cannot read slows down instead of reconnecting several times a
//! second.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rekey_keyring::{SecretBytes, SecretString, SecretValue};
use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_client::RekeyClient;
use tokio::sync::{Notify, oneshot, watch};
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
    Ok(RekeyClient::with_interceptor(channel, Auth(header))
        .max_decoding_message_size(cfg.max_event_bytes))
}

/// What tonic says when a message's length prefix is over the decoding
/// limit (tonic 0.14, `codec/decode.rs`); a unit test pins it.
const TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// An error from the Watch stream: an event over the decoding limit
/// becomes [`Error::EventTooLarge`] with the size its prefix declared.
fn stream_error(s: &tonic::Status, max: usize) -> Error {
    if s.code() == Code::OutOfRange
        && let Some(rest) = s.message().strip_prefix(TOO_LARGE)
    {
        let size = rest.split(' ').next().and_then(|n| n.parse::<usize>().ok());
        return Error::EventTooLarge { size, max };
    }
    Error::from(s.clone())
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
    cap.mul_f64(0.5 + unit_random() * 0.5)
}

/// A random number in [0, 1] (0 if the system has none to give).
fn unit_random() -> f64 {
    let r = rekey_keyring::random_bytes(4)
        .map(|b| u32::from_le_bytes([b.expose()[0], b.expose()[1], b.expose()[2], b.expose()[3]]))
        .unwrap_or(0);
    f64::from(r) / f64::from(u32::MAX)
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
    let (events, mut errors) = match first_events(cfg).await {
        Ok(found) => found,
        Err(e) => return Ok(Probe::Unreachable(e)),
    };
    errors.extend(misfits(cfg, &events, |_| true));
    if errors.is_empty() {
        Ok(Probe::Snapshots(events))
    } else {
        Err(errors)
    }
}

/// Values that do not render into their outputs (a template naming a
/// field the value lacks), for the secrets `check` selects.
fn misfits(cfg: &Config, events: &[pb::WatchEvent], check: impl Fn(&str) -> bool) -> Vec<String> {
    let mut errors = Vec::new();
    for ev in events {
        if let Some((id, served, _)) = offered(ev.clone())
            && check(&id)
            && let Some(sc) = cfg.secrets.iter().find(|s| s.id == id)
            && let Err(e) = crate::render::render(&sc.out, &served.current.value)
        {
            errors.push(format!("secret {id}: {e}"));
        }
    }
    errors
}

/// For a configuration that is already known to be invalid: what the
/// backend says about the secrets it names (not found, not allowed, a
/// value that does not fit an output), so that the operator sees those
/// together with the local problems. Only the outputs in `sound_outputs`
/// are checked against the values; the others have settings in error.
pub async fn backend_problems(cfg: &Config, sound_outputs: &BTreeSet<String>) -> Vec<String> {
    match first_events(cfg).await {
        Ok((events, mut errors)) => {
            errors.extend(misfits(cfg, &events, |id| sound_outputs.contains(id)));
            errors
        }
        // Token file and address problems are configuration errors,
        // reported already.
        Err(
            Error::NoTokenFile
            | Error::TokenFile { .. }
            | Error::TokenNotAHeader
            | Error::BackendAddress { .. },
        ) => vec![],
        Err(e) => vec![format!("backend: the secrets could not be checked: {e}")],
    }
}

/// Watches each secret once. Returns the first events and the refusals,
/// one line per secret, or why the backend could not be asked.
async fn first_events(cfg: &Config) -> Result<(Vec<pb::WatchEvent>, Vec<String>), Error> {
    let mut seen = BTreeSet::new();
    let ids: Vec<String> = cfg
        .secrets
        .iter()
        .map(|s| s.id.clone())
        .filter(|id| !id.is_empty() && seen.insert(id.clone()))
        .collect();
    if ids.is_empty() {
        return Ok((vec![], vec![]));
    }
    let mut client = connect(cfg).await?;
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
                return Err(Error::BackendSilent {
                    after: Duration::from_secs(10),
                });
            }
            Ok(Ok(Some(ev))) => events.push(ev),
            Ok(Ok(None)) => errors.push(format!("secret {id}: the backend closed the stream")),
            Ok(Err(st)) => match st.code() {
                Code::PermissionDenied
                | Code::NotFound
                | Code::Unauthenticated
                | Code::InvalidArgument => errors.push(format!("secret {id}: {}", Error::from(st))),
                // Not a start-up error: an oversized event is a mismatch
                // with the backend's limits that /readyz names while the
                // sidecar retries (the value may shrink, the setting grow).
                _ => return Err(stream_error(&st, cfg.max_event_bytes)),
            },
        }
    }
    Ok((events, errors))
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
        let mut synced = false;
        let r = session(
            &cfg,
            &state,
            &outputs,
            &reloader,
            &mut shutdown,
            &mut synced,
        )
        .await;
        state.set_connected(false);
        if *shutdown.borrow() {
            return;
        }
        if synced {
            // This stream worked: the next failure starts the backoff over.
            attempt = 0;
        }
        let delay = backoff(attempt, cfg.backoff_max);
        match &r {
            Ok(()) => {
                state.set_backend_problem(None);
                tracing::warn!("the backend closed the Watch stream; reconnecting");
            }
            Err(e @ Error::EventTooLarge { .. }) => {
                state.set_backend_problem(Some(e.to_string()));
                tracing::error!(
                    error = %e,
                    attempt,
                    retry_in = ?delay,
                    "an event from the backend is over max_event_bytes; raise it (REKEY_MAX_EVENT_BYTES) to more than twice the backend's limits.max_value_bytes; serving the last good versions"
                );
            }
            Err(e) => {
                state.set_backend_problem(Some(if e.is_unreachable() {
                    format!("unreachable ({e})")
                } else {
                    e.to_string()
                }));
                tracing::warn!(error = %e, attempt, retry_in = ?delay, "backend unavailable; serving the last good versions");
            }
        }
        attempt = attempt.saturating_add(1);
        state.metrics.reconnects.inc();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = crate::stopped(&mut shutdown) => return,
        }
    }
}

/// Reports the versions served; with `leaving`, says goodbye instead, so a
/// sidecar that stopped cleanly holds no decommission back.
async fn report(cfg: &Config, state: &State, client: &mut Client, leaving: bool) {
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
            leaving,
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(code = ?e.code(), message = e.message(), "cannot report served versions");
    }
}

/// Reports every `report_interval`, and as soon as possible when `wanted`.
/// When `leave` fires, a report on its way is finished first and then the
/// goodbye is sent, so the goodbye is always the last word.
async fn reporting(
    cfg: Arc<Config>,
    state: Arc<State>,
    mut client: Client,
    wanted: Arc<Wanted>,
    mut leave: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(cfg.report_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the report of a new version is due: a random part of
    // report_spread after it was asked for, so a fleet's reports spread.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let spread_over = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = &mut leave => {
                report(&cfg, &state, &mut client, true).await;
                return;
            }
            () = wanted.urgent.notified() => {}
            _ = tick.tick() => {}
            () = spread_over => {}
            () = wanted.spread.notified() => {
                // Asked again before it is due: joins the report waiting.
                due.get_or_insert_with(|| {
                    tokio::time::Instant::now() + cfg.report_spread.mul_f64(unit_random())
                });
                continue;
            }
        }
        due = None;
        report(&cfg, &state, &mut client, false).await;
    }
}

/// Reports asked of the reporting task.
#[derive(Default)]
struct Wanted {
    /// A new version served: reported within `report_spread`.
    spread: Notify,
    /// A version that failed to render or validate: reported at once, so
    /// `rekey status` shows the problem while the operator looks.
    urgent: Notify,
}

/// The reporting task of one Watch stream; it ends with the stream.
struct Reporter {
    task: tokio::task::JoinHandle<()>,
    leave: Option<oneshot::Sender<()>>,
}

impl Reporter {
    /// Says goodbye, after any report on its way; false when that did not
    /// finish within `within`.
    async fn leave(mut self, within: Duration) -> bool {
        if let Some(l) = self.leave.take() {
            let _ = l.send(());
        }
        tokio::time::timeout(within, &mut self.task).await.is_ok()
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a stopping sidecar waits to tell the backend it is leaving.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// One Watch stream, until it ends. `synced` is set once every watched
/// secret's first event (its snapshot) has been delivered.
async fn session(
    cfg: &Arc<Config>,
    state: &Arc<State>,
    outputs: &BTreeMap<String, Output>,
    reloader: &Reloader,
    shutdown: &mut watch::Receiver<bool>,
    synced: &mut bool,
) -> Result<(), Error> {
    let mut client = connect(cfg).await?;
    let ids: Vec<String> = cfg.secrets.iter().map(|s| s.id.clone()).collect();
    let mut awaiting: BTreeSet<String> = ids.iter().cloned().collect();
    let mut stream = client
        .watch(pb::WatchRequest { secret_ids: ids })
        .await?
        .into_inner();
    tracing::info!(backend = %cfg.backend, "watching secrets");
    // Reports go out from a task of their own, so that a slow report never
    // holds back the next event; asked for while one is on its way, they
    // coalesce into one.
    let wanted = Arc::new(Wanted::default());
    let (leave, left) = oneshot::channel();
    let reporter = Reporter {
        task: tokio::spawn(reporting(
            cfg.clone(),
            state.clone(),
            client.clone(),
            wanted.clone(),
            left,
        )),
        leave: Some(leave),
    };
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(ev)) => {
                    // The stream delivers: connected, even if this one
                    // event does not render or validate, and why the last
                    // stream failed no longer holds (the readiness body
                    // must not show it while this event is written and
                    // reported).
                    state.set_connected(true);
                    state.set_backend_problem(None);
                    let id = ev.secret.as_ref().map(|s| s.id.clone());
                    if let Some((id, served, published)) = offered(ev)
                        && let Some(out) = outputs.get(&id)
                    {
                        let changed = state.deliver(&id, out, served, published, reloader).await;
                        let failing = state.report().iter().any(|(i, _, ok, _)| i == &id && !ok);
                        if failing {
                            wanted.urgent.notify_one();
                        } else if changed {
                            wanted.spread.notify_one();
                        }
                    }
                    if let Some(id) = id
                        && awaiting.remove(&id)
                        && awaiting.is_empty()
                    {
                        *synced = true;
                        state.set_backend_problem(None);
                    }
                }
                Ok(None) => return Ok(()),
                Err(s) => return Err(stream_error(&s, cfg.max_event_bytes)),
            },
            () = crate::stopped(shutdown) => {
                if !reporter.leave(LEAVE_TIMEOUT).await {
                    tracing::warn!("the backend did not take the goodbye in time; this pod counts as a consumer until its reports expire");
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_over_the_limit_is_named_with_its_size() {
        // The message tonic 0.14 gives when a length prefix is over the
        // decoding limit; if an upgrade changes it, this test says so.
        let st = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 2621500 bytes, the limit is: 1048576 bytes",
        );
        let e = stream_error(&st, 1_048_576);
        assert!(
            matches!(
                e,
                Error::EventTooLarge {
                    size: Some(2_621_500),
                    max: 1_048_576
                }
            ),
            "{e:?}"
        );
        let other = stream_error(&tonic::Status::out_of_range("elsewhere"), 10);
        assert!(matches!(other, Error::Backend { .. }), "{other:?}");
    }

    /// Takes every message whole and keeps nothing of it.
    struct Discard;

    impl tonic::codec::Decoder for Discard {
        type Item = ();
        type Error = tonic::Status;
        fn decode(
            &mut self,
            src: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<()>, tonic::Status> {
            use hyper::body::Buf;
            src.advance(src.remaining());
            Ok(Some(()))
        }
    }

    #[tokio::test]
    async fn tonic_refuses_a_message_over_the_limit_with_that_message() {
        // One gRPC frame of 300 bytes, decoded with a 100-byte limit the
        // way the Watch client decodes events.
        let mut frame = vec![0u8];
        frame.extend_from_slice(&300u32.to_be_bytes());
        frame.extend_from_slice(&[0u8; 300]);
        let mut s = tonic::codec::Streaming::new_response(
            Discard,
            http_body_util::Full::new(hyper::body::Bytes::from(frame)),
            hyper::StatusCode::OK,
            None,
            Some(100),
        );
        let st = s.message().await.unwrap_err();
        let e = stream_error(&st, 100);
        assert!(
            matches!(
                e,
                Error::EventTooLarge {
                    size: Some(300),
                    max: 100
                }
            ),
            "{st:?}"
        );
    }

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
