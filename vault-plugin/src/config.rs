//! The mount's configuration, kept in the host's storage (seal-wrapped
//! where the seal can), and the connection to the rekey backend made
//! from it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use zeroize::Zeroize as _;

use crate::error::PluginError;
use crate::proto::pb::{
    StorageDeleteArgs, StorageEntry, StorageGetArgs, StoragePutArgs, storage_client::StorageClient,
};

/// The storage key of the configuration.
pub const CONFIG_KEY: &str = "config";

/// How long a call to the backend may take; a rotation of a database
/// credential includes the database's own work.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `rekey/config`: where the backend is and how to prove who the plugin
/// is. The token never leaves the plugin: reads say only whether one is
/// set, and it is wiped from memory on drop.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Config {
    pub address: String,
    #[serde(default)]
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

impl Drop for Config {
    fn drop(&mut self) {
        self.token.zeroize();
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("address", &self.address)
            .field("token", &"[redacted]")
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

impl Config {
    /// Checks what a write would store: an http(s) address, a CA for
    /// https, a token that fits in a header.
    pub fn check(&self) -> Result<(), PluginError> {
        let https = self.address.starts_with("https://");
        if !https && !self.address.starts_with("http://") {
            return Err(PluginError::bad_request(format!(
                "address {:?} needs a scheme: http://HOST:PORT, or https://HOST:PORT with ca_pem",
                self.address
            )));
        }
        if Endpoint::from_shared(self.address.clone()).is_err() {
            return Err(PluginError::bad_request(format!(
                "address {:?} is not a URL such as http://rekey-backend.rekey:7700",
                self.address
            )));
        }
        if https && self.ca_pem.is_none() {
            return Err(PluginError::bad_request(
                "an https address needs ca_pem: the PEM certificate of the CA that signed the backend's certificate",
            ));
        }
        if let Some(pem) = &self.ca_pem
            && !pem.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(PluginError::bad_request(
                "ca_pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        if !self.token.is_empty() && MetadataValue::<Ascii>::try_from(self.token.as_str()).is_err()
        {
            return Err(PluginError::bad_request(
                "token holds characters that cannot go in a header",
            ));
        }
        Ok(())
    }

    /// What a read shows.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "token_set": !self.token.is_empty(),
            "ca_pem": self.ca_pem,
        })
    }

    /// A connection to the backend, made on first use.
    pub fn connect(&self) -> Result<Backend, PluginError> {
        self.check()?;
        let mut endpoint = Endpoint::from_shared(self.address.clone())
            .map_err(|e| PluginError::bad_request(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT);
        if let Some(pem) = &self.ca_pem {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| PluginError::bad_request(format!("ca_pem: {e}")))?;
        }
        let bearer = if self.token.is_empty() {
            None
        } else {
            let mut v: MetadataValue<Ascii> = format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| PluginError::bad_request("token cannot go in a header"))?;
            v.set_sensitive(true);
            Some(v)
        };
        Ok(Backend {
            address: self.address.clone(),
            channel: endpoint.connect_lazy(),
            bearer,
        })
    }
}

/// A (lazily connected) channel to the rekey backend with the plugin's
/// token.
#[derive(Clone)]
pub struct Backend {
    pub address: String,
    pub channel: Channel,
    pub bearer: Option<MetadataValue<Ascii>>,
}

/// The host's storage for this mount, reached through the broker.
#[derive(Clone)]
pub struct Storage(pub StorageClient<Channel>);

impl Storage {
    fn failed(what: &str, e: impl std::fmt::Display) -> PluginError {
        PluginError::internal(format!("storage {what}: {e}"))
    }

    /// The host's answer to a storage call: its transport failure, or the
    /// error it put in the reply (`err` empty when none).
    fn replied<T>(
        what: &str,
        reply: Result<tonic::Response<T>, tonic::Status>,
        err: impl FnOnce(&T) -> &str,
    ) -> Result<T, PluginError> {
        let reply = reply
            .map_err(|e| Self::failed(what, e.message()))?
            .into_inner();
        match err(&reply) {
            "" => Ok(reply),
            e => Err(Self::failed(what, e)),
        }
    }

    pub async fn load(&self) -> Result<Option<Config>, PluginError> {
        let got = self
            .0
            .clone()
            .get(StorageGetArgs {
                key: CONFIG_KEY.into(),
            })
            .await;
        let reply = Self::replied("read", got, |r| &r.err)?;
        let Some(mut entry) = reply.entry else {
            return Ok(None);
        };
        let parsed = serde_json::from_slice(&entry.value);
        entry.value.zeroize();
        parsed
            .map(Some)
            .map_err(|_| PluginError::internal("the stored configuration is not valid JSON"))
    }

    pub async fn save(&self, config: &Config) -> Result<(), PluginError> {
        let mut value = serde_json::to_vec(config).map_err(|e| Self::failed("encode", e))?;
        let result = self
            .0
            .clone()
            .put(StoragePutArgs {
                entry: Some(StorageEntry {
                    key: CONFIG_KEY.into(),
                    value: value.clone(),
                    seal_wrap: true,
                }),
            })
            .await;
        value.zeroize();
        Self::replied("write", result, |r| &r.err).map(drop)
    }

    pub async fn delete(&self) -> Result<(), PluginError> {
        let deleted = self
            .0
            .clone()
            .delete(StorageDeleteArgs {
                key: CONFIG_KEY.into(),
            })
            .await;
        Self::replied("delete", deleted, |r| &r.err).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(address: &str, ca: Option<&str>) -> Config {
        Config {
            address: address.into(),
            token: "rk_secret-token".into(),
            ca_pem: ca.map(str::to_string),
        }
    }

    #[test]
    fn addresses_need_a_scheme_and_https_needs_a_ca() {
        assert!(cfg("http://127.0.0.1:7700", None).check().is_ok());
        assert_eq!(cfg("127.0.0.1:7700", None).check().unwrap_err().status, 400);
        let e = cfg("https://b:7700", None).check().unwrap_err();
        assert!(e.message.contains("ca_pem"), "{e}");
        assert!(cfg("https://b:7700", Some("nope")).check().is_err());
    }

    #[test]
    fn the_token_is_never_shown() {
        let c = cfg("http://b:7700", None);
        assert!(!format!("{c:?}").contains("rk_secret-token"));
        let j = c.public_json().to_string();
        assert!(!j.contains("rk_secret-token"), "{j}");
        assert_eq!(c.public_json()["token_set"], true);
    }
}
