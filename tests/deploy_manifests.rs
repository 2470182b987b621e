//! The Kubernetes manifests under `deploy/kubernetes/` and the
//! `--check-config` commands, checked offline.
//!
//! Every overlay (and the backend base) is rendered with `kubectl
//! kustomize` and then:
//! - each object is validated against the Kubernetes OpenAPI schemas by
//!   `kubernetes-validate --strict` (the schemas ship inside the package;
//!   nothing is downloaded). The Prometheus Operator's ServiceMonitor has
//!   no schema there, so its selector and port are checked against the
//!   Service they name;
//! - `checkov` finds nothing, and every check it skips carries its reason
//!   in the object's annotation;
//! - every pod runs as non-root with a read-only root filesystem, no
//!   manifest carries a secret value (literal environment values, Secret
//!   objects, credentials in ConfigMaps), the sidecars are native sidecars
//!   with their probes on the port they listen on, and only pods that send
//!   a signal share their process namespace.
//!
//! The tools come from the tools venv that `./scripts/test` fills
//! (`ensure_deploy_tools`); `kubectl` must be on the `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

use rekey_testkit::{BACKEND, SIDECAR, TempDir, server_pki, stderr, stdout, tool_binary};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Every kustomization to render: the backend base and each overlay.
fn kustomizations() -> Vec<PathBuf> {
    let root = workspace().join("deploy/kubernetes");
    let mut dirs = vec![root.join("base/backend")];
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(root.join("overlays"))
        .expect("deploy/kubernetes/overlays")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    overlays.sort();
    assert!(
        overlays.iter().any(|p| p.ends_with("platform"))
            && overlays.iter().any(|p| p.ends_with("platform-vault")),
        "the platform overlays are there: {overlays:?}"
    );
    dirs.extend(overlays);
    dirs
}

/// `kubectl kustomize DIR`, as YAML text.
fn render(dir: &Path) -> String {
    let o = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (kubectl kustomize renders the overlays)");
    assert!(
        o.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        stderr(&o)
    );
    stdout(&o)
}

/// The rendered objects as JSON, through the tools venv's PyYAML.
fn objects(yaml: &str) -> Vec<Value> {
    let python = tool_binary("python3", "REKEY_PYTHON");
    let dir = TempDir::new("manifests");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).expect("write");
    let o = Command::new(python)
        .arg("-c")
        .arg("import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))")
        .arg(&file)
        .output()
        .expect("python3");
    assert!(o.status.success(), "yaml to json: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("json")
}

fn rendered() -> Vec<(PathBuf, String, Vec<Value>)> {
    kustomizations()
        .into_iter()
        .map(|d| {
            let y = render(&d);
            let o = objects(&y);
            (d, y, o)
        })
        .collect()
}

fn name(o: &Value) -> String {
    format!(
        "{}/{}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or("-"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn pod_specs(objs: &[Value]) -> Vec<(String, &Value)> {
    objs.iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job")
            )
        })
        .map(|o| (name(o), &o["spec"]["template"]["spec"]))
        .collect()
}

fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect()
}

fn is_image(c: &Value, image: &str) -> bool {
    c["image"].as_str().is_some_and(|i| {
        i.rsplit('/')
            .next()
            .unwrap_or(i)
            .starts_with(&format!("{image}:"))
    })
}

#[test]
fn every_overlay_renders_and_passes_the_kubernetes_schemas() {
    let validate = tool_binary("kubernetes-validate", "KUBERNETES_VALIDATE");
    for (dir, yaml, objs) in rendered() {
        let tmp = TempDir::new("validate");
        let file = tmp.path().join("rendered.yaml");
        std::fs::write(&file, &yaml).expect("write");
        let o = Command::new(&validate)
            .args(["--strict", "--no-warn"])
            .arg(&file)
            .output()
            .expect("kubernetes-validate");
        let out = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            o.status.success() && !out.contains("ERROR"),
            "{}: kubernetes-validate:\n{out}",
            dir.display()
        );
        let passed = out.matches(" passed for resource ").count();
        let monitors: Vec<&Value> = objs
            .iter()
            .filter(|o| o["kind"] == "ServiceMonitor")
            .collect();
        assert_eq!(
            passed + monitors.len(),
            objs.len(),
            "{}: every object but the ServiceMonitors is checked against a schema:\n{out}",
            dir.display()
        );
        // No schema for the Prometheus Operator's kind: its selector must
        // pick a Service in its namespace, and its port must be one of
        // that Service's named ports.
        for m in monitors {
            let wanted = m["spec"]["selector"]["matchLabels"]
                .as_object()
                .expect("matchLabels");
            let svc = objs
                .iter()
                .find(|s| {
                    s["kind"] == "Service"
                        && s["metadata"]["namespace"] == m["metadata"]["namespace"]
                        && wanted.iter().all(|(k, v)| s["metadata"]["labels"][k] == *v)
                })
                .unwrap_or_else(|| panic!("{}: no Service matches its selector", name(m)));
            for e in m["spec"]["endpoints"].as_array().expect("endpoints") {
                assert!(
                    svc["spec"]["ports"]
                        .as_array()
                        .expect("ports")
                        .iter()
                        .any(|p| p["name"] == e["port"]),
                    "{}: port {} is not a port of {}",
                    name(m),
                    e["port"],
                    name(svc)
                );
            }
        }
    }
}

