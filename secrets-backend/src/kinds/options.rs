//! Kind options, typed from the request to the stored row.
//!
//! A `CreateSecret` request carries them as protobuf messages;
//! [`crate::convert::kind_options`] turns those into this struct in one
//! place, the kind validates and completes it ([`super::Kind::check_options`]),
//! and the store keeps it as JSON (`{"random": {"length": 32, ...}}`, `{}`
//! for kinds without options) and parses it back when it reads the row.

use serde::{Deserialize, Serialize};

use super::RandomOptions;
use super::exec::ExecOptions;
use super::postgres::PgOptions;
use super::redis::RedisOptions;
use crate::error::{Error, Result};

/// The options of whichever kind a secret has; the others are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KindOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) random: Option<RandomOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) postgres: Option<PgOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) redis: Option<RedisOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) exec: Option<ExecOptions>,
}

macro_rules! from_options {
    ($($field:ident: $ty:ty),*) => {$(
        impl From<$ty> for KindOptions {
            fn from(o: $ty) -> Self {
                KindOptions {
                    $field: Some(o),
                    ..KindOptions::default()
                }
            }
        }
    )*};
}

from_options!(random: RandomOptions, postgres: PgOptions, redis: RedisOptions, exec: ExecOptions);

/// A stored secret's options of the kind it has; their absence means the
/// row was written by something other than its kind's `check_options`.
fn stored<'a, T>(o: Option<&'a T>, kind: &str, secret: &str) -> Result<&'a T> {
    o.ok_or_else(|| Error::Internal(format!("{secret} has no stored {kind} options")))
}

impl KindOptions {
    pub(crate) fn random(&self, secret: &str) -> Result<&RandomOptions> {
        stored(self.random.as_ref(), "random", secret)
    }

    pub(crate) fn postgres(&self, secret: &str) -> Result<&PgOptions> {
        stored(self.postgres.as_ref(), "postgres", secret)
    }

    pub(crate) fn redis(&self, secret: &str) -> Result<&RedisOptions> {
        stored(self.redis.as_ref(), "redis", secret)
    }

    pub(crate) fn exec(&self, secret: &str) -> Result<&ExecOptions> {
        stored(self.exec.as_ref(), "exec", secret)
    }

    /// The JSON kept in the store.
    pub(crate) fn to_stored(&self) -> String {
        // Plain structs of strings and numbers always serialize.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Encoding;
    use super::*;

    #[test]
    fn the_stored_form_is_unchanged_json() {
        let o = KindOptions {
            random: Some(RandomOptions {
                length: 32,
                encoding: Encoding::Hex,
            }),
            ..Default::default()
        };
        assert_eq!(
            o.to_stored(),
            r#"{"random":{"length":32,"encoding":"hex"}}"#
        );
        let back: KindOptions = serde_json::from_str(&o.to_stored()).unwrap();
        assert_eq!(back, o);
        assert_eq!(KindOptions::default().to_stored(), "{}");
        let e = KindOptions::default().postgres("prod/db").unwrap_err();
        assert!(
            e.to_string()
                .contains("prod/db has no stored postgres options"),
            "{e}"
        );
    }
}
