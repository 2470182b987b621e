//! Where versions live: SQLite (embedded, the default) or Postgres (several
//! backend replicas at once), through one set of portable queries.
//!
//! Values are sealed with AES-256-GCM under the key-encryption key (KEK)
//! before they reach the database, with the secret id and version as
//! associated data so that a ciphertext cannot be moved to another row.
//! Every change to a secret row bumps its `revision`, and writers update
//! with `WHERE revision = $old` so that concurrent replicas never overwrite
//! each other.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rekey_keyring::{MasterKey, SecretValue};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::error::{Error, Result};

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// The Postgres channel that carries ids of changed secrets between replicas.
pub const NOTIFY_CHANNEL: &str = "rekey_changes";

pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    kek: Arc<MasterKey>,
    url: String,
}

/// One secret's row: metadata and stage pointers. Version 0 means "none".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecretRow {
    pub id: String,
    pub kind: String,
    /// Kind options as JSON (e.g. `{"length":32,"encoding":"hex"}`).
    pub options: String,
    pub schedule_spec: String,
    pub rotation_window_ms: i64,
    pub jitter_ms: i64,
    pub min_interval_ms: i64,
    /// A one-off "next rotation at" chosen by an operator; 0 when none.
    pub next_override_ms: i64,
    pub validation_window_ms: i64,
    pub created_at_ms: i64,
    pub current_version: i64,
    pub previous_version: i64,
    pub pending_version: i64,
    /// The highest version number ever issued (versions only grow).
    pub latest_version: i64,
    pub next_rotation_at_ms: i64,
    pub last_rotated_at_ms: i64,
    pub revision: i64,
}

/// A version's metadata (never its value).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub secret_id: String,
    pub version: i64,
    pub created_at_ms: i64,
    /// `active` or `revoked`.
    pub state: String,
    pub revoked_at_ms: i64,
}

pub const ACTIVE: &str = "active";
pub const REVOKED: &str = "revoked";

/// A rotation in flight (or finished), one row per target version.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationRow {
    pub secret_id: String,
    pub target_version: i64,
    /// created, set, tested, finished, failed, aborted.
    pub step: String,
    pub error: String,
    pub actor: String,
    pub request_id: String,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerRow {
    pub consumer_id: String,
    pub secret_id: String,
    pub pod: String,
    pub namespace: String,
    pub identity: String,
    pub version: i64,
    pub healthy: bool,
    pub error: String,
    pub reported_at_ms: i64,
}

const SECRET_COLS: &str = "id, kind, options, schedule_spec, rotation_window_ms, jitter_ms, \
    min_interval_ms, next_override_ms, validation_window_ms, created_at_ms, current_version, \
    previous_version, pending_version, latest_version, next_rotation_at_ms, last_rotated_at_ms, \
    revision";

fn secret_from_row(r: &AnyRow) -> Result<SecretRow> {
    Ok(SecretRow {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        options: r.try_get(2)?,
        schedule_spec: r.try_get(3)?,
        rotation_window_ms: r.try_get(4)?,
        jitter_ms: r.try_get(5)?,
        min_interval_ms: r.try_get(6)?,
        next_override_ms: r.try_get(7)?,
        validation_window_ms: r.try_get(8)?,
        created_at_ms: r.try_get(9)?,
        current_version: r.try_get(10)?,
        previous_version: r.try_get(11)?,
        pending_version: r.try_get(12)?,
        latest_version: r.try_get(13)?,
        next_rotation_at_ms: r.try_get(14)?,
        last_rotated_at_ms: r.try_get(15)?,
        revision: r.try_get(16)?,
    })
}

const VERSION_COLS: &str = "secret_id, version, created_at_ms, state, revoked_at_ms";

fn version_from_row(r: &AnyRow) -> Result<VersionRow> {
    Ok(VersionRow {
        secret_id: r.try_get(0)?,
        version: r.try_get(1)?,
        created_at_ms: r.try_get(2)?,
        state: r.try_get(3)?,
        revoked_at_ms: r.try_get(4)?,
    })
}

const ROTATION_COLS: &str =
    "secret_id, target_version, step, error, actor, request_id, started_at_ms, updated_at_ms";

