//! The engine against a fake kind and a fake value provider: the state
//! machine's rules, and what the engine asks of a provider and when.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rekey_keyring::{SecretBytes, SecretValue};

use super::*;
use crate::kinds::{Kind, SecretCtx};
use crate::provider::{Observed, OutsideChange, Stored, ValueProvider, Which};
use crate::store::{RotationStep, VersionState};

/// A kind whose target can be made to fail: stands in for the kinds that
/// act on real systems (a database role, a provider's API key).
struct Flaky {
    fail_set: AtomicBool,
    fail_restore: AtomicBool,
}

#[async_trait]
impl Kind for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn create(
        &self,
        _: &SecretCtx<'_>,
        _: Option<&SecretValue>,
        _: Option<SecretValue>,
    ) -> Result<SecretValue> {
        Ok(SecretValue::Raw(rekey_keyring::random_bytes(16)?))
    }
    async fn set(
        &self,
        ctx: &SecretCtx<'_>,
        _: &SecretValue,
        _: Option<&SecretValue>,
    ) -> Result<crate::kinds::Nodes> {
        if self.fail_set.load(Ordering::SeqCst) {
            return Err(Error::Step {
                secret: ctx.id.into(),
                step: "set",
                message: "target refused the new password".into(),
            });
        }
        Ok(None)
    }
    async fn restore(&self, _: &SecretCtx<'_>, _: &SecretValue) -> Result<crate::kinds::Nodes> {
        if self.fail_restore.load(Ordering::SeqCst) {
            return Err(Error::Internal("target unreachable".into()));
        }
        Ok(None)
    }
    fn one_rotation_at_a_time(&self) -> bool {
        true
    }
}

/// A provider in memory that records what the engine asked of it, in the
/// words of the trait.
#[derive(Default)]
struct FakeProvider {
    values: Mutex<Vec<(String, String, SecretValue)>>,
    calls: Mutex<Vec<String>>,
    /// What `observe` answers next (`Unchanged` when empty).
    outside: Mutex<Vec<Observed>>,
    fail_promote: AtomicBool,
    /// Refuse promotion as Vault does when sealed or denied.
    refuse_promote: AtomicBool,
}

impl FakeProvider {
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    fn holds(&self, path: &str, value_ref: &str) -> bool {
        self.values
            .lock()
            .unwrap()
            .iter()
            .any(|(p, r, _)| p == path && r == value_ref)
    }
}

#[async_trait]
impl ValueProvider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn write_pending(
        &self,
        at: Location<'_>,
        version: i64,
        value: &SecretValue,
    ) -> Result<String> {
        let r = format!("ref-{version}-{}", self.values.lock().unwrap().len());
        self.values
            .lock()
            .unwrap()
            .push((at.path.into(), r.clone(), value.clone()));
        self.log(format!("write_pending {} v{version}", at.path));
        Ok(r)
    }
    async fn promote(
        &self,
        at: Location<'_>,
        new: Stored<'_>,
        old: Option<Stored<'_>>,
    ) -> Result<String> {
        if self.fail_promote.load(Ordering::SeqCst) {
            return Err(Error::Internal("provider unavailable".into()));
        }
        if self.refuse_promote.load(Ordering::SeqCst) {
            return Err(Error::Provider {
                provider: "fake".into(),
                message: "sealed".into(),
                unavailable: true,
            });
        }
        self.log(format!(
            "promote {} v{} over {:?}",
            at.path,
            new.version,
            old.map(|o| o.version)
        ));
        // Like Vault KV v2: promoting moves the value, so its reference changes.
        let moved = format!("{}-current", new.value_ref);
        let mut values = self.values.lock().unwrap();
        let value = values
            .iter()
            .find(|(p, r, _)| p == at.path && r == new.value_ref)
            .map(|(_, _, v)| v.clone())
            .ok_or_else(|| Error::NotFound("pending value".into()))?;
        values.push((at.path.into(), moved.clone(), value));
        Ok(moved)
    }
    async fn read(&self, at: Location<'_>, which: Which<'_>) -> Result<SecretValue> {
        let Which::Version(v) = which else {
            return Err(Error::Internal("the engine reads by version".into()));
        };
        self.values
            .lock()
            .unwrap()
            .iter()
            .find(|(p, r, _)| p == at.path && r == v.value_ref)
            .map(|(_, _, v)| v.clone())
            .ok_or_else(|| Error::NotFound(format!("{} {}", at.path, v.value_ref)))
    }
    async fn roll_back(
        &self,
        at: Location<'_>,
        to: Stored<'_>,
        from: Stored<'_>,
    ) -> Result<String> {
        self.log(format!(
            "roll_back {} to v{} from v{}",
            at.path, to.version, from.version
        ));
        Ok(to.value_ref.into())
    }
    async fn revoke(&self, at: Location<'_>, old: Stored<'_>) -> Result<()> {
        self.log(format!("revoke {} v{}", at.path, old.version));
        Ok(())
    }
    async fn discard(&self, at: Location<'_>, pending: Stored<'_>) -> Result<()> {
        self.log(format!("discard {} v{}", at.path, pending.version));
        self.values
            .lock()
            .unwrap()
            .retain(|(p, r, _)| !(p == at.path && r == pending.value_ref));
        Ok(())
    }
    async fn observe(&self, at: Location<'_>, _: Stored<'_>) -> Result<Observed> {
        let mut q = self.outside.lock().unwrap();
        if q.is_empty() {
            return Ok(Observed::Unchanged);
        }
        let o = q.remove(0);
        if let Observed::Changed(c) = &o {
            self.values.lock().unwrap().push((
                at.path.into(),
                c.value_ref.clone(),
                c.value.clone(),
            ));
        }
        Ok(o)
    }
}

