//! Sidecar injection: what `nip inject` does to a manifest and what the control plane's
//! mutating admission webhook does to a pod, the way `linkerd inject --manual` and Istio's
//! injector do it.
//!
//! A pod template gets, in this order of start-up:
//! * the init container `nip-init` (root with `NET_ADMIN`/`NET_RAW` only): `nip iptables
//!   setup`, so every TCP connection in and out of the pod goes through the proxy, the
//!   proxy's own UID excepted;
//! * the container `nip-proxy`, first among the containers (UID 1337, read-only root, no
//!   capabilities): `nip proxy` on the bootstrap of the `nip-sidecar` ConfigMap, joining
//!   the control plane with the `nip-join-token` Secret and trusting it by the
//!   `nip-trust-bundle` ConfigMap; its `postStart` hook (`nip
//!   wait-ready`) holds the application's containers until the proxy serves, and its admin
//!   port is the readiness and liveness probe and the Prometheus scrape target;
//! * volumes for that bootstrap, the token and the proxy's state (its key and certificate).
//!
//! A pod whose annotation `nip.dev/inject` is `"false"`, or that is injected already
//! (`nip.dev/injected`), is left as it is. Everything works on `serde_json::Value`, so a
//! YAML manifest and an `AdmissionReview` go through the same code.

use serde_json::{json, Map, Value};

/// The annotation that opts a pod out (`"false"`).
pub const INJECT_ANNOTATION: &str = "nip.dev/inject";
/// The annotation an injected pod carries.
pub const INJECTED_ANNOTATION: &str = "nip.dev/injected";
/// The proxy's UID: its traffic is the one `nip iptables` lets through unredirected.
pub const PROXY_UID: u32 = 1337;
/// The proxy's admin port in the pod: readiness, liveness, metrics.
pub const ADMIN_PORT: u16 = 15020;

/// What an injected proxy runs and where it joins.
#[derive(Debug, Clone)]
pub struct InjectSettings {
    /// The NIP image.
    pub image: String,
    /// The ConfigMap holding `bootstrap.yaml` (the proxy's local config: control plane
    /// address, trust bundle, sidecar ports).
    pub bootstrap_config_map: String,
    /// The Secret holding the join token (`token`).
    pub join_token_secret: String,
    /// The ConfigMap holding the mesh's trust bundle (`trust-bundle.pem`).
    pub trust_bundle_config_map: String,
}

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: format!("nip:{}", env!("CARGO_PKG_VERSION")),
            bootstrap_config_map: "nip-sidecar".to_string(),
            join_token_secret: "nip-join-token".to_string(),
            trust_bundle_config_map: "nip-trust-bundle".to_string(),
        }
    }
}

/// Why an object cannot be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// A part the injector writes to has the wrong shape.
    #[error("{path}: {message}")]
    Shape {
        /// Where, as a JSON pointer.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn shape(path: &str, message: &str) -> InjectError {
    InjectError::Shape {
        path: path.to_string(),
        message: message.to_string(),
    }
}

/// Where the pod template of a workload kind lives (JSON pointers to its metadata and its
/// spec); `None` for kinds without pods.
fn pod_template(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind {
        "Pod" => Some(("/metadata", "/spec")),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(("/spec/template/metadata", "/spec/template/spec")),
        "CronJob" => Some((
            "/spec/jobTemplate/spec/template/metadata",
            "/spec/jobTemplate/spec/template/spec",
        )),
        _ => None,
    }
}

/// Injects the sidecar into `object` in place (every item of a `List`); returns whether
/// anything changed.
pub fn inject(object: &mut Value, settings: &InjectSettings) -> Result<bool, InjectError> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if kind == "List" {
        let mut changed = false;
        if let Some(items) = object.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                changed |= inject(item, settings)?;
            }
        }
        return Ok(changed);
    }
    let Some((metadata_path, spec_path)) = pod_template(&kind) else {
        return Ok(false);
    };
    let metadata = object
        .pointer(metadata_path)
        .cloned()
        .unwrap_or_else(|| json!({}));
    if !wants_injection(&metadata) {
        return Ok(false);
    }
    let spec = object
        .pointer(spec_path)
        .cloned()
        .ok_or_else(|| shape(spec_path, "missing: a workload needs its pod spec"))?;
    let (metadata, spec) = injected(metadata, spec, settings, spec_path)?;
    set(object, metadata_path, metadata);
    set(object, spec_path, spec);
    Ok(true)
}

/// Whether a pod with `metadata` is to be injected.
fn wants_injection(metadata: &Value) -> bool {
    let annotation = |key: &str| {
        metadata
            .get("annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
    };
    annotation(INJECT_ANNOTATION) != Some("false") && annotation(INJECTED_ANNOTATION).is_none()
}

/// Sets the value at a JSON pointer whose parents exist or can be made objects.
fn set(object: &mut Value, pointer: &str, value: Value) {
    let mut current = object;
    let parts: Vec<&str> = pointer.split('/').skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        if !current.is_object() {
            *current = json!({});
        }
        let Some(map) = current.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        current = map.entry((*part).to_string()).or_insert_with(|| json!({}));
    }
}

