//! The plugin author's loop: `nip init` makes a project on a language's SDK, `nip test
//! --integration` runs its declared cases through a real proxy, `nip dev` serves it and
//! hot-swaps each save (a failed build leaves the previous one serving), `nip deploy`
//! ships it to a control plane through a canary.

use crate::common::control_plane::*;
use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A project made by `nip init` in a temporary directory, on free ports.
struct Project {
    dir: PathBuf,
    port: u16,
    _tmp: tempfile::TempDir,
}

impl Project {
    fn init(name: &str, language: &str) -> Project {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(name);
        let port = free_port();
        let output = nip(
            &[
                "init",
                name,
                "--lang",
                language,
                "--dir",
                dir.to_str().unwrap(),
                "--port",
                &port.to_string(),
                "--admin-port",
                &free_port().to_string(),
                "--echo-port",
                &free_port().to_string(),
                "--plugin-port",
                &free_port().to_string(),
            ],
            tmp.path(),
        );
        assert!(output.status.success(), "{}", text(&output));
        assert!(
            text(&output).contains("nip test --integration"),
            "{}",
            text(&output)
        );
        Project {
            dir,
            port,
            _tmp: tmp,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn test(&self) -> Output {
        nip(&["test", "--integration"], &self.dir)
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.dir.join(file);
        let source = std::fs::read_to_string(&path).unwrap();
        assert!(source.contains(from), "{file} has no {from:?}:\n{source}");
        std::fs::write(&path, source.replace(from, to)).unwrap();
    }

    /// `nip dev` in the background, its output in a file.
    fn dev(&self) -> Background {
        Background::start(
            Command::new(nip_bin())
                .arg("dev")
                .current_dir(&self.dir)
                .env("PATH", path_with_python())
                .stdin(Stdio::null()),
        )
    }
}

/// Runs nip in `dir`, with the tests' Python first on the PATH (what a Python plugin's
/// `python3` finds).
fn nip(args: &[&str], dir: &Path) -> Output {
    Command::new(nip_bin())
        .args(args)
        .current_dir(dir)
        .env("PATH", path_with_python())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn path_with_python() -> String {
    let python = PathBuf::from(python());
    let bin = python.parent().unwrap().display().to_string();
    format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The `x-hello` header the echo backend saw, through the project's proxy.
async fn greeting(project: &Project) -> String {
    let answer: serde_json::Value = client()
        .get(project.url("/hello"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["headers"]["x-hello"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_plugin_from_init_passes_its_cases_and_is_hot_swapped_on_save() {
    let _turn = crate::common::module_turn(module_path!());
    let project = Project::init("greeter", "rust");

    // The project as made builds and passes its own cases.
    let output = project.test();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("2 passed, 0 failed"),
        "{}",
        text(&output)
    );

    // A case the plugin does not meet fails, says why, and exits 1.
    let cases = std::fs::read_to_string(project.dir.join("cases.yaml")).unwrap();
    std::fs::write(
        project.dir.join("cases.yaml"),
        format!(
            "{cases}  - name: greets someone else\n    request: {{ path: /x }}\n    expect: {{ json: {{ headers: {{ x-hello: bob }} }}, headers: {{ x-missing: yes }} }}\n"
        ),
    )
    .unwrap();
    let output = project.test();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let said = text(&output);
    assert!(said.contains("FAIL  greets someone else"), "{said}");
    assert!(
        said.contains(r#"json.headers.x-hello: want "bob", got "greeter""#),
        "{said}"
    );
    assert!(
        said.contains(r#"header x-missing: want "yes", missing"#),
        "{said}"
    );
    assert!(said.contains("2 passed, 1 failed"), "{said}");

    // A cases file with a field nip does not know is refused by name.
    std::fs::write(
        project.dir.join("cases.yaml"),
        "cases:\n  - name: x\n    request: { path: /, verb: GET }\n    expect: {}\n",
    )
    .unwrap();
    let output = project.test();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("cases[0].request: unknown field `verb`"),
        "{}",
        text(&output)
    );
    std::fs::write(project.dir.join("cases.yaml"), &cases).unwrap();

    // nip dev serves it, and a save is served without a restart.
    let mut dev = project.dev();
    dev.wait_for("nip dev: serving").await;
    assert_eq!(greeting(&project).await, "greeter");
    project.edit(
        "src/lib.rs",
        r#"set_header("x-hello", "greeter")"#,
        r#"set_header("x-hello", "greeter-2")"#,
    );
    dev.wait_for("nip dev: build 2 serving").await;
    assert_eq!(greeting(&project).await, "greeter-2");

    // A save that does not compile shows the compiler's error; build 2 keeps serving.
    project.edit("src/lib.rs", "Plugin::new(", "Plugin::nwe(");
    dev.wait_for("build failed; still serving build 2").await;
    assert!(
        dev.output()
            .contains("no function or associated item named `nwe`"),
        "{}",
        dev.output()
    );
    assert_eq!(greeting(&project).await, "greeter-2");

    // A build that compiles but that the proxy refuses (the plugin rejects its config at
    // start) is said at once; build 2 keeps serving.
    project.edit("src/lib.rs", "Plugin::nwe(", "Plugin::new(");
    project.edit(
        "src/lib.rs",
        ".capability(\"local_reply\")",
        ".capability(\"local_reply\")\n        .on_config_change(|_| Err(\"refused by the test\".into()))",
    );
    dev.wait_for("the proxy refused the new build").await;
    assert!(
        dev.output().contains("refused by the test"),
        "{}",
        dev.output()
    );
    assert_eq!(greeting(&project).await, "greeter-2");

    // Stopping nip dev stops its proxy too.
    dev.kill();
    eventually("the dev proxy stops with nip dev", || async {
        std::net::TcpStream::connect(("127.0.0.1", project.port)).is_err()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_from_init_is_restarted_on_save() {
    let _turn = crate::common::module_turn(module_path!());
    let project = Project::init("pygreeter", "python");
    let output = project.test();
    assert!(output.status.success(), "{}", text(&output));

    let dev = project.dev();
    dev.wait_for("nip dev: serving").await;
    assert_eq!(greeting(&project).await, "pygreeter");
    project.edit(
        "plugin.py",
        r#"set_header("x-hello", "pygreeter")"#,
        r#"set_header("x-hello", "pygreeter-2")"#,
    );
    dev.wait_for("nip dev: build 2 serving").await;
    assert_eq!(greeting(&project).await, "pygreeter-2");

    // A syntax error is caught before the process would keep exiting.
    project.edit("plugin.py", "async def handle", "async def handle(((");
    dev.wait_for("build failed; still serving build 2").await;
    assert!(dev.output().contains("SyntaxError"), "{}", dev.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_and_go_projects_from_init_pass_their_cases_and_are_swapped_on_save() {
    let _turn = crate::common::module_turn(module_path!());
    for (language, source) in [("typescript", "assembly/index.ts"), ("go", "main.go")] {
        let name = format!("hello-{language}");
        let project = Project::init(&name, language);
        let output = project.test();
        assert!(output.status.success(), "{language}: {}", text(&output));
        assert!(
            text(&output).contains("2 passed, 0 failed"),
            "{language}: {}",
            text(&output)
        );
        let dev = project.dev();
        dev.wait_for("nip dev: serving").await;
        assert_eq!(greeting(&project).await, name);
        project.edit(
            source,
            &format!("\"x-hello\", \"{name}\""),
            &format!("\"x-hello\", \"{name}-2\""),
        );
        dev.wait_for("nip dev: build 2 serving").await;
        assert_eq!(greeting(&project).await, format!("{name}-2"), "{language}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deploy_ships_the_plugin_through_a_canary_and_rolls_back_when_the_canary_cannot_ack() {
    let _turn = crate::common::module_turn(module_path!());
    let (a, _b, port, control_plane) = serving_a().await;
    let eu = proxy_of(&control_plane, "edge-eu-1", "eu", port).await;
    wait_routes_to(&eu, "a").await;
    let project = Project::init("shipped", "rust");

    // Production's config: the project's plugin on the gateway's route to `a`.
    std::fs::write(
        project.dir.join("prod.yaml"),
        gateway(
            port,
            &a,
            "plugins:\n  shipped: { source: { file: .nip/build/shipped.wasm } }\n",
        )
        .replace(
            "- { service: web }",
            "- { service: web, plugins: [shipped] }",
        ),
    )
    .unwrap();
    let environment = |canary: &str, extra: &str| {
        format!(
            "{{ control_plane: \"{}\", canary: {canary}, token_file: \"{}\", ca_file: \"{}\", config: prod.yaml{extra} }}",
            control_plane.api(""),
            control_plane.admin_token_file.display(),
            control_plane.bundle_file().display(),
        )
    };
    let manifest = std::fs::read_to_string(project.dir.join("nip-project.yaml")).unwrap();
    std::fs::write(
        project.dir.join("nip-project.yaml"),
        format!(
            "{manifest}environments:\n  prod: {}\n  mars: {}\n",
            environment("eu", ""),
            environment("mars", ", canary_timeout: 300ms")
        ),
    )
    .unwrap();

    // Shipped: the module goes into the store, the eu canary ACKs, everyone gets it.
    let output = nip(&["deploy", "--env", "prod"], &project.dir);
    assert!(output.status.success(), "{}", text(&output));
    let said = text(&output);
    assert!(
        said.contains("canary ACKed by 1 (edge-eu-1), promoted"),
        "{said}"
    );
    let module = std::fs::read(project.dir.join(".nip/build/shipped.wasm")).unwrap();
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(&module)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(said.contains(&format!("module {digest}")), "{said}");
    let stored = control_plane
        .client_with(&control_plane.admin_token())
        .get(control_plane.api(&format!("/v1/modules/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    assert_eq!(stored.bytes().await.unwrap().as_ref(), module.as_slice());
    let current = control_plane.get_json("/v1/config").await;
    assert!(
        current["yaml"].as_str().unwrap().contains(&digest),
        "the config names the module by digest: {current}"
    );
    let private = client().get(eu.url("/private/x")).send().await.unwrap();
    assert_eq!(private.status(), 403, "the plugin runs on the eu proxy");
    assert_eq!(backend_of(&eu).await, "a");

    // A change whose canary region has no proxy is rolled back: exit 1, eu keeps the
    // shipped plugin.
    project.edit(
        "src/lib.rs",
        r#"starts_with("/private")"#,
        r#"starts_with("/secret")"#,
    );
    let output = nip(&["deploy", "--env", "mars"], &project.dir);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("canary rolled back"),
        "{}",
        text(&output)
    );
    let private = client().get(eu.url("/private/x")).send().await.unwrap();
    assert_eq!(private.status(), 403);

    // An environment that is not there is named with the ones that are.
    let output = nip(&["deploy", "--env", "staging"], &project.dir);
    assert!(!output.status.success());
    assert!(
        text(&output).contains("no environment \"staging\"")
            && text(&output).contains("mars, prod"),
        "{}",
        text(&output)
    );

    // A config naming a module the store does not have is refused by field.
    let missing = gateway(
        port,
        &a,
        &format!(
            "plugins:\n  ghost: {{ source: {{ sha256: \"{}\" }} }}\n",
            "ab".repeat(32)
        ),
    );
    let output = control_plane.apply(&missing, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("plugins.ghost.source.sha256: no plugin module"),
        "{}",
        text(&output)
    );
}

/// A console in a pseudo-terminal (tmux on a socket of its own), typed into and read
/// from the screen.
struct Terminal {
    socket: String,
}

impl Terminal {
    fn start(command: &str) -> Terminal {
        let socket = format!("nip-debug-{}", free_port());
        let status = Command::new("tmux")
            .args([
                "-L",
                &socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "220",
                "-y",
                "60",
            ])
            .arg(command)
            .status()
            .expect("tmux (./dev test installs it)");
        assert!(status.success());
        Terminal { socket }
    }

    fn type_line(&self, line: &str) {
        let status = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", line, "Enter"])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-S", "-200"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    async fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !self.screen().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "{text:?} is not on the screen:\n{}",
                self.screen()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn running(&self) -> bool {
        Command::new("tmux")
            .args(["-L", &self.socket, "has-session"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nip_debug_shows_routes_clusters_a_bounded_tap_and_plugin_logs_in_a_terminal() {
    let _turn = crate::common::module_turn(module_path!());
    let app = Pages::start(&[(
        "/orders/7",
        200,
        "application/json",
        r#"{"id": 7, "card": "4111"}"#,
    )])
    .await;
    let proxy = Proxy::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:{{admin}}" }}
api_gateway: {{ address: "127.0.0.1:{{port}}" }}
services:
  shop: {{ endpoints: ["{app}"] }}
plugins:
  guard: {{ source: {{ file: "{guard}" }}, config: {{ redact: [card] }} }}
routes:
  - {{ name: orders, match: {{ path_prefix: /orders }}, service: shop, plugins: [guard] }}
  - {{ name: rest, service: shop }}
"#,
        app = app.address,
        guard = example_plugin("sdk_guard").display(),
    ))
    .await;
    let terminal = Terminal::start(&format!(
        "{} debug --admin 127.0.0.1:{}",
        nip_bin(),
        proxy.admin_port
    ));
    terminal.wait_for("nip debug>").await;

    terminal.type_line("routes");
    terminal.wait_for("prefix /orders").await;
    let screen = terminal.screen();
    assert!(
        screen.contains("orders") && screen.contains("→ shop"),
        "{screen}"
    );

    terminal.type_line("clusters");
    terminal.wait_for(&app.address.to_string()).await;
    assert!(
        terminal.screen().contains("predicted"),
        "{}",
        terminal.screen()
    );

    // The tap shows the next two requests of the route, then stops by itself.
    terminal.type_line("tap orders 2");
    terminal.wait_for("watching orders for 2 request(s)").await;
    let http = client();
    for path in ["/other", "/orders/7", "/orders/7", "/orders/7"] {
        let answer = http.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(answer.status(), if path == "/other" { 404 } else { 200 });
    }
    terminal.wait_for("2 request(s) shown").await;
    let screen = terminal.screen();
    assert_eq!(
        screen.matches("200 GET /orders/7").count(),
        2,
        "two of the route's requests, no other:\n{screen}"
    );
    assert!(!screen.contains("/other"), "{screen}");

    // What the plugin logged while redacting.
    terminal.type_line("logs guard 5");
    terminal.wait_for("redacted 1 field(s)").await;
    assert!(
        terminal.screen().contains("info  guard:"),
        "{}",
        terminal.screen()
    );

    terminal.type_line("tap nowhere 1");
    terminal
        .wait_for("no route named \"nowhere\" (routes: orders, rest")
        .await;

    terminal.type_line("frobnicate");
    terminal
        .wait_for("unknown command \"frobnicate\"; type help")
        .await;
    terminal.type_line("quit");
    eventually("nip debug ends on quit", || async { !terminal.running() }).await;

    // One command from the command line, for scripts.
    let output = nip(
        &[
            "debug",
            "--admin",
            &format!("127.0.0.1:{}", proxy.admin_port),
            "plugins",
        ],
        Path::new("."),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("guard (wasm, module"),
        "{}",
        text(&output)
    );
}

#[test]
fn init_refuses_a_bad_name_and_a_directory_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let output = nip(&["init", "My_Plugin"], tmp.path());
    assert!(!output.status.success());
    assert!(
        text(&output).contains("use lowercase letters, digits and dashes"),
        "{}",
        text(&output)
    );
    std::fs::create_dir(tmp.path().join("taken")).unwrap();
    std::fs::write(tmp.path().join("taken/file"), "mine").unwrap();
    let output = nip(&["init", "taken"], tmp.path());
    assert!(!output.status.success());
    assert!(
        text(&output).contains("exists and is not empty"),
        "{}",
        text(&output)
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("taken/file")).unwrap(),
        "mine"
    );
    let output = nip(&["dev"], tmp.path());
    assert!(
        text(&output).contains("no nip-project.yaml"),
        "{}",
        text(&output)
    );
}
