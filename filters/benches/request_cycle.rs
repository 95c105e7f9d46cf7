//! What one request costs a plugin host, callback by callback, without any proxy around it:
//! `cargo bench -p nip-filters --bench request_cycle` (or `--profile profiling`). Needs the
//! example plugins built (`cargo build --release --target wasm32-wasip1 --manifest-path
//! filters/examples/Cargo.toml`). Prints nanoseconds per operation; asserts nothing.

use nip_filters::host::{Headers, HttpState, NodeInfo, PluginIdentity};
use nip_filters::{PluginEngine, PluginInstance, PluginLimits, PluginModule};
use std::path::Path;
use std::time::Instant;

const ROUNDS: u32 = 200_000;

fn request() -> HttpState {
    let headers = [
        (":method", "GET"),
        (":path", "/"),
        (":authority", "127.0.0.1:8080"),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("x-request-id", "2f1c6a4e-8a3b-4c7d-9e0f-1a2b3c4d5e6f"),
    ];
    HttpState {
        request_headers: Headers::from_pairs(
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

fn time(label: &str, mut op: impl FnMut()) {
    for _ in 0..ROUNDS / 10 {
        op();
    }
    let start = Instant::now();
    for _ in 0..ROUNDS {
        op();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    println!("{label:<44} {ns:>8.0} ns");
}

fn main() {
    let examples =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/target/wasm32-wasip1/release");
    let engine = PluginEngine::new(None).expect("engine");
    // The raw no-op plugin, the same on the Rust SDK (an empty on_message: what the SDK
    // costs), and a header-editing one.
    for (plugin, config) in [("noop", ""), ("sdk_noop", ""), ("add_header", "x-bench=1")] {
        let wasm = std::fs::read(examples.join(format!("{plugin}.wasm")))
            .expect("build the example plugins first");
        let module = PluginModule::compile(
            &engine,
            PluginIdentity {
                name: plugin.into(),
                plugin_config: config.as_bytes().to_vec(),
                ..Default::default()
            },
            NodeInfo::default(),
            PluginLimits::default(),
            &wasm,
        )
        .expect("compile");
        let mut vm = PluginInstance::start(&module).expect("start");
        println!("{plugin}:");
        time("  create + on_request_headers + finish", || {
            let ctx = vm.create_http_context().unwrap();
            let mut http = request();
            vm.on_request_headers(ctx, &mut http, true).unwrap();
            vm.finish_http_context(ctx, &mut http).unwrap();
        });
        time("  whole request (headers, body, log) ", || {
            let ctx = vm.create_http_context().unwrap();
            let mut http = request();
            vm.on_request_headers(ctx, &mut http, true).unwrap();
            http.response_headers = Headers::from_pairs(vec![
                (":status".into(), "200".into()),
                ("content-length".into(), "19".into()),
            ]);
            vm.on_response_headers(ctx, &mut http, false).unwrap();
            http.response_body = bytes::Bytes::from_static(b"hello from backend\n");
            vm.on_response_body(ctx, &mut http, true).unwrap();
            vm.finish_http_context(ctx, &mut http).unwrap();
        });
        time("  building the request state alone", || {
            std::hint::black_box(request());
        });
    }
}
