//! The `HUBGATE_*` environment variables: one table ([`TABLE`]) says, for each variable, the
//! key it sets, how its text becomes the raw value, and a line of documentation. The overlay
//! ([`overlay`]) is a loop over that table, and [`ENV_VARS`] and [`env_configured`] derive from
//! it, so a variable cannot be read without being listed.
//!
//! Rules the table does not spell out, entry by entry:
//! - an empty variable counts as unset;
//! - when several variables set the same key (`HUBGATE_VERIFY_TOKEN` and
//!   `HUBGATE_VERIFY_TOKEN_FILE`), the first one in the table that is set wins and the others
//!   are not read;
//! - the `route[0]` variables create a route when the file has none (`HUBGATE_UPSTREAM`, the
//!   verify token and an app secret are then required), patch the route when it has one, and
//!   are an error when it has several.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::value::{Error as ValueError, StrDeserializer};
use serde::de::DeserializeOwned;

use super::raw::{OneOrMany, RawConfig, RawRoute, SecretSource};
use super::{ConfigError, Delivery, RouteClientCert};

/// One environment variable.
pub(super) struct EnvVar {
    pub name: &'static str,
    /// The key it sets, as errors name it: `server.listen (from HUBGATE_LISTEN)`.
    pub key: &'static str,
    /// How its text becomes the raw value, and where that value goes.
    pub set: Set,
    /// One line for the documentation.
    pub doc: &'static str,
}

/// Where a variable's value goes in the raw configuration.
type Slot<T> = fn(&mut Target) -> &mut Option<T>;

/// How a variable's text becomes a raw value, and the slot it fills.
pub(super) enum Set {
    /// The text as it is.
    Text(Slot<String>),
    /// A path; a relative one resolves against the working directory.
    Path(Slot<PathBuf>),
    /// Comma-separated paths, each resolved against the working directory.
    Paths(Slot<OneOrMany>),
    /// Comma-separated text.
    List(Slot<Vec<String>>),
    /// A count (`usize`).
    Count(Slot<usize>),
    /// A number of bytes (`u64`).
    Bytes(Slot<u64>),
    /// `true` or `false`.
    Bool(Slot<bool>),
    /// One of the names the TOML key takes (`"optional"`, `"spool"`…).
    Enum(fn(&mut Target) -> &mut dyn EnumSlot),
    /// The secret itself.
    Secret(Slot<SecretSource>),
    /// A file holding the secret, resolved against the working directory.
    SecretFile(Slot<SecretSource>),
    /// Comma-separated secrets (a rotation; Meta's app secrets are hex).
    Secrets(Slot<Vec<SecretSource>>),
    /// Comma-separated files, each holding one secret.
    SecretFiles(Slot<Vec<SecretSource>>),
}

/// What the overlay edits: the raw configuration, and the route the `route[0]` variables
/// describe (merged into the configuration's routes once every variable is read).
#[derive(Default)]
pub(super) struct Target {
    raw: RawConfig,
    route: RouteVars,
}

/// The `route[0]` keys the environment can set.
#[derive(Default)]
struct RouteVars {
    path: Option<String>,
    upstream: Option<String>,
    verify_token: Option<SecretSource>,
    app_secrets: Option<Vec<SecretSource>>,
    client_cert: Option<RouteClientCert>,
    legacy_sha1: Option<bool>,
    delivery: Option<Delivery>,
}

