//! Shared fixtures for the black-box suite: a fresh PKI per test (rcgen), a recording upstream
//! (hyper, HTTP/1.1), TLS clients (reqwest over a preconfigured rustls `ClientConfig`, and a raw
//! HTTP/1.1-over-TLS client for requests reqwest will not send), and a helper that starts a
//! gate from TOML written next to the PEM files.
//!
//! Nothing here is checked in: every key and certificate is generated per test into a
//! `TempDir` that is removed when the test ends.

#![allow(dead_code)] // every test binary uses a different subset

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The CN Meta's webhook client certificate carries (hubgate's default allow-list).
pub const META_CN: &str = "client.webhooks.fbclientcerts.com";
pub const TOKEN: &str = "mytoken";
pub const SECRET: &str = "s3cret";
/// The signature header, lower-case as HTTP/2 sends it.
pub const SIG: &str = "x-hub-signature-256";

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

type Ca = CertifiedIssuer<'static, KeyPair>;

/// A root CA, an intermediate under it, and a server certificate (127.0.0.1, localhost) under
/// the intermediate, written as PEM into a temporary directory:
/// `root.pem`, `intermediate.pem`, `server-chain.pem` (leaf + intermediate), `server.key`.
pub struct Pki {
    pub dir: TempDir,
    root: Ca,
    intermediate: Ca,
    configs: AtomicUsize,
}

/// A client certificate chain (leaf first) and the leaf's key.
#[derive(Clone)]
pub struct ClientCert {
    pub chain: Vec<CertificateDer<'static>>,
    key_pkcs8: Vec<u8>,
}

impl ClientCert {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// SHA-256 of the leaf DER, lower-case hex: what `X-Forwarded-Client-Cert: Hash=` must carry.
    pub fn leaf_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.leaf().as_ref()))
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The same certificate sent without its intermediate.
    pub fn leaf_only(&self) -> ClientCert {
        ClientCert {
            chain: vec![self.chain[0].clone()],
            key_pkcs8: self.key_pkcs8.clone(),
        }
    }
}

/// What to change in a client leaf.
#[derive(Clone)]
pub struct LeafSpec {
    pub cn: String,
    /// Add Meta's O/L/ST/C attributes around the CN (the real certificate has them).
    pub full_meta_dn: bool,
    pub not_before: (i32, u8, u8),
    pub not_after: (i32, u8, u8),
    /// An exact notAfter instead of `not_after`'s date (a certificate that expires mid-test).
    pub not_after_exact: Option<std::time::SystemTime>,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    /// Leave the CN out of the subject (the SAN still carries `cn`).
    pub omit_cn: bool,
    /// A second CN attribute in the subject.
    pub extra_cn: Option<String>,
    /// More subject attributes, placed before the CN.
    pub subject_extra: Vec<(DnType, String)>,
}

impl LeafSpec {
    pub fn cn(cn: &str) -> LeafSpec {
        LeafSpec {
            cn: cn.to_owned(),
            full_meta_dn: false,
            not_before: (2000, 1, 1),
            not_after: (2090, 1, 1),
            not_after_exact: None,
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            omit_cn: false,
            extra_cn: None,
            subject_extra: Vec::new(),
        }
    }

    fn params(&self) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if self.full_meta_dn {
            p.distinguished_name.push(DnType::CountryName, "US");
            p.distinguished_name
                .push(DnType::StateOrProvinceName, "California");
            p.distinguished_name
                .push(DnType::LocalityName, "Menlo Park");
            p.distinguished_name
                .push(DnType::OrganizationName, "Meta Platforms, Inc.");
        }
        for (ty, value) in &self.subject_extra {
            p.distinguished_name.push(ty.clone(), value.as_str());
        }
        if !self.omit_cn {
            p.distinguished_name
                .push(DnType::CommonName, self.cn.as_str());
        }
        if let Some(extra) = &self.extra_cn {
            // The CN OID as a "custom" type: rcgen keeps one value per type otherwise.
            p.distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 3]), extra.as_str());
        }
        p.subject_alt_names = vec![rcgen::SanType::DnsName(
            self.cn.clone().try_into().expect("CN is a valid DNS name"),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = self.eku.clone();
        let (y, m, d) = self.not_before;
        p.not_before = rcgen::date_time_ymd(y, m, d);
        let (y, m, d) = self.not_after;
        p.not_after = rcgen::date_time_ymd(y, m, d);
        if let Some(t) = self.not_after_exact {
            p.not_after = t.into();
        }
        p.use_authority_key_identifier_extension = true;
        p
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "hubgate tests");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2095, 1, 1);
    p.use_authority_key_identifier_extension = true;
    p
}

