use super::*;

fn yaml(port: u16) -> String {
    format!("services:\n  web: {{ endpoints: [\"127.0.0.1:{port}\"] }}\nroutes:\n  - {{ service: web }}\n")
}

fn change(port: u16) -> Change {
    Change {
        author: "test".into(),
        message: String::new(),
        yaml: yaml(port),
        canary: None,
        action: RevisionAction::Apply,
        allow_empty: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_one_or_two_pushes_and_ends_on_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/nip.db", dir.path().display()))
        .await
        .unwrap();
    let cache = Arc::new(SnapshotCache::default());
    let service = Arc::new(ConfigService::new(
        store,
        Arc::clone(&cache),
        Arc::new(ProxyRegistry::default()),
        ChangePolicy::default(),
    ));
    service.sync().await.unwrap();
    let before = service.pushes();
    let mut burst = Vec::new();
    for port in 9001..=9010 {
        let service = Arc::clone(&service);
        burst.push(tokio::spawn(
            async move { service.apply(change(port)).await },
        ));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for apply in burst {
        assert!(matches!(apply.await.unwrap(), Ok(Outcome::Applied(_))));
    }
    assert_eq!(cache.current().label, "10", "the last change is served");
    let pushes = service.pushes() - before;
    assert!(
        (1..=2).contains(&pushes),
        "ten changes within ~20 ms made {pushes} pushes"
    );
    // A change after a quiet window goes out at once.
    tokio::time::sleep(PUSH_DEBOUNCE).await;
    let alone = tokio::time::Instant::now();
    service.apply(change(9100)).await.unwrap();
    assert!(alone.elapsed() < PUSH_DEBOUNCE, "{:?}", alone.elapsed());
    assert_eq!(cache.current().label, "11");
}

#[tokio::test]
async fn a_canary_left_behind_by_a_dead_replica_is_rolled_back_by_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/nip.db", dir.path().display()))
        .await
        .unwrap();
    let service = ConfigService::new(
        store.clone(),
        Arc::new(SnapshotCache::default()),
        Arc::new(ProxyRegistry::default()),
        ChangePolicy::default(),
    );
    service.apply(change(9001)).await.unwrap();
    // A replica stored a canary and died: its deadline is long past.
    store
        .commit(NewRevision {
            author: "replica-that-died",
            message: "",
            action: RevisionAction::Apply,
            restored_from: None,
            canary: Some(("eu", now_ms() - 60_000)),
            yaml: &yaml(9002),
        })
        .await
        .unwrap();
    service.sync().await.unwrap();
    assert_eq!(store.canary().await.unwrap(), None);
    assert_eq!(
        store.revision(2).await.unwrap().state,
        RevisionState::Aborted
    );
    assert!(
        service.views().by_region.is_empty(),
        "nothing is served as a canary"
    );
    // Changes are possible again.
    assert!(matches!(
        service.apply(change(9003)).await,
        Ok(Outcome::Applied(_))
    ));
}

#[test]
fn the_policy_refuses_unlisted_plugin_hosts_and_configs_that_serve_nothing() {
    let config = |yaml: &str| Config::from_yaml(yaml).unwrap();
    let sha = "0".repeat(64);
    let with_url = |host: &str| {
        config(&format!(
            "plugins:\n  p: {{ source: {{ url: \"https://{host}/p.wasm\", sha256: \"{sha}\" }} }}\n{}",
            yaml(9001)
        ))
    };
    let closed = ChangePolicy::default();
    let paths =
        |problems: Vec<FieldError>| problems.into_iter().map(|p| p.path).collect::<Vec<_>>();
    assert_eq!(
        paths(closed.problems(&with_url("registry.example.com"), true, false)),
        ["plugins.p.source.url"]
    );
    let open = ChangePolicy {
        plugin_hosts: vec!["registry.example.com".into(), "*.wasm.example.org".into()],
    };
    for (host, allowed) in [
        ("registry.example.com", true),
        ("REGISTRY.example.com", true),
        ("a.wasm.example.org", true),
        ("wasm.example.org", false),
        ("evilwasm.example.org", false),
        ("169.254.169.254", false),
        ("registry.example.com.evil", false),
    ] {
        assert_eq!(
            open.problems(&with_url(host), true, false).is_empty(),
            allowed,
            "{host}"
        );
    }

    // Serving nothing takes an explicit allow_empty.
    let empty = config("services:\n  web: { endpoints: [] }\n");
    assert_eq!(paths(closed.problems(&empty, true, false)), ["routes"]);
    assert!(closed.problems(&empty, true, true).is_empty());
    assert!(
        closed.problems(&empty, false, false).is_empty(),
        "a config that never had routes (services for gRPC clients) loses none"
    );
    let no_endpoints = config(
        "services:\n  web: { endpoints: [] }\n  b: { endpoints: [\"127.0.0.1:1\"] }\nroutes:\n  - split: [{ service: web, weight: 1 }, { service: b, weight: 1 }]\n  - { service: web }\n",
    );
    let problems = closed.problems(&no_endpoints, true, false);
    assert_eq!(
        paths(problems.clone()),
        ["services.web.endpoints", "services.web.endpoints"]
    );
    assert!(problems[1].message.contains("routes[1]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_tls_is_refused_without_a_ca_and_served_with_the_bundle_and_members() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}/nip.db", dir.path().display()))
        .await
        .unwrap();
    let cache = Arc::new(SnapshotCache::default());
    let service = ConfigService::new(
        store,
        Arc::clone(&cache),
        Arc::new(ProxyRegistry::default()),
        ChangePolicy::default(),
    );
    let mesh = "api_gateway: { address: \"0.0.0.0:8443\", tls: { mesh: true } }\nservices:\n  web: { endpoints: [\"10.0.0.7:8443\"] }\n  hop: { endpoints: [\"10.0.0.8:8443\"], tls: { mesh: true } }\nroutes:\n  - { service: web }\n  - { match: { path_prefix: /hop }, service: hop }\n";
    let with = |yaml: &str| Change {
        yaml: yaml.to_string(),
        ..change(0)
    };
    // Without a CA (--plaintext) no proxy could get its certificate or the bundle.
    let Err(ChangeError::Invalid(ConfigError::Invalid(problems))) = service.apply(with(mesh)).await
    else {
        panic!("refused without a CA");
    };
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["api_gateway.tls.mesh", "services.hop.tls.mesh"]);

    // With one: ROOTCA goes with the state, and a member's endpoint is marked.
    let root = rcgen::generate_simple_self_signed(vec!["root.example".to_string()]).unwrap();
    service
        .set_trust_bundle(&root.cert.pem(), "nip.local")
        .await
        .unwrap();
    service.apply(with(mesh)).await.unwrap();
    let secrets = |cache: &SnapshotCache| {
        cache.current().types[nip_xds::resources::SECRET_TYPE]
            .resources
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(secrets(&cache), ["ROOTCA"]);
    let version_before = cache.current().types[nip_xds::resources::ENDPOINT_TYPE]
        .version
        .clone();
    service
        .set_mesh_members([("edge-7".to_string(), "10.0.0.7".parse().unwrap())].into())
        .await
        .unwrap();
    let after = cache.current();
    assert_ne!(
        after.types[nip_xds::resources::ENDPOINT_TYPE].version,
        version_before,
        "the member's endpoint is marked and pushed"
    );
    // The cluster gets the entry expecting edge-7 (its encoded resource names it).
    let (_, web) = &after.types[nip_xds::resources::CLUSTER_TYPE].resources["web"];
    assert!(String::from_utf8_lossy(&web.value).contains("nip-mesh spiffe://nip.local/node/edge-7"));
    let (_, hop) = &after.types[nip_xds::resources::CLUSTER_TYPE].resources["hop"];
    assert!(
        !String::from_utf8_lossy(&hop.value).contains("nip-mesh"),
        "its own TLS stays"
    );
}