#[test]
fn checkov_finds_nothing_and_every_skip_says_why() {
    let checkov = tool_binary("checkov", "CHECKOV");
    for (dir, yaml, objs) in rendered() {
        let tmp = TempDir::new("checkov");
        std::fs::write(tmp.path().join("rendered.yaml"), &yaml).expect("write");
        let o = Command::new(&checkov)
            .arg("-d")
            .arg(tmp.path())
            .args([
                "--framework",
                "kubernetes",
                "--compact",
                "--quiet",
                "--skip-download",
                "--output",
                "json",
            ])
            .env("BC_SKIP_MAPPING", "TRUE")
            .output()
            .expect("checkov");
        let report: Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| {
            panic!(
                "{}: checkov's report is not JSON ({e}):\n{}{}",
                dir.display(),
                stdout(&o),
                stderr(&o)
            )
        });
        let summary = &report["summary"];
        assert_eq!(
            summary["failed"],
            0,
            "{}: checkov failed checks:\n{}",
            dir.display(),
            serde_json::to_string_pretty(&report["results"]["failed_checks"]).unwrap_or_default()
        );
        assert!(
            summary["passed"].as_u64().unwrap_or(0) > 50,
            "{}: checkov ran its Kubernetes checks: {summary}",
            dir.display()
        );
        for obj in &objs {
            let Some(ann) = obj["metadata"]["annotations"].as_object() else {
                continue;
            };
            for (k, v) in ann.iter().filter(|(k, _)| k.starts_with("checkov.io/skip")) {
                let v = v.as_str().unwrap_or_default();
                let (check, why) = v.split_once('=').unwrap_or((v, ""));
                assert!(
                    check.starts_with("CKV_K8S_") && why.split_whitespace().count() >= 5,
                    "{}: {k} skips {check} without a reason: {v:?}",
                    name(obj)
                );
            }
        }
    }
}

#[test]
fn pods_run_as_non_root_read_only_and_hold_no_secret_value() {
    for (dir, _, objs) in rendered() {
        let at = dir.display();
        assert!(
            !objs.iter().any(|o| o["kind"] == "Secret"),
            "{at}: Secrets are created by the operator, not shipped"
        );
        for (pod, spec) in pod_specs(&objs) {
            let sc = &spec["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{at} {pod}: runAsNonRoot");
            assert!(
                sc["runAsUser"].as_u64().is_some_and(|u| u > 0),
                "{at} {pod}: a non-root runAsUser"
            );
            assert_eq!(
                sc["seccompProfile"]["type"], "RuntimeDefault",
                "{at} {pod}: seccomp"
            );
            for c in containers(spec) {
                let cn = c["name"].as_str().unwrap_or("?");
                let csc = &c["securityContext"];
                assert_eq!(
                    csc["readOnlyRootFilesystem"], true,
                    "{at} {pod} {cn}: read-only root"
                );
                assert_eq!(
                    csc["allowPrivilegeEscalation"], false,
                    "{at} {pod} {cn}: no privilege escalation"
                );
                assert!(
                    csc["runAsUser"].as_u64() != Some(0),
                    "{at} {pod} {cn}: not root"
                );
                assert!(
                    c["resources"]["requests"]["memory"].is_string()
                        && c["resources"]["limits"]["memory"].is_string(),
                    "{at} {pod} {cn}: memory requests and limits"
                );
                for e in c["env"].as_array().into_iter().flatten() {
                    let (n, v) = (e["name"].as_str().unwrap_or(""), e["value"].as_str());
                    if let Some(v) = v {
                        assert!(
                            !looks_secret(v),
                            "{at} {pod} {cn}: env {n} holds what looks like a credential"
                        );
                        let sensitive = ["TOKEN", "PASSWORD", "SECRET", "KEY", "URL"]
                            .iter()
                            .any(|s| n.contains(s));
                        assert!(
                            !sensitive || n.ends_with("_FILE") || v.starts_with('/'),
                            "{at} {pod} {cn}: env {n} is given a literal value; use a file or a secretKeyRef"
                        );
                    }
                }
            }
        }
        for cm in objs.iter().filter(|o| o["kind"] == "ConfigMap") {
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                assert!(
                    !looks_secret(v.as_str().unwrap_or_default()),
                    "{at} {}: {k} holds what looks like a credential",
                    name(cm)
                );
            }
        }
    }
}