/// Every `HUBGATE_*` variable the configuration reads, in the order they are applied (the first
/// error found is the one reported).
pub(super) const TABLE: &[EnvVar] = &[
    EnvVar {
        name: "HUBGATE_LISTEN",
        key: "server.listen",
        set: Set::Text(|t| &mut t.raw.server.listen),
        doc: "the TLS listener's address, like 0.0.0.0:8443",
    },
    EnvVar {
        name: "HUBGATE_CERT",
        key: "server.cert",
        set: Set::Path(|t| &mut t.raw.server.cert),
        doc: "the server certificate chain (PEM)",
    },
    EnvVar {
        name: "HUBGATE_KEY",
        key: "server.key",
        set: Set::Path(|t| &mut t.raw.server.key),
        doc: "the server certificate's private key (PEM)",
    },
    EnvVar {
        name: "HUBGATE_MAX_CONNECTIONS",
        key: "server.max_connections",
        set: Set::Count(|t| &mut t.raw.server.max_connections),
        doc: "connections served at once",
    },
    EnvVar {
        name: "HUBGATE_IDLE_TIMEOUT",
        key: "server.idle_timeout",
        set: Set::Text(|t| &mut t.raw.server.idle_timeout),
        doc: "how long a connection with no request in flight stays open",
    },
    EnvVar {
        name: "HUBGATE_DRAIN_TIMEOUT",
        key: "server.drain_timeout",
        set: Set::Text(|t| &mut t.raw.server.drain_timeout),
        doc: "how long a shutdown waits for requests in flight",
    },
    EnvVar {
        name: "HUBGATE_MAX_BODY_BYTES",
        key: "server.max_body_bytes",
        set: Set::Bytes(|t| &mut t.raw.server.max_body_bytes),
        doc: "the largest request body accepted",
    },
    EnvVar {
        name: "HUBGATE_CLIENT_AUTH",
        key: "client_auth.mode",
        set: Set::Enum(|t| &mut client_auth(t).mode),
        doc: "client certificates: require, optional or off",
    },
    EnvVar {
        name: "HUBGATE_CLIENT_ROOTS",
        key: "client_auth.roots",
        set: Set::Paths(|t| &mut client_auth(t).roots),
        doc: "trust anchor files for client certificates (comma-separated)",
    },
    EnvVar {
        name: "HUBGATE_ALLOWED_CN",
        key: "client_auth.allowed_cn",
        set: Set::List(|t| &mut client_auth(t).allowed_cn),
        doc: "client certificate CNs admitted (comma-separated)",
    },
    EnvVar {
        name: "HUBGATE_ADMIN_LISTEN",
        key: "admin.listen",
        set: Set::Text(|t| &mut t.raw.admin.get_or_insert_with(Default::default).listen),
        doc: "the admin listener (health, readiness, metrics)",
    },
    EnvVar {
        name: "HUBGATE_INSPECTOR",
        key: "admin.inspector",
        set: Set::Bool(|t| &mut t.raw.admin.get_or_insert_with(Default::default).inspector),
        doc: "the live event inspector on the admin listener (true/false; shows bodies)",
    },
    EnvVar {
        name: "HUBGATE_ADMIN_TOKEN",
        key: "admin.token",
        set: Set::Secret(|t| &mut t.raw.admin.get_or_insert_with(Default::default).token),
        doc: "the token the inspector and its API ask for (required off loopback)",
    },
    EnvVar {
        name: "HUBGATE_UPSTREAM_TIMEOUT",
        key: "upstream.timeout",
        set: Set::Text(|t| &mut upstream(t).timeout),
        doc: "how long the upstream has to answer",
    },
    EnvVar {
        name: "HUBGATE_SPOOL_BACKEND",
        key: "spool.backend",
        set: Set::Enum(|t| &mut t.raw.spool.get_or_insert_with(Default::default).backend),
        doc: "where the spool keeps events: sqlite (one file per gate) or postgres (shared)",
    },
    EnvVar {
        name: "HUBGATE_SPOOL_PATH",
        key: "spool.path",
        set: Set::Path(|t| &mut t.raw.spool.get_or_insert_with(Default::default).path),
        doc: "the spool's database file",
    },
    EnvVar {
        name: "HUBGATE_SPOOL_URL",
        key: "spool.url",
        set: Set::Secret(|t| &mut t.raw.spool.get_or_insert_with(Default::default).url),
        doc: "the PostgreSQL spool's URL, libpq's form (a secret: it may hold a password)",
    },
    EnvVar {
        name: "HUBGATE_SPOOL_URL_FILE",
        key: "spool.url",
        set: Set::SecretFile(|t| &mut t.raw.spool.get_or_insert_with(Default::default).url),
        doc: "a file holding the PostgreSQL spool's URL (HUBGATE_SPOOL_URL wins)",
    },
    EnvVar {
        name: "HUBGATE_UPSTREAM_CA",
        key: "upstream.ca",
        set: Set::Path(|t| &mut upstream(t).ca),
        doc: "an extra CA for https:// upstreams (PEM)",
    },
    EnvVar {
        name: "HUBGATE_PATH",
        key: "route[0].path",
        set: Set::Text(|t| &mut t.route.path),
        doc: "the route's path (default /webhook)",
    },
    EnvVar {
        name: "HUBGATE_UPSTREAM",
        key: "route[0].upstream",
        set: Set::Text(|t| &mut t.route.upstream),
        doc: "where the route forwards, an http:// or https:// URL",
    },
    EnvVar {
        name: "HUBGATE_VERIFY_TOKEN",
        key: "route[0].verify_token",
        set: Set::Secret(|t| &mut t.route.verify_token),
        doc: "the verify token of the hub.challenge",
    },
    EnvVar {
        name: "HUBGATE_VERIFY_TOKEN_FILE",
        key: "route[0].verify_token",
        set: Set::SecretFile(|t| &mut t.route.verify_token),
        doc: "a file holding the verify token (HUBGATE_VERIFY_TOKEN wins)",
    },
    EnvVar {
        name: "HUBGATE_APP_SECRET",
        key: "route[0].app_secrets",
        set: Set::Secrets(|t| &mut t.route.app_secrets),
        doc: "the app secrets (comma-separated for a rotation)",
    },
    EnvVar {
        name: "HUBGATE_APP_SECRET_FILE",
        key: "route[0].app_secrets",
        set: Set::SecretFiles(|t| &mut t.route.app_secrets),
        doc: "files holding one app secret each (comma-separated; HUBGATE_APP_SECRET wins)",
    },
    EnvVar {
        name: "HUBGATE_LEGACY_SHA1",
        key: "route[0].legacy_sha1",
        set: Set::Bool(|t| &mut t.route.legacy_sha1),
        doc: "also accept X-Hub-Signature (SHA-1): true or false",
    },
    EnvVar {
        name: "HUBGATE_CLIENT_CERT",
        key: "route[0].client_cert",
        set: Set::Enum(|t| &mut t.route.client_cert),
        doc: "whether the route needs a client certificate: required or none",
    },
    EnvVar {
        name: "HUBGATE_DELIVERY",
        key: "route[0].delivery",
        set: Set::Enum(|t| &mut t.route.delivery),
        doc: "how the route delivers: sync or spool",
    },
];