fn rotation_from_row(r: &AnyRow) -> Result<RotationRow> {
    Ok(RotationRow {
        secret_id: r.try_get(0)?,
        target_version: r.try_get(1)?,
        step: r.try_get(2)?,
        error: r.try_get(3)?,
        actor: r.try_get(4)?,
        request_id: r.try_get(5)?,
        started_at_ms: r.try_get(6)?,
        updated_at_ms: r.try_get(7)?,
    })
}

/// The schema, written once: the only dialect difference is the binary
/// type, `BLOB` in SQLite and `BYTEA` in Postgres.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "reencryption",
        include_str!("../migrations/0002_reencryption.sql"),
    ),
];

fn migrator(dialect: Dialect) -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(v, name, sql)| {
            let sql = match dialect {
                Dialect::Sqlite => sql.to_string(),
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

fn aad(secret_id: &str, version: i64) -> Vec<u8> {
    format!("rekey.v1/value/{secret_id}#{version}").into_bytes()
}

impl Store {
    /// Connects, creates the SQLite file (0600) when needed, runs migrations
    /// and checks that `kek` is the key this store was written with.
    pub async fn open(url: &str, max_connections: u32, kek: Arc<MasterKey>) -> Result<Self> {
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
        let opts: AnyConnectOptions = url
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
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        let store = Self {
            pool,
            dialect,
            kek,
            url: url.to_string(),
        };
        migrator(dialect).run(&store.pool).await?;
        store.check_kek().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kek(&self) -> &MasterKey {
        &self.kek
    }

    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(self.pool.begin().await?)
    }

    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
    }

    /// A canary sealed under the KEK tells a wrong KEK apart from corrupt
    /// data at start-up, before any request is served.
    async fn check_kek(&self) -> Result<()> {
        const CANARY: &[u8] = b"rekey kek check";
        let mut c = self.conn().await?;
        match meta_get(&mut c, "kek_check").await? {
            Some(b64) => {
                use base64::Engine as _;
                let env = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| Error::Internal("meta.kek_check is not base64".into()))?;
                let key_id = rekey_keyring::envelope_key_id(&env).unwrap_or_default();
                match self.kek.open(&env, b"kek-check") {
                    Ok(p) if p.expose() == CANARY => Ok(()),
                    _ => Err(Error::FailedPrecondition(format!(
                        "the key-encryption key (id {}) is not the one this store was written with (id {key_id})",
                        self.kek.id_hex()
                    ))),
                }
            }
            None => {
                use base64::Engine as _;
                let env = self.kek.seal(CANARY, b"kek-check")?;
                meta_set(
                    &mut c,
                    "kek_check",
                    &base64::engine::general_purpose::STANDARD.encode(env),
                )
                .await
            }
        }
    }

    /// Tells other replicas (Postgres LISTEN/NOTIFY) that a secret changed;
    /// delivered when the surrounding transaction commits. Carries the id
    /// only, never a value.
    pub async fn notify(&self, c: &mut AnyConnection, secret_id: &str) -> Result<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(secret_id)
                .execute(c)
                .await?;
        }
        Ok(())
    }

    pub async fn get_secret(&self, c: &mut AnyConnection, id: &str) -> Result<Option<SecretRow>> {
        let q = format!("SELECT {SECRET_COLS} FROM secrets WHERE id = $1");
        let row = sqlx::query(&q).bind(id).fetch_optional(c).await?;
        row.as_ref().map(secret_from_row).transpose()
    }

    pub async fn require_secret(&self, c: &mut AnyConnection, id: &str) -> Result<SecretRow> {
        self.get_secret(c, id)
            .await?
            .ok_or_else(|| Error::not_found_secret(id))
    }

    pub async fn list_secrets(
        &self,
        c: &mut AnyConnection,
        prefix: &str,
    ) -> Result<Vec<SecretRow>> {
        let q = format!("SELECT {SECRET_COLS} FROM secrets ORDER BY id");
        let rows = sqlx::query(&q).fetch_all(c).await?;
        rows.iter()
            .map(secret_from_row)
            .filter(|r| r.as_ref().map_or(true, |s| s.id.starts_with(prefix)))
            .collect()
    }

    /// Secrets whose scheduled rotation time has come.
    pub async fn due_secrets(&self, c: &mut AnyConnection, now_ms: i64) -> Result<Vec<SecretRow>> {
        let q = format!(
            "SELECT {SECRET_COLS} FROM secrets WHERE next_rotation_at_ms > 0 AND next_rotation_at_ms <= $1 ORDER BY next_rotation_at_ms"
        );
        let rows = sqlx::query(&q).bind(now_ms).fetch_all(c).await?;
        rows.iter().map(secret_from_row).collect()
    }

    /// Secrets with a previous version still active (decommission candidates).
    pub async fn secrets_with_previous(&self, c: &mut AnyConnection) -> Result<Vec<SecretRow>> {
        let q = format!("SELECT {SECRET_COLS} FROM secrets WHERE previous_version > 0");
        let rows = sqlx::query(&q).fetch_all(c).await?;
        rows.iter().map(secret_from_row).collect()
    }

    pub async fn insert_secret(&self, c: &mut AnyConnection, s: &SecretRow) -> Result<()> {
        let r = sqlx::query(&format!(
            "INSERT INTO secrets ({SECRET_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&s.id)
        .bind(&s.kind)
        .bind(&s.options)
        .bind(&s.schedule_spec)
        .bind(s.rotation_window_ms)
        .bind(s.jitter_ms)
        .bind(s.min_interval_ms)
        .bind(s.next_override_ms)
        .bind(s.validation_window_ms)
        .bind(s.created_at_ms)
        .bind(s.current_version)
        .bind(s.previous_version)
        .bind(s.pending_version)
        .bind(s.latest_version)
        .bind(s.next_rotation_at_ms)
        .bind(s.last_rotated_at_ms)
        .bind(s.revision)
        .execute(c)
        .await?;
        if r.rows_affected() == 0 {
            return Err(Error::AlreadyExists(format!("secret {}", s.id)));
        }
        Ok(())
    }

    /// Writes `s` (with `s.revision` already bumped) if the stored row still
    /// has `expected_revision`. `false` means another writer got there first.
    pub async fn update_secret(
        &self,
        c: &mut AnyConnection,
        s: &SecretRow,
        expected_revision: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE secrets SET options = $1, schedule_spec = $2, rotation_window_ms = $3, \
             jitter_ms = $4, min_interval_ms = $5, next_override_ms = $6, validation_window_ms = $7, \
             current_version = $8, previous_version = $9, pending_version = $10, latest_version = $11, \
             next_rotation_at_ms = $12, last_rotated_at_ms = $13, revision = $14 \
             WHERE id = $15 AND revision = $16",
        )
        .bind(&s.options)
        .bind(&s.schedule_spec)
        .bind(s.rotation_window_ms)
        .bind(s.jitter_ms)
        .bind(s.min_interval_ms)
        .bind(s.next_override_ms)
        .bind(s.validation_window_ms)
        .bind(s.current_version)
        .bind(s.previous_version)
        .bind(s.pending_version)
        .bind(s.latest_version)
        .bind(s.next_rotation_at_ms)
        .bind(s.last_rotated_at_ms)
        .bind(s.revision)
        .bind(&s.id)
        .bind(expected_revision)
        .execute(c)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves the scheduled time from `old` to `new` only if nobody else did:
    /// the replica whose update succeeds is the one that fires.
    pub async fn claim_schedule(
        &self,
        c: &mut AnyConnection,
        id: &str,
        old: i64,
        new: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE secrets SET next_rotation_at_ms = $1 WHERE id = $2 AND next_rotation_at_ms = $3",
        )
        .bind(new)
        .bind(id)
        .bind(old)
        .execute(c)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn insert_version(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
        created_at_ms: i64,
        value: &SecretValue,
    ) -> Result<VersionRow> {
        let plain = value.to_storage_bytes();
        let ct = self.kek.seal(plain.expose(), &aad(secret_id, version))?;
        sqlx::query(
            "INSERT INTO versions (secret_id, version, created_at_ms, state, revoked_at_ms, kek_id, value_ct) VALUES ($1, $2, $3, $4, 0, $5, $6)",
        )
        .bind(secret_id)
        .bind(version)
        .bind(created_at_ms)
        .bind(ACTIVE)
        .bind(self.kek.id_hex())
        .bind(ct)
        .execute(c)
        .await?;
        Ok(VersionRow {
            secret_id: secret_id.into(),
            version,
            created_at_ms,
            state: ACTIVE.into(),
            revoked_at_ms: 0,
        })
    }

    pub async fn get_version(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<VersionRow>> {
        let q =
            format!("SELECT {VERSION_COLS} FROM versions WHERE secret_id = $1 AND version = $2");
        let row = sqlx::query(&q)
            .bind(secret_id)
            .bind(version)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    pub async fn require_version(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
    ) -> Result<VersionRow> {
        self.get_version(c, secret_id, version)
            .await?
            .ok_or_else(|| Error::NotFound(format!("version {version} of secret {secret_id}")))
    }

    /// Newest first.
    pub async fn list_versions(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
    ) -> Result<Vec<VersionRow>> {
        let q = format!(
            "SELECT {VERSION_COLS} FROM versions WHERE secret_id = $1 ORDER BY version DESC"
        );
        let rows = sqlx::query(&q).bind(secret_id).fetch_all(c).await?;
        rows.iter().map(version_from_row).collect()
    }

    /// Decrypts one version's value.
    pub async fn version_value(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
    ) -> Result<SecretValue> {
        let row =
            sqlx::query("SELECT value_ct FROM versions WHERE secret_id = $1 AND version = $2")
                .bind(secret_id)
                .bind(version)
                .fetch_optional(c)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("version {version} of secret {secret_id}"))
                })?;
        let ct: Vec<u8> = row.try_get(0)?;
        let plain = self.kek.open(&ct, &aad(secret_id, version))?;
        SecretValue::from_storage_bytes(plain.expose()).ok_or_else(|| {
            Error::Internal(format!(
                "version {version} of secret {secret_id} has an unreadable value"
            ))
        })
    }

    pub async fn set_version_state(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
        state: &str,
        revoked_at_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE versions SET state = $1, revoked_at_ms = $2 WHERE secret_id = $3 AND version = $4",
        )
        .bind(state)
        .bind(revoked_at_ms)
        .bind(secret_id)
        .bind(version)
        .execute(c)
        .await?;
        Ok(())
    }

    pub async fn insert_rotation(&self, c: &mut AnyConnection, r: &RotationRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO rotations ({ROTATION_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&r.secret_id)
        .bind(r.target_version)
        .bind(&r.step)
        .bind(&r.error)
        .bind(&r.actor)
        .bind(&r.request_id)
        .bind(r.started_at_ms)
        .bind(r.updated_at_ms)
        .execute(c)
        .await?;
        Ok(())
    }

    /// Moves a rotation from step `from` to `to`; `false` when it was not at
    /// `from` (another replica advanced it).
    pub async fn advance_rotation(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
        from: &str,
        to: &str,
        error: &str,
    ) -> Result<bool> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let r = sqlx::query(
            "UPDATE rotations SET step = $1, error = $2, updated_at_ms = $3 WHERE secret_id = $4 AND target_version = $5 AND step = $6",
        )
        .bind(to)
        .bind(error)
        .bind(now_ms)
        .bind(secret_id)
        .bind(version)
        .bind(from)
        .execute(c)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn get_rotation(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<RotationRow>> {
        let q = format!(
            "SELECT {ROTATION_COLS} FROM rotations WHERE secret_id = $1 AND target_version = $2"
        );
        let row = sqlx::query(&q)
            .bind(secret_id)
            .bind(version)
            .fetch_optional(c)
            .await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    /// The most recent rotation of a secret.
    pub async fn last_rotation(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
    ) -> Result<Option<RotationRow>> {
        let q = format!(
            "SELECT {ROTATION_COLS} FROM rotations WHERE secret_id = $1 ORDER BY target_version DESC LIMIT 1"
        );
        let row = sqlx::query(&q).bind(secret_id).fetch_optional(c).await?;
        row.as_ref().map(rotation_from_row).transpose()
    }

    /// Rotations that started and neither finished nor failed.
    pub async fn unfinished_rotations(&self, c: &mut AnyConnection) -> Result<Vec<RotationRow>> {
        let q = format!(
            "SELECT {ROTATION_COLS} FROM rotations WHERE step IN ('created', 'set', 'tested') ORDER BY started_at_ms"
        );
        let rows = sqlx::query(&q).fetch_all(c).await?;
        rows.iter().map(rotation_from_row).collect()
    }

    /// (input fingerprint, version) recorded for a request token.
    pub async fn get_request_token(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        token: &str,
    ) -> Result<Option<(String, i64)>> {
        let row = sqlx::query(
            "SELECT input_fp, version FROM request_tokens WHERE secret_id = $1 AND token = $2",
        )
        .bind(secret_id)
        .bind(token)
        .fetch_optional(c)
        .await?;
        Ok(match row {
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
            None => None,
        })
    }

    pub async fn insert_request_token(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        token: &str,
        input_fp: &str,
        version: i64,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO request_tokens (secret_id, token, input_fp, version, created_at_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(secret_id)
        .bind(token)
        .bind(input_fp)
        .bind(version)
        .bind(now_ms)
        .execute(c)
        .await?;
        Ok(())
    }

    pub async fn upsert_consumer(&self, c: &mut AnyConnection, r: &ConsumerRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO consumers (consumer_id, secret_id, pod, namespace, identity, version, healthy, error, reported_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (consumer_id, secret_id) DO UPDATE SET pod = excluded.pod, namespace = excluded.namespace, \
             identity = excluded.identity, version = excluded.version, healthy = excluded.healthy, \
             error = excluded.error, reported_at_ms = excluded.reported_at_ms",
        )
        .bind(&r.consumer_id)
        .bind(&r.secret_id)
        .bind(&r.pod)
        .bind(&r.namespace)
        .bind(&r.identity)
        .bind(r.version)
        .bind(i64::from(r.healthy))
        .bind(&r.error)
        .bind(r.reported_at_ms)
        .execute(c)
        .await?;
        Ok(())
    }

    /// Ids of secrets that any consumer has reported on.
    pub async fn consumed_secret_ids(&self, c: &mut AnyConnection) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT DISTINCT secret_id FROM consumers ORDER BY secret_id")
            .fetch_all(c)
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    pub async fn consumers(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
    ) -> Result<Vec<ConsumerRow>> {
        let rows = sqlx::query(
            "SELECT consumer_id, secret_id, pod, namespace, identity, version, healthy, error, reported_at_ms \
             FROM consumers WHERE secret_id = $1 ORDER BY consumer_id",
        )
        .bind(secret_id)
        .fetch_all(c)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ConsumerRow {
                    consumer_id: r.try_get(0)?,
                    secret_id: r.try_get(1)?,
                    pod: r.try_get(2)?,
                    namespace: r.try_get(3)?,
                    identity: r.try_get(4)?,
                    version: r.try_get(5)?,
                    healthy: r.try_get::<i64, _>(6)? != 0,
                    error: r.try_get(7)?,
                    reported_at_ms: r.try_get(8)?,
                })
            })
            .collect()
    }
}