/// The pod's metadata and spec with the sidecar.
fn injected(
    mut metadata: Value,
    mut spec: Value,
    settings: &InjectSettings,
    spec_path: &str,
) -> Result<(Value, Value), InjectError> {
    let annotations = metadata
        .as_object_mut()
        .ok_or_else(|| shape("/metadata", "must be an object"))?
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| shape("/metadata/annotations", "must be an object"))?;
    annotations.insert(INJECTED_ANNOTATION.into(), json!("true"));
    annotations.insert("prometheus.io/scrape".into(), json!("true"));
    annotations.insert("prometheus.io/port".into(), json!(ADMIN_PORT.to_string()));
    annotations.insert("prometheus.io/path".into(), json!("/metrics"));

    let spec_map = spec
        .as_object_mut()
        .ok_or_else(|| shape(spec_path, "must be an object"))?;
    let list = |map: &mut Map<String, Value>, key: &str| -> Result<Vec<Value>, InjectError> {
        match map.remove(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(shape(&format!("{spec_path}/{key}"), "must be a list")),
        }
    };
    let mut init = list(spec_map, "initContainers")?;
    init.insert(0, init_container(settings));
    spec_map.insert("initContainers".into(), Value::Array(init));
    let mut containers = list(spec_map, "containers")?;
    // First: the kubelet starts containers in order and waits for each one's postStart.
    containers.insert(0, proxy_container(settings));
    spec_map.insert("containers".into(), Value::Array(containers));
    let mut volumes = list(spec_map, "volumes")?;
    volumes.extend(volumes_of(settings));
    spec_map.insert("volumes".into(), Value::Array(volumes));
    Ok((metadata, spec))
}

fn init_container(settings: &InjectSettings) -> Value {
    json!({
        "name": "nip-init",
        "image": settings.image,
        "args": [
            "iptables", "setup",
            "--proxy-uid", PROXY_UID.to_string(),
            "--inbound-ports-exclude", ADMIN_PORT.to_string(),
        ],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            // iptables takes its lock in /run/xtables.lock.
            "readOnlyRootFilesystem": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] }
        },
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "cpu": "100m", "memory": "64Mi" }
        }
    })
}

fn proxy_container(settings: &InjectSettings) -> Value {
    let probe = || {
        json!({
            "httpGet": { "path": "/ready", "port": ADMIN_PORT },
            "periodSeconds": 5,
            "failureThreshold": 3
        })
    };
    json!({
        "name": "nip-proxy",
        "image": settings.image,
        "args": ["proxy", "--config", "/etc/nip/bootstrap.yaml"],
        "env": [
            { "name": "XDG_CACHE_HOME", "value": "/var/lib/nip/cache" },
            {
                "name": "NIP_POD_NAMESPACE",
                "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } }
            }
        ],
        "ports": [{ "name": "nip-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" }],
        "readinessProbe": probe(),
        "livenessProbe": {
            "httpGet": { "path": "/healthz", "port": ADMIN_PORT },
            "periodSeconds": 10,
            "failureThreshold": 6
        },
        "lifecycle": {
            "postStart": {
                "exec": {
                    "command": [
                        "nip", "wait-ready",
                        "--admin", format!("127.0.0.1:{ADMIN_PORT}"),
                        "--timeout", "120s"
                    ]
                }
            }
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] }
        },
        "resources": {
            "requests": { "cpu": "50m", "memory": "32Mi" },
            "limits": { "cpu": "1", "memory": "256Mi" }
        },
        "volumeMounts": [
            { "name": "nip-bootstrap", "mountPath": "/etc/nip", "readOnly": true },
            { "name": "nip-credentials", "mountPath": "/var/run/nip", "readOnly": true },
            { "name": "nip-state", "mountPath": "/var/lib/nip" }
        ]
    })
}

fn volumes_of(settings: &InjectSettings) -> Vec<Value> {
    vec![
        json!({ "name": "nip-bootstrap", "configMap": { "name": settings.bootstrap_config_map } }),
        // The join token and the trust bundle, side by side in /var/run/nip.
        json!({
            "name": "nip-credentials",
            "projected": {
                "sources": [
                    { "secret": { "name": settings.join_token_secret } },
                    { "configMap": { "name": settings.trust_bundle_config_map } }
                ]
            }
        }),
        json!({ "name": "nip-state", "emptyDir": {} }),
    ]
}

/// The mutating admission webhook's answer to an `AdmissionReview` (admission.k8s.io/v1)
/// about a pod: allowed, with a JSON patch adding the sidecar when it is to be injected.
pub fn review(body: &Value, settings: &InjectSettings) -> Result<Value, InjectError> {
    let request = body
        .get("request")
        .ok_or_else(|| shape("/request", "missing: not an AdmissionReview"))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or_else(|| shape("/request/uid", "missing"))?;
    let mut response = json!({ "uid": uid, "allowed": true });
    if let Some(object) = request.get("object") {
        let mut pod = object.clone();
        if pod.get("kind").is_none() {
            set(&mut pod, "/kind", json!("Pod"));
        }
        if inject(&mut pod, settings)? {
            let patch = json_patch(object, &pod);
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64_encode(patch.to_string().as_bytes()));
        }
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response
    }))
}

