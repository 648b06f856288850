//! Clients of the gate: reqwest over a preconfigured rustls `ClientConfig` (one ALPN protocol,
//! the test root trusted, an optional client certificate), raw HTTP/1.1-over-TLS exchanges for
//! requests reqwest will not send, and a plain-HTTP GET for the admin listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{sign, ClientCert, Pki, SECRET, SIG};

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

/// A reqwest client over `cfg`, no proxy, a 10 s timeout per request.
pub fn reqwest_client(cfg: rustls::ClientConfig, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// An HTTP/1.1 client.
pub fn client(pki: &Pki, identity: Option<&ClientCert>) -> reqwest::Client {
    client_proto(pki, identity, Proto::H1)
}

pub fn client_proto(pki: &Pki, identity: Option<&ClientCert>, proto: Proto) -> reqwest::Client {
    reqwest_client(
        tls_client_config(pki, identity, proto, false),
        Duration::from_secs(10),
    )
}

pub fn client_tls12(pki: &Pki, identity: Option<&ClientCert>) -> reqwest::Client {
    reqwest_client(
        tls_client_config(pki, identity, Proto::H1, true),
        Duration::from_secs(10),
    )
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

pub use hubgate::error_chain;

/// A signed HTTP/1.1 `POST path` of `body` (JSON, `Content-Length`), `extra_headers` lines
/// (each ending in `\r\n`), and `Connection: close`.
pub fn signed_post(host: &str, path: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{SIG}: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len(),
        sign(SECRET, body)
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS handshake on an already connected socket, presenting `server_name` (bounded).
pub async fn tls_connect_on(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    server_name: &str,
) -> std::io::Result<Tls> {
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))?
}

/// A fresh TLS connection (ALPN http/1.1) to `addr`, presenting `identity`.
pub async fn tls_connect(pki: &Pki, identity: Option<&ClientCert>, addr: SocketAddr) -> Tls {
    let cfg = Arc::new(tls_client_config(pki, identity, Proto::H1, false));
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls_connect_on(cfg, tcp, "127.0.0.1").await.unwrap()
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

/// Sends `request` over TLS on an already connected socket (after whatever the caller wrote to
/// it first, e.g. a PROXY protocol header) and reads until the server closes the connection.
pub async fn raw_exchange_on(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    request: &[u8],
) -> std::io::Result<RawResponse> {
    Ok(exchange_on(cfg, tcp, request).await?.0)
}

/// TLS on `tcp`, one request, and the answer read until the server closes the connection;
/// with the handshake kind (full or resumed).
async fn exchange_on(
    cfg: Arc<rustls::ClientConfig>,
    tcp: TcpStream,
    request: &[u8],
) -> std::io::Result<(RawResponse, Option<rustls::HandshakeKind>)> {
    let mut tls = tls_connect_on(cfg, tcp, "127.0.0.1").await?;
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

/// The serial number (DER integer content bytes) of the certificate the server at `addr`
/// presents on a fresh TLS connection.
pub async fn server_serial(
    pki: &Pki,
    identity: Option<&ClientCert>,
    addr: SocketAddr,
) -> std::io::Result<Vec<u8>> {
    let cfg = Arc::new(tls_client_config(pki, identity, Proto::H1, false));
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tls_connect_on(cfg, tcp, "127.0.0.1").await?;
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