fn new_root(cn: &str) -> Ca {
    CertifiedIssuer::self_signed(ca_params(cn), KeyPair::generate().unwrap()).unwrap()
}

fn new_intermediate(cn: &str, parent: &Issuer<'_, KeyPair>) -> Ca {
    CertifiedIssuer::signed_by(ca_params(cn), KeyPair::generate().unwrap(), parent).unwrap()
}

const ROOT_CN: &str = "hubgate test root";
const INTERMEDIATE_CN: &str = "hubgate test intermediate";

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = new_root(ROOT_CN);
        let intermediate = new_intermediate(INTERMEDIATE_CN, &root);

        let mut sp =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        sp.distinguished_name = rcgen::DistinguishedName::new();
        sp.distinguished_name
            .push(DnType::CommonName, "hubgate test server");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        sp.not_before = rcgen::date_time_ymd(2000, 1, 1);
        sp.not_after = rcgen::date_time_ymd(2090, 1, 1);
        sp.use_authority_key_identifier_extension = true;
        let server_key = KeyPair::generate().unwrap();
        let server = sp.signed_by(&server_key, &intermediate).unwrap();

        let pki = Pki {
            dir,
            root,
            intermediate,
            configs: AtomicUsize::new(0),
        };
        pki.write("root.pem", &pki.root.pem());
        pki.write("intermediate.pem", &pki.intermediate.pem());
        pki.write(
            "server-chain.pem",
            &format!("{}{}", server.pem(), pki.intermediate.pem()),
        );
        pki.write("server.key", &server_key.serialize_pem());
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }

    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root.der().clone()
    }

    pub fn intermediate_der(&self) -> CertificateDer<'static> {
        self.intermediate.der().clone()
    }

    /// A leaf issued by the intermediate, chain = [leaf, intermediate].
    pub fn client(&self, spec: &LeafSpec) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().signed_by(&key, &self.intermediate).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone(), self.intermediate.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// A valid client certificate with Meta's full subject (`CN=client.webhooks...,O=Meta
    /// Platforms\, Inc.,L=Menlo Park,ST=California,C=US`).
    pub fn meta_client(&self) -> ClientCert {
        let mut spec = LeafSpec::cn(META_CN);
        spec.full_meta_dn = true;
        self.client(&spec)
    }

    /// A self-signed leaf (no chain to any configured anchor).
    pub fn self_signed_client(&self, spec: &LeafSpec) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().self_signed(&key).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// A leaf under a separate root and intermediate whose names copy the trusted ones
    /// exactly, so only the keys differ.
    pub fn untrusted_client(&self, spec: &LeafSpec) -> ClientCert {
        let root = new_root(ROOT_CN);
        let intermediate = new_intermediate(INTERMEDIATE_CN, &root);
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().signed_by(&key, &intermediate).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone(), intermediate.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }

    /// Writes `toml` next to the PEM files and loads it with `Config::load`, so relative paths
    /// resolve against the temp dir.
    pub fn config(&self, toml: &str) -> Result<hubgate::Config, hubgate::ConfigError> {
        let n = self.configs.fetch_add(1, Ordering::SeqCst);
        let path = self.write(&format!("hubgate-{n}.toml"), toml);
        hubgate::Config::load(&path)
    }

    /// Loads the configuration and starts a gate on 127.0.0.1:0.
    pub async fn start(&self, cfg: &GateConfig) -> Gate {
        self.start_toml(&cfg.to_toml()).await
    }

    /// Loads `toml` (written next to the PKI's files) and starts a gate from it.
    pub async fn start_toml(&self, toml: &str) -> Gate {
        let config = self
            .config(toml)
            .unwrap_or_else(|e| panic!("config rejected: {e}\n{toml}"));
        let running = hubgate::run(config)
            .await
            .unwrap_or_else(|e| panic!("gate did not start: {e}"));
        Gate {
            addr: running.local_addr(),
            running: Some(running),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Gate configuration
// ---------------------------------------------------------------------------------------------

/// A TOML string literal.
pub fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `[server]`, `[upstream]`, `[client_auth]` and the routes, with defaults that make a working
/// gate: mode `require`, the test root anchored, Meta's CN allowed by default.
#[derive(Clone)]
pub struct GateConfig {
    pub mode: &'static str,
    /// TOML value for `client_auth.roots` (`None` leaves the key out).
    pub roots: Option<String>,
    /// TOML value for `client_auth.allowed_cn` (`None` leaves the key out: Meta's CN).
    pub allowed_cn: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub upstream_timeout: &'static str,
    pub max_response_bytes: Option<usize>,
    /// Extra `key = value` lines for `[server]`.
    pub server_extra: String,
    /// Extra `key = value` lines for `[upstream]`.
    pub upstream_extra: String,
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone)]
pub struct RouteConfig {
    pub path: String,
    /// TOML value.
    pub verify_token: String,
    /// TOML value (an array).
    pub app_secrets: String,
    pub upstream: String,
    pub client_cert: Option<&'static str>,
    pub legacy_sha1: bool,
}

impl RouteConfig {
    pub fn new(path: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            path: path.to_owned(),
            verify_token: q(TOKEN),
            app_secrets: format!("[{}]", q(SECRET)),
            upstream: upstream.to_owned(),
            client_cert: None,
            legacy_sha1: false,
        }
    }
}

