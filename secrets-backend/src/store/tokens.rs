//! Tokens issued through the API.

use super::{Conn, Result, Store, TokenRow};

/// Meta key that moves on with every change to the tokens, so replicas
/// notice and reload them.
const REVISION: &str = "tokens_revision";

impl Store {
    pub(crate) async fn insert_token(&self, c: &mut Conn, t: &TokenRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO tokens ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            TokenRow::columns()
        ))
        .bind(&t.id)
        .bind(&t.identity)
        .bind(&t.sha256)
        .bind(serde_json::to_string(&t.prefixes).unwrap_or_default())
        .bind(serde_json::to_string(&t.operations).unwrap_or_default())
        .bind(t.created_at_ms)
        .bind(&t.created_by)
        .bind(t.expires_at_ms)
        .bind(t.revoked_at_ms)
        .execute(&mut *c)
        .await?;
        self.bump_tokens(c).await
    }

    /// Every issued token, oldest first.
    pub(crate) async fn tokens(&self, c: &mut Conn) -> Result<Vec<TokenRow>> {
        let q = format!(
            "SELECT {} FROM tokens ORDER BY created_at_ms, id",
            TokenRow::columns()
        );
        Ok(sqlx::query_as(&q).fetch_all(c).await?)
    }

    /// Marks a token revoked; `false` when there is no such token in force.
    pub(crate) async fn revoke_token(&self, c: &mut Conn, id: &str, now_ms: i64) -> Result<bool> {
        let done =
            sqlx::query("UPDATE tokens SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms = 0")
                .bind(now_ms)
                .bind(id)
                .execute(&mut *c)
                .await?
                .rows_affected()
                == 1;
        if done {
            self.bump_tokens(c).await?;
        }
        Ok(done)
    }

    /// A number that changes whenever a token is issued or revoked.
    pub(crate) async fn tokens_revision(&self, c: &mut Conn) -> Result<String> {
        Ok(super::meta_get(c, REVISION).await?.unwrap_or_default())
    }

    async fn bump_tokens(&self, c: &mut Conn) -> Result<()> {
        let next = self
            .tokens_revision(c)
            .await?
            .parse::<u64>()
            .unwrap_or(0)
            .saturating_add(1);
        super::meta_set(c, REVISION, &next.to_string()).await
    }
}
