//! The same store tests on SQLite and on PostgreSQL.
//!
//! PostgreSQL comes from `./dev test`, which starts a throwaway server from Debian's
//! packages and sets `NIP_TEST_POSTGRES_URL`; each test makes its own database there.

use super::*;

/// A fresh SQLite store in a temporary directory (kept alive by the returned guard).
async fn sqlite() -> (Store, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}/nip.db", dir.path().display());
    let store = Store::open(&url).await.expect("open SQLite store");
    (store, url, dir)
}

/// A fresh PostgreSQL database on the test server.
async fn postgres() -> (Store, String) {
    let server = std::env::var("NIP_TEST_POSTGRES_URL").expect(
        "NIP_TEST_POSTGRES_URL is not set: run the tests with ./dev test, which starts \
         PostgreSQL, or point it at a server where the user may create databases",
    );
    sqlx::any::install_default_drivers();
    let admin = AnyPool::connect(&server)
        .await
        .expect("connect to PostgreSQL");
    let name = format!("nip_test_{}", fastrand::u64(..));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    let store = Store::open(&url).await.expect("open PostgreSQL store");
    (store, url)
}

fn apply<'a>(author: &'a str, yaml: &'a str) -> NewRevision<'a> {
    NewRevision {
        author,
        message: "",
        action: RevisionAction::Apply,
        restored_from: None,
        canary: None,
        yaml,
    }
}

const V1: &str = "routes:\n  - match: {prefix: /}\n    service: a\n";
const V2: &str = "routes:\n  - match: {prefix: /}\n    service: b\n";
const V3: &str = "routes:\n  - match: {prefix: /}\n    service: c\n";

/// Versions, diffs, history, rollback and the audit trail.
async fn history_and_rollback(store: &Store) {
    assert_eq!(store.current().await.unwrap(), None);
    assert_eq!(store.head().await.unwrap(), Head::default());

    let first = store.commit(apply("alice", V1)).await.unwrap();
    assert_eq!(first.version, 1);
    assert!(first.diff.contains("+    service: a"), "{}", first.diff);
    let second = store.commit(apply("bob", V2)).await.unwrap();
    assert_eq!(second.version, 2);
    assert!(second.diff.contains("-    service: a"), "{}", second.diff);
    assert!(second.diff.contains("+    service: b"), "{}", second.diff);
    assert_eq!(store.current().await.unwrap().unwrap().yaml, V2);

    let restored = store.revision(1).await.unwrap();
    let rollback = store
        .commit(NewRevision {
            author: "carol",
            message: "back to a",
            action: RevisionAction::Rollback,
            restored_from: Some(1),
            canary: None,
            yaml: &restored.yaml,
        })
        .await
        .unwrap();
    assert_eq!(rollback.version, 3);
    assert_eq!(store.current().await.unwrap().unwrap().yaml, V1);
    assert!(rollback.diff.contains("+    service: a"));

    let history = store.history(10).await.unwrap();
    let versions: Vec<i64> = history.iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![3, 2, 1]);
    assert_eq!(history[0].restored_from, Some(1));
    assert_eq!(history[0].action, RevisionAction::Rollback);
    assert_eq!(store.history(1).await.unwrap().len(), 1);

    let events = store.events(10).await.unwrap();
    let trail: Vec<(&str, &str, Option<i64>)> = events
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.version))
        .collect();
    assert_eq!(
        trail,
        vec![
            ("carol", "rollback", Some(3)),
            ("bob", "apply", Some(2)),
            ("alice", "apply", Some(1)),
        ]
    );
    store
        .record("dave", "refused", None, "routes[0].service: unknown")
        .await
        .unwrap();
    assert_eq!(
        store.events(1).await.unwrap()[0].detail,
        "routes[0].service: unknown"
    );
    assert!(matches!(
        store.revision(99).await,
        Err(StoreError::NotFound(99))
    ));
}

