//! What a newcomer's first hour ran into, checked with the real binaries:
//! consumers that stopped cleanly holding decommission back, and the
//! other walls of the first real setup.

use std::time::Duration;

use rekey_testkit::*;

/// A sidecar that stops cleanly says goodbye: it no longer counts as a
/// live consumer, and decommission goes ahead at once instead of waiting
/// for its reports to expire.
#[tokio::test]
async fn a_stopped_sidecar_is_not_a_live_consumer() {
    let dir = TempDir::new("leaving");
    let b = Backend::start(
        dir.path(),
        BackendOpts {
            extra_toml: "[consumers]\nttl = \"1h\"\n".into(),
            ..Default::default()
        },
    );
    b.cli_json(&[
        "create",
        "prod/api/key",
        "--kind",
        "random",
        "--window",
        "0s",
    ]);
    let out = dir.path().join("key");
    let mut sidecars: Vec<Sidecar> = (0..2)
        .map(|i| {
            let out = dir.path().join(format!("key-{i}"));
            Sidecar::start(
                dir.path(),
                &[
                    "--backend",
                    &b.grpc,
                    "--token-file",
                    b.token_path().to_str().unwrap(),
                    "--secret",
                    &format!("prod/api/key:{}", out.display()),
                    "--listen",
                    "127.0.0.1:0",
                ],
                &[("REKEY_CONSUMER_ID", &format!("pod-{i}"))],
            )
        })
        .collect();
    drop(out);
    eventually(Duration::from_secs(10), "both pods reporting", || async {
        let st = b.cli_json(&["status", "prod/api/key"]);
        (st[0]["live_consumers"] == 2).then_some(())
    })
    .await;
    // One pod stops while it still serves v1: a live consumer on v1 would
    // hold v1 back for the whole hour of the consumer TTL.
    let code = sidecars.remove(0).stop();
    assert_eq!(code, Some(0));
    b.cli_json(&["rotate", "prod/api/key"]);
    let st = eventually(Duration::from_secs(15), "v1 decommissioned", || async {
        let st = b.cli_json(&["status", "prod/api/key"]);
        st[0]["previous_version"].is_null().then_some(st)
    })
    .await;
    let consumers = st[0]["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{st}");
    assert_eq!(consumers[0]["consumer_id"], "pod-1");
    assert!(
        b.log().contains("consumer left"),
        "the backend took the goodbye"
    );
}
