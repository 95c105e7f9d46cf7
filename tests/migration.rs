//! v3 users: a v3 file is recognised and named as such, and `nip migrate` converts the
//! plan's own v3 example to a v4 file the proxy accepts.

use crate::common::*;

/// The v3 example of the plan (shared/PRODUCT.md), as written.
const PLAN_V3: &str = r#"server:
  port: 8080
  host: "localhost"
plugins:
  - name: "my-plugin"
    enabled: true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_file_is_named_and_converted_to_a_v4_file_the_proxy_accepts() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let v3 = dir.path().join("v3.yaml");
    std::fs::write(&v3, PLAN_V3).unwrap();
    let v4 = dir.path().join("v4.yaml");
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // Given to the proxy or the validator, it is called what it is.
    for args in [&["validate", "--file"][..], &["proxy", "--config"][..]] {
        let output = run_nip(args, Some(&v3));
        assert!(!output.status.success(), "{args:?}");
        let said = text(&output);
        assert!(
            said.contains("this is a v3 config (a `server` block)")
                && said.contains("nip migrate config --from-v3"),
            "{args:?}: {said}"
        );
    }

    // The report, then the file.
    let output = run_nip(&["migrate", "analyze"], Some(&v3));
    assert!(output.status.success(), "{}", text(&output));
    let report = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        report.contains("api_gateway.address \"127.0.0.1:8080\""),
        "{report}"
    );
    assert!(report.contains("plugins.my-plugin.source"), "{report}");
    let output = run_nip(
        &[
            "migrate",
            "config",
            "--output",
            v4.to_str().unwrap(),
            "--from-v3",
        ],
        Some(&v3),
    );
    assert!(output.status.success(), "{}", text(&output));
    let converted = std::fs::read_to_string(&v4).unwrap();
    assert!(converted.contains("TODO"), "{converted}");
    let output = run_nip(&["validate", "--file"], Some(&v4));
    assert!(output.status.success(), "{}\n{converted}", text(&output));

    // v3 messages, one per line, become v4 envelopes; a bad one is named by its place.
    let messages = dir.path().join("messages.jsonl");
    std::fs::write(
        &messages,
        "{\"id\": 1, \"type\": \"order\", \"data\": {\"sku\": \"a\"}}\n{\"id\": \"2\", \"type\": \"order\", \"priority\": \"high\", \"retries\": 1}\n",
    )
    .unwrap();
    let output = run_nip(&["migrate", "message"], Some(&messages));
    assert!(output.status.success(), "{}", text(&output));
    let upgraded: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(upgraded.len(), 2);
    assert_eq!(upgraded[0]["id"], "1");
    assert_eq!(upgraded[0]["correlation_id"], "1");
    assert_eq!(upgraded[0]["data"]["sku"], "a");
    assert_eq!(upgraded[0]["metadata"]["priority"], "normal");
    assert!(upgraded[0]["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(upgraded[1]["metadata"]["priority"], "high");
    assert_eq!(upgraded[1]["metadata"]["retry_count"], 1);
    std::fs::write(
        &messages,
        "{\"id\": 1, \"type\": \"a\"}\n{\"type\": \"b\"}\n",
    )
    .unwrap();
    let output = run_nip(&["migrate", "message"], Some(&messages));
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).contains("message 2: id"), "{}", text(&output));

    // A v4 file is not a v3 one.
    let output = run_nip(&["migrate", "analyze"], Some(&v4));
    assert!(!output.status.success());
    assert!(
        text(&output).contains("not a v3 config"),
        "{}",
        text(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_verify_compares_the_v4_routing_with_what_v3_did() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let v3 = dir.path().join("v3.yaml");
    std::fs::write(
        &v3,
        "server: { port: 8080, host: localhost }\nplugins:\n  - { name: stamp, enabled: true }\n  - { name: old, enabled: false }\n",
    )
    .unwrap();
    let v4 = dir.path().join("v4.yaml");
    let output = run_nip(
        &[
            "migrate",
            "config",
            "--output",
            v4.to_str().unwrap(),
            "--from-v3",
        ],
        Some(&v3),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verify = |v4: &std::path::Path| {
        std::process::Command::new(nip_bin())
            .args(["migrate", "verify", "--from-v3"])
            .arg(&v3)
            .arg(v4)
            .output()
            .unwrap()
    };

    // As converted, the plugin runs nowhere yet: it loads, but does not route as v3 did.
    let output = verify(&v4);
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("loads:"), "{said}");
    assert!(
        said.contains("listens: 127.0.0.1:8080 as v3's server did"),
        "{said}"
    );
    assert!(
        said.contains("DIFFERS  route all runs []; v3 ran [stamp]"),
        "{said}"
    );

    // The human's part done (the module's place, the route's plugins): as v3.
    let converted = std::fs::read_to_string(&v4).unwrap();
    let done = converted
        .replace(
            "# source: { file: plugins/stamp.wasm }",
            &format!(
                "source: {{ file: \"{}\" }}",
                example_plugin("add_header").display()
            ),
        )
        .replace("# plugins: [stamp]", "plugins: [stamp]");
    let finished = dir.path().join("v4-done.yaml");
    std::fs::write(&finished, &done).unwrap();
    let output = verify(&finished);
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{said}{}\n{done}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        said.matches("as v3   route all, plugins [stamp]").count(),
        5,
        "{said}"
    );
    assert!(
        said.contains("the v4 file routes as the v3 one did"),
        "{said}"
    );

    // A route that leaves paths unserved is found out.
    let partial = done.replace(
        "  - name: all          # every request\n",
        "  - name: all\n    match: { path_prefix: /api }\n",
    );
    std::fs::write(&finished, &partial).unwrap();
    let output = verify(&finished);
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains("GET    /health") && said.contains("no route took it (404)"),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_plugin_becomes_a_project_with_its_logic_marked_that_builds_and_passes() {
    let _turn = crate::common::module_turn(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let v3 = dir.path().join("enricher.rs");
    std::fs::write(
        &v3,
        "use v3::{Config, Message};\n\npub fn init(config: &Config) {\n    TABLE.load(&config.table);\n}\n\npub fn process(mut msg: Message) -> Message {\n    msg.data[\"region\"] = lookup(&msg.source);\n    msg\n}\n\npub fn cleanup() {\n    TABLE.clear();\n}\n",
    )
    .unwrap();
    let project = dir.path().join("enricher");
    let port = free_port();
    let output = std::process::Command::new(nip_bin())
        .args(["migrate", "plugin-scaffold"])
        .arg(&v3)
        .arg("--dir")
        .arg(&project)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("init, process, cleanup"), "{said}");
    let source = std::fs::read_to_string(project.join("src/lib.rs")).unwrap();
    // process at the top of the handler, init and cleanup by the lifecycle hooks.
    let handler = source.find(".on_message(").unwrap();
    let process = source
        .find("//   pub fn process(mut msg: Message) -> Message {")
        .unwrap_or_else(|| panic!("{source}"));
    assert!(process > handler, "{source}");
    assert!(
        source.contains("port it to the SDK's on_init hook"),
        "{source}"
    );
    assert!(source.contains("//       TABLE.clear();"), "{source}");
    assert!(source.find("on_init hook").unwrap() < handler, "{source}");

    // The project builds and passes its cases as made (on free ports).
    let config = std::fs::read_to_string(project.join("nip.yaml")).unwrap();
    std::fs::write(
        project.join("nip.yaml"),
        config
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:9901", &format!("127.0.0.1:{}", free_port()))
            .replace("127.0.0.1:9100", &format!("127.0.0.1:{}", free_port())),
    )
    .unwrap();
    let output = std::process::Command::new(nip_bin())
        .args(["test", "--integration"])
        .current_dir(&project)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    assert!(said.contains("2 passed, 0 failed"), "{said}");

    // A file with none of the three is not a v3 plugin.
    std::fs::write(dir.path().join("other.rs"), "fn main() {}\n").unwrap();
    let output = std::process::Command::new(nip_bin())
        .args(["migrate", "plugin-scaffold"])
        .arg(dir.path().join("other.rs"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no init, process or cleanup function"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