fn client_auth(t: &mut Target) -> &mut super::raw::RawClientAuth {
    t.raw.client_auth.get_or_insert_with(Default::default)
}

fn upstream(t: &mut Target) -> &mut super::raw::RawUpstream {
    t.raw.upstream.get_or_insert_with(Default::default)
}

const ENV_VARS_ARRAY: [(&str, &str); TABLE.len()] = {
    let mut out = [("", ""); TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        out[i] = (TABLE[i].name, TABLE[i].key);
        i += 1;
    }
    out
};

/// The environment variables hubgate reads, with the key each one sets (derived from the
/// overlay's table; [`env_docs`] adds a line of documentation to each).
pub const ENV_VARS: &[(&str, &str)] = &ENV_VARS_ARRAY;

/// Each variable with the key it sets and a line of documentation, in the overlay's order.
pub fn env_docs() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    TABLE.iter().map(|v| (v.name, v.key, v.doc))
}

/// True when any configuration variable of [`ENV_VARS`] is set.
pub fn env_configured(env: &dyn Fn(&str) -> Option<String>) -> bool {
    ENV_VARS.iter().any(|(var, _)| env(var).is_some())
}

/// An `Option<T>` slot filled from one of `T`'s serde names.
pub(super) trait EnumSlot {
    fn fill(&mut self, text: &str) -> Result<(), String>;
}

impl<T: DeserializeOwned> EnumSlot for Option<T> {
    fn fill(&mut self, text: &str) -> Result<(), String> {
        let value =
            T::deserialize(StrDeserializer::<ValueError>::new(text)).map_err(|e| e.to_string())?;
        *self = Some(value);
        Ok(())
    }
}

/// Applies the `HUBGATE_*` variables to the raw configuration. Returns it with the keys the
/// variables set, and which variable set each (for `(from HUBGATE_…)` in errors). `file` names
/// the configuration in errors; paths resolve against `cwd`.
pub(super) fn overlay(
    raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
    file: &str,
) -> Result<(RawConfig, HashMap<String, &'static str>), ConfigError> {
    let mut target = Target {
        raw,
        route: RouteVars::default(),
    };
    let mut set: HashMap<String, &'static str> = HashMap::new();
    for var in TABLE {
        if set.contains_key(var.key) {
            continue;
        }
        let Some(text) = env(var.name).filter(|v| !v.is_empty()) else {
            continue;
        };
        set.insert(var.key.to_owned(), var.name);
        apply(var, text, &mut target, cwd, file)?;
    }
    let Target { mut raw, route } = target;
    merge_route(&mut raw, route, file)?;
    Ok((raw, set))
}

