//! Configuration validation through the library (`Config::load`, `from_toml`, and
//! `from_toml_with_env` with the test's own environment map): errors name the file and the key;
//! relative paths resolve against the file's folder.

mod common;

use common::*;

/// `cfg` changed by `f`, written next to a fresh PKI and loaded: the error it must produce.
fn load_err(f: impl FnOnce(&mut GateConfig)) -> (Pki, hubgate::ConfigError) {
    let pki = Pki::new();
    let mut cfg = base();
    f(&mut cfg);
    match cfg.load(&pki) {
        Ok(_) => panic!("config must be rejected:\n{}", cfg.to_toml()),
        Err(e) => (pki, e),
    }
}

/// The key [`load_err`] names.
fn rejected_key(f: impl FnOnce(&mut GateConfig)) -> String {
    load_err(f).1.key
}

/// A valid configuration whose upstream is never contacted.
fn base() -> GateConfig {
    GateConfig::new("http://127.0.0.1:9/hook")
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let pki = Pki::new();
    // The process's working directory is the package root, not the temp dir.
    assert_ne!(std::env::current_dir().unwrap(), pki.dir.path());
    let config = hubgate::Config::load(&base().write(&pki, "hubgate.toml")).expect("valid config");
    assert_eq!(config.server.cert_path, pki.path("server-chain.pem"));
    assert_eq!(config.client_auth.anchors.len(), 1);
    assert_eq!(config.client_auth.anchors[0].der, pki.root_der());
}

#[test]
fn from_toml_resolves_against_the_given_base_dir() {
    let pki = Pki::new();
    let config = hubgate::Config::from_toml(&base().to_toml(), "inline.toml", pki.dir.path())
        .expect("valid config");
    assert_eq!(config.server.key_path, pki.path("server.key"));
}

#[test]
fn error_names_the_file_and_the_key() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().upstream = "nope".into();
    let err = hubgate::Config::from_toml(&cfg.to_toml(), "label.toml", pki.dir.path())
        .err()
        .expect("rejected");
    assert_eq!(err.file, "label.toml");
    assert_eq!(err.key, "route[0].upstream");
    assert!(err
        .to_string()
        .starts_with("label.toml: route[0].upstream: "));
}

#[test]
fn require_mode_without_roots_is_rejected() {
    assert_eq!(
        rejected_key(|c| c.client_auth.roots = None),
        "client_auth.roots"
    );
}

#[test]
fn optional_mode_without_roots_is_rejected() {
    let key = rejected_key(|c| {
        c.client_auth = ClientAuth {
            roots: None,
            ..ClientAuth::optional()
        }
    });
    assert_eq!(key, "client_auth.roots");
}

#[test]
fn off_mode_needs_no_roots() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.client_auth = ClientAuth::off();
    cfg.load(&pki).expect("valid config");
}

#[test]
fn required_route_cert_with_mode_off_is_rejected() {
    let key = rejected_key(|c| {
        c.client_auth = ClientAuth::off();
        c.route().client_cert = Some(RouteCert::Required);
    });
    assert_eq!(key, "route[0].client_cert");
}

#[test]
fn duplicate_route_path_is_rejected() {
    let key = rejected_key(|c| {
        let again = c.routes[0].clone();
        c.routes.push(again);
    });
    assert_eq!(key, "route[1].path");
}

#[test]
fn route_path_with_query_is_rejected() {
    let key = rejected_key(|c| c.route().path = "/webhook?x=1".into());
    assert_eq!(key, "route[0].path");
}

#[test]
fn empty_app_secrets_are_rejected() {
    let key = rejected_key(|c| c.route().app_secrets.clear());
    assert_eq!(key, "route[0].app_secrets");
}

#[test]
fn empty_inline_secret_is_rejected() {
    let key = rejected_key(|c| c.route().app_secrets.push(Secret::inline("")));
    assert_eq!(key, "route[0].app_secrets[1]");
}

#[test]
fn unset_env_secret_names_the_variable() {
    let var = "HG_TEST_LIB_NEVER_SET";
    // The configuration's environment is empty: the variable is not set there.
    let (_, err) = load_err(|c| c.route().app_secrets.push(Secret::env(var)));
    assert_eq!(err.key, "route[0].app_secrets[1]");
    assert!(err.message.contains(var), "{err}");
}

