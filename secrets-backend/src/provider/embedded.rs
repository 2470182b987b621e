//! The embedded provider: values in rekey's own database, sealed with
//! AES-256-GCM under the key-encryption key (KEK), with the secret id and
//! version as associated data so that a ciphertext cannot be moved to
//! another secret or version.
//!
//! Stage pointers live on the secret row, so promote and roll back change
//! nothing here; nobody writes this table but rekey, so there are never
//! outside changes.

use std::sync::Arc;

use async_trait::async_trait;
use rekey_keyring::SecretValue;
use sqlx::Row;

use super::{Location, Observed, Stage, Stored, ValueProvider, Which};
use crate::error::{Error, Result};
use crate::store::Store;

pub(crate) struct Embedded {
    store: Arc<Store>,
}

impl Embedded {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

fn aad(secret_id: &str, version: i64) -> Vec<u8> {
    format!("rekey.v1/value/{secret_id}#{version}").into_bytes()
}

impl Embedded {
    /// Seals `value` as version `version` of `secret_id` under `value_ref`,
    /// in place of what that reference held before.
    pub(crate) async fn keep(
        &self,
        secret_id: &str,
        version: i64,
        value_ref: &str,
        value: &SecretValue,
    ) -> Result<()> {
        let kek = self.store.kek();
        let ct = kek.seal(value.to_storage_bytes().expose(), &aad(secret_id, version))?;
        let mut c = self.store.conn().await?;
        sqlx::query(
            "INSERT INTO embedded_values (secret_id, value_ref, version, kek_id, value_ct, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (secret_id, value_ref) DO UPDATE SET version = excluded.version, kek_id = excluded.kek_id, value_ct = excluded.value_ct, created_at_ms = excluded.created_at_ms",
        )
        .bind(secret_id)
        .bind(value_ref)
        .bind(version)
        .bind(kek.id_hex())
        .bind(ct)
        .bind(crate::clock::now_ms())
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Drops every value kept for one version of a secret.
    pub(crate) async fn forget_version(&self, secret_id: &str, version: i64) -> Result<()> {
        let mut c = self.store.conn().await?;
        sqlx::query("DELETE FROM embedded_values WHERE secret_id = $1 AND version = $2")
            .bind(secret_id)
            .bind(version)
            .execute(&mut *c)
            .await?;
        Ok(())
    }

    /// The value kept under `value_ref`; when there is none, `fetch`es it
    /// from where an external provider keeps it and keeps it from now on.
    pub(crate) async fn kept_or<F, Fut>(
        &self,
        secret_id: &str,
        version: i64,
        value_ref: &str,
        fetch: F,
    ) -> Result<SecretValue>
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = Result<SecretValue>> + Send,
    {
        match self.open(secret_id, version, value_ref).await {
            Ok(v) => Ok(v),
            Err(Error::NotFound(_)) => {
                let value = fetch().await?;
                self.keep(secret_id, version, value_ref, &value).await?;
                Ok(value)
            }
            Err(e) => Err(e),
        }
    }

    async fn open(&self, secret_id: &str, version: i64, value_ref: &str) -> Result<SecretValue> {
        let mut c = self.store.conn().await?;
        let row = sqlx::query(
            "SELECT value_ct FROM embedded_values WHERE secret_id = $1 AND value_ref = $2 AND version = $3",
        )
        .bind(secret_id)
        .bind(value_ref)
        .bind(version)
        .fetch_optional(&mut *c)
        .await?
        .ok_or_else(|| Error::NotFound(format!("the value of v{version} of {secret_id}")))?;
        drop(c);
        let ct: Vec<u8> = row.try_get(0)?;
        let plain = self.store.kek().open(&ct, &aad(secret_id, version))?;
        SecretValue::from_storage_bytes(plain.expose()).ok_or_else(|| {
            Error::Internal(format!(
                "version {version} of secret {secret_id} has an unreadable value"
            ))
        })
    }
}

#[async_trait]
impl ValueProvider for Embedded {
    fn name(&self) -> &'static str {
        ""
    }

    async fn write_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<String> {
        // A fresh reference per write: two writers racing for one version
        // number never overwrite each other, and the loser's row is never
        // referenced.
        let value_ref = format!(
            "v{version}.{}",
            hex::encode(rekey_keyring::random_bytes(6)?.expose())
        );
        self.keep(at.secret_id, version, &value_ref, value).await?;
        Ok(value_ref)
    }

    async fn promote(
        &self,
        _: Location<'_>,
        new: Stored<'_>,
        _: Option<Stored<'_>>,
    ) -> Result<String> {
        Ok(new.value_ref.to_string())
    }

