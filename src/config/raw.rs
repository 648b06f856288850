//! The configuration as written: serde shapes that mirror the TOML (unknown keys rejected),
//! before any validation. [`parse`] turns text into a [`RawConfig`], with the file and line in
//! its errors; the environment overlay ([`super::env`]) edits these shapes; validation
//! ([`super::validate`]) turns them into a [`super::Config`].

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{ClientAuthMode, ConfigError, Delivery, RouteClientCert};

/// A secret given inline, from an environment variable, or from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(String),
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "PATH" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretSource, E> {
                Ok(SecretSource::Inline(v.to_owned()))
            }
            // Numbers and booleans are refused without echoing them: the error message must
            // never carry a secret.
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretSource, E> {
                Err(E::custom(NUMBER_REFUSED))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretSource, E> {
                Err(E::custom(NUMBER_REFUSED))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretSource, E> {
                Err(E::custom(NUMBER_REFUSED))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretSource, E> {
                Err(E::custom("must be a quoted string"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        r#"expected { env = "NAME" } or { file = "PATH" }"#,
                    ));
                };
                let value: String = map.next_value()?;
                let source = match key.as_str() {
                    "env" => SecretSource::Env(value),
                    "file" => SecretSource::File(PathBuf::from(value)),
                    other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "unexpected `{extra}`: give exactly one of `env` or `file`"
                    )));
                }
                Ok(source)
            }
        }
        d.deserialize_any(V)
    }
}

const NUMBER_REFUSED: &str = "must be a quoted string (a number here would be printed in errors)";

/// One path or a list of paths.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub client_auth: Option<RawClientAuth>,
    pub upstream: Option<RawUpstream>,
    pub admin: Option<RawAdmin>,
    pub trusted_proxies: Option<RawTrustedProxies>,
    pub spool: Option<RawSpool>,
    pub dedupe: Option<RawDedupe>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub max_body_bytes: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub max_headers: Option<usize>,
    pub max_buffered_bytes: Option<u64>,
    pub handshake_timeout: Option<String>,
    pub header_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub idle_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    pub proxy_protocol: Option<bool>,
    pub allow_sources: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientAuth {
    pub mode: Option<ClientAuthMode>,
    pub roots: Option<OneOrMany>,
    pub allowed_cn: Option<Vec<String>>,
    pub crls: Option<OneOrMany>,
    pub crl_policy: Option<crate::config::CrlPolicy>,
    pub crl_urls: Option<Vec<String>>,
    pub crl_refresh: Option<String>,
    pub crl_fetch_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub ca: Option<PathBuf>,
    pub max_response_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<String>,
    pub inspector: Option<bool>,
    pub inspector_capacity: Option<usize>,
    pub token: Option<SecretSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrustedProxies {
    pub cidrs: Vec<String>,
    pub forwarded_for: Option<bool>,
    pub identity: Option<String>,
    pub identity_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
    pub path: Option<PathBuf>,
    pub retry_horizon: Option<String>,
    pub max_concurrency: Option<usize>,
    pub backoff_base: Option<String>,
    pub backoff_max: Option<String>,
    pub dead_letter_4xx: Option<bool>,
    pub max_size_bytes: Option<u64>,
    pub backend: Option<SpoolBackendName>,
    pub url: Option<SecretSource>,
    pub pool_size: Option<usize>,
    pub ca: Option<PathBuf>,
    pub lease: Option<String>,
    pub accept_timeout: Option<String>,
}

/// `[spool] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolBackendName {
    Sqlite,
    Postgres,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDedupe {
    pub window: Option<String>,
    pub sync_window: Option<String>,
    pub sync_max_entries: Option<usize>,
    pub store: Option<DedupeStoreName>,
}

/// `[dedupe] store`: where sync routes remember what they delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupeStoreName {
    Memory,
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub path: String,
    pub verify_token: SecretSource,
    pub app_secrets: Vec<SecretSource>,
    pub upstream: String,
    pub client_cert: Option<RouteClientCert>,
    #[serde(default)]
    pub legacy_sha1: bool,
    pub delivery: Option<Delivery>,
    pub dedupe: Option<RouteDedupe>,
    pub split: Option<crate::gate::batch::SplitMode>,
    pub backend_secret: Option<SecretSource>,
}

/// A route's `dedupe`: a boolean (the original spelling) or a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RouteDedupe {
    Off,
    Body,
    Item,
}

impl<'de> Deserialize<'de> for RouteDedupe {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RouteDedupe;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"true, false, "off", "body" or "item""#)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RouteDedupe, E> {
                Ok(if v {
                    RouteDedupe::Body
                } else {
                    RouteDedupe::Off
                })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RouteDedupe, E> {
                match v {
                    "off" => Ok(RouteDedupe::Off),
                    "body" => Ok(RouteDedupe::Body),
                    "item" => Ok(RouteDedupe::Item),
                    other => Err(E::unknown_variant(other, &["off", "body", "item"])),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses TOML text into the raw shape; errors carry the file, the key and the line.
pub(super) fn parse(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
    let syntax = |e: toml::de::Error| ConfigError {
        file: file.to_owned(),
        key: e
            .span()
            .map(|s| format!("(line {})", line_of(text, s.start)))
            .unwrap_or_else(|| "(syntax)".into()),
        message: e.message().trim().to_owned(),
    };
    let de = toml::Deserializer::parse(text).map_err(syntax)?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| format!(" (line {})", line_of(text, s.start)))
            .unwrap_or_default();
        ConfigError {
            file: file.to_owned(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: format!("{}{line}", inner.message().trim()),
        }
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_source_forms() {
        #[derive(Debug, Deserialize)]
        struct T {
            a: SecretSource,
            b: SecretSource,
            c: SecretSource,
        }
        let t: T = toml::from_str("a = \"x\"\nb = { env = \"E\" }\nc = { file = \"f\" }").unwrap();
        assert_eq!(t.a, SecretSource::Inline("x".into()));
        assert_eq!(t.b, SecretSource::Env("E".into()));
        assert_eq!(t.c, SecretSource::File("f".into()));
        let bad = toml::from_str::<T>("a = { envv = \"E\" }\nb = \"\"\nc = \"\"");
        assert!(bad.unwrap_err().to_string().contains("envv"));
    }

    #[test]
    fn secret_numbers_and_booleans_are_not_echoed() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct T {
            a: SecretSource,
        }
        for text in ["a = 918273645", "a = 91827.3645", "a = true"] {
            let err = toml::from_str::<T>(text).unwrap_err().message().to_owned();
            assert!(err.starts_with("must be a quoted string"), "{err}");
            assert!(!err.contains("918273645") && !err.contains("true"), "{err}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_line() {
        let err = parse("[server]\nlisten = \"x\"\nbogus = 1\n", "f.toml").unwrap_err();
        assert_eq!(err.file, "f.toml");
        assert!(err.message.contains("(line 3)"), "{err}");
        let err = parse("[server\n", "f.toml").unwrap_err();
        assert_eq!(err.key, "(line 1)");
    }
}