/// A URL with a password, a rekey token, or base64 of 32 bytes.
fn looks_secret(text: &str) -> bool {
    let url_password = text.split("://").skip(1).any(|rest| {
        let authority = rest.split(['/', '?', '#', '"', ' ']).next().unwrap_or("");
        authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
    });
    let token = text
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|w| w.starts_with("rk_") && w.len() > 20);
    let key = text
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .any(|w| {
            w.len() == 44
                && w.ends_with('=')
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c))
        });
    url_password || token || key
}

#[test]
fn sidecars_are_native_with_probes_on_their_port_and_signals_only_where_configured() {
    for (dir, _, objs) in rendered() {
        let at = dir.display();
        for (pod, spec) in pod_specs(&objs) {
            let sidecars: Vec<&Value> = containers(spec)
                .into_iter()
                .filter(|c| is_image(c, "rekey-sidecar"))
                .collect();
            if sidecars.is_empty() {
                continue;
            }
            let mut signals = false;
            for c in sidecars {
                assert!(
                    spec["initContainers"]
                        .as_array()
                        .is_some_and(|i| i.contains(c))
                        && c["restartPolicy"] == "Always",
                    "{at} {pod}: the sidecar is a native sidecar (an init container with restartPolicy Always)"
                );
                let config = sidecar_config(&objs, spec, c);
                let listen = config
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("listen = "))
                    .map(|v| v.trim_matches('"').to_string())
                    .expect("the sidecar's config sets listen");
                let port: u64 = listen
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("a port");
                assert!(
                    listen.starts_with("0.0.0.0:"),
                    "{at} {pod}: the kubelet probes the pod's IP, so the sidecar listens on all addresses ({listen})"
                );
                for (probe, path) in [
                    ("startupProbe", "/readyz"),
                    ("readinessProbe", "/readyz"),
                    ("livenessProbe", "/livez"),
                ] {
                    assert_eq!(
                        c[probe]["httpGet"]["path"], path,
                        "{at} {pod}: {probe} path"
                    );
                    assert_eq!(
                        c[probe]["httpGet"]["port"], port,
                        "{at} {pod}: {probe} on the port the sidecar listens on"
                    );
                }
                signals |= config.lines().any(|l| l.trim().starts_with("signal = "));
                let secrets_dir = c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["mountPath"] == "/run/secrets/app")
                    .and_then(|m| m["name"].as_str())
                    .expect("the sidecar writes into /run/secrets/app");
                let vol = spec["volumes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == secrets_dir)
                    .expect("its volume");
                assert!(
                    vol["emptyDir"]["medium"] == "Memory"
                        && vol["emptyDir"]["sizeLimit"].is_string(),
                    "{at} {pod}: secret files live in an in-memory emptyDir with a sizeLimit"
                );
            }
            assert_eq!(
                spec["shareProcessNamespace"].as_bool().unwrap_or(false),
                signals,
                "{at} {pod}: the process namespace is shared exactly when a reload sends a signal"
            );
        }
    }
}

/// The text of the sidecar config file the container is started with
/// (`--config PATH`), from the ConfigMap mounted at PATH's directory.
fn sidecar_config(objs: &[Value], spec: &Value, c: &Value) -> String {
    mounted_file(objs, spec, c, &config_arg(c)).expect("the config file comes from a ConfigMap")
}

fn config_arg(c: &Value) -> String {
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    args.windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1].to_string())
        .expect("--config")
}