impl GateConfig {
    /// One route, `/webhook`, forwarding to `upstream`.
    pub fn new(upstream: &str) -> GateConfig {
        GateConfig {
            mode: "require",
            roots: Some(q("root.pem")),
            allowed_cn: None,
            max_body_bytes: None,
            upstream_timeout: "2s",
            max_response_bytes: None,
            server_extra: String::new(),
            upstream_extra: String::new(),
            routes: vec![RouteConfig::new("/webhook", upstream)],
        }
    }

    pub fn mode(mut self, mode: &'static str) -> GateConfig {
        self.mode = mode;
        self
    }

    pub fn route(&mut self) -> &mut RouteConfig {
        &mut self.routes[0]
    }

    pub fn to_toml(&self) -> String {
        let mut t = String::new();
        t.push_str("[server]\nlisten = \"127.0.0.1:0\"\ncert = \"server-chain.pem\"\nkey = \"server.key\"\n");
        if let Some(n) = self.max_body_bytes {
            t.push_str(&format!("max_body_bytes = {n}\n"));
        }
        t.push_str(&self.server_extra);
        t.push_str(&format!(
            "\n[upstream]\ntimeout = {}\nconnect_timeout = \"1s\"\n",
            q(self.upstream_timeout)
        ));
        if let Some(n) = self.max_response_bytes {
            t.push_str(&format!("max_response_bytes = {n}\n"));
        }
        t.push_str(&self.upstream_extra);
        t.push_str(&format!("\n[client_auth]\nmode = {}\n", q(self.mode)));
        if let Some(r) = &self.roots {
            t.push_str(&format!("roots = {r}\n"));
        }
        if let Some(a) = &self.allowed_cn {
            t.push_str(&format!("allowed_cn = {a}\n"));
        }
        for r in &self.routes {
            t.push_str(&format!(
                "\n[[route]]\npath = {}\nverify_token = {}\napp_secrets = {}\nupstream = {}\nlegacy_sha1 = {}\n",
                q(&r.path),
                r.verify_token,
                r.app_secrets,
                q(&r.upstream),
                r.legacy_sha1
            ));
            if let Some(c) = r.client_cert {
                t.push_str(&format!("client_cert = {}\n", q(c)));
            }
        }
        t
    }
}

