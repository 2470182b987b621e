//! Where a secret's values live: the [`ValueProvider`] seam.
//!
//! rekey's own store always keeps a secret's metadata, rotation state,
//! consumers and audit trail. Its values live with a provider: the
//! embedded one ([`embedded::Embedded`], values sealed in rekey's own
//! database) or one the operator already runs (HashiCorp Vault / OpenBao
//! KV v2, AWS Secrets Manager). The engine decides what happens and in
//! which order; a provider only stores and finds values.
//!
//! The operations follow the places values already live:
//! - **pending** never reaches where apps read: Vault keeps it off the KV
//!   path apps read (latest = current, written with check-and-set), AWS
//!   Secrets Manager labels it `AWSPENDING`;
//! - **promote** makes it current (a new latest KV version; moving
//!   `AWSCURRENT`, which moves `AWSPREVIOUS` with it);
//! - **roll back** makes an older value current again;
//! - **revoke** retires a value (destroy a KV version, drop its labels);
//! - **outside changes** (a hand edit in the Vault UI or the AWS console)
//!   are listed since a cursor, so rekey can take them as a new current
//!   version and deliver them.
//!
//! Every method must be safe to repeat: after a crash the engine runs a
//! step again. The engine never holds a store connection while it calls a
//! provider (the embedded one needs the connection itself on SQLite).

pub(crate) mod aws;
pub(crate) mod embedded;
pub(crate) mod vault;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rekey_keyring::SecretValue;

use crate::error::{Error, Result};

/// Where one secret's values are kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Location<'a> {
    pub(crate) secret_id: &'a str,
    /// The provider's own address for the secret (a KV path, a secret
    /// name); the embedded store uses the secret id.
    pub(crate) path: &'a str,
}

/// One stored value: rekey's version number and the provider's reference
/// to it (an opaque string rekey records and hands back).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored<'a> {
    pub(crate) version: i64,
    pub(crate) value_ref: &'a str,
}

/// A stage, as AWS Secrets Manager names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Current,
    Previous,
    Pending,
}

/// Which value to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which<'a> {
    Version(Stored<'a>),
    /// By stage, as AWS Secrets Manager's rotation contract reads
    /// `AWSCURRENT` and `AWSPENDING`; the engine itself always knows the
    /// version.
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the AWS rotation function reads by stage; the engine reads by version"
        )
    )]
    Stage(Stage),
}

/// A value that changed where the provider keeps it, not through rekey.
pub(crate) struct OutsideChange {
    pub(crate) value: SecretValue,
    /// The provider's reference to the new value.
    pub(crate) value_ref: String,
    /// What the provider says about it (a KV version, a version id); no value.
    pub(crate) note: String,
}

/// What a provider finds where it keeps a secret's current value.
pub(crate) enum Observed {
    /// The value rekey made current is still the one apps read.
    Unchanged,
    /// Someone changed it outside rekey.
    Changed(OutsideChange),
    /// What apps read is not a value that can be delivered (a deleted or
    /// destroyed latest version); said in words, without the value.
    Problem(String),
}
#[async_trait]
pub(crate) trait ValueProvider: Send + Sync {
    /// The name secrets refer to it by (`[[providers]] name`); empty for
    /// the embedded store.
    fn name(&self) -> &str;

    /// Stores `value` as version `version`, pending: nothing that reads the
    /// current value sees it. Returns the reference rekey records.
    async fn write_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<String>;

    /// Makes `new` current; `old` is the current it replaces, if any.
    /// Returns `new`'s reference from now on (a provider may move a value
    /// when it promotes it).
    async fn promote(
        &self,
        at: Location<'_>,
        new: Stored<'_>,
        old: Option<Stored<'_>>,
    ) -> Result<String>;

    /// Reads one value.
    async fn read(&self, at: Location<'_>, which: Which<'_>) -> Result<SecretValue>;

    /// Makes `to` (previous) current again in place of `from`. Returns
    /// `to`'s reference from now on.
    async fn roll_back(&self, at: Location<'_>, to: Stored<'_>, from: Stored<'_>)
    -> Result<String>;

    /// Retires a value that is neither current nor pending any more.
    async fn revoke(&self, at: Location<'_>, old: Stored<'_>) -> Result<()>;

    /// Drops a pending value whose rotation ended without it becoming
    /// current.
    async fn discard(&self, at: Location<'_>, pending: Stored<'_>) -> Result<()>;

    /// Looks at what apps read for one secret whose current value rekey
    /// knows as `current`. Providers that nobody else writes always answer
    /// [`Observed::Unchanged`].
    async fn observe(&self, at: Location<'_>, current: Stored<'_>) -> Result<Observed>;

    /// What already lives at a new secret's path, for it to take over as
    /// version 1 (with the reference rekey records); `None` when the path
    /// is free. Providers that refuse to take over a path answer `None`
    /// and refuse at the first write instead.
    async fn adopt(&self, _at: Location<'_>) -> Result<Option<OutsideChange>> {
        Ok(None)
    }

    /// Checks a path against the provider's own naming rules.
    fn check_path(&self, _path: &str) -> Result<()> {
        Ok(())
    }

    /// Where a secret keeps its values when `create` names no path.
    fn default_path(&self, secret_id: &str) -> String {
        secret_id.to_string()
    }

    /// A secret's path as the provider's own tools name it (`secret/rekey/db`
    /// for `vault kv get`), for audit events and messages.
    fn full_path(&self, path: &str) -> String {
        path.to_string()
    }

    /// How often [`ValueProvider::observe`] is worth asking.
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(10)
    }
}

/// The sealed copy in rekey's store behind a `pending:REF` reference (a
/// value an external provider does not hold yet); `None` for a reference
/// of the provider's own.
pub(crate) fn sealed_copy(v: Stored<'_>) -> Option<Stored<'_>> {
    Some(Stored {
        version: v.version,
        value_ref: v.value_ref.strip_prefix("pending:")?,
    })
}

/// Whether two values are the same, in constant time.
pub(crate) fn same_value(a: &SecretValue, b: &SecretValue) -> bool {
    rekey_keyring::ct_eq(a.to_storage_bytes().expose(), b.to_storage_bytes().expose())
}

/// The providers a backend knows, by name; `""` is the embedded store.
#[derive(Clone)]
pub(crate) struct Providers(BTreeMap<String, Arc<dyn ValueProvider>>);

impl Providers {
    /// The registry with the embedded store only.
    pub(crate) fn new(embedded: Arc<dyn ValueProvider>) -> Self {
        let mut p = Providers(BTreeMap::new());
        p.0.insert(String::new(), embedded);
        p
    }

    /// Adds (or replaces) the provider of that name.
    pub(crate) fn add(&mut self, p: Arc<dyn ValueProvider>) {
        self.0.insert(p.name().to_string(), p);
    }

    pub(crate) fn get(&self, name: &str) -> Result<Arc<dyn ValueProvider>> {
        self.0.get(name).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown provider {name:?} (configured: {})",
                self.0
                    .keys()
                    .filter(|k| !k.is_empty())
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// The providers that can change outside rekey (every one but the
    /// embedded store).
    pub(crate) fn external(&self) -> impl Iterator<Item = &Arc<dyn ValueProvider>> {
        self.0.iter().filter(|(k, _)| !k.is_empty()).map(|(_, p)| p)
    }
}
