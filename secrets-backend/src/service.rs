//! The `rekey.v1.Rekey` gRPC service: input checks at the edge,
//! authentication, policy, and translation between messages and the
//! engine. It calls the engine and nothing else; refusals are audited
//! through it too.
//!
//! Secret ids are checked before anything is logged, so a hostile id can
//! neither forge a log line nor reach the audit log. Calls refused before
//! authentication are only counted and summarized
//! ([`Engine::refused_unauthenticated`]).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_server::Rekey;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt, StreamMap, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Identity, Operation};
use crate::clock::now_ms;
use crate::convert::{self, signed};
use crate::engine::{
    self, Actor, AuditPage, CreateSpec, Engine, Outcome, ReencryptionReport, Selector,
    ServedReport, TokenSpec, validate_id,
};
use crate::error::{Error, Result};
use crate::front::WatchFrames;
use crate::limits::StreamLimits;
use crate::provider::Stage;

pub(crate) struct RekeyService {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    /// Flips to `true` at shutdown; open Watch streams end then.
    shutdown: watch::Receiver<bool>,
    streams: StreamLimits,
}

/// Free text a caller sends that rekey stores, prints or logs (a consumer
/// id, a pod name): bounded, and without control characters.
fn check_text(what: &str, v: &str, max: usize) -> Result<()> {
    if v.len() > max || v.chars().any(char::is_control) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be at most {max} bytes without control characters"
        )));
    }
    Ok(())
}

/// `x-rekey-on-behalf-of`: who a front (the OpenBao / Vault plugin) acts
/// for, e.g. `vault:userpass-alice/entity=7a1b...`. Recorded, never used
/// to decide anything; ignored unless it is 1 to 160 characters of
/// `[A-Za-z0-9-_.:@=/]`.
fn on_behalf_of(md: &tonic::metadata::MetadataMap) -> Option<&str> {
    md.get("x-rekey-on-behalf-of")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 160
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:@=/".contains(&b))
        })
}

/// A prefix of secret ids: empty, or the characters ids are made of.
fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.len() > 256
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(Error::InvalidArgument(
            "a prefix uses the characters of secret ids: letters, digits, - _ . /".into(),
        ));
    }
    Ok(())
}

type Reply<T> = std::result::Result<Response<T>, Status>;

impl RekeyService {
    pub(crate) fn new(
        engine: Arc<Engine>,
        auth: Arc<Auth>,
        shutdown: watch::Receiver<bool>,
        streams: StreamLimits,
    ) -> Self {
        Self {
            engine,
            auth,
            shutdown,
            streams,
        }
    }

