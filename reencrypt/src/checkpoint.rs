//! Checkpoints: where a run over one column stands, kept in the
//! re-encrypted database itself (`rekey_reencrypt_checkpoints`), so that a
//! run that stopped (a crash, a row under neither key, a new leader)
//! resumes after the last batch written instead of at the first row. The
//! sidecar task keys them by secret and version, the one-shot command by
//! its pair of keys.

use sqlx::PgPool;

use crate::Column;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS rekey_reencrypt_checkpoints (
    secret_id text NOT NULL,
    version bigint NOT NULL,
    table_name text NOT NULL,
    column_name text NOT NULL,
    pass text NOT NULL,
    last_id text,
    done boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (secret_id, version, table_name, column_name, pass)
)";

/// Creates the checkpoint table unless it exists. Runs that start together
/// race to create it; the loser's error is no error.
///
/// # Errors
///
/// The database's reason, when the table neither exists nor can be made.
pub async fn ensure_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    let exists = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT to_regclass('rekey_reencrypt_checkpoints') IS NOT NULL",
        )
        .fetch_one(pool)
        .await
    };
    if exists().await? {
        return Ok(());
    }
    match sqlx::query(SCHEMA).execute(pool).await {
        Ok(_) => Ok(()),
        Err(_) if exists().await? => Ok(()),
        Err(e) => Err(e),
    }
}

/// The checkpoints of one run: `run` and `version` name it, `pass` the
/// pass over the columns.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub pool: PgPool,
    pub run: String,
    pub version: i64,
}

impl Checkpoints {
    /// Where `col` stands in `pass`: the last id written and whether the
    /// column is done; `None` when the pass has not reached it.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn load(
        &self,
        col: &Column,
        pass: &str,
    ) -> Result<Option<(Option<String>, bool)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT last_id, done FROM rekey_reencrypt_checkpoints WHERE secret_id = $1 AND version = $2 AND table_name = $3 AND column_name = $4 AND pass = $5",
        )
        .bind(&self.run)
        .bind(self.version)
        .bind(&col.table)
        .bind(&col.column)
        .bind(pass)
        .fetch_optional(&self.pool)
        .await
    }

    /// Records that `col` is written up to `last_id` in `pass`.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn save(&self, col: &Column, pass: &str, last_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rekey_reencrypt_checkpoints (secret_id, version, table_name, column_name, pass, last_id) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (secret_id, version, table_name, column_name, pass) \
             DO UPDATE SET last_id = excluded.last_id, updated_at = now()",
        )
        .bind(&self.run)
        .bind(self.version)
        .bind(&col.table)
        .bind(&col.column)
        .bind(pass)
        .bind(last_id)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Records that `col` is done in `pass`.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn done(&self, col: &Column, pass: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rekey_reencrypt_checkpoints (secret_id, version, table_name, column_name, pass, done) VALUES ($1, $2, $3, $4, $5, true) \
             ON CONFLICT (secret_id, version, table_name, column_name, pass) DO UPDATE SET done = true, updated_at = now()",
        )
        .bind(&self.run)
        .bind(self.version)
        .bind(&col.table)
        .bind(&col.column)
        .bind(pass)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Forgets the run: the next one starts at the first row.
    ///
    /// # Errors
    ///
    /// When the database fails.
    pub async fn clear(&self) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM rekey_reencrypt_checkpoints WHERE secret_id = $1 AND version = $2")
            .bind(&self.run)
            .bind(self.version)
            .execute(&self.pool)
            .await
            .map(drop)
    }
}
