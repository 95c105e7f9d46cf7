//! The host against real plugins: the example built with the public proxy-wasm Rust SDK,
//! and hand-written modules that misbehave (loop forever, grow memory without bound, trap,
//! import what the host lacks).

use nip_filters::abi::Action;
use nip_filters::host::{Headers, HttpState, NodeInfo, PluginIdentity};
use nip_filters::{PluginEngine, PluginError, PluginInstance, PluginLimits, PluginModule};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Builds the example plugins once (the SDK's own toolchain path: cargo + wasm32-wasip1).
fn example(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(examples.join("Cargo.toml"))
            .status()
            .expect("run cargo for the example plugins");
        assert!(
            status.success(),
            "building example plugins failed (is wasm32-wasip1 installed? ./dev test adds it)"
        );
        examples.join("target/wasm32-wasip1/release")
    });
    std::fs::read(dir.join(format!("{name}.wasm"))).expect("example plugin built")
}

fn engine() -> PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE
        .get_or_init(|| PluginEngine::new(None).expect("engine"))
        .clone()
}

fn load(
    name: &str,
    config: &str,
    wasm: &[u8],
    limits: PluginLimits,
) -> Result<PluginModule, PluginError> {
    PluginModule::compile(
        &engine(),
        PluginIdentity {
            name: name.to_string(),
            plugin_config: config.as_bytes().to_vec(),
            ..Default::default()
        },
        NodeInfo::default(),
        limits,
        wasm,
    )
}

fn request(path: &str, extra: &[(&str, &str)]) -> HttpState {
    let mut headers = vec![
        (":method".to_string(), "GET".to_string()),
        (":path".to_string(), path.to_string()),
        (":authority".to_string(), "example.com".to_string()),
        (":scheme".to_string(), "http".to_string()),
    ];
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    HttpState {
        request_headers: Headers::from_pairs(headers),
        ..Default::default()
    }
}