    /// Authenticates the caller of `method` and builds its audit actor. A
    /// refusal is counted, not audited one by one.
    fn caller<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        secret: &str,
    ) -> Result<(Identity, Actor)> {
        let cert_identity = match req.peer_certs().as_deref().and_then(|c| c.first()) {
            None => None,
            Some(c) => match crate::auth::cert_identity(c) {
                Ok(name) => Some(name),
                Err(why) => {
                    let e = Error::Unauthenticated(format!(
                        "the client certificate names no identity: {why}"
                    ));
                    self.engine
                        .refused_unauthenticated(method, secret, &e.to_string());
                    return Err(e);
                }
            },
        };
        let request_id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            })
            .map_or_else(engine::new_request_id, str::to_string);
        match self
            .auth
            .authenticate(req.metadata(), cert_identity, now_ms())
        {
            Ok(id) => {
                // A front such as the OpenBao / Vault plugin names the
                // person it acts for; the audit log keeps both, the
                // authenticated token's name first.
                let identity = match on_behalf_of(req.metadata()) {
                    Some(who) => format!("{} for {who}", id.name),
                    None => id.name.clone(),
                };
                let actor = Actor {
                    identity,
                    request_id,
                };
                Ok((id, actor))
            }
            Err(e) => {
                self.engine
                    .refused_unauthenticated(method, secret, &e.to_string());
                Err(e)
            }
        }
    }

    /// An authenticated caller of `method` allowed to do `op` on `secret`.
    fn authorized<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        op: Operation,
        secret: &str,
    ) -> Result<Identity> {
        let (who, _) = self.caller(req, method, secret)?;
        self.auth.authorize(&who, op, secret)?;
        Ok(who)
    }

    /// A provider path given to `create` is a secret of the provider's: it
    /// may already hold a value, which create adopts. The path must map to
    /// a secret id the caller may create (the provider's prefix followed by
    /// the id, as paths are made by default); a path outside the prefix
    /// needs create on every secret, an operator's right.
    fn authorize_provider_path(&self, who: &Identity, provider: &str, path: &str) -> Result<()> {
        let prefix = self.engine.provider_prefix(provider)?;
        match path.strip_prefix(prefix.as_str()) {
            Some(id) => {
                if self.auth.allows(who, Operation::Create, id) {
                    return Ok(());
                }
                Err(Error::PermissionDenied(format!(
                    "{} may not create {id}, the secret that {provider}'s path {path} stands for",
                    who.name
                )))
            }
            None if self.auth.allows(who, Operation::Create, "") => Ok(()),
            None => Err(Error::PermissionDenied(format!(
                "{} may not use {provider}'s path {path}: it lies outside the provider's prefix {prefix:?}, which needs create on every secret",
                who.name
            ))),
        }
    }

    /// An identity name belongs to one issuer: who is not the admin may
    /// not issue a token under a name of the configuration (the
    /// operator's), nor under one that another issuer's tokens carry, so
    /// nobody can pass for the plugin or a sidecar in the audit log, or
    /// use up their limits.
    async fn may_name(&self, who: &Identity, name: &str) -> Result<()> {
        if who.name == crate::auth::ADMIN {
            return Ok(());
        }
        let elsewhere = self.auth.is_configured(name)
            || self.engine.list_tokens().await?.iter().any(|t| {
                t.identity == name && t.created_by.split(" for ").next() != Some(who.name.as_str())
            });
        if elsewhere {
            return Err(Error::PermissionDenied(format!(
                "{} may not issue tokens named {name}: that identity belongs to another issuer (or the configuration)",
                who.name
            )));
        }
        Ok(())
    }

    /// Runs a call that changes or reveals something: authorize, run,
    /// audit a refusal.
    async fn changing<T, F, Fut>(
        &self,
        caller: Result<(Identity, Actor)>,
        op: Operation,
        secret: &str,
        version: i64,
        run: F,
    ) -> std::result::Result<T, Status>
    where
        F: FnOnce(Identity, Actor) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (who, actor) = caller?;
        if let Err(e) = self.auth.authorize(&who, op, secret) {
            self.engine
                .record_refusal(&actor, op.name(), secret, version, &e)
                .await;
            return Err(e.into());
        }
        match run(who, actor.clone()).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // A rotation that failed in a step recorded its own event.
                if !(op == Operation::Rotate && matches!(e, Error::Step { .. })) {
                    self.engine
                        .record_refusal(&actor, op.name(), secret, version, &e)
                        .await;
                }
                tracing::info!(secret, action = op.name(), error = %e, "call refused or failed");
                Err(e.into())
            }
        }
    }
}

fn parts(o: &Outcome) -> (Option<pb::Secret>, Option<pb::Version>) {
    (
        Some(convert::secret(&o.secret)),
        Some(convert::version(&o.secret, &o.version, None)),
    )
}

fn selector(s: Option<pb::get_secret_request::Selector>) -> Selector {
    match s {
        Some(pb::get_secret_request::Selector::Version(v)) => Selector::Version(signed(v)),
        Some(pb::get_secret_request::Selector::Stage(st)) => Selector::Stage(
            match pb::Stage::try_from(st).unwrap_or(pb::Stage::Unspecified) {
                pb::Stage::Previous => Stage::Previous,
                pb::Stage::Pending => Stage::Pending,
                pb::Stage::Current | pb::Stage::Unspecified => Stage::Current,
            },
        ),
        None => Selector::Stage(Stage::Current),
    }
}

impl RekeyService {
    /// A token may carry only what its issuer may do itself: every
    /// operation on every prefix.
    fn may_grant(
        &self,
        who: &Identity,
        prefixes: &[String],
        operations: &std::collections::BTreeSet<Operation>,
    ) -> Result<()> {
        for p in prefixes {
            for op in operations.iter().chain([&Operation::Tokens]) {
                if !self.auth.allows(who, *op, p) {
                    return Err(Error::PermissionDenied(format!(
                        "{} may not {} {}, so cannot grant it",
                        who.name,
                        op.name(),
                        if p.is_empty() { "(any secret)" } else { p }
                    )));
                }
            }
        }
        Ok(())
    }

