//! Prometheus metrics and the small HTTP server that exposes them.
//!
//! Labels carry kinds, outcomes, steps, secret ids and version numbers:
//! never a value.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RotationLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub secret: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MacLabels {
    pub mac: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub rotations: Family<RotationLabels, Counter>,
    pub step_seconds: HistogramFamily<StepLabels>,
    pub watch_streams: Gauge,
    pub consumers: Family<ConsumerLabels, Gauge>,
    /// The versions each secret's consumer series were last set for, so
    /// that series of versions nobody serves any more are removed.
    consumer_versions: std::sync::Mutex<std::collections::HashMap<String, Vec<i64>>>,
    /// The audit chain's newest event: its number, labelled with its MAC.
    audit_head: Family<MacLabels, Gauge>,
    /// 1 once the store's audit head fell behind one this backend saw.
    pub audit_tampered: Gauge,
    /// Calls refused before authentication, by method.
    pub unauthenticated: Family<MethodLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rekey");
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "rotations",
            "Rotations by kind and outcome",
            rotations.clone(),
        );
        let step_seconds: HistogramFamily<StepLabels> =
            Family::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register(
            "rotation_step_seconds",
            "Latency of each rotation step (create, set, test, finish, revoke, rollback)",
            step_seconds.clone(),
        );
        let watch_streams = Gauge::default();
        registry.register(
            "watch_streams",
            "Open Watch streams on this replica",
            watch_streams.clone(),
        );
        let consumers = Family::<ConsumerLabels, Gauge>::default();
        registry.register(
            "consumers",
            "Live consumers by secret and the version they serve",
            consumers.clone(),
        );
        let audit_head = Family::<MacLabels, Gauge>::default();
        registry.register(
            "audit_head",
            "The audit chain's newest event number, labelled with its MAC; keep a copy elsewhere to detect truncation",
            audit_head.clone(),
        );
        let audit_tampered = Gauge::default();
        registry.register(
            "audit_tampered",
            "1 when the store's audit log lost events this backend saw (its head fell behind)",
            audit_tampered.clone(),
        );
        let unauthenticated = Family::<MethodLabels, Counter>::default();
        registry.register(
            "unauthenticated",
            "Calls refused before authentication, by method",
            unauthenticated.clone(),
        );
        Self {
            registry,
            rotations,
            step_seconds,
            watch_streams,
            consumers,
            consumer_versions: std::sync::Mutex::default(),
            audit_head,
            audit_tampered,
            unauthenticated,
        }
    }
}

impl Metrics {
    pub fn rotation(&self, kind: &str, outcome: &str) {
        self.rotations
            .get_or_create(&RotationLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn step(&self, step: &str, secs: f64) {
        self.step_seconds
            .get_or_create(&StepLabels { step: step.into() })
            .observe(secs);
    }

    /// Replaces the consumer gauges of one secret with `(version, count)`.
    pub fn set_consumers(&self, secret: &str, by_version: &[(i64, i64)]) {
        let label = |v: i64| ConsumerLabels {
            secret: secret.into(),
            version: v.to_string(),
        };
        let mut known = self
            .consumer_versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for v in known.remove(secret).unwrap_or_default() {
            self.consumers.remove(&label(v));
        }
        for (v, n) in by_version {
            self.consumers.get_or_create(&label(*v)).set(*n);
        }
        if !by_version.is_empty() {
            known.insert(
                secret.to_string(),
                by_version.iter().map(|(v, _)| *v).collect(),
            );
        }
    }

    /// Publishes the audit chain's head.
    pub fn set_audit_head(&self, seq: i64, mac: &str) {
        self.audit_head.clear();
        self.audit_head
            .get_or_create(&MacLabels { mac: mac.into() })
            .set(seq);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Whether a scrape may read `/metrics`: with a token file configured,
/// only with `Authorization: Bearer` and that token (the file is read at
/// each scrape, so it can be rotated like any other secret).
fn scrape_allowed(token_file: Option<&std::path::Path>, header: Option<&str>) -> bool {
    let Some(path) = token_file else {
        return true;
    };
    let Ok(want) = std::fs::read_to_string(path).map(zeroize::Zeroizing::new) else {
        tracing::warn!(path = %path.display(), "cannot read metrics.bearer_token_file; refusing scrapes");
        return false;
    };
    let want = want.trim();
    let got = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim();
    !want.is_empty() && rekey_keyring::ct_eq(want.as_bytes(), got.as_bytes())
}

/// Serves `GET /metrics` (and `/livez`) until `shutdown` resolves.
/// `/metrics` names secret ids; with `token_file` it needs that bearer
/// token.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    token_file: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let token_file = Arc::new(token_file);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let m = metrics.clone();
                let token_file = token_file.clone();
                async move {
                    let auth = headers
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    if !scrape_allowed(token_file.as_deref(), auth) {
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(header::WWW_AUTHENTICATE, "Bearer")],
                            "a bearer token is required (metrics.bearer_token_file)\n",
                        )
                            .into_response();
                    }
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                        .into_response()
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener actually bound (port 0 resolved).
pub fn bound(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_need_the_token_when_one_is_configured() {
        let dir = crate::store::tests_support::tempdir();
        let f = dir.join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert!(scrape_allowed(None, None));
        assert!(scrape_allowed(Some(&f), Some("Bearer s3cret")));
        assert!(!scrape_allowed(Some(&f), Some("Bearer s3cre")));
        assert!(!scrape_allowed(Some(&f), None));
        assert!(!scrape_allowed(
            Some(&dir.join("gone")),
            Some("Bearer s3cret")
        ));
    }

    #[test]
    fn encodes_the_documented_series() {
        let m = Metrics::default();
        m.rotation("random", "ok");
        m.step("finish", 0.002);
        m.watch_streams.set(3);
        m.set_consumers("prod/api/db", &[(2, 5), (3, 1)]);
        m.set_consumers("prod/api/db", &[(3, 6)]);
        m.set_consumers("prod/api/other", &[(1, 1)]);
        m.set_consumers("prod/api/other", &[]);
        let s = m.encode();
        assert!(!s.contains("prod/api/other"), "{s}");
        assert!(
            s.contains("rekey_rotations_total{kind=\"random\",outcome=\"ok\"} 1"),
            "{s}"
        );
        assert!(
            s.contains("rekey_rotation_step_seconds_count{step=\"finish\"} 1"),
            "{s}"
        );
        assert!(s.contains("rekey_watch_streams 3"), "{s}");
        assert!(
            s.contains("rekey_consumers{secret=\"prod/api/db\",version=\"3\"} 6"),
            "{s}"
        );
        assert!(!s.contains("version=\"2\""), "{s}");
    }
}
