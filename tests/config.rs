//! Configuration validation through the library (`Config::load`/`from_toml`): errors name the
//! file and the key; relative paths resolve against the file's folder.

mod common;

use common::*;

fn load_err(pki: &Pki, toml: &str) -> hubgate::ConfigError {
    match pki.config(toml) {
        Ok(_) => panic!("config must be rejected:\n{toml}"),
        Err(e) => e,
    }
}

fn base() -> GateConfig {
    GateConfig::new("http://127.0.0.1:9/hook")
}

#[test]
fn relative_paths_resolve_against_the_config_folder() {
    let pki = Pki::new();
    // The process's working directory is the package root, not the temp dir.
    assert_ne!(std::env::current_dir().unwrap(), pki.dir.path());
    let config = pki.config(&base().to_toml()).expect("valid config");
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
    let err = hubgate::Config::from_toml(
        &base().to_toml().replace("http://127.0.0.1:9/hook", "nope"),
        "label.toml",
        pki.dir.path(),
    )
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
    let pki = Pki::new();
    let mut cfg = base();
    cfg.roots = None;
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "client_auth.roots");
}

#[test]
fn optional_mode_without_roots_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base().mode("optional");
    cfg.roots = None;
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "client_auth.roots");
}

#[test]
fn off_mode_needs_no_roots() {
    let pki = Pki::new();
    let mut cfg = base().mode("off");
    cfg.roots = None;
    pki.config(&cfg.to_toml()).expect("valid config");
}

#[test]
fn required_route_cert_with_mode_off_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base().mode("off");
    cfg.roots = None;
    cfg.route().client_cert = Some("required");
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "route[0].client_cert");
}

#[test]
fn duplicate_route_path_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    let again = cfg.routes[0].clone();
    cfg.routes.push(again);
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "route[1].path");
}

#[test]
fn route_path_with_query_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().path = "/webhook?x=1".into();
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "route[0].path");
}

#[test]
fn empty_app_secrets_are_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().app_secrets = "[]".into();
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "route[0].app_secrets");
}

#[test]
fn empty_inline_secret_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().app_secrets = format!("[{}, \"\"]", q(SECRET));
    assert_eq!(
        load_err(&pki, &cfg.to_toml()).key,
        "route[0].app_secrets[1]"
    );
}

#[test]
fn unset_env_secret_names_the_variable() {
    let pki = Pki::new();
    let var = "HG_TEST_LIB_NEVER_SET";
    let mut cfg = base();
    cfg.route().app_secrets = format!("[{}, {{ env = {} }}]", q(SECRET), q(var));
    let err = load_err(&pki, &cfg.to_toml());
    assert_eq!(err.key, "route[0].app_secrets[1]");
    assert!(err.message.contains(var), "{err}");
}

#[test]
fn missing_secret_file_names_the_path() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().verify_token = format!("{{ file = {} }}", q("no-such-token"));
    let err = load_err(&pki, &cfg.to_toml());
    assert_eq!(err.key, "route[0].verify_token");
    assert!(
        err.message
            .contains(pki.path("no-such-token").to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn zero_body_limit_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.max_body_bytes = Some(0);
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "server.max_body_bytes");
}

#[test]
fn bad_duration_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.upstream_timeout = "soon";
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "upstream.timeout");
}

#[test]
fn empty_allowed_cn_entry_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.allowed_cn = Some(format!("[{}, \"\"]", q(META_CN)));
    assert_eq!(
        load_err(&pki, &cfg.to_toml()).key,
        "client_auth.allowed_cn[1]"
    );
}

#[test]
fn no_routes_is_rejected() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.routes.clear();
    assert_eq!(load_err(&pki, &cfg.to_toml()).key, "route");
}

#[test]
fn unknown_key_is_rejected_and_named() {
    let pki = Pki::new();
    let toml = base()
        .to_toml()
        .replace("[upstream]\n", "[upstream]\ntimeuot = \"1s\"\n");
    let err = load_err(&pki, &toml);
    assert!(err.to_string().contains("timeuot"), "{err}");
}

#[test]
fn a_secret_given_as_a_number_is_refused_without_echoing_it() {
    let pki = Pki::new();
    let mut cfg = base();
    cfg.route().verify_token = "918273645".into();
    let err = load_err(&pki, &cfg.to_toml());
    assert_eq!(err.key, "route[0].verify_token");
    assert!(!err.to_string().contains("918273645"), "{err}");
    assert!(err.message.contains("quoted string"), "{err}");
}