    /// Puts the store's issued tokens in force on this replica now.
    pub(crate) async fn reload_tokens(&self) -> Result<()> {
        let (_, tokens) = self.engine.issued_tokens().await?;
        self.auth.set_issued(tokens);
        Ok(())
    }
}

type WatchResponseStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::WatchEvent, Status>> + Send>>;

/// Keeps the open-streams gauge honest: decremented when the stream drops.
struct StreamGauge(prometheus_client::metrics::gauge::Gauge);
impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RekeyService {
    /// Checks a Watch request: its secret ids, its caller, the caller's
    /// rights to each secret and a free stream slot. Synchronous, so that
    /// the request (headers, extensions) is gone before anything waits: a
    /// fleet reconnecting at once must not keep every request, and a
    /// stream's future is only as large as what it keeps across an await.
    pub(crate) fn admit_watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> std::result::Result<WatchAdmitted, WatchRefused> {
        let ids: Vec<String> = {
            let mut seen = HashSet::new();
            request
                .get_ref()
                .secret_ids
                .iter()
                .filter(|i| seen.insert(i.as_str()))
                .cloned()
                .collect()
        };
        if ids.is_empty() {
            return Err(WatchRefused::Invalid(
                Error::InvalidArgument("name at least one secret to watch".into()).into(),
            ));
        }
        for id in &ids {
            validate_id(id).map_err(|e| WatchRefused::Invalid(e.into()))?;
        }
        let (who, actor) = self
            .caller(&request, "Watch", &ids[0])
            .map_err(|e| WatchRefused::Invalid(e.into()))?;
        for id in &ids {
            if let Err(error) = self.auth.authorize(&who, Operation::Watch, id) {
                return Err(WatchRefused::Unauthorized(Box::new(Unauthorized {
                    actor,
                    secret: id.clone(),
                    error,
                })));
            }
        }
        let slots = self
            .streams
            .open(&who.name, request.remote_addr())
            .map_err(WatchRefused::Invalid)?;
        Ok(WatchAdmitted { ids, actor, slots })
    }

    /// The answer to a refused Watch, audited when it was the caller's
    /// rights that refused it.
    pub(crate) async fn refuse_watch(&self, refused: WatchRefused) -> Status {
        match refused {
            WatchRefused::Invalid(status) => status,
            WatchRefused::Unauthorized(refusal) => {
                let Unauthorized {
                    actor,
                    secret,
                    error,
                } = *refusal;
                self.engine
                    .record_refusal(&actor, "watch", &secret, 0, &error)
                    .await;
                error.into()
            }
        }
    }

    /// Opens an admitted Watch stream: subscribes to each secret, audits
    /// the opening with the versions sent, and returns the stream's frames.
    pub(crate) async fn open_watch(
        &self,
        admitted: WatchAdmitted,
    ) -> std::result::Result<WatchFrames, Status> {
        // Used in place, not taken apart: an async fn's locals would be
        // a second copy of its argument in every stream's future.
        let mut map = StreamMap::new();
        let mut sent = Vec::with_capacity(admitted.ids.len());
        for id in &admitted.ids {
            let rx = self.engine.subscribe(id).await?;
            let versions = rx.borrow().as_ref().map_or((0, 0), |s| s.versions());
            sent.push((id.clone(), versions));
            map.insert(id.clone(), WatchStream::new(rx));
        }
        self.engine.record_watch(&admitted.actor, &sent).await?;
        tracing::debug!(identity = %admitted.actor.identity, secrets = sent.len(), "watch stream opened");
        let gauge = self.engine.metrics().watch_streams.clone();
        gauge.inc();
        let held = (StreamGauge(gauge), admitted.slots);
        // Secrets whose first event was sent; a stream watches a few, so
        // a list is smaller than a set.
        let mut sent_first: Vec<String> = Vec::new();
        let frames = map.filter_map(move |(id, snap)| {
            let _held = &held;
            let s = snap?;
            Some(Some(if sent_first.contains(&id) {
                s.change.clone()
            } else {
                sent_first.push(id);
                s.first.clone()
            }))
        });
        // End every stream at shutdown so the server can drain.
        let stop = WatchStream::from_changes(self.shutdown.clone()).map(|_| None);
        Ok(Box::pin(frames.merge(stop).map_while(|f| f)))
    }
}

