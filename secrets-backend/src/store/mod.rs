//! rekey's own store: secrets and their stage pointers, version metadata,
//! rotation state, consumers, re-encryption progress and the audit log, in
//! SQLite (embedded, the default) or Postgres (several backend replicas at
//! once), through one set of portable queries.
//!
//! Only the engine and the embedded value provider use it. Every change to
//! a secret row bumps its `revision`, and writers update with `WHERE
//! revision = $old`, so concurrent replicas never overwrite each other.
//! Values themselves live with a provider ([`crate::provider`]); the
//! embedded one keeps them here, sealed under the key-encryption key (KEK).

mod progress;
mod rows;
mod secrets;
mod tokens;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rekey_keyring::MasterKey;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::error::{Error, Result};

pub(crate) use rows::{
    ConsumerRow, ReencryptionRow, RotationRow, RotationStep, SecretRow, TokenRow, VersionRow,
    VersionState,
};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// Meta key of the canary sealed under the KEK.
const KEK_CHECK: &str = "kek_check";
/// The canary of stores written before meta rows were sealed.
const CANARY_LEGACY: &[u8] = b"rekey kek check";
/// The canary of stores whose meta rows carry MACs.
const CANARY_SEALED: &[u8] = b"rekey kek check/2: meta rows sealed";

/// What the canary says about a store, at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Canary {
    /// A new store: the canary was just written.
    Fresh,
    /// Written by a release before meta rows were sealed: its meta rows
    /// carry no MACs yet.
    Legacy,
    /// Its meta rows that verification depends on carry MACs.
    Sealed,
}

/// A meta row read with its MAC checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sealed {
    Absent,
    Valid(String),
    /// There, but its MAC does not hold: written without the KEK.
    Forged(String),
}

/// The Postgres channel that carries ids of changed secrets between replicas.
pub(crate) const NOTIFY_CHANNEL: &str = "rekey_changes";

/// Consumer rows written by one statement: 9 parameters a row, 900 a
/// statement, under every SQLite's limit.
pub(crate) const CONSUMERS_PER_STATEMENT: usize = 100;

/// A connection inside a transaction, or alone.
pub(crate) type Conn = AnyConnection;
/// A transaction; commits with `.commit()`, rolls back when dropped.
pub(crate) type Tx = sqlx::Transaction<'static, sqlx::Any>;

pub(crate) struct Store {
    pool: AnyPool,
    dialect: Dialect,
    kek: Arc<MasterKey>,
}

/// The schema, written once: the only dialect difference is the binary
/// type, `BLOB` in SQLite and `BYTEA` in Postgres.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "reencryption",
        include_str!("../../migrations/0002_reencryption.sql"),
    ),
    (
        3,
        "providers",
        include_str!("../../migrations/0003_providers.sql"),
    ),
    (
        4,
        "tokens",
        include_str!("../../migrations/0004_tokens.sql"),
    ),
    (5, "nodes", include_str!("../../migrations/0005_nodes.sql")),
    (
        6,
        "meta_mac",
        include_str!("../../migrations/0006_meta_mac.sql"),
    ),
];

fn migrator(dialect: Dialect) -> Migrator {
    migrator_of(dialect, MIGRATIONS)
}

