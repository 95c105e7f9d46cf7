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