/// A Watch request that passed [`RekeyService::admit_watch`].
pub(crate) struct WatchAdmitted {
    ids: Vec<String>,
    actor: Actor,
    slots: crate::limits::StreamSlots,
}

/// Why [`RekeyService::admit_watch`] refused a Watch request.
pub(crate) enum WatchRefused {
    /// Answered as is: a malformed request, an unknown caller, no slot.
    Invalid(Status),
    /// The caller may not watch a secret: audited, then answered.
    Unauthorized(Box<Unauthorized>),
}

/// Who was refused which secret, and why.
pub(crate) struct Unauthorized {
    actor: Actor,
    secret: String,
    error: Error,
}

#[tonic::async_trait]
impl Rekey for RekeyService {
    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> Reply<pb::CreateSecretResponse> {
        validate_id(&request.get_ref().id)?;
        let caller = self.caller(&request, "CreateSecret", &request.get_ref().id);
        let r = &request.into_inner();
        let o = self
            .changing(caller, Operation::Create, &r.id, 1, |who, actor| async move {
                if r.provider.is_empty() && !r.provider_path.is_empty() {
                    return Err(Error::InvalidArgument(
                        "provider_path needs a provider (the embedded store keys values by the secret id)".into(),
                    ));
                }
                if !r.provider_path.is_empty() {
                    self.authorize_provider_path(&who, &r.provider, &r.provider_path)?;
                }
                let sched = r.schedule.clone().unwrap_or_default();
                let spec = CreateSpec {
                    options: convert::kind_options(r)?,
                    value: convert::opt_value(r.value.as_ref())?,
                    id: r.id.clone(),
                    kind: r.kind.clone(),
                    provider: r.provider.clone(),
                    provider_path: r.provider_path.clone(),
                    schedule_spec: sched.spec,
                    rotation_window_ms: sched.rotation_window_ms,
                    jitter_ms: sched.jitter_ms,
                    min_interval_ms: sched.min_interval_ms,
                    next_override_ms: sched.next_rotation_at_ms,
                    validation_window_ms: r
                        .validation_window_ms
                        .unwrap_or(engine::DEFAULT_VALIDATION_WINDOW_MS),
                };
                self.engine.create_secret(&actor, spec).await
            })
            .await?;
        let (secret, version) = parts(&o);
        Ok(Response::new(pb::CreateSecretResponse { secret, version }))
    }

    async fn rotate(&self, request: Request<pb::RotateRequest>) -> Reply<pb::RotateResponse> {
        validate_id(&request.get_ref().secret_id)?;
        let caller = self.caller(&request, "Rotate", &request.get_ref().secret_id);
        let r = &request.into_inner();
        let o = self
            .changing(
                caller,
                Operation::Rotate,
                &r.secret_id,
                0,
                |_, actor| async move {
                    if r.cancel {
                        return self.engine.cancel(&actor, &r.secret_id).await;
                    }
                    let token = Some(r.request_token.as_str()).filter(|t| !t.is_empty());
                    if let Some(t) = token {
                        check_text("request token", t, 128)?;
                    }
                    let value = convert::opt_value(r.value.as_ref())?;
                    self.engine.rotate(&actor, &r.secret_id, token, value).await
                },
            )
            .await?;
        let (secret, version) = parts(&o);
        Ok(Response::new(pb::RotateResponse {
            secret,
            version,
            replayed: o.replayed,
        }))
    }

