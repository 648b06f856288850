//! `hubgate demo` (and plain `hubgate` without a config): a throwaway PKI, a backend that prints
//! what it receives, and a real gate between them on 127.0.0.1 — then hubgate plays Meta against
//! it (challenge, signed event, forged event, impostor certificate) and prints the `curl`
//! commands to do the same by hand. Nothing here is fit for production, and it says so.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use hubgate::config::{Config, Secret};
use hubgate::gate::signature::Signer;

const TOKEN: &str = "demo-verify-token";
const SECRET: &str = "demo-app-secret";
const EVENT: &str = r#"{"object":"page","entry":[{"id":"1234","time":1764300000,"messaging":[{"sender":{"id":"42"},"message":{"text":"h\u00e9llo from Meta \ud83d\udc4b"}}]}]}"#;

/// Runs the demo. With `exit_after_selftest` it stops after the self-test (for scripts).
pub async fn run(listen: SocketAddr, exit_after_selftest: bool) -> Result<()> {
    if !listen.ip().is_loopback() {
        bail!("the demo only listens on loopback addresses, not {listen}");
    }
    let dir = std::env::temp_dir().join(format!("hubgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pki = Pki::generate(&dir)?;

    let backend = start_backend().await?;
    let gate = start_gate(&dir, listen, backend).await?;
    let addr = gate.local_addr();

    banner(&dir, addr);
    let ok = selftest(&pki, addr).await;
    if matches!(ok, Ok(true)) && !exit_after_selftest {
        print_curl(&dir, addr);
        tokio::signal::ctrl_c().await.ok();
    }
    gate.shutdown().await;
    // The throwaway keys and config go with the demo.
    let _ = std::fs::remove_dir_all(&dir);
    if !ok? {
        bail!("the self-test failed (see above)");
    }
    Ok(())
}

fn banner(dir: &Path, addr: SocketAddr) {
    println!();
    println!("==================================================================================");
    println!(
        " hubgate DEMO MODE: throwaway certificates, secrets and backend. NOT FOR PRODUCTION."
    );
    println!(
        " Gate:    https://localhost:{}/webhook  (config: {})",
        addr.port(),
        dir.join("hubgate.toml").display()
    );
    println!(" For real use: hubgate run --config FILE (see README.md).");
    println!("==================================================================================");
    println!();
}

struct Pki {
    ca: CertificateDer<'static>,
    meta: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    impostor: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

impl Pki {
    /// A demo CA, a server certificate for localhost, Meta's client identity and an impostor.
    fn generate(dir: &Path) -> Result<Pki> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "hubgate DEMO CA - not for production");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        write(dir, "ca.pem", &ca_cert.pem())?;

        let leaf =
            |cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose, name: &str| -> Result<_> {
                let key = KeyPair::generate()?;
                let mut p = CertificateParams::new(sans)?;
                p.distinguished_name.push(DnType::CommonName, cn);
                p.extended_key_usages = vec![eku];
                let cert = p.signed_by(&key, &issuer)?;
                write(dir, &format!("{name}.pem"), &cert.pem())?;
                write(dir, &format!("{name}.key"), &key.serialize_pem())?;
                let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
                Ok((vec![cert.der().clone()], key_der))
            };
        leaf(
            "localhost",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        )?;
        let meta = leaf(
            hubgate::config::META_CLIENT_CN,
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            "meta-client",
        )?;
        let impostor = leaf(
            "impostor.example",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            "impostor-client",
        )?;
        Ok(Pki {
            ca: ca_cert.der().clone(),
            meta,
            impostor,
        })
    }
}

fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(path)
}

/// A backend that prints every event it receives, as Meta's sample app does.
async fn start_backend() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    println!(
                        "  [backend] received {} bytes: {}",
                        body.len(),
                        String::from_utf8_lossy(&body)
                    );
                    println!("  [backend] X-Forwarded-Client-Cert: {xfcc}");
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"EVENT_RECEIVED"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn start_gate(
    dir: &Path,
    listen: SocketAddr,
    backend: SocketAddr,
) -> Result<hubgate::Running> {
    let config_text = |listen: SocketAddr| {
        format!(
            r#"# hubgate demo configuration: throwaway PKI and secrets, loopback only. NOT FOR PRODUCTION.
[server]
listen = "{listen}"
cert = "server.pem"
key = "server.key"

[client_auth]
mode = "require"
roots = ["ca.pem"]
allowed_cn = ["{cn}"]

[[route]]
path = "/webhook"
verify_token = "{TOKEN}"
app_secrets = ["{SECRET}"]
upstream = "http://{backend}/webhook"
"#,
            cn = hubgate::config::META_CLIENT_CN
        )
    };
    let path = write(dir, "hubgate.toml", &config_text(listen))?;
    let config = Config::load(&path)?;
    match hubgate::run(config).await {
        Ok(r) => Ok(r),
        Err(hubgate::Error::Bind { .. }) => {
            println!("({listen} is busy; the demo takes a free port instead)");
            let fallback = SocketAddr::new(listen.ip(), 0);
            let path = write(dir, "hubgate.toml", &config_text(fallback))?;
            Ok(hubgate::run(Config::load(&path)?).await?)
        }
        Err(e) => Err(e.into()),
    }
}

type DemoClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client that plays Meta's sender: trusts the demo CA, presents `identity` if given.
fn client(
    pki: &Pki,
    identity: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<DemoClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let builder = rustls::ClientConfig::builder_with_provider(hubgate::pki::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let tls = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    // TCP_NODELAY: a request leaves in more than one write (HTTP/2 HEADERS then DATA, each its
    // own TLS record); with Nagle on, the second waits for the server's delayed ACK (~40 ms).
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector))
}

/// Sends one request; `Err` when no HTTP answer came back (e.g. the handshake was refused).
async fn send(
    client: &DemoClient,
    method: http::Method,
    url: &str,
    signature: Option<&str>,
    body: &str,
) -> Result<(http::StatusCode, String)> {
    let mut req = http::Request::builder().method(method).uri(url);
    if let Some(sig) = signature {
        req = req
            .header("content-type", "application/json")
            .header("x-hub-signature-256", sig);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Plays Meta (and an attacker) against the gate; prints one line per check.
async fn selftest(pki: &Pki, addr: SocketAddr) -> Result<bool> {
    use http::Method;
    let base = format!("https://localhost:{}/webhook", addr.port());
    let meta = client(pki, Some(&pki.meta))?;
    let impostor = client(pki, Some(&pki.impostor))?;
    let anonymous = client(pki, None)?;
    let signature = Signer::new(&[Secret::new(SECRET)], false).sign(EVENT.as_bytes());
    let mut all_ok = true;
    let mut report = |ok: bool, what: &str, got: String| {
        all_ok &= ok;
        println!("{} {what}: {got}", if ok { "  PASS" } else { "  FAIL" });
    };
    let challenge = |token: &str| {
        format!("{base}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}")
    };

    println!("Self-test: hubgate plays Meta against the gate");
    let (status, body) = send(&meta, Method::GET, &challenge(TOKEN), None, "").await?;
    report(
        status == 200 && body == "1158201444",
        "verification request is answered with the challenge",
        format!("{status} {body:?}"),
    );

    let (status, _) = send(&meta, Method::GET, &challenge("wrong"), None, "").await?;
    report(
        status == 403,
        "wrong verify token is refused",
        status.to_string(),
    );

    let (status, _) = send(&meta, Method::POST, &base, Some(&signature), EVENT).await?;
    report(
        status == 200,
        "signed event is forwarded to the backend",
        status.to_string(),
    );

    let forged = EVENT.replace("42", "43");
    let (status, _) = send(&meta, Method::POST, &base, Some(&signature), &forged).await?;
    report(
        status == 403,
        "tampered event is refused, backend untouched",
        status.to_string(),
    );

    let r = send(&impostor, Method::POST, &base, Some(&signature), EVENT).await;
    report(
        r.is_err(),
        "certificate with another CN is refused at the handshake",
        outcome(r),
    );

    let r = send(&anonymous, Method::POST, &base, Some(&signature), EVENT).await;
    report(
        r.is_err(),
        "connection without a client certificate is refused",
        outcome(r),
    );
    println!();
    Ok(all_ok)
}

fn outcome(r: Result<(http::StatusCode, String)>) -> String {
    match r {
        Ok((status, _)) => format!("answered {status}"),
        Err(_) => "TLS handshake failed".to_owned(),
    }
}

fn print_curl(dir: &Path, addr: SocketAddr) {
    let d = dir.display();
    let port = addr.port();
    let sig = Signer::new(&[Secret::new(SECRET)], false).sign(EVENT.as_bytes());
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "hubgate".into());
    println!("Try it yourself (another terminal), as Meta would:");
    println!();
    println!("  # the verification request");
    println!("  curl --cacert {d}/ca.pem --cert {d}/meta-client.pem --key {d}/meta-client.key \\");
    println!("    'https://localhost:{port}/webhook?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={TOKEN}'");
    println!();
    println!("  # a signed event (signature made with: {exe} sign --secret {SECRET} < body)");
    println!("  curl --cacert {d}/ca.pem --cert {d}/meta-client.pem --key {d}/meta-client.key \\");
    println!("    -H 'Content-Type: application/json' -H 'X-Hub-Signature-256: {sig}' \\");
    println!("    --data-binary '{EVENT}' https://localhost:{port}/webhook");
    println!();
    println!("  # a forged event: same signature, one byte changed -> 403");
    println!("  curl --cacert {d}/ca.pem --cert {d}/meta-client.pem --key {d}/meta-client.key \\");
    println!(
        "    -H 'X-Hub-Signature-256: {sig}' --data-binary '{}' https://localhost:{port}/webhook",
        EVENT.replace("42", "43")
    );
    println!();
    println!("  # an impostor certificate -> TLS handshake refused");
    println!("  curl --cacert {d}/ca.pem --cert {d}/impostor-client.pem --key {d}/impostor-client.key https://localhost:{port}/webhook");
    println!();
    println!("Serving until Ctrl-C.");
}
