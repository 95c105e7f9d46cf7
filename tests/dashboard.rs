//! The control plane's dashboard in a real headless browser (Debian's Chromium driven by
//! Playwright, tests/interop/dashboard_browser.py): sign-in, the fleet by region,
//! validation as the operator types, the change before apply, apply, rollback. The page
//! itself is public and holds no data; everything it shows comes through the API with
//! the operator's token.

use crate::common::control_plane::*;
use crate::common::*;

/// Debian's Chromium (`./dev test` installs it).
const CHROMIUM: &str = "/usr/bin/chromium";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_changes_and_rolls_back_the_config_from_the_dashboard_in_a_browser() {
    let _turn = crate::common::module_turn(module_path!());
    let (_a, _b, port, control_plane) = serving_a().await;
    let eu = streaming_proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    wait_routes_to(&eu, "a").await;
    // Traffic the dashboard shows by route (the proxy streams its access records).
    let http = client();
    for _ in 0..20 {
        assert_eq!(http.get(eu.url("/")).send().await.unwrap().status(), 200);
    }
    let operator = create_token(
        &control_plane,
        &["dashboard-operator", "--role", "operator"],
    );

    // The page is served to anyone, under a policy that runs nothing but its own files;
    // the data behind it is not.
    let anonymous = control_plane.anonymous();
    let page = anonymous
        .get(control_plane.api("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        policy.contains("script-src 'self'") && policy.contains("default-src 'none'"),
        "{policy}"
    );
    let proxies = anonymous
        .get(control_plane.api("/v1/proxies"))
        .send()
        .await
        .unwrap();
    assert_eq!(proxies.status(), 401);

    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = std::process::Command::new(python())
        .arg(script("dashboard_browser.py"))
        .args([
            &control_plane.api(""),
            &operator,
            "edge-eu-1",
            "eu",
            screenshot.to_str().unwrap(),
            CHROMIUM,
        ])
        .output()
        .expect("run the browser test");
    assert!(
        output.status.success(),
        "{}{}\ncontrol plane log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        control_plane.log()
    );
    let png = std::fs::read(&screenshot).expect("the test wrote a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );

    // What the browser did is what the store holds: the change by the operator's token,
    // then version 1 restored, served to the proxy.
    let history = control_plane.get_json("/v1/history").await;
    let messages: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap_or(""))
        .collect();
    assert!(messages.contains(&"browser test change"), "{history}");
    assert_eq!(history[0]["restored_from"], 1, "{history}");
    assert!(
        history[1]["author"]
            .as_str()
            .unwrap()
            .contains("dashboard-operator"),
        "{history}"
    );
    let current = control_plane.get_json("/v1/config").await;
    assert!(!current["yaml"]
        .as_str()
        .unwrap()
        .contains("from the dashboard test"));
    assert_eq!(backend_of(&eu).await, "a");
}