struct Fixture {
    engine: Arc<Engine>,
    flaky: Arc<Flaky>,
    fake: Arc<FakeProvider>,
}

async fn fixture() -> Fixture {
    let dir = crate::store::tests_support::tempdir();
    let store = Arc::new(crate::store::tests_support::store_in(&dir, 9).await);
    let flaky = Arc::new(Flaky {
        fail_set: AtomicBool::new(false),
        fail_restore: AtomicBool::new(false),
    });
    let mut kinds = Kinds::default();
    kinds.register(flaky.clone());
    let fake = Arc::new(FakeProvider::default());
    let mut providers = Providers::new(Arc::new(crate::provider::embedded::Embedded::new(
        store.clone(),
    )));
    providers.add(fake.clone());
    let engine = Engine::with_kinds(
        store,
        kinds,
        providers,
        Arc::new(Metrics::default()),
        Settings {
            step_delay: Duration::ZERO,
            step_attempts: 2,
            step_backoff: Duration::from_millis(10),
            consumer_ttl: Duration::from_secs(60),
            max_value_bytes: 64 << 10,
            refusal_summary_interval: Duration::from_secs(60),
            scheduler_concurrency: 4,
        },
    );
    Fixture {
        engine: Arc::new(engine),
        flaky,
        fake,
    }
}

fn spec(id: &str, kind: &str) -> CreateSpec {
    CreateSpec {
        id: id.into(),
        kind: kind.into(),
        ..Default::default()
    }
}

fn in_fake(mut s: CreateSpec, path: &str) -> CreateSpec {
    s.provider = "fake".into();
    s.provider_path = path.into();
    s
}

impl Engine {
    async fn secret(&self, id: &str) -> SecretRow {
        self.require_secret(id).await.unwrap()
    }
}

#[tokio::test]
async fn a_failed_step_rolls_the_rotation_back_and_keeps_current() {
    let Fixture {
        engine: e, flaky, ..
    } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(&actor, spec("prod/db", "flaky"))
        .await
        .unwrap();
    flaky.fail_set.store(true, Ordering::SeqCst);
    let err = e
        .rotate(&actor, "prod/db", Some("tok"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Step { step: "set", .. }), "{err}");
    let s = e.secret("prod/db").await;
    assert_eq!(
        (s.current_version, s.previous_version, s.pending_version),
        (1, 0, 0)
    );
    let (_, v2) = e
        .get_version("prod/db", Selector::Version(2))
        .await
        .unwrap();
    assert_eq!(
        v2.state,
        VersionState::Revoked,
        "the failed version is never served"
    );
    let st = e.status("prod/db").await.unwrap();
    let rot = st.rotation.unwrap();
    assert_eq!(rot.step, RotationStep::NeedsAttention);
    assert!(rot.error.contains("refused the new password"));
    let events = e
        .list_audit("prod/db", AuditPage::After(0), 100)
        .await
        .unwrap();
    assert_eq!(events.last().unwrap().outcome, "failed");
    // A retry with the same token reports the same failure, creates nothing.
    let again = e
        .rotate(&actor, "prod/db", Some("tok"), None)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("failed"), "{again}");
    // Once the target works again, a new rotation succeeds with v3.
    flaky.fail_set.store(false, Ordering::SeqCst);
    let ok = e.rotate(&actor, "prod/db", None, None).await.unwrap();
    assert_eq!(ok.version.version, 3);
}

