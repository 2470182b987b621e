//! The sidecar's Prometheus metrics. Labels carry secret ids, versions,
//! action names and outcomes: never a value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabel {
    pub secret: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub secret: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub action: String,
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub version: Family<SecretLabel, Gauge>,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub delivery_seconds: Histogram,
    pub backend_connected: Gauge,
    pub reconnects: Counter,
    pub reencrypt_rows: Gauge,
    pub reencrypt_leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rekey_sidecar");
        let version = Family::<SecretLabel, Gauge>::default();
        registry.register(
            "secret_version",
            "Version served per secret",
            version.clone(),
        );
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliveries",
            "New versions by outcome (ok, render_failed, validation_failed, write_failed)",
            deliveries.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register("reloads", "Reload actions by outcome", reloads.clone());
        let delivery_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "delivery_seconds",
            "Time from the backend publishing a version to the file written",
            delivery_seconds.clone(),
        );
        let backend_connected = Gauge::default();
        registry.register(
            "backend_connected",
            "1 while the Watch stream to the backend is open",
            backend_connected.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "backend_reconnects",
            "Attempts to reconnect to the backend",
            reconnects.clone(),
        );
        let reencrypt_rows = Gauge::default();
        registry.register(
            "reencrypt_rows",
            "Rows this sidecar has re-encrypted or checked in the current pass while leading",
            reencrypt_rows.clone(),
        );
        let reencrypt_leader = Gauge::default();
        registry.register(
            "reencrypt_leader",
            "1 while this sidecar leads re-encryption",
            reencrypt_leader.clone(),
        );
        Self {
            reencrypt_rows,
            reencrypt_leader,
            registry,
            version,
            deliveries,
            reloads,
            delivery_seconds,
            backend_connected,
            reconnects,
        }
    }
}

impl Metrics {
    pub fn delivered(&self, secret: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&OutcomeLabels {
                secret: secret.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn reload(&self, action: &str, outcome: &str) {
        self.reloads
            .get_or_create(&ReloadLabels {
                action: action.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn serving(&self, secret: &str, version: u64) {
        self.version
            .get_or_create(&SecretLabel {
                secret: secret.into(),
            })
            .set(version as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