fn migrator_of(dialect: Dialect, list: &[(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = list
        .iter()
        .map(|(v, name, sql)| {
            let sql = match dialect {
                Dialect::Sqlite => (*sql).to_string(),
                Dialect::Postgres => sql.replace(" BLOB ", " BYTEA "),
            };
            Migration::new(
                *v,
                Cow::Borrowed(*name),
                MigrationType::Simple,
                Cow::Owned(sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        ..Migrator::DEFAULT
    }
}

impl Store {
    /// Connects, creates the SQLite file (0600) when needed, runs migrations
    /// and checks that `kek` is the key this store was written with. In a
    /// new store, `first_use` runs before anything is sealed under `kek`
    /// (to save a key made for it).
    pub(crate) async fn open(
        url: &str,
        max_connections: u32,
        kek: Arc<MasterKey>,
        first_use: Option<impl FnOnce() -> Result<()>>,
    ) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        if dialect == Dialect::Sqlite
            && let Some(path) = sqlite_path(url)
        {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::Internal(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            if !path.exists() {
                create_private_file(&path)?;
            }
        }
        // A Postgres URL is read as libpq reads it (sslmode, sslrootcert,
        // sslcert / sslkey), and a failure to connect says which way TLS
        // went wrong.
        let pg = match dialect {
            Dialect::Postgres => Some(
                rekey_probe::postgres::PgUrl::parse(url)
                    .map_err(|e| Error::InvalidArgument(format!("store.url: {e}")))?,
            ),
            Dialect::Sqlite => None,
        };
        let opts: AnyConnectOptions = pg
            .as_ref()
            .map_or(url, |u| u.as_str())
            .parse()
            .map_err(|e: sqlx::Error| Error::InvalidArgument(format!("store.url: {e}")))?;
        let pool = AnyPoolOptions::new()
            // SQLite has one writer; a single connection also avoids
            // SQLITE_BUSY on read-to-write lock upgrades.
            .max_connections(match dialect {
                Dialect::Sqlite => 1,
                Dialect::Postgres => max_connections,
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // Write-ahead logging: readers never wait for the
                        // writer, and a commit is one append. Durability
                        // stays at synchronous=FULL.
                        sqlx::Executor::execute(&mut *conn, "PRAGMA journal_mode = WAL").await?;
                    }
                    Ok(())
                })
            })
            // A SQLite connection is a file, not a socket: nothing can
            // break it between uses, and a ping would cost a round trip
            // to its worker thread before every statement batch.
            .test_before_acquire(dialect == Dialect::Postgres)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(|e| match &pg {
                Some(u) => Error::StoreUnreachable(format!(
                    "cannot connect to {}: {}",
                    u.target(),
                    u.reason(&e)
                )),
                None => Error::from(e),
            })?;
        let store = Self { pool, dialect, kek };
        migrator(dialect).run(&store.pool).await?;
        let canary = store.check_kek(first_use).await?;
        crate::audit::migrate(&store, canary).await?;
        Ok(store)
    }

    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub(crate) fn kek(&self) -> &MasterKey {
        &self.kek
    }

    pub(crate) async fn begin(&self) -> Result<Tx> {
        Ok(self.pool.begin().await?)
    }

    pub(crate) async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
    }

    /// Closes every connection (at shutdown).
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }

    /// A canary sealed under the KEK tells a wrong KEK apart from corrupt
    /// data at start-up, before any request is served; which canary it is
    /// tells whether the store's meta rows are sealed ([`Canary`]). A store
    /// that holds data but no canary was altered: it is refused, and no
    /// new key is written over its data.
    async fn check_kek(&self, first_use: Option<impl FnOnce() -> Result<()>>) -> Result<Canary> {
        let mut c = self.conn().await?;
        if let Some(canary) = self.canary(&mut c).await? {
            return Ok(canary);
        }
        let held: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM secrets) + (SELECT COUNT(*) FROM audit) + (SELECT COUNT(*) FROM tokens)",
        )
        .fetch_one(&mut *c)
        .await?;
        if held > 0 {
            return Err(Error::FailedPrecondition(
                "the store holds data, but its key check (meta.kek_check) is gone: the store was altered. \
                 rekey neither starts on it nor writes a new key-encryption key over its data; \
                 restore the store (or that row) from a backup"
                    .into(),
            ));
        }
        if let Some(f) = first_use {
            f()?;
        }
        self.write_canary(&mut c).await?;
        Ok(Canary::Fresh)
    }

    /// The canary, opened: `None` when there is none.
    pub(crate) async fn canary(&self, c: &mut Conn) -> Result<Option<Canary>> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some(text) = meta_get(c, KEK_CHECK).await? else {
            return Ok(None);
        };
        let env = b64
            .decode(text)
            .map_err(|_| Error::Internal("meta.kek_check is not base64".into()))?;
        let key_id = rekey_keyring::envelope_key_id(&env).unwrap_or_default();
        match self.kek.open(&env, b"kek-check") {
            Ok(p) if p.expose() == CANARY_SEALED => Ok(Some(Canary::Sealed)),
            Ok(p) if p.expose() == CANARY_LEGACY => Ok(Some(Canary::Legacy)),
            _ => Err(Error::FailedPrecondition(format!(
                "the key-encryption key (id {}) is not the one this store was written with (id {key_id})",
                self.kek.id_hex()
            ))),
        }
    }

    /// Writes the canary the releases before sealed meta rows wrote, as
    /// such a store has it.
    #[cfg(test)]
    pub(crate) async fn write_legacy_canary(&self, c: &mut Conn) -> Result<()> {
        use base64::Engine as _;
        let env = self.kek.seal(CANARY_LEGACY, b"kek-check")?;
        meta_set(
            c,
            KEK_CHECK,
            &base64::engine::general_purpose::STANDARD.encode(env),
        )
        .await
    }

    /// Writes the canary of a store whose meta rows are sealed.
    pub(crate) async fn write_canary(&self, c: &mut Conn) -> Result<()> {
        use base64::Engine as _;
        let env = self.kek.seal(CANARY_SEALED, b"kek-check")?;
        let text = base64::engine::general_purpose::STANDARD.encode(env);
        self.sealed_set(c, KEK_CHECK, &text).await
    }

    /// A meta row that verification depends on, and whether its MAC holds.
    pub(crate) async fn sealed_get(&self, c: &mut Conn, key: &str) -> Result<Sealed> {
        let row = sqlx::query("SELECT value, mac FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(c)
            .await?;
        let Some(r) = row else {
            return Ok(Sealed::Absent);
        };
        let (value, mac): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        if rekey_keyring::ct_eq(self.meta_mac(key, &value).as_bytes(), mac.as_bytes()) {
            Ok(Sealed::Valid(value))
        } else {
            Ok(Sealed::Forged(value))
        }
    }

    /// Writes a meta row with its MAC.
    pub(crate) async fn sealed_set(&self, c: &mut Conn, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value, mac) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, mac = excluded.mac",
        )
        .bind(key)
        .bind(value)
        .bind(self.meta_mac(key, value))
        .execute(c)
        .await?;
        Ok(())
    }

    /// HMAC-SHA256 under a key derived from the KEK over a meta row's key
    /// and value: who can write the store but does not hold the KEK cannot
    /// make one.
    fn meta_mac(&self, key: &str, value: &str) -> String {
        let mut data = Vec::with_capacity(key.len() + 1 + value.len());
        data.extend_from_slice(key.as_bytes());
        data.push(0);
        data.extend_from_slice(value.as_bytes());
        hex::encode(self.kek.fingerprint(b"rekey.v1/meta", &data))
    }

    /// Tells other replicas (Postgres LISTEN/NOTIFY) that a secret changed;
    /// delivered when the surrounding transaction commits. Carries the id
    /// only, never a value.
    pub(crate) async fn notify(&self, c: &mut Conn, secret_id: &str) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(secret_id)
                .execute(c)
                .await?;
        }
        Ok(())
    }
}