#[tokio::test]
async fn one_rotation_at_a_time_until_previous_is_decommissioned() {
    let Fixture { engine: e, .. } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(&actor, spec("prod/db", "flaky"))
        .await
        .unwrap();
    e.rotate(&actor, "prod/db", None, None).await.unwrap();
    let err = e.rotate(&actor, "prod/db", None, None).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("not decommissioned yet"), "{err}");
    // Validation window 0 and no consumers: decommission runs on tick.
    e.tick_and_wait().await.unwrap();
    assert_eq!(e.secret("prod/db").await.previous_version, 0);
    assert_eq!(
        e.rotate(&actor, "prod/db", None, None)
            .await
            .unwrap()
            .version
            .version,
        3
    );
}

#[tokio::test]
async fn rollback_restores_the_target_first_and_changes_nothing_when_that_fails() {
    let Fixture {
        engine: e, flaky, ..
    } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(&actor, spec("prod/db", "flaky"))
        .await
        .unwrap();
    e.rotate(&actor, "prod/db", None, None).await.unwrap();
    flaky.fail_restore.store(true, Ordering::SeqCst);
    let err = e.rollback(&actor, "prod/db").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Step {
                step: "restore",
                ..
            }
        ),
        "{err}"
    );
    let s = e.secret("prod/db").await;
    assert_eq!((s.current_version, s.previous_version), (2, 1));
    flaky.fail_restore.store(false, Ordering::SeqCst);
    let o = e.rollback(&actor, "prod/db").await.unwrap();
    assert_eq!(
        (o.secret.current_version, o.secret.previous_version),
        (1, 2)
    );
}

#[tokio::test]
async fn random_secrets_rotate_back_to_back_and_displace_previous() {
    let Fixture { engine: e, .. } = fixture().await;
    let actor = Actor::system("test");
    let mut s = spec("prod/jwt", "random");
    s.validation_window_ms = 3_600_000;
    e.create_secret(&actor, s).await.unwrap();
    for _ in 0..3 {
        e.rotate(&actor, "prod/jwt", None, None).await.unwrap();
    }
    let (s, versions) = e.list_versions("prod/jwt").await.unwrap();
    assert_eq!((s.current_version, s.previous_version), (4, 3));
    let states: Vec<VersionState> = versions.into_iter().map(|v| v.state).collect();
    use VersionState::{Active, Revoked};
    assert_eq!(states, [Active, Active, Revoked, Revoked]);
}

#[tokio::test]
async fn a_provider_is_asked_in_the_order_of_the_state_machine() {
    let Fixture {
        engine: e, fake, ..
    } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(&actor, in_fake(spec("prod/db", "flaky"), "kv/prod/db"))
        .await
        .unwrap();
    assert_eq!(
        fake.calls(),
        [
            "write_pending kv/prod/db v1",
            "promote kv/prod/db v1 over None"
        ]
    );
    let o = e.rotate(&actor, "prod/db", None, None).await.unwrap();
    assert_eq!(
        fake.calls(),
        [
            "write_pending kv/prod/db v2",
            "promote kv/prod/db v2 over Some(1)"
        ]
    );
    // The reference the provider returned when promoting is what rekey
    // records and reads from now on.
    assert!(
        o.version.value_ref.ends_with("-current"),
        "{}",
        o.version.value_ref
    );
    let mut rx = e.subscribe("prod/db").await.unwrap();
    let snap = rx.borrow_and_update().clone().unwrap();
    assert_eq!(snap.versions(), (2, 1));

    e.rollback(&actor, "prod/db").await.unwrap();
    assert_eq!(fake.calls(), ["roll_back kv/prod/db to v1 from v2"]);
    e.tick_and_wait().await.unwrap();
    assert_eq!(
        fake.calls(),
        ["revoke kv/prod/db v2"],
        "decommission retires it"
    );
}