/// A JSON patch (RFC 6902) turning the pod `before` into `after`: the annotations one by
/// one (the apiserver's own may be there), the spec whole.
fn json_patch(before: &Value, after: &Value) -> Value {
    let mut ops = Vec::new();
    let before_annotations = before.pointer("/metadata/annotations");
    let after_annotations = after
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    match (before_annotations, after_annotations) {
        (Some(Value::Object(existing)), Some(wanted)) => {
            for (key, value) in wanted {
                if existing.get(key) != Some(value) {
                    let escaped = key.replace('~', "~0").replace('/', "~1");
                    ops.push(json!({
                        "op": "add",
                        "path": format!("/metadata/annotations/{escaped}"),
                        "value": value
                    }));
                }
            }
        }
        (_, Some(wanted)) => {
            if before.get("metadata").is_none() {
                ops.push(json!({ "op": "add", "path": "/metadata", "value": {} }));
            }
            ops.push(json!({ "op": "add", "path": "/metadata/annotations", "value": wanted }));
        }
        (_, None) => {}
    }
    if let Some(spec) = after.get("spec") {
        ops.push(json!({ "op": "replace", "path": "/spec", "value": spec }));
    }
    Value::Array(ops)
}

/// Standard base64 with padding (the AdmissionReview's `patch`).
fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": "web" },
            "spec": {
                "selector": { "matchLabels": { "app": "web" } },
                "template": {
                    "metadata": { "labels": { "app": "web" } },
                    "spec": { "containers": [{ "name": "web", "image": "nginx" }] }
                }
            }
        })
    }

    #[test]
    fn a_deployment_gets_the_init_step_the_proxy_first_and_its_volumes() {
        let mut d = deployment();
        assert_eq!(inject(&mut d, &InjectSettings::default()), Ok(true));
        let spec = d.pointer("/spec/template/spec").unwrap();
        assert_eq!(spec["initContainers"][0]["name"], "nip-init");
        assert_eq!(spec["initContainers"][0]["args"][0], "iptables");
        assert_eq!(spec["containers"][0]["name"], "nip-proxy");
        assert_eq!(spec["containers"][1]["name"], "web");
        assert_eq!(
            spec["containers"][0]["securityContext"]["runAsUser"],
            PROXY_UID
        );
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 3);
        let annotations = d.pointer("/spec/template/metadata/annotations").unwrap();
        assert_eq!(annotations[INJECTED_ANNOTATION], "true");
        assert_eq!(annotations["prometheus.io/port"], "15020");
        // Injecting again changes nothing.
        let once = d.clone();
        assert_eq!(inject(&mut d, &InjectSettings::default()), Ok(false));
        assert_eq!(d, once);
    }

    #[test]
    fn opted_out_pods_and_kinds_without_pods_are_left_alone() {
        let mut d = deployment();
        d["spec"]["template"]["metadata"]["annotations"] = json!({ INJECT_ANNOTATION: "false" });
        let before = d.clone();
        assert_eq!(inject(&mut d, &InjectSettings::default()), Ok(false));
        assert_eq!(d, before);
        let mut service = json!({ "kind": "Service", "metadata": { "name": "web" } });
        assert_eq!(inject(&mut service, &InjectSettings::default()), Ok(false));
        let mut broken = deployment();
        broken["spec"]["template"]["spec"]["containers"] = json!("nginx");
        assert_eq!(
            inject(&mut broken, &InjectSettings::default()),
            Err(shape("/spec/template/spec/containers", "must be a list"))
        );
    }

    #[test]
    fn an_admission_review_is_answered_with_a_patch_that_injects_the_pod() {
        let pod = json!({
            "metadata": { "name": "p", "annotations": { "a/b": "c" } },
            "spec": { "containers": [{ "name": "app", "image": "app" }] }
        });
        let review_request = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": { "uid": "u-1", "object": pod }
        });
        let answer = review(&review_request, &InjectSettings::default()).unwrap();
        assert_eq!(answer["response"]["uid"], "u-1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let encoded = answer["response"]["patch"].as_str().unwrap();
        let decoded = nip_xds::config::decode_base64(encoded).unwrap();
        let patch: Value = serde_json::from_slice(&decoded).unwrap();
        let ops = patch.as_array().unwrap();
        assert!(ops
            .iter()
            .any(|op| op["path"] == "/metadata/annotations/nip.dev~1injected"));
        let spec = ops.iter().find(|op| op["path"] == "/spec").unwrap();
        assert_eq!(spec["value"]["containers"][0]["name"], "nip-proxy");
        assert_eq!(spec["value"]["containers"][1]["name"], "app");
    }

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        for (input, expected) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input), expected);
        }
    }
}
