//! The `rekey.v1.Rekey` gRPC service: authentication, policy, audit of
//! refusals, and translation between messages and the engine.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use rekey_proto::v1 as pb;
use rekey_proto::v1::rekey_server::Rekey;
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt, StreamMap, wrappers::WatchStream};
use tonic::{Request, Response, Status};

use crate::audit::{self, NewEvent};
use crate::auth::{Auth, Identity, Operation};
use crate::convert;
use crate::engine::{Actor, CreateSpec, Engine, Outcome, now_ms};
use crate::error::{Error, Result};
use crate::store::{ACTIVE, ConsumerRow};

pub struct RekeyService {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    /// Flips to `true` at shutdown; open Watch streams end then.
    shutdown: watch::Receiver<bool>,
}

impl RekeyService {
    pub fn new(engine: Arc<Engine>, auth: Arc<Auth>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            engine,
            auth,
            shutdown,
        }
    }

    /// Authenticates the caller and builds its audit actor.
    fn caller<T>(&self, req: &Request<T>) -> Result<(Identity, Actor)> {
        let cert_identity = req
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| crate::auth::cert_common_name(c)));
        let request_id = req
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(crate::engine::new_request_id);
        match self
            .auth
            .authenticate(req.metadata(), cert_identity, now_ms())
        {
            Ok(id) => {
                let actor = Actor {
                    identity: id.0.clone(),
                    request_id,
                };
                Ok((id, actor))
            }
            Err(e) => {
                tracing::info!(request_id = %request_id, error = %e, "unauthenticated call");
                Err(e)
            }
        }
    }

    /// Records a refused or failed call that would have changed or revealed
    /// something. Events carry the error message, which never holds a value.
    async fn record_failure(
        &self,
        actor: &Actor,
        action: &str,
        secret: &str,
        version: i64,
        e: &Error,
    ) {
        let ev = NewEvent {
            actor: actor.identity.clone(),
            action: action.into(),
            secret_id: secret.into(),
            version,
            outcome: e.outcome().into(),
            request_id: actor.request_id.clone(),
            detail: e.to_string(),
        };
        if let Err(err) = audit::append(&self.engine.store, ev, now_ms()).await {
            tracing::error!(error = %err, "cannot append audit event");
        }
    }

    /// Runs a changing call: authorize, run, audit a refusal.
    async fn changing<T, F, Fut>(
        &self,
        caller: Result<(Identity, Actor)>,
        op: Operation,
        secret: &str,
        version: i64,
        run: F,
    ) -> std::result::Result<T, Status>
    where
        F: FnOnce(Actor) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (who, actor) = match caller {
            Ok(x) => x,
            Err(e) => {
                let anon = Actor::system("anonymous");
                self.record_failure(&anon, op.name(), secret, version, &e)
                    .await;
                return Err(e.into());
            }
        };
        if let Err(e) = self.auth.authorize(&who, op, secret) {
            self.record_failure(&actor, op.name(), secret, version, &e)
                .await;
            return Err(e.into());
        }
        match run(actor.clone()).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // A rotation that failed in a step recorded its own event.
                if !(op == Operation::Rotate && matches!(e, Error::Step { .. })) {
                    self.record_failure(&actor, op.name(), secret, version, &e)
                        .await;
                }
                tracing::info!(secret, action = op.name(), error = %e, "call refused or failed");
                Err(e.into())
            }
        }
    }

    fn outcome_parts(&self, o: &Outcome) -> (pb::Secret, pb::Version) {
        (
            convert::secret(&o.secret),
            convert::version(&o.secret, &o.version, None),
        )
    }
}

