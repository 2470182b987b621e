//! Rotation state, request tokens, consumer reports and re-encryption
//! progress.

use super::rows::RequestTokenRow;
use super::{Conn, ConsumerRow, ReencryptionRow, Result, RotationRow, RotationStep, Store};

impl Store {
    pub(crate) async fn insert_rotation(&self, c: &mut Conn, r: &RotationRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO rotations ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            RotationRow::columns()
        ))
        .bind(&r.secret_id)
        .bind(r.target_version)
        .bind(r.step.as_str())
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
    pub(crate) async fn advance_rotation(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
        from: RotationStep,
        to: RotationStep,
        error: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE rotations SET step = $1, error = $2, updated_at_ms = $3 WHERE secret_id = $4 AND target_version = $5 AND step = $6",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(crate::clock::now_ms())
        .bind(secret_id)
        .bind(version)
        .bind(from.as_str())
        .execute(c)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Marks the rotation to `version` finished (from tested).
    pub(crate) async fn finish_rotation(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
    ) -> Result<bool> {
        self.advance_rotation(
            c,
            secret_id,
            version,
            RotationStep::Tested,
            RotationStep::Finished,
            "",
        )
        .await
    }

    pub(crate) async fn get_rotation(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<RotationRow>> {
        let q = format!(
            "SELECT {} FROM rotations WHERE secret_id = $1 AND target_version = $2",
            RotationRow::columns()
        );
        super::row_by(c, &q, secret_id, version).await
    }

    /// The most recent rotation of a secret.
    pub(crate) async fn last_rotation(
        &self,
        c: &mut Conn,
        secret_id: &str,
    ) -> Result<Option<RotationRow>> {
        let q = format!(
            "SELECT {} FROM rotations WHERE secret_id = $1 ORDER BY target_version DESC LIMIT 1",
            RotationRow::columns()
        );
        Ok(sqlx::query_as(&q).bind(secret_id).fetch_optional(c).await?)
    }

    /// Rotations that started and neither finished nor stopped.
    pub(crate) async fn unfinished_rotations(&self, c: &mut Conn) -> Result<Vec<RotationRow>> {
        let steps = RotationStep::IN_FLIGHT.map(|s| format!("'{}'", s.as_str()));
        let q = format!(
            "SELECT {} FROM rotations WHERE step IN ({}) ORDER BY started_at_ms",
            RotationRow::columns(),
            steps.join(", ")
        );
        Ok(sqlx::query_as(&q).fetch_all(c).await?)
    }

    /// (input fingerprint, version) recorded for a request token.
    pub(crate) async fn get_request_token(
        &self,
        c: &mut Conn,
        secret_id: &str,
        token: &str,
    ) -> Result<Option<(String, i64)>> {
        let row: Option<RequestTokenRow> = sqlx::query_as(&format!(
            "SELECT {} FROM request_tokens WHERE secret_id = $1 AND token = $2",
            RequestTokenRow::columns()
        ))
        .bind(secret_id)
        .bind(token)
        .fetch_optional(c)
        .await?;
        Ok(row.map(|r| (r.input_fp, r.version)))
    }

    pub(crate) async fn insert_request_token(
        &self,
        c: &mut Conn,
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

    /// Writes consumer rows, each replacing the row of its (consumer,
    /// secret) when the same identity wrote it, or when that row was last
    /// reported before `live_since_ms` (a consumer that is not live holds
    /// nothing back, so its id may pass to another identity); many rows
    /// to a statement. No two rows may share a key.
    pub(crate) async fn upsert_consumers(
        &self,
        c: &mut Conn,
        rows: &[&ConsumerRow],
        live_since_ms: i64,
    ) -> Result<()> {
        for chunk in rows.chunks(super::CONSUMERS_PER_STATEMENT) {
            let values = (0..chunk.len())
                .map(|i| {
                    let p: Vec<String> = (1..=9).map(|k| format!("${}", i * 9 + k)).collect();
                    format!("({})", p.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO consumers ({}) VALUES {values} \
                 ON CONFLICT (consumer_id, secret_id) DO UPDATE SET pod = excluded.pod, namespace = excluded.namespace, \
                 identity = excluded.identity, version = excluded.version, healthy = excluded.healthy, \
                 error = excluded.error, reported_at_ms = excluded.reported_at_ms \
                 WHERE consumers.identity = excluded.identity OR consumers.reported_at_ms < ${}",
                ConsumerRow::columns(),
                chunk.len() * 9 + 1
            );
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(&r.consumer_id)
                    .bind(&r.secret_id)
                    .bind(&r.pod)
                    .bind(&r.namespace)
                    .bind(&r.identity)
                    .bind(r.version)
                    .bind(i64::from(r.healthy))
                    .bind(&r.error)
                    .bind(r.reported_at_ms);
            }
            q.bind(live_since_ms).execute(&mut *c).await?;
        }
        Ok(())
    }

    /// Forgets a consumer of one secret, if `identity` owns its row.
    pub(crate) async fn delete_consumer(
        &self,
        c: &mut Conn,
        consumer_id: &str,
        secret_id: &str,
        identity: &str,
    ) -> Result<()> {
        sqlx::query(
            "DELETE FROM consumers WHERE consumer_id = $1 AND secret_id = $2 AND identity = $3",
        )
        .bind(consumer_id)
        .bind(secret_id)
        .bind(identity)
        .execute(c)
        .await?;
        Ok(())
    }

    /// Ids of secrets that any consumer has reported on.
    pub(crate) async fn consumed_secret_ids(&self, c: &mut Conn) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT DISTINCT secret_id FROM consumers ORDER BY secret_id")
                .fetch_all(c)
                .await?,
        )
    }

    /// The secrets whose row for `consumer_id` another identity than
    /// `identity` owns and reported at `live_since_ms` or later.
    pub(crate) async fn consumers_owned_by_others(
        &self,
        c: &mut Conn,
        consumer_id: &str,
        identity: &str,
        live_since_ms: i64,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT secret_id FROM consumers WHERE consumer_id = $1 AND identity <> $2 \
             AND reported_at_ms >= $3 ORDER BY secret_id",
        )
        .bind(consumer_id)
        .bind(identity)
        .bind(live_since_ms)
        .fetch_all(c)
        .await?)
    }

    pub(crate) async fn consumers(
        &self,
        c: &mut Conn,
        secret_id: &str,
    ) -> Result<Vec<ConsumerRow>> {
        let q = format!(
            "SELECT {} FROM consumers WHERE secret_id = $1 ORDER BY consumer_id",
            ConsumerRow::columns()
        );
        Ok(sqlx::query_as(&q).bind(secret_id).fetch_all(c).await?)
    }

    /// Records progress; once a run is reported finished it stays finished.
    pub(crate) async fn upsert_reencryption(
        &self,
        c: &mut Conn,
        r: &ReencryptionRow,
    ) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO reencryptions ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (secret_id, version) DO UPDATE SET consumer_id = excluded.consumer_id, rows_done = excluded.rows_done, \
             rows_total = excluded.rows_total, rate_milli = excluded.rate_milli, \
             finished = CASE WHEN reencryptions.finished = 1 THEN 1 ELSE excluded.finished END, \
             phase = excluded.phase, updated_at_ms = excluded.updated_at_ms",
            ReencryptionRow::columns()
        ))
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

    pub(crate) async fn reencryption(
        &self,
        c: &mut Conn,
        secret_id: &str,
        version: i64,
    ) -> Result<Option<ReencryptionRow>> {
        let q = format!(
            "SELECT {} FROM reencryptions WHERE secret_id = $1 AND version = $2",
            ReencryptionRow::columns()
        );
        super::row_by(c, &q, secret_id, version).await
    }
}
