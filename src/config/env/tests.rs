//! The environment table: every variable sets its key, bad values name the variable, and
//! [`ENV_VARS`] lists exactly what the overlay reads.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::*;
use crate::config::raw::parse;

const CWD: &str = "/cwd";

/// A file with one route, for the variables to patch.
const ONE_ROUTE: &str = "[[route]]\npath = \"/a\"\nverify_token = \"t\"\n\
                         app_secrets = [\"s\"]\nupstream = \"http://u/\"\n";

fn reader(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn run(
    file: &str,
    vars: &[(&str, &str)],
) -> Result<(RawConfig, HashMap<String, &'static str>), ConfigError> {
    let raw = parse(file, "test.toml").expect("test TOML parses");
    overlay(
        raw,
        &reader(vars),
        Path::new(CWD),
        "test.toml + environment",
    )
}

/// Each variable with a value, and the TOML that value stands for (on top of [`ONE_ROUTE`]).
fn cases() -> Vec<(&'static str, &'static str, String)> {
    let route = |from: &str, to: &str| {
        assert!(ONE_ROUTE.contains(from));
        ONE_ROUTE.replace(from, to)
    };
    let add = |toml: &str| format!("{ONE_ROUTE}{toml}\n");
    vec![
        (
            "HUBGATE_LISTEN",
            "0.0.0.0:1",
            add("[server]\nlisten = \"0.0.0.0:1\""),
        ),
        (
            "HUBGATE_CERT",
            "c.pem",
            add("[server]\ncert = \"/cwd/c.pem\""),
        ),
        ("HUBGATE_KEY", "/k.pem", add("[server]\nkey = \"/k.pem\"")),
        (
            "HUBGATE_MAX_CONNECTIONS",
            "7",
            add("[server]\nmax_connections = 7"),
        ),
        (
            "HUBGATE_IDLE_TIMEOUT",
            "3s",
            add("[server]\nidle_timeout = \"3s\""),
        ),
        (
            "HUBGATE_DRAIN_TIMEOUT",
            "4s",
            add("[server]\ndrain_timeout = \"4s\""),
        ),
        (
            "HUBGATE_MAX_BODY_BYTES",
            "9",
            add("[server]\nmax_body_bytes = 9"),
        ),
        (
            "HUBGATE_CLIENT_AUTH",
            "optional",
            add("[client_auth]\nmode = \"optional\""),
        ),
        (
            "HUBGATE_CLIENT_ROOTS",
            "a.pem, /b.pem,",
            add("[client_auth]\nroots = [\"/cwd/a.pem\", \"/b.pem\"]"),
        ),
        (
            "HUBGATE_ALLOWED_CN",
            "x, y",
            add("[client_auth]\nallowed_cn = [\"x\", \"y\"]"),
        ),
        (
            "HUBGATE_ADMIN_LISTEN",
            "127.0.0.1:2",
            add("[admin]\nlisten = \"127.0.0.1:2\""),
        ),
        (
            "HUBGATE_UPSTREAM_TIMEOUT",
            "5s",
            add("[upstream]\ntimeout = \"5s\""),
        ),
        (
            "HUBGATE_SPOOL_BACKEND",
            "postgres",
            add("[spool]\nbackend = \"postgres\""),
        ),
        (
            "HUBGATE_SPOOL_PATH",
            "s.db",
            add("[spool]\npath = \"/cwd/s.db\""),
        ),
        (
            "HUBGATE_SPOOL_URL",
            "postgres://u@h/d",
            add("[spool]\nurl = \"postgres://u@h/d\""),
        ),
        (
            "HUBGATE_SPOOL_URL_FILE",
            "db-url",
            add("[spool]\nurl = { file = \"/cwd/db-url\" }"),
        ),
        (
            "HUBGATE_UPSTREAM_CA",
            "ca.pem",
            add("[upstream]\nca = \"/cwd/ca.pem\""),
        ),
        (
            "HUBGATE_PATH",
            "/b",
            route("path = \"/a\"", "path = \"/b\""),
        ),
        (
            "HUBGATE_UPSTREAM",
            "http://v/",
            route("upstream = \"http://u/\"", "upstream = \"http://v/\""),
        ),
        (
            "HUBGATE_VERIFY_TOKEN",
            "tok",
            route("verify_token = \"t\"", "verify_token = \"tok\""),
        ),
        (
            "HUBGATE_VERIFY_TOKEN_FILE",
            "tok.txt",
            route(
                "verify_token = \"t\"",
                "verify_token = { file = \"/cwd/tok.txt\" }",
            ),
        ),
        (
            "HUBGATE_APP_SECRET",
            "s1,s2",
            route("app_secrets = [\"s\"]", "app_secrets = [\"s1\", \"s2\"]"),
        ),
        (
            "HUBGATE_APP_SECRET_FILE",
            "a.txt, /b.txt",
            route(
                "app_secrets = [\"s\"]",
                "app_secrets = [{ file = \"/cwd/a.txt\" }, { file = \"/b.txt\" }]",
            ),
        ),
        ("HUBGATE_LEGACY_SHA1", "true", add("legacy_sha1 = true")),
        ("HUBGATE_INSPECTOR", "1", add("[admin]\ninspector = true")),
        (
            "HUBGATE_ADMIN_TOKEN",
            "a-long-admin-token",
            add("[admin]\ntoken = \"a-long-admin-token\""),
        ),
        ("HUBGATE_CLIENT_CERT", "none", add("client_cert = \"none\"")),
        ("HUBGATE_DELIVERY", "spool", add("delivery = \"spool\"")),
    ]
}

#[test]
fn every_variable_sets_its_key() {
    let cases = cases();
    let tested: BTreeSet<_> = cases.iter().map(|(var, _, _)| *var).collect();
    let listed: BTreeSet<_> = TABLE.iter().map(|v| v.name).collect();
    assert_eq!(tested, listed, "every variable of the table has a case");
    for (var, value, toml) in cases {
        let (raw, set) = run(ONE_ROUTE, &[(var, value)]).unwrap_or_else(|e| panic!("{var}: {e}"));
        let want = parse(&toml, "want.toml").unwrap_or_else(|e| panic!("{var}: {e}"));
        assert_eq!(format!("{raw:?}"), format!("{want:?}"), "{var}={value}");
        let key = TABLE.iter().find(|v| v.name == var).unwrap().key;
        assert_eq!(set, HashMap::from([(key.to_owned(), var)]), "{var}");
        // An empty variable is no variable.
        let (raw, set) = run(ONE_ROUTE, &[(var, "")]).unwrap();
        let unchanged = parse(ONE_ROUTE, "want.toml").unwrap();
        assert_eq!(format!("{raw:?}"), format!("{unchanged:?}"), "{var}=");
        assert!(set.is_empty());
    }
}

#[test]
fn a_bad_number_boolean_or_name_names_the_variable() {
    let mut checked = 0;
    for var in TABLE {
        let expected = match var.set {
            Set::Count(_) => "`x1` is not a number",
            Set::Bytes(_) => "`x1` is not a number of bytes",
            Set::Bool(_) => "`x1` is not true or false (or 1 or 0)",
            Set::Enum(_) => "unknown variant `x1`",
            _ => continue,
        };
        let err = run(ONE_ROUTE, &[(var.name, "x1")]).expect_err(var.name);
        assert_eq!(err.key, var.name);
        assert!(err.message.starts_with(expected), "{err}");
        // Names are reported against the environment, other values against the sources.
        let file = match var.set {
            Set::Enum(_) => "environment",
            _ => "test.toml + environment",
        };
        assert_eq!(err.file, file, "{err}");
        checked += 1;
    }
    assert_eq!(
        checked, 8,
        "max connections, body bytes, legacy SHA-1, the inspector and four names"
    );
}

#[test]
fn env_vars_document_exactly_what_the_overlay_reads() {
    let asked = |vars: &[(&str, &str)]| {
        let seen = RefCell::new(BTreeSet::new());
        let inner = reader(vars);
        let env = |name: &str| {
            seen.borrow_mut().insert(name.to_owned());
            inner(name)
        };
        let raw = parse(ONE_ROUTE, "test.toml").unwrap();
        overlay(raw, &env, Path::new(CWD), "test.toml").unwrap();
        seen.into_inner()
    };
    let documented: BTreeSet<String> = ENV_VARS.iter().map(|(v, _)| (*v).to_owned()).collect();
    assert_eq!(documented.len(), ENV_VARS.len(), "no variable listed twice");
    assert_eq!(asked(&[]), documented);
    // With every variable set, the overlay reads no other (and skips the `…_FILE` variables a
    // value already decided).
    let all: Vec<_> = cases().into_iter().map(|(var, v, _)| (var, v)).collect();
    let read = asked(&all);
    assert!(read.is_subset(&documented), "{read:?}");
    assert!(!read.contains("HUBGATE_VERIFY_TOKEN_FILE"));
    assert!(!read.contains("HUBGATE_APP_SECRET_FILE"));
    for name in [
        "HUBGATE_SPOOL_PATH",
        "HUBGATE_LEGACY_SHA1",
        "HUBGATE_DELIVERY",
    ] {
        assert!(documented.contains(name), "{name}");
        assert!(env_configured(&reader(&[(name, "x")])), "{name}");
    }
    assert!(!env_configured(&reader(&[("HUBGATE_CONFIG", "x")])));
    assert_eq!(env_docs().count(), ENV_VARS.len());
    assert!(env_docs().all(|(_, _, doc)| !doc.is_empty() && !doc.contains('\n')));
}

#[test]
fn the_readme_lists_every_variable() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for (var, _) in ENV_VARS {
        assert!(
            readme.contains(&format!("`{var}`")),
            "README.md does not list {var}"
        );
    }
}

