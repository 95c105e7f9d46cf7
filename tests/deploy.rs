//! `deploy/`: every Kubernetes kustomization renders with `kubectl kustomize` (offline) and
//! every object it renders validates against the Kubernetes schemas (`kubernetes-validate`,
//! strict); `nip inject` output validates too; the control plane's admission webhook
//! answers AdmissionReviews with a patch that injects the sidecar.

use crate::common::control_plane::ControlPlane;
use crate::common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubernetes-validate` of the test virtualenv (tests/interop/requirements.txt).
fn validator() -> PathBuf {
    let python = std::env::var("NIP_TEST_PYTHON").expect(
        "NIP_TEST_PYTHON is not set: run the tests with ./dev test, which makes a virtualenv with tests/interop/requirements.txt",
    );
    Path::new(&python)
        .parent()
        .expect("the venv's bin directory")
        .join("kubernetes-validate")
}

/// Validates the YAML documents in `manifests` strictly; panics with what is wrong.
fn validate(manifests: &str, what: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifests).unwrap();
    let output = Command::new(validator())
        .args(["--strict", "--no-warn", "-k", KUBERNETES_VERSION])
        .arg(file.path())
        .output()
        .expect("kubernetes-validate runs");
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what}:\n{report}");
    assert!(!report.contains("ERROR"), "{what}:\n{report}");
}

/// `kubectl kustomize DIR` (kubectl's built-in kustomize works offline).
fn kustomize(dir: &str) -> String {
    let output = Command::new("kubectl")
        .args(["kustomize"])
        .arg(repository().join("deploy/kubernetes").join(dir))
        .output()
        .expect("kubectl is missing: ./dev test installs it (Debian's kubernetes-client)");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::to_value(serde_yaml_value(d)).unwrap())
        .collect()
}

fn serde_yaml_value(document: &str) -> serde_yaml::Value {
    serde_yaml::from_str(document).unwrap()
}

#[test]
fn every_kustomization_renders_and_validates_against_the_kubernetes_schemas() {
    let _turn = crate::common::module_turn(module_path!());
    for dir in [
        "control-plane",
        "regions/eu-west",
        "regions/us-east",
        "sidecar",
        "demo-postgres",
    ] {
        let rendered = kustomize(dir);
        validate(&rendered, dir);
        assert!(!rendered.contains("REGION"), "{dir}: a placeholder is left");
    }
    // Each region's fleet runs on its nodes, as itself, with its own join token.
    for region in ["eu-west", "us-east"] {
        let objects = documents(&kustomize(&format!("regions/{region}")));
        let fleet = objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet")
            .expect("the fleet");
        assert_eq!(fleet["metadata"]["name"], format!("{region}-nip-edge"));
        let pod = &fleet["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["topology.kubernetes.io/region"], region);
        assert_eq!(pod["serviceAccountName"], format!("{region}-nip-edge"));
        let volumes = pod["volumes"].as_array().unwrap();
        assert!(volumes
            .iter()
            .any(|v| v["secret"]["secretName"] == format!("nip-join-token-{region}")));
        assert!(volumes
            .iter()
            .any(|v| v["configMap"]["name"] == format!("{region}-nip-edge-bootstrap")));
        let bootstrap = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap")
            .expect("the bootstrap");
        let text = bootstrap["data"]["bootstrap.yaml"].as_str().unwrap();
        assert!(text.contains(&format!("region: {region}")), "{text}");
        // The bootstrap is a config nip itself accepts.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let checked = run_nip(&["validate", "-f", file.path().to_str().unwrap()], None);
        assert!(
            checked.status.success(),
            "{region} bootstrap: {}",
            String::from_utf8_lossy(&checked.stderr)
        );
    }
}

#[test]
fn nip_inject_output_validates_and_injecting_it_again_changes_nothing() {
    let _turn = crate::common::module_turn(module_path!());
    let app = repository().join("deploy/examples/app.yaml");
    let injected = run_nip(&["inject", "-f", app.to_str().unwrap()], None);
    assert!(
        injected.status.success(),
        "{}",
        String::from_utf8_lossy(&injected.stderr)
    );
    let injected = String::from_utf8(injected.stdout).unwrap();
    validate(&injected, "nip inject output");
    let objects = documents(&injected);
    let pod = &objects[0]["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["name"], "nip-proxy");
    assert_eq!(pod["containers"][1]["name"], "hello");
    assert_eq!(pod["initContainers"][0]["name"], "nip-init");
    assert_eq!(objects[1]["kind"], "Service");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &injected).unwrap();
    let again = run_nip(&["inject", "-f", file.path().to_str().unwrap()], None);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), injected);
    // A broken manifest is named by its position and the path that is wrong.
    std::fs::write(
        file.path(),
        "kind: Pod\nmetadata: { name: p }\nspec: { containers: 3 }\n",
    )
    .unwrap();
    let broken = run_nip(&["inject", "-f", file.path().to_str().unwrap()], None);
    assert!(!broken.status.success());
    assert!(
        String::from_utf8_lossy(&broken.stderr)
            .contains("document 1 (Pod p): /spec/containers: must be a list"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
}

/// Applies the `add`/`replace` operations of a JSON patch (all the webhook sends).
fn apply_patch(mut document: Value, patch: &Value) -> Value {
    for op in patch.as_array().unwrap() {
        assert!(matches!(op["op"].as_str(), Some("add" | "replace")), "{op}");
        let path = op["path"].as_str().unwrap();
        let parts: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|p| p.replace("~1", "/").replace("~0", "~"))
            .collect();
        let mut current = &mut document;
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                current[part.as_str()] = op["value"].clone();
            } else {
                current = &mut current[part.as_str()];
            }
        }
    }
    document
}

/// The control plane's answer to an AdmissionReview.
async fn answered(http: &reqwest::Client, control_plane: &ControlPlane, review: &Value) -> Value {
    http.post(control_plane.api("/v1/inject"))
        .json(review)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_webhook_injects_pods_posted_as_admission_reviews() {
    let _turn = crate::common::module_turn(module_path!());
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    // The apiserver calls the webhook without an API token.
    let http = control_plane.anonymous();
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": "app", "namespace": "shop", "annotations": { "team": "a" } },
        "spec": { "containers": [{ "name": "app", "image": "shop:1" }] }
    });
    let review = |object: &Value, uid: &str| {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "operation": "CREATE",
                "namespace": "shop",
                "object": object
            }
        })
    };
    let answer = answered(&http, &control_plane, &review(&pod, "r-1")).await;
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "r-1");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = nip_xds::config::decode_base64(response["patch"].as_str().unwrap()).unwrap();
    let injected = apply_patch(pod.clone(), &serde_json::from_slice(&patch).unwrap());
    assert_eq!(injected["metadata"]["annotations"]["team"], "a");
    assert_eq!(
        injected["metadata"]["annotations"]["nip.dev/injected"],
        "true"
    );
    assert_eq!(injected["spec"]["containers"][0]["name"], "nip-proxy");
    validate(
        &serde_yaml::to_string(&injected).unwrap(),
        "the webhook's pod",
    );

    // A pod that opted out is admitted unchanged.
    let mut opted_out = pod.clone();
    opted_out["metadata"]["annotations"]["nip.dev/inject"] = json!("false");
    let answer = answered(&http, &control_plane, &review(&opted_out, "r-2")).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    // Not an AdmissionReview: 400, naming what is missing.
    let refused = http
        .post(control_plane.api("/v1/inject"))
        .json(&json!({ "hello": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("/request"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_returns_once_the_proxy_serves_and_fails_at_its_timeout() {
    let _turn = crate::common::module_turn(module_path!());
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        "admin: {{ address: \"127.0.0.1:{{admin}}\" }}\napi_gateway: {{ address: \"127.0.0.1:{{port}}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\nroutes:\n  - service: web\n",
        backend.address
    ))
    .await;
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let ready = run_nip(&["wait-ready", "--admin", &admin, "--timeout", "10s"], None);
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    // Nothing answers there: it gives up at the timeout, saying why.
    let nobody = format!("127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let waited = run_nip(&["wait-ready", "--admin", &nobody, "--timeout", "1s"], None);
    assert!(!waited.status.success());
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert!(
        String::from_utf8_lossy(&waited.stderr).contains("the proxy was not ready within"),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
}

/// deploy/grafana/nip.json asks only for metrics a proxy exports, by labels they have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_names_metrics_a_proxy_exports() {
    let _turn = crate::common::module_turn(module_path!());
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repository().join("deploy/grafana/nip.json")).unwrap(),
    )
    .unwrap();
    let backend = Backend::start("web").await;
    let proxy = Proxy::start(&format!(
        "admin: {{ address: \"127.0.0.1:{{admin}}\" }}\napi_gateway: {{ address: \"127.0.0.1:{{port}}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\nroutes:\n  - {{ name: all, match: {{ path_prefix: /in }}, service: web }}\n",
        backend.address
    ))
    .await;
    client().get(proxy.url("/in")).send().await.unwrap();
    client().get(proxy.url("/nowhere")).send().await.unwrap();
    let metrics = proxy.metrics().await;
    // Families by their TYPE lines (counters lose `_total` there), and the families the
    // registry holds (one without samples yet — no tenant, no JWT here — prints nothing).
    let registered =
        std::fs::read_to_string(repository().join("proxy/src/telemetry/metrics.rs")).unwrap();
    let registration = regex::Regex::new(r#"registry\.register\(\s*"([a-z_]+)""#).unwrap();
    let mut families: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    assert!(families.contains("nip_requests"), "{metrics}");
    families.extend(
        registration
            .captures_iter(&registered)
            .map(|c| format!("nip_{}", &c[1])),
    );
    let family_of = |name: &str| {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        base.strip_suffix("_total").unwrap_or(base).to_string()
    };
    let metric = regex::Regex::new(r"nip_[a-z_]+").unwrap();
    let by = regex::Regex::new(r"by \(([a-z_, ]+)\) \((?:rate\()?(nip_[a-z_]+)").unwrap();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in metric.find_iter(expr).map(|m| m.as_str()) {
                asked += 1;
                assert!(
                    families.contains(family_of(name).as_str()),
                    "{:?} asks for {name}, which the proxy does not export",
                    panel["title"]
                );
            }
            // `sum by (labels) (… nip_x …)`: a family with samples has those labels.
            for caps in by.captures_iter(expr) {
                let (labels, name) = (&caps[1], &caps[2]);
                let samples: Vec<&str> = metrics
                    .lines()
                    .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                    .collect();
                for label in labels.split(',').map(str::trim) {
                    if label == "le" || samples.is_empty() {
                        continue;
                    }
                    assert!(
                        samples.iter().any(|s| s.contains(&format!("{label}=\""))),
                        "{:?}: {name} has no label {label}: {samples:?}",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(asked >= 20, "the dashboard asks for {asked} metrics");
}