pub async fn meta_get(c: &mut AnyConnection, key: &str) -> Result<Option<String>> {
    let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
        .bind(key)
        .fetch_optional(c)
        .await?;
    Ok(match row {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    })
}

pub async fn meta_set(c: &mut AnyConnection, key: &str, value: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(c)
    .await?;
    Ok(())
}

/// Re-encryption progress towards one version of an encryption key.
#[derive(Debug, Clone, PartialEq)]
pub struct ReencryptionRow {
    pub secret_id: String,
    pub version: i64,
    pub consumer_id: String,
    pub rows_done: i64,
    pub rows_total: i64,
    /// Rows per second × 1000.
    pub rate_milli: i64,
    pub finished: bool,
    pub phase: String,
    pub updated_at_ms: i64,
}

impl Store {
    pub async fn upsert_reencryption(
        &self,
        c: &mut AnyConnection,
        r: &ReencryptionRow,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO reencryptions (secret_id, version, consumer_id, rows_done, rows_total, rate_milli, finished, phase, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (secret_id, version) DO UPDATE SET consumer_id = excluded.consumer_id, rows_done = excluded.rows_done, \
             rows_total = excluded.rows_total, rate_milli = excluded.rate_milli, \
             finished = CASE WHEN reencryptions.finished = 1 THEN 1 ELSE excluded.finished END, \
             phase = excluded.phase, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&r.secret_id)
        .bind(r.version)
        .bind(&r.consumer_id)
        .bind(r.rows_done)
        .bind(r.rows_total)
        .bind(r.rate_milli)
        .bind(i64::from(r.finished))
        .bind(&r.phase)
        .bind(r.updated_at_ms)
        .execute(c)
        .await?;
        Ok(())
    }