/// A canary blocks other changes, and ends promoted or aborted.
async fn canary_lifecycle(store: &Store) {
    store.commit(apply("alice", V1)).await.unwrap();
    let canary = store
        .commit(NewRevision {
            canary: Some(("eu", now_ms() + 30_000)),
            ..apply("alice", V2)
        })
        .await
        .unwrap();
    assert_eq!(canary.state, RevisionState::Canary);
    let stored = store.canary().await.unwrap().expect("the canary is stored");
    assert_eq!(stored.canary_deadline_ms, canary.canary_deadline_ms);
    assert_eq!(stored.canary_region.as_deref(), Some("eu"));
    assert_eq!(
        store.head().await.unwrap(),
        Head {
            active: Some(1),
            canary: Some(2),
            policies: None,
        }
    );
    assert_eq!(store.current().await.unwrap().unwrap().version, 1);
    match store.commit(apply("bob", V3)).await {
        Err(StoreError::CanaryInProgress { version, region }) => {
            assert_eq!((version, region.as_str()), (2, "eu"));
        }
        other => panic!("expected a refusal during the canary, got {other:?}"),
    }
    store
        .abort(2, "control-plane", "node eu-1 NACKed: bad plugin")
        .await
        .unwrap();
    assert_eq!(
        store.revision(2).await.unwrap().state,
        RevisionState::Aborted
    );
    assert_eq!(store.current().await.unwrap().unwrap().version, 1);
    let aborted = &store.events(1).await.unwrap()[0];
    assert_eq!(aborted.action, "canary_aborted");
    assert!(aborted.detail.contains("NACKed"));
    assert!(matches!(
        store.promote(2, "x").await,
        Err(StoreError::WrongState { .. })
    ));

    let next = store
        .commit(NewRevision {
            canary: Some(("us", now_ms() + 30_000)),
            ..apply("bob", V3)
        })
        .await
        .unwrap();
    assert!(
        next.diff.contains("-    service: a"),
        "diff from the current config, not the aborted one"
    );
    store.promote(next.version, "control-plane").await.unwrap();
    assert_eq!(store.current().await.unwrap().unwrap().yaml, V3);
    assert_eq!(store.canary().await.unwrap(), None);
}

/// Two replicas writing at once get distinct versions and lose nothing.
async fn concurrent_replicas(url: &str) {
    let replicas = [
        Store::open(url).await.unwrap(),
        Store::open(url).await.unwrap(),
    ];
    let mut writers = Vec::new();
    for (i, store) in replicas.iter().enumerate() {
        for n in 0..10 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let yaml = format!("# replica {i} change {n}\n");
                store
                    .commit(apply("replica", &yaml))
                    .await
                    .map(|r| r.version)
            }));
        }
    }
    let mut versions = Vec::new();
    for writer in writers {
        versions.push(writer.await.unwrap().expect("commit"));
    }
    versions.sort_unstable();
    assert_eq!(versions, (1..=20).collect::<Vec<i64>>());
    assert_eq!(replicas[1].events(100).await.unwrap().len(), 20);
    // Reopening runs the migrations again: a no-op that keeps everything.
    let reopened = Store::open(url).await.unwrap();
    assert_eq!(reopened.current().await.unwrap().unwrap().version, 20);
}

/// Tokens: stored with their digest only, found by id and name, names unique, revocation
/// for good and recorded.
async fn tokens(store: &Store) {
    let token = StoredToken {
        id: "0123456789ab".into(),
        name: "ci".into(),
        role: "operator".into(),
        tenants: vec!["acme".into(), "globex".into()],
        secret_sha256: "d".repeat(64),
        created_at_ms: now_ms(),
        created_by: "token:root".into(),
        expires_at_ms: Some(now_ms() + 60_000),
        revoked_at_ms: None,
        scope: String::new(),
    };
    store.create_token(&token).await.unwrap();
    assert_eq!(
        store.token("0123456789ab").await.unwrap().as_ref(),
        Some(&token)
    );
    assert_eq!(
        store.token_named("ci").await.unwrap().as_ref(),
        Some(&token)
    );
    assert_eq!(store.token("ffffffffffff").await.unwrap(), None);
    let taken = StoredToken {
        id: "ba9876543210".into(),
        ..token.clone()
    };
    assert!(matches!(
        store.create_token(&taken).await,
        Err(StoreError::NameTaken(name)) if name == "ci"
    ));
    assert!(store.revoke_token("ci", "token:root").await.unwrap());
    assert!(!store.revoke_token("nobody", "token:root").await.unwrap());
    let revoked = store.token("0123456789ab").await.unwrap().unwrap();
    assert!(revoked.revoked_at_ms.is_some() && !revoked.usable_at(now_ms()));
    assert_eq!(store.tokens().await.unwrap().len(), 1);
    let events = store.events(10).await.unwrap();
    assert_eq!(
        (events[0].action.as_str(), events[0].actor.as_str()),
        ("token_revoked", "token:root")
    );
    assert_eq!(events[1].action, "token_created");
}

