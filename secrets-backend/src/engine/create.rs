//! Create: version 1, set and tested at its target before it is stored.

use std::time::Instant;

use rekey_keyring::SecretValue;

use super::{Actor, CreateSpec, Engine, Outcome, event, location, step_error, validate_id};
use crate::audit;
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::kinds::{Kind, SecretCtx};
use crate::provider::{Location, OutsideChange, Stored, ValueProvider};
use crate::schedule;
use crate::store::{SecretRow, VersionRow};

impl Engine {
    /// Where `provider` keeps a secret's values by default: its path
    /// prefix, followed by the secret id.
    pub(crate) fn provider_prefix(&self, provider: &str) -> Result<String> {
        Ok(self.providers.get(provider)?.default_path(""))
    }

    /// Creates a secret and stores version 1 as current (after the kind's
    /// set and test steps, so that a credential exists before anybody is
    /// handed it).
    pub(crate) async fn create_secret(&self, actor: &Actor, spec: CreateSpec) -> Result<Outcome> {
        let started = Instant::now();
        validate_id(&spec.id)?;
        let kind = self.kinds.get(&spec.kind)?;
        let provider = self.providers.get(&spec.provider)?;
        let mut spec = spec;
        if !spec.provider.is_empty() {
            spec.provider_path =
                provider_path(&spec.provider_path, || provider.default_path(&spec.id))?;
            provider.check_path(&spec.provider_path)?;
        } else if !spec.provider_path.is_empty() {
            return Err(Error::InvalidArgument(
                "a provider path needs a provider (--provider NAME)".into(),
            ));
        }
        let options = kind.check_options(&spec.options)?;
        check_schedule(&spec)?;
        if self
            .store
            .get_secret(&mut *self.store.conn().await?, &spec.id)
            .await?
            .is_some()
        {
            return Err(Error::AlreadyExists(format!("secret {}", spec.id)));
        }
        if !spec.provider.is_empty() {
            let mut c = self.store.conn().await?;
            if self
                .store
                .secret_at(&mut c, &spec.provider, &spec.provider_path)
                .await?
                .is_some()
            {
                // Which secret keeps it is not said: the caller may not
                // be allowed to read that one.
                return Err(Error::AlreadyExists(format!(
                    "{} keeps another rekey secret at {} already",
                    spec.provider, spec.provider_path
                )));
            }
        }
        let ctx = SecretCtx {
            id: &spec.id,
            options: &options,
        };
        if let Some(v) = &spec.value {
            self.check_size(&spec.id, v)?;
        }
        let here = Location {
            secret_id: &spec.id,
            path: &spec.provider_path,
        };
        let adopted = if spec.provider.is_empty() {
            None
        } else {
            provider.adopt(here).await?
        };
        let first = match adopted {
            Some(found) => {
                self.check_adopted(kind.as_ref(), &ctx, provider.as_ref(), &spec, &found)?;
                First::Adopted(found)
            }
            None => {
                Self::check_supplied(kind.as_ref(), &ctx, spec.value.as_ref())?;
                let value = kind.create(&ctx, None, spec.value.take()).await?;
                self.check_size(&spec.id, &value)?;
                let nodes = kind
                    .set(&ctx, &value, None)
                    .await
                    .map_err(|e| step_error(&spec.id, "set", e))?;
                kind.test(&ctx, &value)
                    .await
                    .map_err(|e| step_error(&spec.id, "test", e))?;
                First::Made(value, nodes.unwrap_or_default())
            }
        };

        let now = now_ms();
        let mut row = SecretRow {
            id: spec.id.clone(),
            kind: kind.name().into(),
            options,
            provider: spec.provider,
            provider_path: spec.provider_path,
            schedule_spec: spec.schedule_spec.trim().to_string(),
            rotation_window_ms: spec.rotation_window_ms,
            jitter_ms: spec.jitter_ms,
            min_interval_ms: spec.min_interval_ms,
            next_override_ms: spec.next_override_ms,
            validation_window_ms: spec.validation_window_ms,
            created_at_ms: now,
            current_version: 1,
            latest_version: 1,
            revision: 1,
            ..Default::default()
        };
        row.next_rotation_at_ms = schedule::next_rotation(&row, now)?;
        let at = location(&row);
        let (value_ref, detail, nodes) = match first {
            First::Adopted(found) => (
                found.value_ref,
                format!(
                    "kind {}; adopted from {}: {}",
                    row.kind, row.provider, found.note
                ),
                Vec::new(),
            ),
            First::Made(value, nodes) => {
                let pending = provider.write_pending(at, 1, &value).await?;
                let pending = Stored {
                    version: 1,
                    value_ref: &pending,
                };
                match provider.promote(at, pending, None).await {
                    Ok(r) => (r, format!("kind {}", row.kind), nodes),
                    Err(e) => {
                        if let Err(d) = provider.discard(at, pending).await {
                            tracing::warn!(secret = %row.id, error = %d, "the provider kept a value of a creation that failed");
                        }
                        return Err(e);
                    }
                }
            }
        };
        let (version, ev) = match self
            .record_created(actor, &row, &value_ref, &nodes, detail)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                // The reference is this call's own: nobody else uses it.
                let mine = Stored {
                    version: 1,
                    value_ref: &value_ref,
                };
                if let Err(d) = provider.discard(at, mine).await {
                    tracing::warn!(secret = %row.id, error = %d, "the provider kept a value of a creation that failed");
                }
                return Err(e);
            }
        };
        self.published(&ev);
        self.metrics.step("create", started.elapsed().as_secs_f64());
        tracing::info!(secret = %row.id, kind = %row.kind, version = 1, "secret created");
        self.refresh(&row.id).await;
        Ok(Outcome {
            secret: row,
            version,
            replayed: false,
        })
    }

    /// What a new secret takes over from its provider must suit its kind,
    /// and no value may be supplied beside it.
    fn check_adopted(
        &self,
        kind: &dyn Kind,
        ctx: &SecretCtx<'_>,
        provider: &dyn ValueProvider,
        spec: &CreateSpec,
        found: &OutsideChange,
    ) -> Result<()> {
        let where_ = provider.full_path(&spec.provider_path);
        if spec.value.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{where_} already holds a value in {}; create adopts it, so leave out the value, or choose another --provider-path",
                spec.provider
            )));
        }
        self.check_size(&spec.id, &found.value)?;
        kind.check_value(ctx, &found.value).map_err(|e| {
            Error::InvalidArgument(format!(
                "{where_} already holds a value in {} that a {} secret cannot take over: {e}",
                spec.provider,
                kind.name()
            ))
        })
    }

    /// Records a new secret with version 1 current, and its audit event.
    async fn record_created(
        &self,
        actor: &Actor,
        row: &SecretRow,
        value_ref: &str,
        nodes: &[String],
        detail: String,
    ) -> Result<(VersionRow, audit::Event)> {
        let mut tx = self.store.begin().await?;
        self.store.insert_secret(&mut tx, row).await?;
        let mut version = self
            .store
            .insert_version(&mut tx, &row.id, 1, row.created_at_ms, value_ref)
            .await?;
        if !nodes.is_empty() {
            self.store
                .set_version_nodes(&mut tx, &row.id, 1, nodes)
                .await?;
            version.nodes = nodes.to_vec();
        }
        let ev = self
            .record(&mut tx, event(actor, "create", &row.id, 1, "ok", detail))
            .await?;
        tx.commit().await?;
        Ok((version, ev))
    }
}