/// The row `sql` selects by its two parameters, if there is one.
async fn row_by<'q, R, A, B>(c: &mut Conn, sql: &'q str, a: A, b: B) -> Result<Option<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> + Send + Unpin,
    A: 'q + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Send,
    B: 'q + sqlx::Encode<'q, sqlx::Any> + sqlx::Type<sqlx::Any> + Send,
{
    Ok(sqlx::query_as(sql)
        .bind(a)
        .bind(b)
        .fetch_optional(c)
        .await?)
}

pub(crate) async fn meta_get(c: &mut Conn, key: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
        .bind(key)
        .fetch_optional(c)
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    })
}

pub(crate) async fn meta_set(c: &mut Conn, key: &str, value: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(c)
    .await?;
    Ok(())
}

/// The file behind a `sqlite:` URL, if it names one.
pub(crate) fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(Path::new(path).to_path_buf())
}

/// Creates an empty file readable only by its owner.
fn create_private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rekey_keyring::MasterKey;

    use super::Store;

    pub(crate) fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rekey-store-test-{}-{}",
            std::process::id(),
            hex::encode(rekey_keyring::random_bytes(6).unwrap().expose())
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A SQLite store in `dir` under a fixed test KEK.
    pub(crate) async fn store_in(dir: &Path, kek_byte: u8) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        Store::open(
            &url,
            1,
            Arc::new(MasterKey::from_bytes(&[kek_byte; 32]).unwrap()),
            None::<fn() -> crate::error::Result<()>>,
        )
        .await
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{store_in, tempdir};
    use super::*;

    const NO_HOOK: Option<fn() -> Result<()>> = None;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://./rekey-data/rekey.db?mode=rwc"),
            Some("./rekey-data/rekey.db".into())
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x"), None);
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_mode() {
        let dir = tempdir();
        let store = store_in(&dir, 3).await;
        let mut c = store.conn().await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut *c)
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn a_wrong_kek_is_refused_at_open() {
        let dir = tempdir();
        drop(store_in(&dir, 3).await);
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let e = Store::open(
            &url,
            1,
            Arc::new(MasterKey::from_bytes(&[4; 32]).unwrap()),
            NO_HOOK,
        )
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("key-encryption key"), "{e}");
    }

    #[tokio::test]
    async fn revision_guards_concurrent_updates() {
        let dir = tempdir();
        let store = store_in(&dir, 3).await;
        let mut c = store.conn().await.unwrap();
        let mut s = SecretRow {
            id: "x".into(),
            kind: "random".into(),
            ..Default::default()
        };
        store.insert_secret(&mut c, &s).await.unwrap();
        assert!(matches!(
            store.insert_secret(&mut c, &s).await,
            Err(Error::AlreadyExists(_))
        ));
        s.revision = 1;
        assert!(store.update_secret(&mut c, &s, 0).await.unwrap());
        s.revision = 2;
        assert!(!store.update_secret(&mut c, &s, 0).await.unwrap());
        assert!(store.claim_schedule(&mut c, "x", 0, 10).await.unwrap());
        assert!(!store.claim_schedule(&mut c, "x", 0, 11).await.unwrap());
        assert_eq!(store.require_secret(&mut c, "x").await.unwrap().revision, 1);
    }

    #[tokio::test]
    async fn a_store_from_before_providers_keeps_its_values() {
        use crate::provider::{Location, Stored, ValueProvider, Which, embedded::Embedded};
        use rekey_keyring::{SecretBytes, SecretValue};
        let dir = tempdir();
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let kek = MasterKey::from_bytes(&[3; 32]).unwrap();
        {
            // A store as the previous release wrote it: values in `versions`.
            sqlx::any::install_default_drivers();
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap();
            migrator_of(Dialect::Sqlite, &MIGRATIONS[..2])
                .run(&pool)
                .await
                .unwrap();
            let value = SecretValue::Raw(SecretBytes::new(b"kept-value".to_vec()));
            let ct = kek
                .seal(value.to_storage_bytes().expose(), b"rekey.v1/value/a/b#1")
                .unwrap();
            sqlx::query("INSERT INTO secrets (id, kind, options, created_at_ms, current_version, latest_version) VALUES ('a/b', 'static', '{}', 1, 1, 1)")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query("INSERT INTO versions (secret_id, version, created_at_ms, state, kek_id, value_ct) VALUES ('a/b', 1, 1, 'active', 'k', $1)")
                .bind(ct)
                .execute(&pool)
                .await
                .unwrap();
            // Every release has written the KEK's canary.
            use base64::Engine as _;
            let canary = kek.seal(CANARY_LEGACY, b"kek-check").unwrap();
            sqlx::query("INSERT INTO meta (key, value) VALUES ('kek_check', $1)")
                .bind(base64::engine::general_purpose::STANDARD.encode(canary))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = Arc::new(Store::open(&url, 1, Arc::new(kek), NO_HOOK).await.unwrap());
        let v = {
            let mut c = store.conn().await.unwrap();
            store.require_version(&mut c, "a/b", 1).await.unwrap()
        };
        assert_eq!(v.value_ref, "v1");
        let got = Embedded::new(store)
            .read(
                Location {
                    secret_id: "a/b",
                    path: "a/b",
                },
                Which::Version(Stored {
                    version: 1,
                    value_ref: &v.value_ref,
                }),
            )
            .await
            .unwrap();
        assert_eq!(
            got,
            SecretValue::Raw(SecretBytes::new(b"kept-value".to_vec()))
        );
    }

    #[tokio::test]
    async fn rows_read_back_typed() {
        let dir = tempdir();
        let store = store_in(&dir, 3).await;
        let mut c = store.conn().await.unwrap();
        let s = SecretRow {
            id: "a/b".into(),
            kind: "static".into(),
            created_at_ms: 1,
            ..Default::default()
        };
        store.insert_secret(&mut c, &s).await.unwrap();
        store
            .insert_version(&mut c, "a/b", 1, 5, "ref-1")
            .await
            .unwrap();
        store
            .set_version_state(&mut c, "a/b", 1, VersionState::Revoked, 9)
            .await
            .unwrap();
        let v = store.require_version(&mut c, "a/b", 1).await.unwrap();
        assert_eq!(
            (v.state, v.revoked_at_ms, v.value_ref.as_str()),
            (VersionState::Revoked, 9, "ref-1")
        );
        let rot = RotationRow {
            secret_id: "a/b".into(),
            target_version: 2,
            step: RotationStep::Created,
            error: String::new(),
            actor: "t".into(),
            request_id: "r".into(),
            started_at_ms: 1,
            updated_at_ms: 1,
        };
        store.insert_rotation(&mut c, &rot).await.unwrap();
        assert!(
            store
                .advance_rotation(
                    &mut c,
                    "a/b",
                    2,
                    RotationStep::Created,
                    RotationStep::Set,
                    ""
                )
                .await
                .unwrap()
        );
        assert!(
            !store
                .advance_rotation(
                    &mut c,
                    "a/b",
                    2,
                    RotationStep::Created,
                    RotationStep::Set,
                    ""
                )
                .await
                .unwrap(),
            "a step moves once"
        );
        let unfinished = store.unfinished_rotations(&mut c).await.unwrap();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].step, RotationStep::Set);
        sqlx::query("UPDATE rotations SET step = 'half-done'")
            .execute(&mut *c)
            .await
            .unwrap();
        let e = store.last_rotation(&mut c, "a/b").await.unwrap_err();
        assert!(e.to_string().contains("half-done"), "{e}");
    }
}