#[test]
fn a_value_wins_over_a_file() {
    let vars = [
        ("HUBGATE_VERIFY_TOKEN", "tok"),
        ("HUBGATE_VERIFY_TOKEN_FILE", "tok.txt"),
        ("HUBGATE_APP_SECRET_FILE", "a.txt"),
    ];
    let (raw, set) = run(ONE_ROUTE, &vars).unwrap();
    let r = &raw.route[0];
    assert_eq!(r.verify_token, SecretSource::Inline("tok".into()));
    assert_eq!(r.app_secrets, [SecretSource::File("/cwd/a.txt".into())]);
    assert_eq!(set["route[0].verify_token"], "HUBGATE_VERIFY_TOKEN");
    assert_eq!(set["route[0].app_secrets"], "HUBGATE_APP_SECRET_FILE");
    // An empty value gives way to the file.
    let (raw, _) = run(
        ONE_ROUTE,
        &[
            ("HUBGATE_VERIFY_TOKEN", ""),
            ("HUBGATE_VERIFY_TOKEN_FILE", "f"),
        ],
    )
    .unwrap();
    assert_eq!(
        raw.route[0].verify_token,
        SecretSource::File("/cwd/f".into())
    );
}

#[test]
fn route_variables_create_a_route_when_the_file_has_none() {
    let vars = [
        ("HUBGATE_UPSTREAM", "http://u/"),
        ("HUBGATE_VERIFY_TOKEN", "t"),
        ("HUBGATE_APP_SECRET", "s"),
    ];
    let (raw, _) = run("", &vars).unwrap();
    let want = parse(&ONE_ROUTE.replace("/a", "/webhook"), "want.toml").unwrap();
    assert_eq!(format!("{raw:?}"), format!("{want:?}"));

    for (missing, key) in [
        (0, "HUBGATE_UPSTREAM"),
        (1, "HUBGATE_VERIFY_TOKEN (or HUBGATE_VERIFY_TOKEN_FILE)"),
        (2, "HUBGATE_APP_SECRET (or HUBGATE_APP_SECRET_FILE)"),
    ] {
        let mut some = vars.to_vec();
        some.remove(missing);
        let err = run("", &some).unwrap_err();
        assert_eq!(err.key, key);
        assert_eq!(err.file, "test.toml + environment");
        assert_eq!(
            err.message,
            "is required to configure a route from the environment"
        );
    }
    // Variables for other sections alone create no route.
    let (raw, _) = run("", &[("HUBGATE_LISTEN", "0.0.0.0:1")]).unwrap();
    assert!(raw.route.is_empty());
}