/// A running gate. Dropping it leaves the server task to die with the test's runtime.
pub struct Gate {
    pub addr: SocketAddr,
    pub running: Option<hubgate::Running>,
}

impl Gate {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://{}{}", self.addr, path_and_query)
    }

    /// `127.0.0.1:PORT`: what `Host`/`:authority` carries and `X-Forwarded-Host` must echo.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signing
// ---------------------------------------------------------------------------------------------

/// `sha256=<lower-case hex HMAC-SHA256(secret, body)>`, computed independently of hubgate.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `sha1=<hex HMAC-SHA1(secret, body)>` for the legacy `X-Hub-Signature` header.
pub fn sign_sha1(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A typical WhatsApp Business webhook payload.
pub fn sample_body() -> Vec<u8> {
    br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"value":{"messaging_product":"whatsapp","messages":[{"from":"16315551181","id":"wamid.ABGGFlA5Fpa","timestamp":"1504902988","text":{"body":"this is a text message"},"type":"text"}]},"field":"messages"}]}]}"#.to_vec()
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// Which protocol the client offers in ALPN (only that one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

/// A rustls client configuration trusting the test root, offering exactly one ALPN protocol,
/// presenting `identity` when given.
pub fn tls_client_config(
    pki: &Pki,
    identity: Option<&ClientCert>,
    proto: Proto,
    tls12_only: bool,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.root_der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![match proto {
        Proto::H1 => b"http/1.1".to_vec(),
        Proto::H2 => b"h2".to_vec(),
    }];
    cfg
}

fn reqwest_client(cfg: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// An HTTP/1.1 client.
pub fn client(pki: &Pki, identity: Option<&ClientCert>) -> reqwest::Client {
    reqwest_client(tls_client_config(pki, identity, Proto::H1, false))
}

pub fn client_proto(pki: &Pki, identity: Option<&ClientCert>, proto: Proto) -> reqwest::Client {
    reqwest_client(tls_client_config(pki, identity, proto, false))
}

pub fn client_tls12(pki: &Pki, identity: Option<&ClientCert>) -> reqwest::Client {
    reqwest_client(tls_client_config(pki, identity, Proto::H1, true))
}

/// POSTs `body` with a valid signature under `SECRET`.
pub async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    client
        .post(url)
        .header("content-type", "application/json")
        .header(SIG, sign(SECRET, body))
        .body(body.to_vec())
        .send()
        .await
}

/// An error and all its sources, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Sends `request` verbatim over a fresh TLS connection (ALPN http/1.1) and reads until the
/// server closes it; the request should carry `Connection: close`.
pub async fn raw_exchange(
    pki: &Pki,
    identity: Option<&ClientCert>,
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<RawResponse> {
    let cfg = Arc::new(tls_client_config(pki, identity, Proto::H1, false));
    raw_exchange_with(cfg, addr, request).await.map(|(r, _)| r)
}

/// Like [`raw_exchange`] with a caller-owned configuration (and so a shared session cache);
/// also returns whether the handshake was full or resumed.
pub async fn raw_exchange_with(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<(RawResponse, Option<rustls::HandshakeKind>)> {
    let tcp = TcpStream::connect(addr).await?;
    exchange_on(cfg, tcp, request).await
}

/// TLS on `tcp`, one request, and the answer read until the server closes the connection;
/// with the handshake kind (full or resumed).
async fn exchange_on(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    request: &[u8],
) -> std::io::Result<(RawResponse, Option<rustls::HandshakeKind>)> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))??;
    let kind = tls.get_ref().1.handshake_kind();
    tls.write_all(request).await?;
    tls.flush().await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 8192];
        loop {
            match tls.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                // A close without close_notify after a complete response is fine.
                Err(_) if !buf.is_empty() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))??;
    Ok((parse_raw(&buf)?, kind))
}

