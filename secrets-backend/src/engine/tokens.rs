//! Tokens issued through the API (`rekey token create`): an identity, the
//! operations it may do on secret-id prefixes, an optional expiry. Only
//! the token's SHA-256 is stored; the token itself is handed out once.
//! Issuing and revoking are audited, and reach every replica's
//! authentication without a restart.

use std::collections::BTreeSet;

use rekey_keyring::SecretString;

use super::{Actor, Engine, event};
use crate::auth::{ADMIN, IssuedToken, Operation};
use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::store::TokenRow;

/// What a new token may do.
pub(crate) struct TokenSpec {
    pub(crate) identity: String,
    pub(crate) prefixes: Vec<String>,
    pub(crate) operations: BTreeSet<Operation>,
    /// Unix ms; `None` never expires.
    pub(crate) expires_at_ms: Option<i64>,
}

fn check_spec(t: &TokenSpec, now: i64) -> Result<()> {
    if !crate::auth::valid_identity(&t.identity) {
        return Err(Error::InvalidArgument(
            "an identity is 1 to 128 letters, digits and - _ . @ :".into(),
        ));
    }
    if t.identity == ADMIN {
        return Err(Error::InvalidArgument(format!(
            "{ADMIN} is the bootstrap identity; issue tokens under another name"
        )));
    }
    if t.prefixes.is_empty() {
        return Err(Error::InvalidArgument(
            "name at least one secret-id prefix (--prefix; \"\" means every secret)".into(),
        ));
    }
    if t.operations.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "name at least one operation (--ops; of {})",
            Operation::ALL_NAMES.join(", ")
        )));
    }
    if t.expires_at_ms.is_some_and(|e| e <= now) {
        return Err(Error::InvalidArgument("the expiry is in the past".into()));
    }
    Ok(())
}

impl Engine {
    /// Issues a token; returns its record and the token, which is never
    /// stored or shown again.
    pub(crate) async fn create_token(
        &self,
        actor: &Actor,
        spec: TokenSpec,
    ) -> Result<(TokenRow, SecretString)> {
        let now = now_ms();
        check_spec(&spec, now)?;
        let raw = rekey_keyring::random_bytes(32)?;
        let token = SecretString::new(format!("rk_{}", hex::encode(raw.expose())));
        let row = TokenRow {
            id: format!(
                "tok_{}",
                hex::encode(rekey_keyring::random_bytes(4)?.expose())
            ),
            identity: spec.identity,
            sha256: hex::encode(crate::auth::token_digest(token.expose())),
            prefixes: spec.prefixes,
            operations: spec
                .operations
                .iter()
                .map(|o| o.name().to_string())
                .collect(),
            created_at_ms: now,
            created_by: actor.identity.clone(),
            expires_at_ms: spec.expires_at_ms.unwrap_or(0),
            revoked_at_ms: 0,
        };
        let mut tx = self.store.begin().await?;
        self.store.insert_token(&mut tx, &row).await?;
        let detail = format!(
            "{} for {}: {} on {}{}",
            row.id,
            row.identity,
            row.operations.join(","),
            row.prefixes
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(","),
            if row.expires_at_ms > 0 {
                format!(", expires {}", rekey_proto::format_time(row.expires_at_ms))
            } else {
                String::new()
            }
        );
        let ev = self
            .record(&mut tx, event(actor, "token-create", "", 0, "ok", detail))
            .await?;
        tx.commit().await?;
        self.published(&ev);
        tracing::info!(token = %row.id, identity = %row.identity, "token issued");
        Ok((row, token))
    }

    /// Every issued token, revoked ones included.
    pub(crate) async fn list_tokens(&self) -> Result<Vec<TokenRow>> {
        let mut c = self.store.conn().await?;
        self.store.tokens(&mut c).await
    }

    /// Revokes an issued token.
    pub(crate) async fn revoke_token(&self, actor: &Actor, id: &str) -> Result<TokenRow> {
        let mut tx = self.store.begin().await?;
        if !self.store.revoke_token(&mut tx, id, now_ms()).await? {
            return Err(Error::NotFound(format!("token {id} in force")));
        }
        let row = self
            .store
            .tokens(&mut tx)
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| Error::NotFound(format!("token {id}")))?;
        let detail = format!("{id} for {}", row.identity);
        let ev = self
            .record(&mut tx, event(actor, "token-revoke", "", 0, "ok", detail))
            .await?;
        tx.commit().await?;
        self.published(&ev);
        tracing::info!(token = id, identity = %row.identity, "token revoked");
        Ok(row)
    }

    /// The tokens in force for authentication, and the revision of the
    /// store's tokens they were read at.
    pub(crate) async fn issued_tokens(&self) -> Result<(String, Vec<IssuedToken>)> {
        let mut c = self.store.conn().await?;
        let revision = self.store.tokens_revision(&mut c).await?;
        let rows = self.store.tokens(&mut c).await?;
        let tokens = rows
            .into_iter()
            .filter(|t| t.revoked_at_ms == 0)
            .filter_map(|t| {
                let mut sha256 = [0u8; 32];
                hex::decode_to_slice(&t.sha256, &mut sha256).ok()?;
                Some(IssuedToken {
                    sha256,
                    prefixes: t.prefixes,
                    operations: t.operations.iter().filter_map(|o| o.parse().ok()).collect(),
                    expires_at_ms: (t.expires_at_ms > 0).then_some(t.expires_at_ms),
                    identity: t.identity,
                })
            })
            .collect();
        Ok((revision, tokens))
    }

    /// The revision of the store's tokens, cheap to poll.
    pub(crate) async fn tokens_revision(&self) -> Result<String> {
        let mut c = self.store.conn().await?;
        self.store.tokens_revision(&mut c).await
    }
}