/// A file under one of the container's ConfigMap mounts: its text.
fn mounted_file(objs: &[Value], spec: &Value, c: &Value, path: &str) -> Option<String> {
    let ns = objs
        .iter()
        .find(|o| std::ptr::eq(&o["spec"]["template"]["spec"], spec))
        .map(|o| o["metadata"]["namespace"].clone())
        .unwrap_or(Value::Null);
    c["volumeMounts"].as_array()?.iter().find_map(|m| {
        let rel = path
            .strip_prefix(m["mountPath"].as_str()?)?
            .trim_start_matches('/');
        let vol = spec["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == m["name"])?;
        let cm_name = vol["configMap"]["name"].as_str()?;
        let cm = objs.iter().find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"] == cm_name
                && o["metadata"]["namespace"] == ns
        })?;
        cm["data"][rel].as_str().map(str::to_string)
    })
}

/// The rekey containers of the rendered pods: (where, pod spec, container,
/// binary).
fn rekey_containers(objs: &[Value]) -> Vec<(String, &Value, &Value, rekey_testkit::Binary)> {
    let mut out = Vec::new();
    for (pod, spec) in pod_specs(objs) {
        for c in containers(spec) {
            let bin = if is_image(c, "rekey-sidecar") {
                SIDECAR
            } else if is_image(c, "rekey-backend") {
                BACKEND
            } else {
                continue;
            };
            out.push((format!("{pod} {}", c["name"]), spec, c, bin));
        }
    }
    out
}

/// The container's command as its pod would run it, with the pod's files
/// laid out under `root`: the config file from its ConfigMap, each file the
/// config names under a Secret or projected mount as a stand-in (a KEK of
/// the right shape, a token, a CA that parses, else a placeholder), each
/// emptyDir empty, and the container's environment (Secret references as
/// stand-ins). Paths in the config and environment are the pod's paths,
/// moved under `root`. `store` replaces a store URL taken from a Secret.
fn pod_command(
    root: &Path,
    objs: &[Value],
    spec: &Value,
    c: &Value,
    bin: rekey_testkit::Binary,
    store: &str,
) -> Command {
    let relocate = |p: &str| format!("{}{p}", root.display());
    let config_path = config_arg(c);
    let config = mounted_file(objs, spec, c, &config_path).expect("config");
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let mount = m["mountPath"].as_str().expect("mountPath");
        let at = PathBuf::from(relocate(mount));
        std::fs::create_dir_all(&at).expect("mount dir");
        let vol = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"])
            .expect("volume");
        if vol.get("secret").is_none() && vol.get("projected").is_none() {
            continue;
        }
        for word in config.split(['"', '\'']) {
            let Some(rel) = word.strip_prefix(mount).and_then(|r| r.strip_prefix('/')) else {
                continue;
            };
            let content = if rel.ends_with(".crt") || rel.ends_with(".pem") {
                ca_pem(root)
            } else if rel.contains("kek") {
                // base64 of 32 bytes.
                "cmVrZXkgc3RhbmQtaW4ga2V5LWVuY3J5cHRpb24gayE=\n".to_string()
            } else if rel.contains("token") {
                format!("rk_{}\n", "0f".repeat(32))
            } else {
                "placeholder\n".to_string()
            };
            std::fs::write(at.join(rel), content).expect("stand-in");
        }
    }
    let file = PathBuf::from(relocate(&config_path));
    std::fs::write(&file, relocate_paths(&config, c, &relocate)).expect("config");
    let mut cmd = Command::new(bin.path());
    let mut args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        args[i + 1] = file.display().to_string();
    }
    cmd.args(&args);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOSTNAME", "pod-0")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443");
    for e in c["env"].as_array().into_iter().flatten() {
        let n = e["name"].as_str().expect("name");
        let v = match (&e["value"], &e["valueFrom"]) {
            (Value::String(v), _) => relocate_paths(v, c, &relocate),
            (_, from) if from.get("secretKeyRef").is_some() => {
                if n.ends_with("URL") {
                    store.to_string()
                } else {
                    "placeholder".into()
                }
            }
            (_, from) if from.get("fieldRef").is_some() => "platform".into(),
            _ => continue,
        };
        cmd.env(n, v);
    }
    cmd
}

/// The config file mounted into each rekey container passes
/// `--check-config` in the pod's layout.
#[test]
fn the_mounted_config_files_pass_check_config() {
    let mut checked = 0;
    for (dir, _, objs) in rendered() {
        for (at, spec, c, bin) in rekey_containers(&objs) {
            let root = TempDir::new("pod");
            let mut cmd = pod_command(
                root.path(),
                &objs,
                spec,
                c,
                bin,
                "postgres://placeholder@postgres:5432/placeholder",
            );
            let o = cmd
                .arg("--check-config")
                .output()
                .expect("run --check-config");
            assert!(
                o.status.success() && stdout(&o).starts_with("configuration valid: "),
                "{} {at}: {} --check-config failed:\n{}{}",
                dir.display(),
                bin.name,
                stdout(&o),
                stderr(&o)
            );
            checked += 1;
        }
    }
    // The base's backend, and each platform overlay's backend and two
    // sidecars.
    assert!(checked >= 7, "checked {checked} containers");
}