    pub async fn reencryption(
        &self,
        c: &mut AnyConnection,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<ReencryptionRow>> {
        let row = sqlx::query(
            "SELECT secret_id, version, consumer_id, rows_done, rows_total, rate_milli, finished, phase, updated_at_ms \
             FROM reencryptions WHERE secret_id = $1 AND version = $2",
        )
        .bind(secret_id)
        .bind(version)
        .fetch_optional(c)
        .await?;
        row.map(|r| {
            Ok(ReencryptionRow {
                secret_id: r.try_get(0)?,
                version: r.try_get(1)?,
                consumer_id: r.try_get(2)?,
                rows_done: r.try_get(3)?,
                rows_total: r.try_get(4)?,
                rate_milli: r.try_get(5)?,
                finished: r.try_get::<i64, _>(6)? != 0,
                phase: r.try_get(7)?,
                updated_at_ms: r.try_get(8)?,
            })
        })
        .transpose()
    }
}

/// The file behind a `sqlite:` URL, if it names one.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
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
pub fn create_private_file(path: &Path) -> Result<()> {
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
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://./rekey-data/rekey.db?mode=rwc"),
            Some("./rekey-data/rekey.db".into())
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x"), None);
    }

    use super::tests_support::tempdir;

    async fn temp_store(dir: &Path) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        Store::open(&url, 1, Arc::new(MasterKey::from_bytes(&[3; 32]).unwrap()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn values_are_sealed_and_bound_to_their_row() {
        let dir = tempdir();
        let store = temp_store(&dir).await;
        let mut c = store.conn().await.unwrap();
        let s = SecretRow {
            id: "a/b".into(),
            kind: "static".into(),
            options: "{}".into(),
            created_at_ms: 1,
            ..Default::default()
        };
        store.insert_secret(&mut c, &s).await.unwrap();
        assert!(matches!(
            store.insert_secret(&mut c, &s).await,
            Err(Error::AlreadyExists(_))
        ));
        let v = SecretValue::Raw(rekey_keyring::SecretBytes::new(b"needle-xyz".to_vec()));
        store.insert_version(&mut c, "a/b", 1, 5, &v).await.unwrap();
        store.insert_version(&mut c, "a/b", 2, 6, &v).await.unwrap();
        assert_eq!(store.version_value(&mut c, "a/b", 1).await.unwrap(), v);
        // Swap the ciphertexts of two versions: the AAD must refuse it.
        let ct1: Vec<u8> = sqlx::query("SELECT value_ct FROM versions WHERE version = 1")
            .fetch_one(&mut *c)
            .await
            .unwrap()
            .get(0);
        sqlx::query("UPDATE versions SET value_ct = $1 WHERE version = 2")
            .bind(ct1)
            .execute(&mut *c)
            .await
            .unwrap();
        assert!(store.version_value(&mut c, "a/b", 2).await.is_err());
        drop(c);
        let bytes = std::fs::read(dir.join("t.db")).unwrap();
        assert!(!bytes.windows(10).any(|w| w == b"needle-xyz"));
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_mode() {
        let dir = tempdir();
        let store = temp_store(&dir).await;
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
        drop(temp_store(&dir).await);
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let e = Store::open(&url, 1, Arc::new(MasterKey::from_bytes(&[4; 32]).unwrap()))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("key-encryption key"), "{e}");
    }

    #[tokio::test]
    async fn revision_guards_concurrent_updates() {
        let dir = tempdir();
        let store = temp_store(&dir).await;
        let mut c = store.conn().await.unwrap();
        let mut s = SecretRow {
            id: "x".into(),
            kind: "random".into(),
            options: "{}".into(),
            ..Default::default()
        };
        store.insert_secret(&mut c, &s).await.unwrap();
        s.revision = 1;
        assert!(store.update_secret(&mut c, &s, 0).await.unwrap());
        s.revision = 2;
        assert!(!store.update_secret(&mut c, &s, 0).await.unwrap());
        assert!(store.claim_schedule(&mut c, "x", 0, 10).await.unwrap());
        assert!(!store.claim_schedule(&mut c, "x", 0, 11).await.unwrap());
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rekey-store-test-{}-{}",
            std::process::id(),
            rekey_keyring::random_bytes(6)
                .unwrap()
                .expose()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