#[tokio::test]
async fn a_rotation_that_fails_drops_its_pending_value_at_the_provider() {
    let Fixture {
        engine: e,
        flaky,
        fake,
    } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(&actor, in_fake(spec("prod/db", "flaky"), "kv/db"))
        .await
        .unwrap();
    fake.calls();
    flaky.fail_set.store(true, Ordering::SeqCst);
    e.rotate(&actor, "prod/db", None, None).await.unwrap_err();
    assert_eq!(fake.calls(), ["write_pending kv/db v2", "discard kv/db v2"]);
    let (_, v2) = e
        .get_version("prod/db", Selector::Version(2))
        .await
        .unwrap();
    assert!(!fake.holds("kv/db", &v2.value_ref));

    // A provider that cannot promote leaves the rotation resumable at
    // finish: current stays, and the next drive finishes it.
    flaky.fail_set.store(false, Ordering::SeqCst);
    fake.fail_promote.store(true, Ordering::SeqCst);
    assert!(e.rotate(&actor, "prod/db", None, None).await.is_err());
    assert_eq!(e.secret("prod/db").await.current_version, 1);
    fake.fail_promote.store(false, Ordering::SeqCst);
    assert_eq!(e.recover().await.unwrap(), 1);
    assert_eq!(e.secret("prod/db").await.current_version, 3);

    // A provider that refuses (sealed, denied, a check-and-set that lost)
    // parks the rotation; current stays, and the next rotation succeeds.
    e.tick_and_wait().await.unwrap();
    fake.refuse_promote.store(true, Ordering::SeqCst);
    let err = e.rotate(&actor, "prod/db", None, None).await.unwrap_err();
    assert_eq!(err.to_string(), "provider fake: sealed");
    let st = e.status("prod/db").await.unwrap();
    assert_eq!(st.secret.current_version, 3);
    assert_eq!(st.secret.pending_version, 0);
    assert_eq!(st.rotation.unwrap().step, RotationStep::NeedsAttention);
    fake.refuse_promote.store(false, Ordering::SeqCst);
    e.rotate(&actor, "prod/db", None, None).await.unwrap();
    assert_eq!(e.secret("prod/db").await.current_version, 5);
}

#[tokio::test]
async fn outside_changes_become_current_once_are_delivered_and_audited() {
    let Fixture {
        engine: e, fake, ..
    } = fixture().await;
    let actor = Actor::system("test");
    e.create_secret(
        &actor,
        in_fake(spec("prod/key", "encryption-key"), "kv/key"),
    )
    .await
    .unwrap();
    let mut rx = e.subscribe("prod/key").await.unwrap();
    rx.borrow_and_update();
    let key = |b: u8| {
        use base64::Engine as _;
        SecretValue::Raw(SecretBytes::new(
            base64::engine::general_purpose::STANDARD
                .encode([b; 32])
                .into_bytes(),
        ))
    };
    let change = |value_ref: &str, value| {
        Observed::Changed(OutsideChange {
            value,
            value_ref: value_ref.into(),
            note: format!("edited at {value_ref}"),
        })
    };
    let p: Arc<dyn ValueProvider> = fake.clone();
    let take = async |o: Observed| {
        fake.outside.lock().unwrap().push(o);
        e.take_outside_changes(p.as_ref()).await.unwrap()
    };
    assert_eq!(take(change("kv-7", key(7))).await, 1);
    let s = e.secret("prod/key").await;
    assert_eq!((s.current_version, s.previous_version), (2, 1));
    assert!(rx.has_changed().unwrap(), "watchers get the new value");
    let snap = rx.borrow_and_update().clone().unwrap();
    assert_eq!(snap.versions(), (2, 1));
    // Seen again (another replica, the next poll): taken once only.
    assert_eq!(take(change("kv-7", key(7))).await, 0);
    // A value the kind refuses is not delivered, and is reported.
    let misfit = SecretValue::Raw(SecretBytes::new(b"not a key".to_vec()));
    assert_eq!(take(change("kv-8", misfit.clone())).await, 0);
    assert_eq!(e.secret("prod/key").await.current_version, 2);
    assert!(
        !rx.has_changed().unwrap(),
        "watchers keep the last good value"
    );
    let problem = e
        .status("prod/key")
        .await
        .unwrap()
        .provider_problem
        .unwrap();
    assert!(problem.contains("edited at kv-8 does not fit"), "{problem}");
    // Seen again on the next poll: reported once.
    assert_eq!(take(change("kv-8", misfit)).await, 0);
    assert_eq!(take(Observed::Problem("latest deleted".into())).await, 0);
    assert_eq!(take(Observed::Problem("latest deleted".into())).await, 0);
    let events = e
        .list_audit("prod/key", AuditPage::After(0), 100)
        .await
        .unwrap();
    let took = events
        .iter()
        .find(|ev| ev.action == "outside-change" && ev.outcome == "ok")
        .unwrap();
    assert_eq!(took.actor, "external:fake:kv/key");
    assert!(took.detail.contains("edited at kv-7"), "{}", took.detail);
    let refused: Vec<_> = events
        .iter()
        .filter(|ev| ev.action == "outside-change" && ev.outcome != "ok")
        .map(|ev| ev.detail.as_str())
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("32 bytes"), "{}", refused[0]);
    assert!(!refused[0].contains("not a key"), "never the value");
    assert!(refused[1].contains("latest deleted"), "{}", refused[1]);
    // Once the provider is well again the problem is gone from status.
    assert_eq!(take(Observed::Unchanged).await, 0);
    assert!(
        e.status("prod/key")
            .await
            .unwrap()
            .provider_problem
            .is_none()
    );
    // An encryption key changes one version at a time: a change while
    // previous may still be in use waits for its decommission.
    assert_eq!(take(change("kv-9", key(9))).await, 0);
    let problem = e
        .status("prod/key")
        .await
        .unwrap()
        .provider_problem
        .unwrap();
    assert!(problem.contains("previous v1"), "{problem}");
    e.revoke(&actor, "prod/key", 1, true, "test").await.unwrap();
    assert_eq!(take(change("kv-9", key(9))).await, 1);
    assert_eq!(e.secret("prod/key").await.current_version, 3);
}