    async fn read(&self, at: Location<'_>, which: Which<'_>) -> Result<SecretValue> {
        match which {
            Which::Version(v) => self.open(at.secret_id, v.version, v.value_ref).await,
            Which::Stage(stage) => {
                let pointer = match stage {
                    Stage::Current => "current_version",
                    Stage::Previous => "previous_version",
                    Stage::Pending => "pending_version",
                };
                let mut c = self.store.conn().await?;
                let row = sqlx::query(&format!(
                    "SELECT v.version, v.value_ref FROM secrets s JOIN versions v \
                     ON v.secret_id = s.id AND v.version = s.{pointer} WHERE s.id = $1"
                ))
                .bind(at.secret_id)
                .fetch_optional(&mut *c)
                .await?
                .ok_or_else(|| Error::NotFound(format!("{} has no such stage", at.secret_id)))?;
                drop(c);
                let (version, value_ref): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
                self.open(at.secret_id, version, &value_ref).await
            }
        }
    }

    async fn roll_back(&self, _: Location<'_>, to: Stored<'_>, _: Stored<'_>) -> Result<String> {
        Ok(to.value_ref.to_string())
    }

    /// The ciphertext stays: a revoked version is never served or revealed,
    /// and its record keeps what was used when.
    async fn revoke(&self, _: Location<'_>, _: Stored<'_>) -> Result<()> {
        Ok(())
    }

    async fn discard(&self, at: Location<'_>, pending: Stored<'_>) -> Result<()> {
        let mut c = self.store.conn().await?;
        sqlx::query("DELETE FROM embedded_values WHERE secret_id = $1 AND value_ref = $2")
            .bind(at.secret_id)
            .bind(pending.value_ref)
            .execute(&mut *c)
            .await?;
        Ok(())
    }

    async fn observe(&self, _: Location<'_>, _: Stored<'_>) -> Result<Observed> {
        Ok(Observed::Unchanged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SecretRow;
    use crate::store::tests_support::{store_in, tempdir};
    use rekey_keyring::SecretBytes;

    #[tokio::test]
    async fn values_are_sealed_bound_to_their_version_and_found_by_stage() {
        let dir = tempdir();
        let store = Arc::new(store_in(&dir, 3).await);
        let p = Embedded::new(store.clone());
        let at = Location {
            secret_id: "a/b",
            path: "a/b",
        };
        let needle = SecretValue::Raw(SecretBytes::new(b"needle-xyz".to_vec()));
        let r1 = p.write_pending(at, 1, &needle).await.unwrap();
        let other = SecretValue::Raw(SecretBytes::new(b"other-value".to_vec()));
        let r2 = p.write_pending(at, 2, &other).await.unwrap();
        assert_ne!(r1, r2);
        let v1 = Stored {
            version: 1,
            value_ref: &r1,
        };
        assert_eq!(p.read(at, Which::Version(v1)).await.unwrap(), needle);
        let wrong = Stored {
            version: 2,
            value_ref: &r1,
        };
        assert!(
            p.read(at, Which::Version(wrong)).await.is_err(),
            "a reference answers only for its own version"
        );

        {
            let mut c = store.conn().await.unwrap();
            store
                .insert_secret(
                    &mut c,
                    &SecretRow {
                        id: "a/b".into(),
                        kind: "static".into(),
                        current_version: 2,
                        previous_version: 1,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            store
                .insert_version(&mut c, "a/b", 1, 1, &r1)
                .await
                .unwrap();
            store
                .insert_version(&mut c, "a/b", 2, 2, &r2)
                .await
                .unwrap();
        }
        assert_eq!(
            p.read(at, Which::Stage(Stage::Current)).await.unwrap(),
            other
        );
        assert_eq!(
            p.read(at, Which::Stage(Stage::Previous)).await.unwrap(),
            needle
        );

        // Move version 1's ciphertext under version 2's reference: the
        // associated data refuses it.
        let mut c = store.conn().await.unwrap();
        let ct1: Vec<u8> = sqlx::query("SELECT value_ct FROM embedded_values WHERE value_ref = $1")
            .bind(&r1)
            .fetch_one(&mut *c)
            .await
            .unwrap()
            .get(0);
        sqlx::query("UPDATE embedded_values SET value_ct = $1 WHERE value_ref = $2")
            .bind(ct1)
            .bind(&r2)
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        assert!(p.read(at, Which::Stage(Stage::Current)).await.is_err());

        // No plaintext in any of the database's files: the store runs in
        // WAL mode and is still open, so recent rows sit in t.db-wal.
        let mut files = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            files += 1;
            assert!(!bytes.windows(10).any(|w| w == b"needle-xyz"));
        }
        assert!(files >= 2, "the database and its write-ahead log");
        assert!(
            std::fs::metadata(dir.join("t.db-wal")).unwrap().len() > 0,
            "the rows were written to the WAL the check reads"
        );
    }

    #[tokio::test]
    async fn discard_removes_a_pending_value() {
        let dir = tempdir();
        let store = Arc::new(store_in(&dir, 3).await);
        let p = Embedded::new(store);
        let at = Location {
            secret_id: "x",
            path: "x",
        };
        let v = SecretValue::Raw(SecretBytes::new(b"pending".to_vec()));
        let r = p.write_pending(at, 5, &v).await.unwrap();
        let s = Stored {
            version: 5,
            value_ref: &r,
        };
        p.discard(at, s).await.unwrap();
        let e = p.read(at, Which::Version(s)).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }
}