/// Tenant policies: set, replaced, read back, cleared once; each change moves the head.
async fn tenant_policies(store: &Store) {
    assert_eq!(store.plugin_signing("acme").await.unwrap(), None);
    let before = store.head().await.unwrap().policies;
    let keys = vec!["a2V5MQ==".to_string(), "a2V5Mg==".to_string()];
    assert!(!store
        .set_plugin_signing("acme", &keys, "token:root")
        .await
        .unwrap());
    assert_eq!(
        store.plugin_signing("acme").await.unwrap(),
        Some(keys.clone())
    );
    let after_set = store.head().await.unwrap().policies;
    assert_ne!(before, after_set, "replicas notice the change");
    assert!(store
        .set_plugin_signing("acme", &keys[..1], "token:root")
        .await
        .unwrap());
    assert_eq!(store.plugin_signing_all().await.unwrap()["acme"], keys[..1]);
    assert!(store
        .set_plugin_signing("acme", &[], "token:root")
        .await
        .unwrap());
    assert!(!store
        .set_plugin_signing("acme", &[], "token:root")
        .await
        .unwrap());
    assert_eq!(store.plugin_signing("acme").await.unwrap(), None);
    let events = store.events(10).await.unwrap();
    assert_eq!(
        events[0].action, "plugin_signing_cleared",
        "clearing nothing records nothing"
    );
    assert_eq!(events[1].action, "plugin_signing_set");
}

async fn modules(store: &Store) {
    let digest = "ab".repeat(32);
    assert_eq!(store.module(&digest).await.unwrap(), None);
    let module: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    assert!(store
        .put_module(&digest, &module, "token:ci")
        .await
        .unwrap());
    assert!(
        !store
            .put_module(&digest, &module, "token:ci")
            .await
            .unwrap(),
        "a digest is stored once"
    );
    assert_eq!(store.module(&digest).await.unwrap(), Some(module));
    let events = store.events(10).await.unwrap();
    assert_eq!(events[0].action, "module_uploaded");
    assert_eq!(
        events[1].action, "apply",
        "storing it again records nothing"
    );
}

#[tokio::test]
async fn sqlite_modules() {
    let (store, _, _dir) = sqlite().await;
    store
        .commit(apply("token:ci", "routes: []\n"))
        .await
        .unwrap();
    modules(&store).await;
}

#[tokio::test]
async fn postgres_modules() {
    let (store, _) = postgres().await;
    store
        .commit(apply("token:ci", "routes: []\n"))
        .await
        .unwrap();
    modules(&store).await;
}

#[tokio::test]
async fn sqlite_tenant_policies() {
    let (store, _, _dir) = sqlite().await;
    tenant_policies(&store).await;
}

#[tokio::test]
async fn postgres_tenant_policies() {
    let (store, _) = postgres().await;
    tenant_policies(&store).await;
}

#[tokio::test]
async fn sqlite_tokens() {
    let (store, _, _dir) = sqlite().await;
    tokens(&store).await;
}

#[tokio::test]
async fn postgres_tokens() {
    let (store, _) = postgres().await;
    tokens(&store).await;
}

#[tokio::test]
async fn sqlite_history_and_rollback() {
    let (store, _, _dir) = sqlite().await;
    history_and_rollback(&store).await;
}

#[tokio::test]
async fn sqlite_canary_lifecycle() {
    let (store, _, _dir) = sqlite().await;
    canary_lifecycle(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_replicas() {
    let (_, url, _dir) = sqlite().await;
    concurrent_replicas(&url).await;
}

#[tokio::test]
async fn postgres_history_and_rollback() {
    let (store, _) = postgres().await;
    history_and_rollback(&store).await;
}

#[tokio::test]
async fn postgres_canary_lifecycle() {
    let (store, _) = postgres().await;
    canary_lifecycle(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_replicas() {
    let (_, url) = postgres().await;
    concurrent_replicas(&url).await;
}

#[test]
fn unknown_url_scheme_names_the_choices() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let error = runtime
        .block_on(Store::open("mysql://x/y"))
        .expect_err("mysql is not supported");
    assert!(
        error.to_string().contains("sqlite:// or postgres://"),
        "{error}"
    );
}

#[test]
fn passwords_are_not_printed() {
    assert_eq!(
        redact("postgres://nip:secret@db:5432/nip"),
        "postgres://nip:***@db:5432/nip"
    );
    assert_eq!(redact("postgres://nip@db/nip"), "postgres://nip@db/nip");
    assert_eq!(
        redact("sqlite:///var/lib/nip.db"),
        "sqlite:///var/lib/nip.db"
    );
}