#[tokio::test]
async fn an_unknown_provider_is_refused_with_the_configured_names() {
    let Fixture { engine: e, .. } = fixture().await;
    let mut s = spec("prod/x", "random");
    s.provider = "vault-main".into();
    let err = e.create_secret(&Actor::system("t"), s).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid argument: unknown provider \"vault-main\" (configured: fake)"
    );
    assert!(e.list_secrets("").await.unwrap().is_empty());
}

#[test]
fn secret_ids_look_like_paths() {
    for ok in ["prod/api/database", "a", "x-1_2.3/y"] {
        validate_id(ok).unwrap();
    }
    for bad in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "../etc",
        "a/./b",
        "sp ace",
        "ü",
    ] {
        assert!(validate_id(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_at_once_are_all_kept_and_the_latest_wins() {
    let Fixture { engine, .. } = fixture().await;
    let report = |engine: Arc<Engine>, consumer: String, version: i64, leaving: bool| async move {
        engine
            .report_served(
                "sidecar",
                &consumer,
                "pod",
                "ns",
                &[ServedReport {
                    secret_id: "app/key".into(),
                    version,
                    healthy: true,
                    error: String::new(),
                }],
                leaving,
            )
            .await
    };
    // 300 consumers at once, as a fleet reports after a rotation.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300 {
        set.spawn(report(engine.clone(), format!("c{i}"), 1, false));
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    // Then each again in order: a newer version, and a goodbye from some.
    for i in 0..300 {
        report(engine.clone(), format!("c{i}"), 2, false)
            .await
            .unwrap();
    }
    let mut set = tokio::task::JoinSet::new();
    for i in (0..300).step_by(3) {
        set.spawn(report(engine.clone(), format!("c{i}"), 2, true));
    }
    // A caller that goes away while its report waits: the report is
    // written all the same.
    let gone = tokio::spawn(report(engine.clone(), "gone".into(), 7, false));
    gone.abort();
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    report(engine.clone(), "last".into(), 2, false)
        .await
        .unwrap();
    let mut c = engine.store.conn().await.unwrap();
    let rows = engine.store.consumers(&mut c, "app/key").await.unwrap();
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.consumer_id.as_str()).collect();
    assert_eq!(rows.len(), ids.len(), "one row per consumer");
    for i in 0..300 {
        let id = format!("c{i}");
        assert_eq!(ids.contains(id.as_str()), i % 3 != 0, "{id}");
    }
    assert!(ids.contains("last"));
    assert!(
        rows.iter()
            .filter(|r| r.consumer_id.starts_with('c'))
            .all(|r| r.version == 2)
    );
    // The aborted report was written or never queued; it is never half there.
    if let Some(g) = rows.iter().find(|r| r.consumer_id == "gone") {
        assert_eq!(g.version, 7);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_opened_together_are_each_audited_in_one_chain() {
    let Fixture { engine, .. } = fixture().await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let engine = engine.clone();
        set.spawn(async move {
            let actor = Actor {
                identity: format!("pod-{i}"),
                request_id: format!("r{i}"),
            };
            engine
                .record_watch(&actor, &[("app/key".into(), (i + 1, i))])
                .await
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let events = engine
        .list_audit("app/key", AuditPage::After(0), 1000)
        .await
        .unwrap();
    let watchers: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.action == "watch")
        .map(|e| e.actor.as_str())
        .collect();
    assert_eq!(watchers.len(), 200, "one event per stream");
    let v = engine.verify_audit(None).await.unwrap();
    assert!(v.first_bad.is_none(), "{:?}", v.first_bad);
    assert_eq!(v.checked, i64::try_from(events.len()).unwrap());
}