    async fn revoke(&self, request: Request<pb::RevokeRequest>) -> Reply<pb::RevokeResponse> {
        validate_id(&request.get_ref().secret_id)?;
        check_text("reason", &request.get_ref().reason, 1000)?;
        let caller = self.caller(&request, "Revoke", &request.get_ref().secret_id);
        let r = &request.into_inner();
        let version = signed(r.version);
        let o = self
            .changing(
                caller,
                Operation::Revoke,
                &r.secret_id,
                version,
                |_, actor| async move {
                    self.engine
                        .revoke(&actor, &r.secret_id, version, r.force, &r.reason)
                        .await
                },
            )
            .await?;
        let (secret, version) = parts(&o);
        Ok(Response::new(pb::RevokeResponse { secret, version }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Reply<pb::RollbackResponse> {
        validate_id(&request.get_ref().secret_id)?;
        let caller = self.caller(&request, "Rollback", &request.get_ref().secret_id);
        let r = &request.into_inner();
        let o = self
            .changing(
                caller,
                Operation::Rollback,
                &r.secret_id,
                0,
                |_, actor| async move { self.engine.rollback(&actor, &r.secret_id).await },
            )
            .await?;
        let (secret, version) = parts(&o);
        Ok(Response::new(pb::RollbackResponse { secret, version }))
    }

    async fn get_secret(
        &self,
        request: Request<pb::GetSecretRequest>,
    ) -> Reply<pb::GetSecretResponse> {
        validate_id(&request.get_ref().secret_id)?;
        let caller = self.caller(&request, "GetSecret", &request.get_ref().secret_id);
        let r = &request.into_inner();
        let which = selector(r.selector);
        if !r.reveal {
            let (who, _) = caller?;
            self.auth.authorize(&who, Operation::Read, &r.secret_id)?;
            let (s, v) = self.engine.get_version(&r.secret_id, which).await?;
            return Ok(Response::new(pb::GetSecretResponse {
                version: Some(convert::version(&s, &v, None)),
                secret: Some(convert::secret(&s)),
            }));
        }
        let (s, v, value) = self
            .changing(
                caller,
                Operation::Reveal,
                &r.secret_id,
                0,
                |who, actor| async move {
                    self.auth.authorize(&who, Operation::Read, &r.secret_id)?;
                    self.engine.reveal(&actor, &r.secret_id, which).await
                },
            )
            .await?;
        Ok(Response::new(pb::GetSecretResponse {
            version: Some(convert::version(&s, &v, Some(&value))),
            secret: Some(convert::secret(&s)),
        }))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Reply<pb::ListVersionsResponse> {
        let id = &request.get_ref().secret_id;
        validate_id(id)?;
        self.authorized(&request, "ListVersions", Operation::Read, id)?;
        let (s, versions) = self.engine.list_versions(id).await?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: versions
                .iter()
                .map(|v| convert::version(&s, v, None))
                .collect(),
            secret: Some(convert::secret(&s)),
        }))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Reply<pb::ListSecretsResponse> {
        let prefix = &request.get_ref().prefix;
        check_prefix(prefix)?;
        let (who, _) = self.caller(&request, "ListSecrets", prefix)?;
        let secrets = self.engine.list_secrets(prefix).await?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: secrets
                .iter()
                .filter(|s| self.auth.allows(&who, Operation::Read, &s.id))
                .map(convert::secret)
                .collect(),
        }))
    }

    type WatchStream = WatchResponseStream;

    /// Served by [`crate::front`] from shared frames; this path decodes
    /// them again for callers of the generated service.
    async fn watch(&self, request: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let frames = match self.admit_watch(request) {
            Ok(admitted) => self.open_watch(admitted).await?,
            Err(refused) => return Err(self.refuse_watch(refused).await),
        };
        let events = frames.map(|f| {
            pb::WatchEvent::decode(f.get(5..).unwrap_or_default())
                .map_err(|_| Status::internal("a Watch frame did not decode"))
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn report_status(
        &self,
        request: Request<pb::ReportStatusRequest>,
    ) -> Reply<pb::ReportStatusResponse> {
        {
            let r = request.get_ref();
            check_text("consumer_id", &r.consumer_id, 256)?;
            check_text("pod", &r.pod, 256)?;
            check_text("namespace", &r.namespace, 256)?;
            for s in &r.secrets {
                validate_id(&s.secret_id)?;
            }
        }
        let (who, _) = self.caller(&request, "ReportStatus", "")?;
        let r = request.into_inner();
        for s in &r.secrets {
            self.auth.authorize(&who, Operation::Report, &s.secret_id)?;
        }
        let served: Vec<ServedReport> = r
            .secrets
            .into_iter()
            .map(|s| ServedReport {
                secret_id: s.secret_id,
                version: signed(s.version),
                healthy: s.healthy,
                error: s.error,
            })
            .collect();
        self.engine
            .report_served(
                &who.name,
                &r.consumer_id,
                &r.pod,
                &r.namespace,
                &served,
                r.leaving,
            )
            .await?;
        Ok(Response::new(pb::ReportStatusResponse {}))
    }

    async fn report_reencryption(
        &self,
        request: Request<pb::ReportReencryptionRequest>,
    ) -> Reply<pb::ReportReencryptionResponse> {
        {
            let r = request.get_ref();
            validate_id(&r.secret_id)?;
            check_text("consumer_id", &r.consumer_id, 256)?;
            check_text("phase", &r.phase, 500)?;
        }
        let (who, actor) =
            self.caller(&request, "ReportReencryption", &request.get_ref().secret_id)?;
        let r = request.into_inner();
        self.auth.authorize(&who, Operation::Report, &r.secret_id)?;
        // Finished lets the old key be revoked: only who could have
        // re-encrypted (it gets the secret's keys) may say so.
        if r.finished
            && !self.auth.allows(&who, Operation::Watch, &r.secret_id)
            && !self.auth.allows(&who, Operation::Reveal, &r.secret_id)
        {
            let e = Error::PermissionDenied(format!(
                "reporting re-encryption of {} finished needs watch or reveal on it: only a re-encryption consumer, which holds its keys, may report that",
                r.secret_id
            ));
            self.engine
                .record_refusal(&actor, "reencrypt", &r.secret_id, signed(r.version), &e)
                .await;
            return Err(e.into());
        }
        self.engine
            .report_reencryption(
                &actor,
                ReencryptionReport {
                    secret_id: r.secret_id,
                    version: signed(r.version),
                    consumer_id: r.consumer_id,
                    rows_done: signed(r.rows_done),
                    rows_total: signed(r.rows_total),
                    rate: r.rate,
                    finished: r.finished,
                    phase: r.phase,
                },
            )
            .await?;
        Ok(Response::new(pb::ReportReencryptionResponse {}))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Reply<pb::GetStatusResponse> {
        let id = &request.get_ref().secret_id;
        if !id.is_empty() {
            validate_id(id)?;
        }
        let (who, _) = self.caller(&request, "GetStatus", id)?;
        let ids: Vec<String> = if id.is_empty() {
            self.engine
                .list_secrets("")
                .await?
                .into_iter()
                .map(|s| s.id)
                .filter(|id| self.auth.allows(&who, Operation::Read, id))
                .collect()
        } else {
            self.auth.authorize(&who, Operation::Read, id)?;
            vec![id.clone()]
        };
        let mut secrets = Vec::with_capacity(ids.len());
        for id in ids {
            secrets.push(convert::status(&self.engine.status(&id).await?));
        }
        Ok(Response::new(pb::GetStatusResponse { secrets }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Reply<pb::ListAuditResponse> {
        let id = &request.get_ref().secret_id;
        if !id.is_empty() {
            validate_id(id)?;
        }
        // Listing every secret's events needs audit on every secret.
        self.authorized(&request, "ListAudit", Operation::Audit, id)?;
        let r = request.into_inner();
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(10_000)
        };
        let page = if r.newest_first {
            AuditPage::NewestBefore(signed(r.before_seq))
        } else {
            AuditPage::After(signed(r.after_seq))
        };
        let events = self
            .engine
            .list_audit(&r.secret_id, page, i64::from(limit))
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            events: events.into_iter().map(convert::audit_event).collect(),
        }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Reply<pb::CreateTokenResponse> {
        let caller = self.caller(&request, "CreateToken", "");
        let r = &request.into_inner();
        check_text("identity", &r.identity, 128)?;
        for p in &r.prefixes {
            check_prefix(p)?;
        }
        let mut operations = std::collections::BTreeSet::new();
        for o in &r.operations {
            operations.insert(o.parse::<Operation>().map_err(|()| {
                Error::InvalidArgument(format!(
                    "unknown operation {:?} (expected one of {})",
                    crate::engine::loggable(o),
                    Operation::ALL_NAMES.join(", ")
                ))
            })?);
        }
        // Issuing is authorized on what the token will cover.
        let scope = r.prefixes.first().map_or("", String::as_str);
        let (info, token) = self
            .changing(
                caller,
                Operation::Tokens,
                scope,
                0,
                |who, actor| async move {
                    self.may_grant(&who, &r.prefixes, &operations)?;
                    self.may_name(&who, &r.identity).await?;
                    let spec = TokenSpec {
                        identity: r.identity.clone(),
                        prefixes: r.prefixes.clone(),
                        operations: operations.clone(),
                        expires_at_ms: (r.expires_at_ms > 0).then_some(r.expires_at_ms),
                    };
                    let (row, token) = self.engine.create_token(&actor, spec).await?;
                    self.reload_tokens().await?;
                    Ok((convert::token_info(&row), token))
                },
            )
            .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            info: Some(info),
            token: token.expose().to_string(),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Reply<pb::ListTokensResponse> {
        self.authorized(&request, "ListTokens", Operation::Tokens, "")?;
        let tokens = self.engine.list_tokens().await?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(convert::token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Reply<pb::RevokeTokenResponse> {
        let caller = self.caller(&request, "RevokeToken", "");
        let id = &request.get_ref().id;
        check_text("token id", id, 64)?;
        // Revoking is authorized on what the token covers; who may not
        // issue tokens learns nothing about which exist.
        let current = match &caller {
            Ok(_) => self
                .engine
                .list_tokens()
                .await?
                .into_iter()
                .find(|t| &t.id == id),
            Err(_) => None,
        };
        let scope = current
            .as_ref()
            .and_then(|t| t.prefixes.first())
            .cloned()
            .unwrap_or_default();
        let row = self
            .changing(
                caller,
                Operation::Tokens,
                &scope,
                0,
                |who, actor| async move {
                    let current = current.ok_or_else(|| Error::NotFound(format!("token {id}")))?;
                    let ops = current
                        .operations
                        .iter()
                        .filter_map(|o| o.parse().ok())
                        .collect();
                    self.may_grant(&who, &current.prefixes, &ops)?;
                    let row = self.engine.revoke_token(&actor, id).await?;
                    self.reload_tokens().await?;
                    Ok(row)
                },
            )
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            info: Some(convert::token_info(&row)),
        }))
    }

    async fn sync(&self, request: Request<pb::SyncRequest>) -> Reply<pb::SyncResponse> {
        let r = request.get_ref();
        let id = if r.secret_id.is_empty() {
            check_text("provider path", &r.provider_path, 512)?;
            let (who, _) = self.caller(&request, "Sync", "")?;
            // A path kept for a secret the caller may not rotate reads as
            // one kept for none: the answer tells nobody what exists.
            let hidden = || {
                Status::from(Error::NotFound(format!(
                    "no secret you may rotate is kept at {:?}",
                    r.provider_path
                )))
            };
            let id = match self.engine.secret_at_path(&r.provider_path).await {
                Ok(s) => s.id,
                Err(Error::NotFound(_)) => return Err(hidden()),
                Err(e) => return Err(e.into()),
            };
            if !self.auth.allows(&who, Operation::Rotate, &id) {
                return Err(hidden());
            }
            id
        } else {
            validate_id(&r.secret_id)?;
            r.secret_id.clone()
        };
        let caller = self.caller(&request, "Sync", &id);
        let (s, changed, problem) = self
            .changing(caller, Operation::Rotate, &id, 0, |_, _| {
                self.engine.sync_secret(&id)
            })
            .await?;
        Ok(Response::new(pb::SyncResponse {
            secret: Some(convert::secret(&s)),
            changed,
            provider_problem: problem.unwrap_or_default(),
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Reply<pb::VerifyAuditResponse> {
        self.authorized(&request, "VerifyAudit", Operation::Audit, "")?;
        let r = request.into_inner();
        let expected = match r.expect_head_seq {
            0 => None,
            seq => Some(crate::audit::parse_head(signed(seq), &r.expect_head_mac)?),
        };
        let v = self.engine.verify_audit(expected).await?;
        let head = v.head.clone();
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: v.first_bad.is_none(),
            checked: u64::try_from(v.checked).unwrap_or(0),
            first_bad_seq: v
                .first_bad
                .as_ref()
                .map_or(0, |(s, _)| u64::try_from(*s).unwrap_or(0)),
            problem: v.first_bad.map(|(_, p)| p).unwrap_or_default(),
            head_seq: head
                .as_ref()
                .map_or(0, |h| u64::try_from(h.seq).unwrap_or(0)),
            head_mac: head.map(|h| h.mac).unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_behalf_of_is_kept_only_when_plain() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(on_behalf_of(&md), None);
        md.insert(
            "x-rekey-on-behalf-of",
            "vault:approle/entity=7a1b-2c".parse().unwrap(),
        );
        assert_eq!(on_behalf_of(&md), Some("vault:approle/entity=7a1b-2c"));
        md.insert("x-rekey-on-behalf-of", "alice; drop".parse().unwrap());
        assert_eq!(on_behalf_of(&md), None);
        md.insert("x-rekey-on-behalf-of", "a".repeat(161).parse().unwrap());
        assert_eq!(on_behalf_of(&md), None);
    }
}