/// Converts one variable's text and puts it in its slot.
fn apply(
    var: &EnvVar,
    text: String,
    t: &mut Target,
    cwd: &Path,
    file: &str,
) -> Result<(), ConfigError> {
    let err = |message: String| ConfigError {
        file: file.to_owned(),
        key: var.name.to_owned(),
        message,
    };
    let list = |text: &str| -> Vec<String> {
        text.split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect()
    };
    match var.set {
        Set::Text(slot) => *slot(t) = Some(text),
        Set::Path(slot) => *slot(t) = Some(cwd.join(text)),
        Set::Paths(slot) => {
            let paths = list(&text).into_iter().map(|p| cwd.join(p)).collect();
            *slot(t) = Some(OneOrMany::Many(paths));
        }
        Set::List(slot) => *slot(t) = Some(list(&text)),
        Set::Count(slot) => {
            let n = text
                .parse()
                .map_err(|_| err(format!("`{text}` is not a number")))?;
            *slot(t) = Some(n);
        }
        Set::Bytes(slot) => {
            let n = text
                .parse()
                .map_err(|_| err(format!("`{text}` is not a number of bytes")))?;
            *slot(t) = Some(n);
        }
        Set::Bool(slot) => {
            // `1`/`0` as well: the spelling shell users and container manifests reach for.
            let b = match text.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(err(format!("`{text}` is not true or false (or 1 or 0)"))),
            };
            *slot(t) = Some(b);
        }
        // An unknown name is reported against the environment as a whole, file or not (as it
        // always has been).
        Set::Enum(slot) => slot(t).fill(&text).map_err(|message| ConfigError {
            file: "environment".into(),
            key: var.name.to_owned(),
            message,
        })?,
        Set::Secret(slot) => *slot(t) = Some(SecretSource::Inline(text)),
        Set::SecretFile(slot) => *slot(t) = Some(SecretSource::File(cwd.join(text))),
        Set::Secrets(slot) => {
            *slot(t) = Some(list(&text).into_iter().map(SecretSource::Inline).collect());
        }
        Set::SecretFiles(slot) => {
            let files = list(&text).into_iter().map(|f| cwd.join(f));
            *slot(t) = Some(files.map(SecretSource::File).collect());
        }
    }
    Ok(())
}

/// The variables that set `key`, for messages: `HUBGATE_A (or HUBGATE_B)`.
fn vars_for(key: &str) -> String {
    let mut names = TABLE.iter().filter(|v| v.key == key).map(|v| v.name);
    let first = names.next().unwrap_or(key).to_owned();
    let rest: Vec<_> = names.collect();
    if rest.is_empty() {
        first
    } else {
        format!("{first} (or {})", rest.join(", "))
    }
}

/// Puts the `route[0]` variables into the configuration: a new route when it has none, the
/// one route patched when it has one.
fn merge_route(raw: &mut RawConfig, vars: RouteVars, file: &str) -> Result<(), ConfigError> {
    let RouteVars {
        path,
        upstream,
        verify_token,
        app_secrets,
        client_cert,
        legacy_sha1,
        delivery,
    } = vars;
    let any = path.is_some()
        || upstream.is_some()
        || verify_token.is_some()
        || app_secrets.is_some()
        || client_cert.is_some()
        || legacy_sha1.is_some()
        || delivery.is_some();
    if !any {
        return Ok(());
    }
    let env_err = |var: String, message: String| ConfigError {
        file: file.to_owned(),
        key: var,
        message,
    };
    match raw.route.as_mut_slice() {
        [] => {
            let missing = |key: &str| {
                env_err(
                    vars_for(key),
                    "is required to configure a route from the environment".into(),
                )
            };
            raw.route.push(RawRoute {
                path: path.unwrap_or_else(|| "/webhook".into()),
                upstream: upstream.ok_or_else(|| missing("route[0].upstream"))?,
                verify_token: verify_token.ok_or_else(|| missing("route[0].verify_token"))?,
                app_secrets: app_secrets.ok_or_else(|| missing("route[0].app_secrets"))?,
                client_cert,
                legacy_sha1: legacy_sha1.unwrap_or(false),
                delivery,
                dedupe: None,
                split: None,
                backend_secret: None,
            });
        }
        [r] => {
            if let Some(v) = path {
                r.path = v;
            }
            if let Some(v) = upstream {
                r.upstream = v;
            }
            if let Some(v) = verify_token {
                r.verify_token = v;
            }
            if let Some(v) = app_secrets {
                r.app_secrets = v;
            }
            r.client_cert = client_cert.or(r.client_cert);
            r.legacy_sha1 = legacy_sha1.unwrap_or(r.legacy_sha1);
            r.delivery = delivery.or(r.delivery);
        }
        routes => {
            return Err(env_err(
                "HUBGATE_UPSTREAM/PATH/VERIFY_TOKEN/APP_SECRET".into(),
                format!(
                    "route variables apply to a single route, but the file has {}",
                    routes.len()
                ),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