fn header<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn rust_sdk_plugin_edits_headers_both_ways() {
    let module = load(
        "add-header",
        "x-team = blue",
        &example("add_header"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    for i in 0..3 {
        let ctx = vm.create_http_context().unwrap();
        let mut http = request(&format!("/items/{i}"), &[]);
        assert_eq!(
            vm.on_request_headers(ctx, &mut http, true).unwrap(),
            Action::Continue
        );
        assert!(http.request_headers.is_changed());
        assert_eq!(header(http.request_headers.pairs(), "x-team"), Some("blue"));
        assert_eq!(
            header(http.request_headers.pairs(), "x-seen-path"),
            Some(format!("/items/{i}").as_str())
        );
        http.response_headers = Headers::from_pairs(vec![(":status".into(), "200".into())]);
        assert_eq!(
            vm.on_response_headers(ctx, &mut http, false).unwrap(),
            Action::Continue
        );
        assert_eq!(
            header(http.response_headers.pairs(), "x-team"),
            Some("blue")
        );
        http.response_trailers = Headers::from_pairs(vec![("grpc-status".into(), "0".into())]);
        vm.on_response_trailers(ctx, &mut http).unwrap();
        let trailers = http
            .response_trailers
            .take_changes()
            .expect("trailers edited");
        assert_eq!(header(trailers, "x-team-trailer"), Some("blue"));
        assert_eq!(header(trailers, "grpc-status"), Some("0"));
        vm.finish_http_context(ctx, &mut http).unwrap();
    }
}

#[test]
fn rust_sdk_plugin_answers_locally() {
    let module = load(
        "add-header",
        "",
        &example("add_header"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let ctx = vm.create_http_context().unwrap();
    let mut http = request("/", &[("x-deny", "yes")]);
    assert_eq!(
        vm.on_request_headers(ctx, &mut http, true).unwrap(),
        Action::Pause
    );
    let reply = http.local_response.expect("a local response");
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, b"denied\n");
    assert_eq!(header(&reply.headers, "x-denied-by"), Some("add-header"));
}

#[test]
fn a_plugin_that_rejects_its_config_does_not_start() {
    let module = load(
        "add-header",
        "no-equals-sign",
        &example("add_header"),
        PluginLimits::default(),
    )
    .unwrap();
    match PluginInstance::start(&module) {
        Err(PluginError::Rejected { callback, .. }) => assert_eq!(callback, "proxy_on_configure"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the plugin accepted a config it should reject"),
    }
}

/// A minimal plugin in WAT whose request callback runs `body`.
fn wat_plugin(body: &str) -> Vec<u8> {
    format!(
        r#"(module
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
          (func (export "proxy_on_context_create") (param i32 i32))
          (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
            {body}
            i32.const 0))"#
    )
    .into_bytes()
}

#[test]
fn an_endless_loop_hits_the_cpu_deadline_and_the_instance_can_be_replaced() {
    let limits = PluginLimits {
        callback_deadline: Duration::from_millis(50),
        ..Default::default()
    };
    let module = load("spin", "", &wat_plugin("(loop $l (br $l))"), limits).unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let ctx = vm.create_http_context().unwrap();
    let started = Instant::now();
    let error = vm
        .on_request_headers(ctx, &mut request("/", &[]), true)
        .unwrap_err();
    assert!(
        error.to_string().contains("CPU deadline exceeded"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // A fresh instance of the same module starts fine.
    PluginInstance::start(&module).unwrap();
}

#[test]
fn unbounded_memory_growth_stops_at_the_ceiling() {
    let limits = PluginLimits {
        memory_bytes: 4 << 20,
        ..Default::default()
    };
    // Grow one page at a time until refused, then trap as an allocator would.
    let body = "(block $done (loop $l (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1))) (br $l))) unreachable";
    let module = load("hog", "", &wat_plugin(body), limits).unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let ctx = vm.create_http_context().unwrap();
    let error = vm
        .on_request_headers(ctx, &mut request("/", &[]), true)
        .unwrap_err();
    assert!(error.to_string().contains("trap"), "{error}");
}

#[test]
fn a_trap_is_an_error_not_a_crash() {
    let module = load(
        "trapper",
        "",
        &wat_plugin("unreachable"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let ctx = vm.create_http_context().unwrap();
    let error = vm
        .on_request_headers(ctx, &mut request("/", &[]), true)
        .unwrap_err();
    assert!(
        matches!(
            error,
            PluginError::Trap {
                callback: "proxy_on_request_headers",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn missing_imports_and_non_plugins_are_clear_load_errors() {
    let importer = br#"(module
        (import "env" "proxy_teleport" (func (param i32)))
        (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_2_1")))"#;
    let error = load("importer", "", importer, PluginLimits::default()).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("proxy_teleport"), "{text}");
    let plain = br#"(module (func (export "hello")))"#;
    let text = load("plain", "", plain, PluginLimits::default())
        .unwrap_err()
        .to_string();
    assert!(text.contains("proxy_abi_version_0_2_1"), "{text}");
    let text = load("garbage", "", b"\0asm garbage", PluginLimits::default())
        .unwrap_err()
        .to_string();
    assert!(text.contains("cannot compile"), "{text}");
}

#[test]
fn a_plugin_that_does_nothing_changes_nothing() {
    let module = load("noop", "", &example("noop"), PluginLimits::default()).unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let ctx = vm.create_http_context().unwrap();
    let mut http = request("/", &[("x-a", "1")]);
    assert_eq!(
        vm.on_request_headers(ctx, &mut http, true).unwrap(),
        Action::Continue
    );
    assert!(!http.request_headers.is_changed());
    assert_eq!(http.request_headers.len(), 5);
    vm.finish_http_context(ctx, &mut http).unwrap();
}

#[test]
fn shared_data_and_metrics_are_shared_by_instances_on_different_threads() {
    let module = load("counter", "", &example("counter"), PluginLimits::default()).unwrap();
    // As the proxy's canary does: one instance starts first and creates the shared key.
    PluginInstance::start(&module).unwrap();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let module = module.clone();
            std::thread::spawn(move || {
                let mut vm = PluginInstance::start(&module).unwrap();
                let mut last = 0u64;
                for _ in 0..200 {
                    let ctx = vm.create_http_context().unwrap();
                    let mut http = request("/", &[]);
                    vm.on_request_headers(ctx, &mut http, true).unwrap();
                    vm.on_response_headers(ctx, &mut http, true).unwrap();
                    let count: u64 = header(http.response_headers.pairs(), "x-request-count")
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(count > last, "the shared count only grows");
                    last = count;
                    vm.finish_http_context(ctx, &mut http).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let shared = engine().shared().clone();
    let (value, _) = shared.get("counter", "requests").unwrap();
    assert_eq!(
        u64::from_le_bytes(value.try_into().unwrap()),
        400,
        "no lost update"
    );
    let metric = shared
        .metrics()
        .into_iter()
        .find(|m| m.plugin == "counter" && m.name == "requests")
        .unwrap();
    assert_eq!(metric.get(), 400);
}

/// A plugin whose every callback does nothing, except `trapping`, which traps.
fn plugin_trapping_in(trapping: &str) -> String {
    let callbacks = [
        (
            "proxy_on_vm_start",
            "(param i32 i32) (result i32)",
            "i32.const 1",
        ),
        (
            "proxy_on_configure",
            "(param i32 i32) (result i32)",
            "i32.const 1",
        ),
        ("proxy_on_context_create", "(param i32 i32)", ""),
        (
            "proxy_on_request_headers",
            "(param i32 i32 i32) (result i32)",
            "i32.const 0",
        ),
        (
            "proxy_on_request_body",
            "(param i32 i32 i32) (result i32)",
            "i32.const 0",
        ),
        (
            "proxy_on_response_headers",
            "(param i32 i32 i32) (result i32)",
            "i32.const 0",
        ),
        (
            "proxy_on_response_body",
            "(param i32 i32 i32) (result i32)",
            "i32.const 0",
        ),
        ("proxy_on_log", "(param i32)", ""),
        ("proxy_on_done", "(param i32) (result i32)", "i32.const 1"),
        ("proxy_on_delete", "(param i32)", ""),
        ("proxy_on_tick", "(param i32)", ""),
        ("proxy_on_queue_ready", "(param i32 i32)", ""),
        (
            "proxy_on_http_call_response",
            "(param i32 i32 i32 i32 i32)",
            "",
        ),
    ];
    let mut wat = String::from(
        "(module\n (memory (export \"memory\") 1)\n (func (export \"proxy_abi_version_0_2_1\"))\n (func (export \"proxy_on_memory_allocate\") (param i32) (result i32) i32.const 1024)\n",
    );
    for (name, signature, body) in callbacks {
        let body = if name == trapping {
            "unreachable"
        } else {
            body
        };
        wat.push_str(&format!(" (func (export \"{name}\") {signature} {body})\n"));
    }
    wat.push(')');
    wat
}

#[test]
fn a_trap_in_any_callback_fails_that_callback_and_a_fresh_instance_runs() {
    use nip_filters::host::CalloutResponse;
    for trapping in [
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_context_create",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
        "proxy_on_tick",
        "proxy_on_queue_ready",
        "proxy_on_http_call_response",
    ] {
        let module = load(
            "trap",
            "",
            plugin_trapping_in(trapping).as_bytes(),
            PluginLimits::default(),
        )
        .unwrap();
        // Drives every callback once; returns the first failure.
        let run = |vm: &mut PluginInstance| -> Result<(), PluginError> {
            let ctx = vm.create_http_context()?;
            let mut http = request("/", &[]);
            vm.on_request_headers(ctx, &mut http, false)?;
            http.request_body = bytes::Bytes::from_static(b"body");
            vm.on_request_body(ctx, &mut http, true)?;
            http.response_headers = Headers::from_pairs(vec![(":status".into(), "200".into())]);
            vm.on_response_headers(ctx, &mut http, false)?;
            http.response_body = bytes::Bytes::from_static(b"body");
            vm.on_response_body(ctx, &mut http, true)?;
            vm.finish_http_context(ctx, &mut http)?;
            vm.on_tick()?;
            vm.on_queue_ready(1)?;
            vm.on_http_call_response(1, CalloutResponse::default(), None)
        };
        let error = match PluginInstance::start(&module) {
            Err(e) => {
                // The root context's own start-up callbacks trap: the plugin cannot start.
                assert!(
                    matches!(
                        trapping,
                        "proxy_on_vm_start" | "proxy_on_configure" | "proxy_on_context_create"
                    ),
                    "{trapping}: {e}"
                );
                e
            }
            Ok(mut vm) => {
                let error = run(&mut vm).expect_err(trapping);
                // A fresh instance of the same module gets exactly as far again.
                let mut fresh = PluginInstance::start(&module).unwrap();
                assert_eq!(
                    run(&mut fresh).map_err(|e| e.to_string()),
                    Err(error.to_string())
                );
                error
            }
        };
        let text = error.to_string();
        assert!(
            text.contains(trapping) && text.contains("unreachable"),
            "{trapping}: {text}"
        );
    }
}

#[test]
fn headers_are_converted_only_for_a_plugin_that_looks_at_them() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let lazy = |converted: &Arc<AtomicBool>| {
        let converted = Arc::clone(converted);
        HttpState {
            request_headers: Headers::lazy(4, move || {
                converted.store(true, Ordering::SeqCst);
                request("/lazy", &[]).request_headers.pairs().clone()
            }),
            ..Default::default()
        }
    };
    let noop = load("noop", "", &example("noop"), PluginLimits::default()).unwrap();
    let mut vm = PluginInstance::start(&noop).unwrap();
    let converted = Arc::new(AtomicBool::new(false));
    let mut http = lazy(&converted);
    let ctx = vm.create_http_context().unwrap();
    vm.on_request_headers(ctx, &mut http, true).unwrap();
    vm.finish_http_context(ctx, &mut http).unwrap();
    assert!(
        !converted.load(Ordering::SeqCst),
        "a no-op plugin paid for a conversion"
    );
    assert!(!http.request_headers.is_changed());

    let tagger = load(
        "add-header",
        "x-a=1",
        &example("add_header"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&tagger).unwrap();
    let mut http = lazy(&converted);
    let ctx = vm.create_http_context().unwrap();
    vm.on_request_headers(ctx, &mut http, true).unwrap();
    assert!(converted.load(Ordering::SeqCst));
    assert_eq!(
        http.request_headers
            .take_changes()
            .and_then(|p| header(p, "x-seen-path")),
        Some("/lazy")
    );
    assert!(
        http.request_headers.take_changes().is_none(),
        "changes are taken once"
    );
}

#[test]
fn an_sdk_plugin_declares_itself_and_reports_health_and_usage() {
    let config = r#"{"redact": ["card"]}"#;
    let module = load(
        "guard",
        config,
        &example("sdk_guard"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let declared = vm
        .declaration()
        .expect("the SDK declared the plugin")
        .clone();
    assert_eq!(declared.name, "sdk-guard");
    assert_eq!(declared.version, "1.0.0");
    assert_eq!(declared.api, "2.0");
    assert_eq!(declared.sdk, "rust");
    assert!(declared.capabilities.iter().any(|c| c == "http_calls"));
    let health = vm.sdk_report(nip_filters::sdk::HEALTH_CHECK).unwrap();
    assert_eq!(health.as_deref(), Some(&br#"{"healthy":true}"#[..]));
    let usage = vm.sdk_report(nip_filters::sdk::RESOURCE_USAGE).unwrap();
    assert_eq!(usage.as_deref(), Some(&b"{}"[..]));

    let module = load(
        "hazards",
        "",
        &example("sdk_hazards"),
        PluginLimits::default(),
    )
    .unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    let health = vm
        .sdk_report(nip_filters::sdk::HEALTH_CHECK)
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&health),
        r#"{"healthy":false,"message":"built to fail"}"#
    );
    let usage = vm
        .sdk_report(nip_filters::sdk::RESOURCE_USAGE)
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&usage), r#"{"hazards":3}"#);

    // A raw plugin declares nothing and is never asked.
    let module = load("noop", "", &example("noop"), PluginLimits::default()).unwrap();
    let mut vm = PluginInstance::start(&module).unwrap();
    assert!(vm.declaration().is_none());
    assert_eq!(vm.sdk_report(nip_filters::sdk::HEALTH_CHECK).unwrap(), None);
}

#[test]
fn an_sdk_plugin_for_another_api_version_is_refused_naming_both() {
    let declare = |api: &str| {
        let json =
            format!(r#"{{"api": "{api}", "sdk": "rust", "name": "future", "version": "9.0.0"}}"#);
        format!(
            r#"(module
              (import "env" "proxy_call_foreign_function"
                (func $call (param i32 i32 i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (data (i32.const 16) "nip_sdk_declare")
              (data (i32.const 64) "{}")
              (func (export "proxy_abi_version_0_2_1"))
              (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 1024)
              (func (export "proxy_on_context_create") (param i32 i32))
              (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
                (drop (call $call (i32.const 16) (i32.const 15) (i32.const 64) (i32.const {})
                  (i32.const 900) (i32.const 904)))
                i32.const 1))"#,
            json.replace('"', "\\\""),
            json.len()
        )
        .into_bytes()
    };
    for api in ["3.0", "2.7", "1.9"] {
        let module = load("future", "", &declare(api), PluginLimits::default()).unwrap();
        match PluginInstance::start(&module) {
            Err(error @ PluginError::Incompatible { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains("future 9.0.0")
                        && text.contains(&format!("API {api}"))
                        && text.contains("runs API 2.0"),
                    "{text}"
                );
            }
            Err(e) => panic!("{api}: unexpected error {e}"),
            Ok(_) => panic!("{api}: an incompatible plugin started"),
        }
    }
    let module = load("current", "", &declare("2.0"), PluginLimits::default()).unwrap();
    let vm = PluginInstance::start(&module).unwrap();
    assert_eq!(vm.declaration().unwrap().api, "2.0");
}

#[test]
fn an_sdk_plugin_that_panics_loops_or_hoards_memory_is_contained_like_a_raw_one() {
    let limits = PluginLimits {
        callback_deadline: Duration::from_millis(100),
        memory_bytes: 16 << 20,
    };
    let module = load("hazards", "", &example("sdk_hazards"), limits).unwrap();
    for hazard in ["panic", "loop", "alloc"] {
        let mut vm = PluginInstance::start(&module).unwrap();
        let ctx = vm.create_http_context().unwrap();
        let error = vm
            .on_request_headers(ctx, &mut request("/", &[("x-hazard", hazard)]), true)
            .unwrap_err();
        assert!(
            matches!(
                error,
                PluginError::Trap {
                    callback: "proxy_on_request_headers",
                    ..
                }
            ),
            "{hazard}: {error}"
        );
        // A fresh instance serves the next request.
        let mut vm = PluginInstance::start(&module).unwrap();
        let ctx = vm.create_http_context().unwrap();
        let action = vm
            .on_request_headers(ctx, &mut request("/", &[]), true)
            .unwrap();
        assert_eq!(action, Action::Continue, "{hazard}");
    }
}