fn parse_raw(buf: &[u8]) -> std::io::Result<RawResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    Ok(RawResponse {
        status,
        head,
        body: buf[end + 4..].to_vec(),
    })
}

// ---------------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// The single value of a header; panics when it appears more than once.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut all = self.headers.get_all(name).iter();
        let first = all.next()?;
        assert!(all.next().is_none(), "header {name} appears more than once");
        Some(String::from_utf8_lossy(first.as_bytes()).into_owned())
    }
}

/// What the upstream answers.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Default for Reply {
    fn default() -> Self {
        Reply {
            status: 200,
            body: Bytes::from_static(b"ok"),
            headers: vec![("content-type".into(), "text/plain".into())],
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct UpstreamState {
    requests: Mutex<Vec<Recorded>>,
    reply: Mutex<Reply>,
}

/// A plain-HTTP/1.1 backend on 127.0.0.1 that records every request.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Self::with_reply(Reply::default()).await
    }

    pub async fn with_reply(reply: Reply) -> Upstream {
        Self::serve(reply, None).await
    }

    /// An HTTPS backend presenting the PKI's server certificate (chain to the test root).
    pub async fn start_tls(pki: &Pki) -> Upstream {
        use rustls_pki_types::pem::PemObject;
        let chain = CertificateDer::pem_file_iter(pki.path("server-chain.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Self::serve(Reply::default(), Some(acceptor)).await
    }

    async fn serve(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            requests: Mutex::new(Vec::new()),
            reply: Mutex::new(reply),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| record(shared.clone(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream { addr, state }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// The one request received; panics unless exactly one arrived.
    pub fn only(&self) -> Recorded {
        let r = self.requests();
        assert_eq!(r.len(), 1, "upstream received {} requests", r.len());
        r.into_iter().next().unwrap()
    }

    pub fn assert_nothing_received(&self) {
        let r = self.requests();
        assert!(
            r.is_empty(),
            "upstream must receive nothing, got {} request(s): {:?}",
            r.len(),
            r.iter().map(|r| (&r.method, &r.uri)).collect::<Vec<_>>()
        );
    }
}

async fn record(
    state: Arc<UpstreamState>,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    state.requests.lock().unwrap().push(Recorded {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
    });
    let reply = state.reply.lock().unwrap().clone();
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = http::Response::new(Full::new(reply.body.clone()));
    *resp.status_mut() = http::StatusCode::from_u16(reply.status).unwrap();
    for (k, v) in &reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    Ok(resp)
}

/// A 127.0.0.1 port that refuses connections: bound but never listening, so no other test
/// can take it while the returned socket lives.
pub fn closed_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// The path of the hubgate binary built by Cargo for this test run.
pub fn hubgate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hubgate"))
}

// ---------------------------------------------------------------------------------------------
// Operations: extra PKI pieces, admin and raw-socket clients, the binary as a child process
// ---------------------------------------------------------------------------------------------

/// Standard base64 (with padding), for writing PEM by hand.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One DER certificate as a PEM block.
pub fn cert_pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

impl ClientCert {
    /// The chain (leaf first) as concatenated PEM blocks.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| cert_pem(c.as_ref())).collect()
    }
}

impl Pki {
    /// A new server certificate (127.0.0.1, localhost) under the intermediate with the given
    /// serial number (keep the first byte below 0x80), written as `chain_name` (leaf +
    /// intermediate) and `key_name`.
    pub fn server_cert_with_serial(&self, serial: &[u8], chain_name: &str, key_name: &str) {
        let mut sp =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        sp.distinguished_name = rcgen::DistinguishedName::new();
        sp.distinguished_name
            .push(DnType::CommonName, "hubgate test server (reissued)");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        sp.not_before = rcgen::date_time_ymd(2000, 1, 1);
        sp.not_after = rcgen::date_time_ymd(2090, 1, 1);
        sp.use_authority_key_identifier_extension = true;
        sp.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        let key = KeyPair::generate().unwrap();
        let cert = sp.signed_by(&key, &self.intermediate).unwrap();
        self.write(
            chain_name,
            &format!("{}{}", cert.pem(), self.intermediate.pem()),
        );
        self.write(key_name, &key.serialize_pem());
    }
}

/// A second, independent client CA (root + intermediate) with its own names.
pub struct OtherCa {
    root: Ca,
    intermediate: Ca,
}

impl OtherCa {
    pub fn new(name: &str) -> OtherCa {
        let root = new_root(&format!("{name} root"));
        let intermediate = new_intermediate(&format!("{name} intermediate"), &root);
        OtherCa { root, intermediate }
    }

    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A leaf issued by this CA's intermediate, chain = [leaf, intermediate].
    pub fn client(&self, spec: &LeafSpec) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let leaf = spec.params().signed_by(&key, &self.intermediate).unwrap();
        ClientCert {
            chain: vec![leaf.der().clone(), self.intermediate.der().clone()],
            key_pkcs8: key.serialize_der(),
        }
    }
}

/// The serial number (DER integer content bytes) of the certificate the server at `addr`
/// presents on a fresh TLS connection.
pub async fn server_serial(
    pki: &Pki,
    identity: Option<&ClientCert>,
    addr: SocketAddr,
) -> std::io::Result<Vec<u8>> {
    let cfg = Arc::new(tls_client_config(pki, identity, Proto::H1, false));
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))??;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone();
    let _ = tls.shutdown().await;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).expect("server cert DER");
    Ok(cert.tbs_certificate.raw_serial().to_vec())
}