/// Each rekey container of the platform overlay, started with its pod's
/// arguments in a network namespace of its own (so the manifests' fixed
/// ports are free), answers every probe the manifest gives it on the port
/// the manifest names: HTTP probes with the status the probe expects (200;
/// a 500 or a 404 fails), the gRPC probe with SERVING for the service it
/// names. The backend's store is
/// SQLite in its data volume instead of the Secret's Postgres URL; the
/// sidecars cannot reach their backend's cluster address, which their
/// readiness reports (503) while their endpoints still answer.
#[test]
fn every_probe_names_a_path_and_port_the_binary_serves() {
    let overlay = workspace().join("deploy/kubernetes/overlays/platform");
    let objs = objects(&render(&overlay));
    let mut probed = 0;
    for (at, spec, c, bin) in rekey_containers(&objs) {
        let root = TempDir::new("probe");
        let db = format!(
            "sqlite://{}/var/lib/rekey/rekey.db?mode=rwc",
            root.path().display()
        );
        let cmd = pod_command(root.path(), &objs, spec, c, bin, &db);
        let mut script = String::from("ip link set lo up\n");
        let envs: Vec<String> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, shell(v?.to_str()?))))
            .collect();
        let args: Vec<String> = cmd
            .get_args()
            .filter_map(|a| a.to_str().map(shell))
            .collect();
        script += &format!(
            "env -i {} {} {} >{log} 2>&1 &\npid=$!\n",
            envs.join(" "),
            shell(&bin.path().display().to_string()),
            args.join(" "),
            log = root.path().join("log").display()
        );
        let request = root.path().join("health-request");
        let mut checks = Vec::new();
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let p = &c[probe];
            if let Some(path) = p["httpGet"]["path"].as_str() {
                let port = p["httpGet"]["port"].as_u64().expect("port");
                checks.push(format!(
                    "echo {probe} $(curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}{path})"
                ));
            } else if let Some(port) = p["grpc"]["port"].as_u64() {
                let service = p["grpc"]["service"].as_str().unwrap_or("");
                // A gRPC frame holding HealthCheckRequest { service }.
                let mut msg = vec![0x0a, u8::try_from(service.len()).expect("short")];
                msg.extend_from_slice(service.as_bytes());
                let mut frame = vec![0u8];
                frame.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_be_bytes());
                frame.extend_from_slice(&msg);
                std::fs::write(&request, &frame).expect("request");
                checks.push(format!(
                    "echo {probe} $(curl -s --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @{} http://127.0.0.1:{port}/grpc.health.v1.Health/Check | od -An -tx1 | tr -d ' \\n')",
                    request.display()
                ));
            } else {
                panic!("{at}: {probe} is neither an HTTP nor a gRPC probe");
            }
        }
        // Poll until the first probe answers, then ask each once.
        script += &format!(
            "for i in $(seq 1 100); do {first} | grep -qv ' 000$' && break; sleep 0.1; done\n{all}\nkill $pid\nwait $pid\n",
            first = checks[0],
            all = checks.join("\n")
        );
        let o = Command::new("timeout")
            .args(["60", "unshare", "--net", "sh", "-c", &script])
            .output()
            .expect("unshare");
        let out = stdout(&o);
        let log = std::fs::read_to_string(root.path().join("log")).unwrap_or_default();
        for line in out.lines() {
            let (probe, answer) = line.split_once(' ').unwrap_or((line, ""));
            if c[probe].get("grpc").is_some() {
                // 5-byte frame header, then field 1 (status) = 1 (SERVING).
                assert!(
                    answer.ends_with("0801"),
                    "{at}: {probe} is not SERVING (answer {answer:?}); log:\n{log}"
                );
            } else {
                // The status the probe expects: 200, but for a sidecar's
                // readiness here, whose backend's cluster address cannot be
                // reached from the namespace: 503, as it should say then.
                let path = c[probe]["httpGet"]["path"].as_str().unwrap_or_default();
                let want = if bin.path() == SIDECAR.path() && path == "/readyz" {
                    "503"
                } else {
                    "200"
                };
                assert_eq!(
                    answer, want,
                    "{at}: {probe} ({path}) answered {answer:?}; log:\n{log}"
                );
            }
            probed += 1;
        }
        assert_eq!(out.lines().count(), 3, "{at}: three probes:\n{out}\n{log}");
    }
    // The backend's and two sidecars' three probes each.
    assert_eq!(probed, 9);
}