fn opt_value(v: Option<&pb::SecretValue>) -> Result<Option<rekey_keyring::SecretValue>> {
    v.map(convert::value_from_pb).transpose()
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

#[tonic::async_trait]
impl Rekey for RekeyService {
    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> std::result::Result<Response<pb::CreateSecretResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let options = serde_json::json!({
            "random": r.random.as_ref().map(|o| {
                let mut m = serde_json::Map::new();
                // 0 means "the default length" on the wire.
                if o.length > 0 { m.insert("length".into(), o.length.into()); }
                if !o.encoding.is_empty() { m.insert("encoding".into(), o.encoding.clone().into()); }
                serde_json::Value::Object(m)
            }),
            "postgres": r.postgres.as_ref().map(|p| serde_json::json!({
                "admin_url_file": p.admin_url_file,
                "group_role": p.group_role,
                "role_base": p.role_base,
                "database": p.database,
                "host": p.host,
                "port": p.port,
                "probe": p.probe,
                "terminate_sessions": p.terminate_sessions,
            })),
            "redis": r.redis.as_ref().map(|p| serde_json::json!({
                "admin_url_file": p.admin_url_file,
                "username": p.username,
                "address": p.address,
            })),
            "exec": r.exec.as_ref().map(|p| serde_json::json!({
                "create": p.create,
                "set": p.set,
                "test": p.test,
                "revoke": p.revoke,
                "timeout_ms": p.timeout_ms,
            })),
        });
        let sched = r.schedule.clone().unwrap_or_default();
        let id = r.id.clone();
        let o = self
            .changing(caller, Operation::Create, &id, 1, |actor| async move {
                let spec = CreateSpec {
                    id: r.id.clone(),
                    kind: r.kind.clone(),
                    options,
                    schedule_spec: sched.spec,
                    rotation_window_ms: sched.rotation_window_ms,
                    jitter_ms: sched.jitter_ms,
                    min_interval_ms: sched.min_interval_ms,
                    next_override_ms: sched.next_rotation_at_ms,
                    validation_window_ms: r
                        .validation_window_ms
                        .unwrap_or(crate::engine::DEFAULT_VALIDATION_WINDOW_MS),
                    value: opt_value(r.value.as_ref())?,
                };
                self.engine.create_secret(&actor, spec).await
            })
            .await?;
        let (secret, version) = self.outcome_parts(&o);
        Ok(Response::new(pb::CreateSecretResponse {
            secret: Some(secret),
            version: Some(version),
        }))
    }

    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> std::result::Result<Response<pb::RotateResponse>, Status> {
        let caller = self.caller(&request);
        let r = &request.into_inner();
        let o = self
            .changing(
                caller,
                Operation::Rotate,
                &r.secret_id,
                0,
                |actor| async move {
                    if r.cancel {
                        return self.engine.cancel(&actor, &r.secret_id).await;
                    }
                    let token = Some(r.request_token.as_str()).filter(|t| !t.is_empty());
                    self.engine
                        .rotate(&actor, &r.secret_id, token, opt_value(r.value.as_ref())?)
                        .await
                },
            )
            .await?;
        let (secret, version) = self.outcome_parts(&o);
        Ok(Response::new(pb::RotateResponse {
            secret: Some(secret),
            version: Some(version),
            replayed: o.replayed,
        }))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> std::result::Result<Response<pb::RevokeResponse>, Status> {
        let caller = self.caller(&request);
        let r = &request.into_inner();
        let o = self
            .changing(
                caller,
                Operation::Revoke,
                &r.secret_id,
                r.version as i64,
                |actor| async move {
                    if r.version == 0 {
                        return Err(Error::InvalidArgument("name the version to revoke".into()));
                    }
                    self.engine
                        .revoke(&actor, &r.secret_id, r.version as i64, r.force, &r.reason)
                        .await
                },
            )
            .await?;
        let (secret, version) = self.outcome_parts(&o);
        Ok(Response::new(pb::RevokeResponse {
            secret: Some(secret),
            version: Some(version),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> std::result::Result<Response<pb::RollbackResponse>, Status> {
        let caller = self.caller(&request);
        let r = &request.into_inner();
        let o = self
            .changing(
                caller,
                Operation::Rollback,
                &r.secret_id,
                0,
                |actor| async move { self.engine.rollback(&actor, &r.secret_id).await },
            )
            .await?;
        let (secret, version) = self.outcome_parts(&o);
        Ok(Response::new(pb::RollbackResponse {
            secret: Some(secret),
            version: Some(version),
        }))
    }

    async fn get_secret(
        &self,
        request: Request<pb::GetSecretRequest>,
    ) -> std::result::Result<Response<pb::GetSecretResponse>, Status> {
        let caller = self.caller(&request);
        let r = &request.into_inner();
        let store = &self.engine.store;
        let lookup = |who: Identity| async move {
            self.auth.authorize(&who, Operation::Read, &r.secret_id)?;
            let mut c = store.conn().await?;
            let s = store.require_secret(&mut c, &r.secret_id).await?;
            let n = match r.selector {
                Some(pb::get_secret_request::Selector::Version(v)) => v as i64,
                Some(pb::get_secret_request::Selector::Stage(st)) => {
                    let (label, n) = match pb::Stage::try_from(st).unwrap_or(pb::Stage::Unspecified)
                    {
                        pb::Stage::Previous => ("previous", s.previous_version),
                        pb::Stage::Pending => ("pending", s.pending_version),
                        _ => ("current", s.current_version),
                    };
                    if n == 0 {
                        return Err(Error::NotFound(format!(
                            "{} has no {label} version",
                            r.secret_id
                        )));
                    }
                    n
                }
                None => s.current_version,
            };
            let v = store.require_version(&mut c, &r.secret_id, n).await?;
            Ok::<_, Error>((s, v))
        };
        if !r.reveal {
            let (who, _) = caller?;
            let (s, v) = lookup(who).await?;
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
                |actor| async move {
                    let (s, v) = lookup(Identity(actor.identity.clone())).await?;
                    if v.state != ACTIVE {
                        return Err(Error::FailedPrecondition(format!(
                            "v{} of {} is revoked; its value is not revealed",
                            v.version, r.secret_id
                        )));
                    }
                    let mut c = store.conn().await?;
                    let value = store.version_value(&mut c, &r.secret_id, v.version).await?;
                    drop(c);
                    audit::append(
                        store,
                        NewEvent {
                            actor: actor.identity,
                            action: "reveal".into(),
                            secret_id: r.secret_id.clone(),
                            version: v.version,
                            outcome: "ok".into(),
                            request_id: actor.request_id,
                            detail: String::new(),
                        },
                        now_ms(),
                    )
                    .await?;
                    Ok((s, v, value))
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
    ) -> std::result::Result<Response<pb::ListVersionsResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        let r = request.into_inner();
        self.auth.authorize(&who, Operation::Read, &r.secret_id)?;
        let store = &self.engine.store;
        let mut c = store.conn().await.map_err(Status::from)?;
        let s = store.require_secret(&mut c, &r.secret_id).await?;
        let versions = store.list_versions(&mut c, &r.secret_id).await?;
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
    ) -> std::result::Result<Response<pb::ListSecretsResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        let r = request.into_inner();
        let store = &self.engine.store;
        let mut c = store.conn().await?;
        let secrets = store.list_secrets(&mut c, &r.prefix).await?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: secrets
                .iter()
                .filter(|s| self.auth.allows(&who, Operation::Read, &s.id))
                .map(convert::secret)
                .collect(),
        }))
    }

    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> std::result::Result<Response<Self::WatchStream>, Status> {
        let (who, actor) = self.caller(&request)?;
        let r = request.into_inner();
        let ids: Vec<String> = {
            let mut seen = HashSet::new();
            r.secret_ids
                .into_iter()
                .filter(|i| seen.insert(i.clone()))
                .collect()
        };
        if ids.is_empty() {
            return Err(Error::InvalidArgument("name at least one secret to watch".into()).into());
        }
        let mut map = StreamMap::new();
        for id in &ids {
            self.auth.authorize(&who, Operation::Watch, id)?;
            let rx = self.engine.hub.subscribe(id).await?;
            map.insert(id.clone(), WatchStream::new(rx));
        }
        tracing::debug!(identity = %actor.identity, secrets = ids.len(), "watch stream opened");
        let gauge = self.engine.metrics.watch_streams.clone();
        gauge.inc();
        let guard = StreamGauge(gauge);
        let mut first = HashSet::new();
        let events = map.filter_map(move |(id, snap)| {
            let _keep = &guard;
            let s = snap?;
            let snapshot = first.insert(id);
            Some(Some(Ok(pb::WatchEvent {
                secret: Some(s.secret.clone()),
                current: Some(s.current.clone()),
                previous: s.previous.clone(),
                snapshot,
                published_at_ms: s.published_at_ms,
            })))
        });
        // End every stream at shutdown so the server can drain.
        let stop = WatchStream::from_changes(self.shutdown.clone()).map(|_| None);
        let stream = events
            .merge(stop)
            .take_while(Option::is_some)
            .map(|e| e.unwrap_or_else(|| Err(Status::unavailable("shutting down"))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_status(
        &self,
        request: Request<pb::ReportStatusRequest>,
    ) -> std::result::Result<Response<pb::ReportStatusResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        let r = request.into_inner();
        if r.consumer_id.is_empty() || r.consumer_id.len() > 256 {
            return Err(
                Error::InvalidArgument("consumer_id must be 1 to 256 characters".into()).into(),
            );
        }
        for s in &r.secrets {
            self.auth.authorize(&who, Operation::Report, &s.secret_id)?;
        }
        let store = &self.engine.store;
        let now = now_ms();
        let mut tx = store.begin().await?;
        for s in &r.secrets {
            store
                .upsert_consumer(
                    &mut tx,
                    &ConsumerRow {
                        consumer_id: r.consumer_id.clone(),
                        secret_id: s.secret_id.clone(),
                        pod: r.pod.clone(),
                        namespace: r.namespace.clone(),
                        identity: who.0.clone(),
                        version: s.version as i64,
                        healthy: s.healthy,
                        error: s.error.chars().take(1000).collect(),
                        reported_at_ms: now,
                    },
                )
                .await?;
        }
        tx.commit().await.map_err(Error::from)?;
        self.engine
            .consumers_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(r.secrets.iter().map(|s| s.secret_id.clone()));
        Ok(Response::new(pb::ReportStatusResponse {}))
    }

    async fn report_reencryption(
        &self,
        request: Request<pb::ReportReencryptionRequest>,
    ) -> std::result::Result<Response<pb::ReportReencryptionResponse>, Status> {
        let (who, actor) = self.caller(&request)?;
        let r = request.into_inner();
        self.auth.authorize(&who, Operation::Report, &r.secret_id)?;
        let store = &self.engine.store;
        let mut c = store.conn().await?;
        let s = store.require_secret(&mut c, &r.secret_id).await?;
        store
            .require_version(&mut c, &r.secret_id, r.version as i64)
            .await?;
        let row = crate::store::ReencryptionRow {
            secret_id: r.secret_id.clone(),
            version: r.version as i64,
            consumer_id: r.consumer_id.chars().take(256).collect(),
            rows_done: r.rows_done as i64,
            rows_total: r.rows_total as i64,
            rate_milli: (r.rate.max(0.0) * 1000.0) as i64,
            finished: r.finished,
            phase: r.phase.chars().take(500).collect(),
            updated_at_ms: now_ms(),
        };
        store.upsert_reencryption(&mut c, &row).await?;
        drop(c);
        if r.finished {
            let ev = NewEvent {
                actor: actor.identity,
                action: "reencrypt".into(),
                secret_id: r.secret_id.clone(),
                version: r.version as i64,
                outcome: "ok".into(),
                request_id: actor.request_id,
                detail: format!("{} rows checked by {}", r.rows_done, row.consumer_id),
            };
            audit::append(store, ev, now_ms()).await?;
            tracing::info!(secret = %s.id, version = r.version, "re-encryption finished");
        }
        Ok(Response::new(pb::ReportReencryptionResponse {}))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> std::result::Result<Response<pb::GetStatusResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        let r = request.into_inner();
        let store = &self.engine.store;
        let ids: Vec<String> = if r.secret_id.is_empty() {
            let mut c = store.conn().await?;
            store
                .list_secrets(&mut c, "")
                .await?
                .into_iter()
                .map(|s| s.id)
                .filter(|id| self.auth.allows(&who, Operation::Read, id))
                .collect()
        } else {
            self.auth.authorize(&who, Operation::Read, &r.secret_id)?;
            vec![r.secret_id.clone()]
        };
        let mut out = Vec::new();
        for id in ids {
            out.push(self.engine.status(&id).await?);
        }
        Ok(Response::new(pb::GetStatusResponse { secrets: out }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> std::result::Result<Response<pb::ListAuditResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        let r = request.into_inner();
        // Listing every secret's events needs audit on every secret.
        self.auth.authorize(&who, Operation::Audit, &r.secret_id)?;
        let limit = if r.limit == 0 {
            1000
        } else {
            r.limit.min(10_000)
        } as i64;
        let mut c = self.engine.store.conn().await?;
        let events = audit::list(&mut c, &r.secret_id, r.after_seq as i64, limit).await?;
        Ok(Response::new(pb::ListAuditResponse {
            events: events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    seq: e.seq as u64,
                    time_ms: e.time_ms,
                    actor: e.actor,
                    action: e.action,
                    secret_id: e.secret_id,
                    version: e.version as u64,
                    outcome: e.outcome,
                    request_id: e.request_id,
                    detail: e.detail,
                    prev_hash: e.prev_hash,
                    hash: e.hash,
                })
                .collect(),
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> std::result::Result<Response<pb::VerifyAuditResponse>, Status> {
        let (who, _) = self.caller(&request)?;
        self.auth.authorize(&who, Operation::Audit, "")?;
        let mut c = self.engine.store.conn().await?;
        let v = audit::verify(&mut c).await?;
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: v.first_bad.is_none(),
            checked: v.checked as u64,
            first_bad_seq: v.first_bad.as_ref().map_or(0, |(s, _)| *s as u64),
            problem: v.first_bad.map(|(_, p)| p).unwrap_or_default(),
        }))
    }
}