#[test]
fn missing_secret_file_names_the_path() {
    let (pki, err) = load_err(|c| c.route().verify_token = Secret::file("no-such-token"));
    assert_eq!(err.key, "route[0].verify_token");
    assert!(
        err.message
            .contains(pki.path("no-such-token").to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn zero_body_limit_is_rejected() {
    let key = rejected_key(|c| c.server.max_body_bytes = Some(0));
    assert_eq!(key, "server.max_body_bytes");
}

#[test]
fn bad_duration_is_rejected() {
    let key = rejected_key(|c| c.upstream.timeout = Some("soon".into()));
    assert_eq!(key, "upstream.timeout");
}

#[test]
fn empty_allowed_cn_entry_is_rejected() {
    let key = rejected_key(|c| c.client_auth.allowed_cn = Some(vec![META_CN.into(), "".into()]));
    assert_eq!(key, "client_auth.allowed_cn[1]");
}

#[test]
fn no_routes_is_rejected() {
    assert_eq!(rejected_key(|c| c.routes.clear()), "route");
}

#[test]
fn unknown_key_is_rejected_and_named() {
    // A misspelt key is malformed text, not a typed configuration: edited as text.
    let pki = Pki::new();
    let toml = base()
        .to_toml()
        .replace("[upstream]\n", "[upstream]\ntimeuot = \"1s\"\n");
    assert_ne!(toml, base().to_toml(), "the key was inserted");
    let err = pki.load_toml(&toml).err().expect("rejected");
    assert!(err.to_string().contains("timeuot"), "{err}");
}

#[test]
fn a_secret_given_as_a_number_is_refused_without_echoing_it() {
    let (_, err) = load_err(|c| c.route().verify_token = Secret::Number(918273645));
    assert_eq!(err.key, "route[0].verify_token");
    assert!(!err.to_string().contains("918273645"), "{err}");
    assert!(err.message.contains("quoted string"), "{err}");
}

#[test]
fn item_dedupe_needs_item_split() {
    let (_, e) = load_err(|c| {
        c.route().dedupe = Some(toml::Value::String("item".into()));
    });
    assert_eq!(e.key, "route[0].dedupe");
    assert!(e.message.contains("split = \"item\""), "{}", e.message);
    let (_, e) = load_err(|c| {
        c.route().split("entry", "item");
    });
    assert_eq!(e.key, "route[0].dedupe");
}

#[test]
fn backend_secret_needs_a_splitting_route() {
    let (_, e) = load_err(|c| c.route().backend_secret = Some(Secret::inline("k")));
    assert_eq!(e.key, "route[0].backend_secret");
    assert!(e.message.contains("split"), "{}", e.message);
}

#[test]
fn dedupe_takes_booleans_and_modes_and_names_the_bad_ones() {
    let pki = Pki::new();
    for (value, want) in [
        (
            toml::Value::Boolean(true),
            hubgate::config::DedupeMode::Body,
        ),
        (
            toml::Value::Boolean(false),
            hubgate::config::DedupeMode::Off,
        ),
        (
            toml::Value::String("off".into()),
            hubgate::config::DedupeMode::Off,
        ),
        (
            toml::Value::String("body".into()),
            hubgate::config::DedupeMode::Body,
        ),
    ] {
        let mut c = base();
        c.route().dedupe = Some(value);
        assert_eq!(c.load(&pki).unwrap().routes[0].dedupe, want);
    }
    let mut c = base();
    c.route().split("item", "item");
    let config = c.load(&pki).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.dedupe, hubgate::config::DedupeMode::Item);
    assert_eq!(route.split, hubgate::config::SplitMode::Item);
    // The backend key defaults to the first app secret.
    assert_eq!(route.backend_secret.as_ref(), Some(&route.app_secrets[0]));
    let (_, e) = load_err(|c| c.route().dedupe = Some(toml::Value::String("items".into())));
    assert_eq!(e.key, "route[0].dedupe");
    assert!(e.message.contains("`item`"), "{}", e.message);
    let (_, e) = load_err(|c| c.route().split = Some("changes".into()));
    assert_eq!(e.key, "route[0].split");
    // Off on a spool route is refused, whichever spelling.
    let (_, e) = load_err(|c| {
        c.with_spool();
        c.route().delivery = Some(Delivery::Spool);
        c.route().dedupe = Some(toml::Value::String("off".into()));
    });
    assert_eq!(e.key, "route[0].dedupe");
}

#[test]
fn the_inspector_off_loopback_needs_a_token_and_bounds_its_capacity() {
    let (_, e) = load_err(|c| {
        c.with_inspector(None);
        c.admin.as_mut().unwrap().listen = "0.0.0.0:0".into();
    });
    assert_eq!(e.key, "admin.token");
    assert!(
        e.message.contains("not a loopback address"),
        "{}",
        e.message
    );
    let (_, e) = load_err(|c| c.with_inspector(Some("short")));
    assert_eq!(e.key, "admin.token");
    let (_, e) = load_err(|c| {
        c.with_inspector(None);
        c.admin.as_mut().unwrap().inspector_capacity = Some(0);
    });
    assert_eq!(e.key, "admin.inspector_capacity");
    let (_, e) = load_err(|c| {
        c.with_admin();
        c.admin.as_mut().unwrap().inspector_capacity = Some(10);
    });
    assert_eq!(e.key, "admin.inspector_capacity");
    // With a token, any address will do; off loopback without the inspector, none is needed.
    let pki = Pki::new();
    let mut c = base();
    c.with_inspector(Some("a-long-enough-token"));
    c.admin.as_mut().unwrap().listen = "0.0.0.0:0".into();
    let config = c.load(&pki).unwrap();
    assert_eq!(config.inspector.unwrap().capacity, 500);
    let mut c = base();
    c.with_admin();
    c.admin.as_mut().unwrap().listen = "0.0.0.0:0".into();
    assert!(c.load(&pki).unwrap().inspector.is_none());
}