/// `s` quoted for sh.
fn shell(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A CA certificate (PEM), made in `dir`.
fn ca_pem(dir: &Path) -> String {
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        std::fs::create_dir_all(&pki).expect("pki");
        server_pki(&pki);
    }
    std::fs::read_to_string(pki.join("ca.pem")).expect("ca.pem")
}

/// `text` with every path under one of the container's mounts moved under
/// the temporary root.
fn relocate_paths(text: &str, c: &Value, relocate: &dyn Fn(&str) -> String) -> String {
    let mut mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let mut out = text.to_string();
    for m in mounts {
        out = out
            .replace(&format!("\"{m}"), &format!("\"{}", relocate(m)))
            .replace(&format!("'{m}"), &format!("'{}", relocate(m)));
        if out.starts_with(m) {
            out = format!("{}{}", relocate(m), &out[m.len()..]);
        }
    }
    out
}

#[test]
fn check_config_names_every_problem_and_no_secret() {
    let tmp = TempDir::new("check-config");
    let token = tmp.path().join("token");
    std::fs::write(&token, "rk_supersecretvalue_that_must_not_show\n").expect("token");
    // The backend: a valid configuration, then one with two problems.
    let ok = Command::new(BACKEND.path())
        .arg("--check-config")
        .env_clear()
        .env("REKEY_DATA_DIR", tmp.path())
        .env(
            "REKEY_STORE_URL",
            "postgres://rekey:hunter2hunter2@db:5432/rekey",
        )
        .output()
        .expect("rekey-backend");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = stdout(&ok);
    assert!(out.starts_with("configuration valid: "), "{out}");
    assert!(
        !out.contains("hunter2"),
        "the store password is not shown: {out}"
    );
    let bad = Command::new(BACKEND.path())
        .arg("--check-config")
        .env_clear()
        .env("REKEY_DATA_DIR", tmp.path())
        .env("REKEY_LISTEN", "nowhere")
        .env("REKEY_KEK_FILE", tmp.path().join("missing-kek"))
        .output()
        .expect("rekey-backend");
    assert_eq!(bad.status.code(), Some(2));
    let err = stderr(&bad);
    assert!(err.contains("listen") && err.contains("nowhere"), "{err}");
    // Settings first; the files are checked once the settings are valid.
    let bad_file = Command::new(BACKEND.path())
        .arg("--check-config")
        .env_clear()
        .env("REKEY_DATA_DIR", tmp.path())
        .env("REKEY_KEK_FILE", tmp.path().join("missing-kek"))
        .output()
        .expect("rekey-backend");
    assert_eq!(bad_file.status.code(), Some(2));
    assert!(
        stderr(&bad_file).contains("kek.file: cannot read"),
        "{}",
        stderr(&bad_file)
    );
    assert!(
        !tmp.path().join("rekey.db").exists() && !tmp.path().join("kek").exists(),
        "--check-config starts nothing and creates nothing"
    );

    // The sidecar: valid, then every problem in one list.
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).expect("out");
    let ok = Command::new(SIDECAR.path())
        .arg("--check-config")
        .arg("--backend")
        .arg("http://127.0.0.1:1")
        .arg("--token-file")
        .arg(&token)
        .arg("--secret")
        .arg(format!("app/db:{}", out_dir.join("db").display()))
        .env_clear()
        .output()
        .expect("rekey-sidecar");
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).starts_with("configuration valid: "),
        "{}",
        stdout(&ok)
    );
    let bad = Command::new(SIDECAR.path())
        .arg("--check-config")
        .arg("--backend")
        .arg("ftp://x")
        .arg("--token-file")
        .arg(&token)
        .arg("--secret")
        .arg(format!("app/db:{}", tmp.path().join("absent/db").display()))
        .env_clear()
        .output()
        .expect("rekey-sidecar");
    assert_eq!(bad.status.code(), Some(2));
    let err = stderr(&bad);
    assert!(err.contains("backend") && err.contains("absent"), "{err}");
    for o in [&ok, &bad] {
        let all = format!("{}{}", stdout(o), stderr(o));
        assert!(
            !all.contains("supersecret"),
            "no token in the output: {all}"
        );
    }
}
