//! Secrets and version metadata.

use super::{Conn, Result, SecretRow, Store, VersionRow, VersionState};
use crate::error::Error;

impl Store {
    pub(crate) async fn get_secret(&self, c: &mut Conn, id: &str) -> Result<Option<SecretRow>> {
        let q = format!("SELECT {} FROM secrets WHERE id = $1", SecretRow::columns());
        Ok(sqlx::query_as(&q).bind(id).fetch_optional(c).await?)
    }

    pub(crate) async fn require_secret(&self, c: &mut Conn, id: &str) -> Result<SecretRow> {
        self.get_secret(c, id)
            .await?
            .ok_or_else(|| Error::not_found_secret(id))
    }

    /// Secrets whose id starts with `prefix`, by id.
    pub(crate) async fn list_secrets(&self, c: &mut Conn, prefix: &str) -> Result<Vec<SecretRow>> {
        let q = format!("SELECT {} FROM secrets ORDER BY id", SecretRow::columns());
        let rows: Vec<SecretRow> = sqlx::query_as(&q).fetch_all(c).await?;
        Ok(rows
            .into_iter()
            .filter(|s| s.id.starts_with(prefix))
            .collect())
    }

    /// Secrets whose scheduled rotation time has come.
    pub(crate) async fn due_secrets(&self, c: &mut Conn, now_ms: i64) -> Result<Vec<SecretRow>> {
        let q = format!(
            "SELECT {} FROM secrets WHERE next_rotation_at_ms > 0 AND next_rotation_at_ms <= $1 ORDER BY next_rotation_at_ms",
            SecretRow::columns()
        );
        Ok(sqlx::query_as(&q).bind(now_ms).fetch_all(c).await?)
    }

    /// Secrets with a previous version still active (decommission candidates).
    pub(crate) async fn secrets_with_previous(&self, c: &mut Conn) -> Result<Vec<SecretRow>> {
        let q = format!(
            "SELECT {} FROM secrets WHERE previous_version > 0",
            SecretRow::columns()
        );
        Ok(sqlx::query_as(&q).fetch_all(c).await?)
    }

    /// The secrets whose values a provider keeps, by id.
    pub(crate) async fn secrets_of(&self, c: &mut Conn, provider: &str) -> Result<Vec<SecretRow>> {
        let q = format!(
            "SELECT {} FROM secrets WHERE provider = $1 ORDER BY id",
            SecretRow::columns()
        );
        Ok(sqlx::query_as(&q).bind(provider).fetch_all(c).await?)
    }

    /// The secret a provider keeps at `path`, if rekey manages one there.
    pub(crate) async fn secret_at(
        &self,
        c: &mut Conn,
        provider: &str,
        path: &str,
    ) -> Result<Option<SecretRow>> {
        let q = format!(
            "SELECT {} FROM secrets WHERE provider = $1 AND provider_path = $2",
            SecretRow::columns()
        );
        super::row_by(c, &q, provider, path).await
    }