#[test]
fn route_variables_refuse_a_file_with_several_routes() {
    let two = format!("{ONE_ROUTE}{}", ONE_ROUTE.replace("/a", "/b"));
    let err = run(&two, &[("HUBGATE_DELIVERY", "spool")]).unwrap_err();
    assert_eq!(err.key, "HUBGATE_UPSTREAM/PATH/VERIFY_TOKEN/APP_SECRET");
    assert_eq!(
        err.message,
        "route variables apply to a single route, but the file has 2"
    );
    // Other variables are fine.
    run(&two, &[("HUBGATE_LISTEN", "0.0.0.0:1")]).unwrap();
}

#[test]
fn validation_errors_name_the_variable() {
    let env = reader(&[("HUBGATE_LISTEN", "nowhere")]);
    let err = crate::config::Config::from_sources(None, &env)
        .err()
        .unwrap();
    assert_eq!(err.file, "environment");
    assert_eq!(err.key, "server.listen (from HUBGATE_LISTEN)");
    assert_eq!(
        err.message,
        "`nowhere` is not an address like 127.0.0.1:8443"
    );
}

#[test]
fn booleans_take_one_and_zero_too() {
    for (value, want) in [("1", true), ("0", false), ("true", true), ("false", false)] {
        let (raw, _) = run(ONE_ROUTE, &[("HUBGATE_LEGACY_SHA1", value)]).unwrap();
        let toml = format!("{ONE_ROUTE}legacy_sha1 = {want}\n");
        let expected = parse(&toml, "want.toml").unwrap();
        assert_eq!(format!("{raw:?}"), format!("{expected:?}"), "{value}");
    }
}