/// Version 1 of a new secret: taken over from where its provider keeps it,
/// or made by its kind.
enum First {
    Adopted(OutsideChange),
    /// The value and the servers its kind's set left it on.
    Made(SecretValue, Vec<String>),
}

/// The path a provider keeps a new secret's values at: the one given, or
/// the provider's default; relative, without empty or dot segments.
fn provider_path(given: &str, default: impl FnOnce() -> String) -> Result<String> {
    let path = if given.is_empty() {
        default()
    } else {
        given.to_string()
    };
    if path.len() > 512
        || path.starts_with('/')
        || path.ends_with('/')
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || path.chars().any(|c| c.is_control())
    {
        return Err(Error::InvalidArgument(format!(
            "provider path {path:?} must be relative, without empty, . or .. segments"
        )));
    }
    Ok(path)
}

/// A schedule that parses, and windows that are not negative.
fn check_schedule(spec: &CreateSpec) -> Result<()> {
    schedule::parse(&spec.schedule_spec)?;
    for (name, v) in [
        ("validation window", spec.validation_window_ms),
        ("rotation window", spec.rotation_window_ms),
        ("jitter", spec.jitter_ms),
        ("minimum interval", spec.min_interval_ms),
    ] {
        if v < 0 {
            return Err(Error::InvalidArgument(format!(
                "{name} must not be negative"
            )));
        }
    }
    Ok(())
}