    pub(crate) async fn insert_secret(&self, c: &mut Conn, s: &SecretRow) -> Result<()> {
        let r = sqlx::query(&format!(
            "INSERT INTO secrets ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) ON CONFLICT (id) DO NOTHING",
            SecretRow::columns()
        ))
        .bind(&s.id)
        .bind(&s.kind)
        .bind(s.options.to_stored())
        .bind(&s.provider)
        .bind(&s.provider_path)
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
    /// The kind, options and provider never change after creation.
    pub(crate) async fn update_secret(
        &self,
        c: &mut Conn,
        s: &SecretRow,
        expected_revision: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE secrets SET schedule_spec = $1, rotation_window_ms = $2, \
             jitter_ms = $3, min_interval_ms = $4, next_override_ms = $5, validation_window_ms = $6, \
             current_version = $7, previous_version = $8, pending_version = $9, latest_version = $10, \
             next_rotation_at_ms = $11, last_rotated_at_ms = $12, revision = $13 \
             WHERE id = $14 AND revision = $15",
        )
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
    pub(crate) async fn claim_schedule(
        &self,
        c: &mut Conn,
        id: &str,
        old: i64,
        new: i64,
    ) -> Result<bool> {
        let q = "UPDATE secrets SET next_rotation_at_ms = $1 WHERE id = $2 AND next_rotation_at_ms = $3";
        let claimed = sqlx::query(q)
            .bind(new)
            .bind(id)
            .bind(old)
            .execute(c)
            .await?;
        Ok(claimed.rows_affected() == 1)
    }

    /// Records version `version`, active, whose value its provider finds
    /// by `value_ref`.
    pub(crate) async fn insert_version(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
        created_at_ms: i64,
        value_ref: &str,
    ) -> Result<VersionRow> {
        let row = VersionRow {
            secret_id: secret_id.into(),
            version,
            created_at_ms,
            state: VersionState::Active,
            revoked_at_ms: 0,
            value_ref: value_ref.into(),
            nodes: Vec::new(),
        };
        sqlx::query(&format!(
            "INSERT INTO versions ({}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            VersionRow::columns()
        ))
        .bind(&row.secret_id)
        .bind(row.version)
        .bind(row.created_at_ms)
        .bind(row.state.as_str())
        .bind(row.revoked_at_ms)
        .bind(&row.value_ref)
        .bind("[]")
        .execute(c)
        .await?;
        Ok(row)
    }

    /// Records the servers a version's value is on.
    pub(crate) async fn set_version_nodes(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
        nodes: &[String],
    ) -> Result<()> {
        let json = serde_json::to_string(nodes)
            .map_err(|e| Error::Internal(format!("server list: {e}")))?;
        sqlx::query("UPDATE versions SET nodes = $1 WHERE secret_id = $2 AND version = $3")
            .bind(json)
            .bind(secret_id)
            .bind(version)
            .execute(c)
            .await?;
        Ok(())
    }

    pub(crate) async fn get_version(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<VersionRow>> {
        let q = format!(
            "SELECT {} FROM versions WHERE secret_id = $1 AND version = $2",
            VersionRow::columns()
        );
        super::row_by(c, &q, secret_id, version).await
    }

    pub(crate) async fn require_version(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
    ) -> Result<VersionRow> {
        self.get_version(c, secret_id, version)
            .await?
            .ok_or_else(|| Error::NotFound(format!("version {version} of secret {secret_id}")))
    }

    /// The version whose value its provider finds by `value_ref`.
    pub(crate) async fn version_by_ref(
        &self,
        c: &mut Conn,
        secret_id: &str,
        value_ref: &str,
    ) -> Result<Option<VersionRow>> {
        let q = format!(
            "SELECT {} FROM versions WHERE secret_id = $1 AND value_ref = $2",
            VersionRow::columns()
        );
        super::row_by(c, &q, secret_id, value_ref).await
    }

    /// Newest first.
    pub(crate) async fn list_versions(
        &self,
        c: &mut Conn,
        secret_id: &str,
    ) -> Result<Vec<VersionRow>> {
        let q = format!(
            "SELECT {} FROM versions WHERE secret_id = $1 ORDER BY version DESC",
            VersionRow::columns()
        );
        Ok(sqlx::query_as(&q).bind(secret_id).fetch_all(c).await?)
    }

    pub(crate) async fn set_version_state(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
        state: VersionState,
        revoked_at_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE versions SET state = $1, revoked_at_ms = $2 WHERE secret_id = $3 AND version = $4",
        )
        .bind(state.as_str())
        .bind(revoked_at_ms)
        .bind(secret_id)
        .bind(version)
        .execute(c)
        .await?;
        Ok(())
    }

    /// Points a version at a new value reference (a provider that moves a
    /// value when it promotes or restores it).
    pub(crate) async fn set_value_ref(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
        value_ref: &str,
    ) -> Result<()> {
        sqlx::query("UPDATE versions SET value_ref = $1 WHERE secret_id = $2 AND version = $3")
            .bind(value_ref)
            .bind(secret_id)
            .bind(version)
            .execute(c)
            .await?;
        Ok(())
    }
}