/// Sends `request` over TLS on an already connected socket (after whatever the caller wrote to
/// it first, e.g. a PROXY protocol header) and reads until the server closes the connection.
pub async fn raw_exchange_on(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    request: &[u8],
) -> std::io::Result<RawResponse> {
    Ok(exchange_on(cfg, tcp, request).await?.0)
}

/// A signed HTTP/1.1 POST of `body` to `/webhook`, with extra header lines (each ending in
/// `\r\n`), closing the connection after the response.
pub fn signed_post_request(host: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len(),
        sign(SECRET, body)
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// `GET path` on a plain-HTTP (admin) listener: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await?;
        let r = parse_raw(&buf)?;
        Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// Removes ANSI colour sequences (`ESC [ … letter`) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `hubgate` binary as a child process, its stderr collected line by line (ANSI stripped).
/// Dropping it kills the process.
pub struct Hubgate {
    pub child: std::process::Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Hubgate {
    /// Spawns the binary with `args`, every inherited `HUBGATE_*` variable removed, `RUST_LOG`
    /// set to `info`, and `env` added; the working directory is `cwd`.
    pub fn spawn(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Hubgate {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(hubgate_bin());
        cmd.args(args)
            .current_dir(cwd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("HUBGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn hubgate");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        Hubgate { child, logs }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends a signal with `kill -SIG PID`.
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Everything logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn log_count(&self) -> usize {
        self.logs.lock().unwrap().len()
    }

    /// Waits (bounded) for a log line at index `from` or later containing `needle`; returns
    /// the line's index and text. Panics with the log on timeout.
    pub async fn wait_log(&self, from: usize, needle: &str, within: Duration) -> (usize, String) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            {
                let logs = self.logs.lock().unwrap();
                if let Some((i, l)) = logs
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, l)| l.contains(needle))
                {
                    return (i, l.clone());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "no log line containing {needle:?} within {within:?}; log:\n{}",
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The address logged as `KEY=ADDR` in the first line containing `needle`.
    pub async fn logged_addr(&self, needle: &str, key: &str) -> SocketAddr {
        let (_, line) = self.wait_log(0, needle, Duration::from_secs(10)).await;
        let token = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
        token
            .trim_matches('"')
            .parse()
            .unwrap_or_else(|_| panic!("bad address in {line:?}"))
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits (bounded) for the process to exit; `None` on timeout.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Hubgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
