//! The upstream client: pooled connections (`http://` upstreams: HTTP/1.1 driven by the
//! request's task, see `h1`; `https://`: hyper-util's client with rustls), header hygiene on
//! the way in, and the relay of the backend's answer on the way out. Used for sync routes and
//! for spooled events alike.
//!
//! The body is forwarded as the same `Bytes` that were verified: no copy, no re-encoding. The
//! identity headers (`X-Forwarded-For`, `X-Forwarded-Client-Cert` and the proxies' own) are
//! stripped and set by the request's [`ClientContext`], which owns that rule.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};

use super::h1::{Failure, H1Pool};
use crate::config::UpstreamSettings;
pub use crate::error_chain;
use crate::identity::ClientContext;

const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Errors building the upstream client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("upstream TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// A cause, whichever client it came from.
type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why forwarding failed. The causes are kept: [`error_chain`] shows them all.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream unreachable")]
    Unreachable(#[source] Cause),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("bad upstream response")]
    BadResponse(#[source] BadResponse),
    #[error("the request's query string cannot be appended to the upstream URL")]
    Query(#[source] http::Error),
}

/// What was wrong with the backend's answer.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    #[error("the exchange failed")]
    Exchange(#[source] Cause),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body")]
    Body(#[source] Cause),
}

type HttpClient = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The pooled client for all routes' upstreams. hyper-util's client adds nothing to the request
/// but `Host` (from the upstream URL) and the body's `Content-Length`, and follows no redirects.
pub struct Upstream {
    /// `http://` upstreams.
    plain: H1Pool,
    /// `https://` upstreams.
    client: HttpClient,
    timeout: Duration,
    max_response_bytes: usize,
}

impl Upstream {
    pub fn new(
        settings: &UpstreamSettings,
        provider: Arc<CryptoProvider>,
    ) -> Result<Upstream, ClientError> {
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let tls = match &settings.ca {
            Some((_, certs)) => {
                let mut roots = RootCertStore::empty();
                for c in certs {
                    roots.add(c.clone())?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(
                    rustls_platform_verifier::Verifier::new(provider)?,
                ))
                .with_no_client_auth(),
        };
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(settings.connect_timeout));
        tcp.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(Upstream {
            plain: H1Pool::new(256, Duration::from_secs(60), settings.connect_timeout),
            client,
            timeout: settings.timeout,
            max_response_bytes: settings.max_response_bytes,
        })
    }

    /// Sends the verified request upstream and returns the backend's answer, all within the
    /// configured deadline.
    pub async fn forward(
        &self,
        upstream: &Uri,
        parts: &Parts,
        body: Bytes,
        client: &ClientContext,
    ) -> Result<Response<Full<Bytes>>, ForwardError> {
        let headers = upstream_headers(parts, client);
        self.forward_with(upstream, parts.uri.query(), headers, body)
            .await
    }

    /// Sends `body` upstream with these headers (as [`upstream_headers`] makes them, perhaps
    /// changed: the parts of a split batch carry their own signature).
    pub async fn forward_with(
        &self,
        upstream: &Uri,
        query: Option<&str>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, ForwardError> {
        let uri = match query {
            None => upstream.clone(),
            Some(q) => with_query(upstream, q)?,
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        self.exchange(request).await
    }

    /// Sends an event from the spool (headers as stored at acceptance) and returns the
    /// backend's status.
    pub async fn deliver_stored(
        &self,
        upstream: &Uri,
        event: &crate::spool::StoredEvent,
    ) -> Result<http::StatusCode, ForwardError> {
        let uri = match event.query.as_deref() {
            None => upstream.clone(),
            Some(q) => with_query(upstream, q)?,
        };
        let mut request = Request::new(Full::new(event.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = event.headers.clone();
        Ok(self.exchange(request).await?.status())
    }

    /// One request and its complete answer (body bounded), within the deadline.
    async fn exchange(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Full<Bytes>>, ForwardError> {
        let limit = self.max_response_bytes;
        let exchange = async move {
            let (head, body) = if request.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
                let resp = self
                    .plain
                    .exchange(request, limit)
                    .await
                    .map_err(|f| match f {
                        Failure::Connect(e) => ForwardError::Unreachable(e.into()),
                        Failure::Exchange(e) => {
                            ForwardError::BadResponse(BadResponse::Exchange(e.into()))
                        }
                        Failure::TooLarge => {
                            ForwardError::BadResponse(BadResponse::TooLarge(limit))
                        }
                        Failure::Body(e) => ForwardError::BadResponse(BadResponse::Body(e)),
                    })?;
                resp.into_parts()
            } else {
                let resp = self.client.request(request).await.map_err(|e| {
                    if e.is_connect() {
                        ForwardError::Unreachable(e.into())
                    } else {
                        ForwardError::BadResponse(BadResponse::Exchange(e.into()))
                    }
                })?;
                let (head, body) = resp.into_parts();
                let body = Limited::new(body, limit).collect().await.map_err(|e| {
                    ForwardError::BadResponse(if e.is::<LengthLimitError>() {
                        BadResponse::TooLarge(limit)
                    } else {
                        BadResponse::Body(e)
                    })
                })?;
                (head, body.to_bytes())
            };
            let mut out = Response::new(Full::new(body));
            *out.status_mut() = head.status;
            *out.headers_mut() = response_headers(&head.headers);
            Ok(out)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ForwardError::Timeout(self.timeout)),
        }
    }
}

/// The upstream URI with the inbound query string appended to its own.
fn with_query(upstream: &Uri, query: &str) -> Result<Uri, ForwardError> {
    let path = upstream.path();
    let joined = match upstream.query() {
        Some(existing) if !existing.is_empty() => format!("{path}?{existing}&{query}"),
        _ => format!("{path}?{query}"),
    };
    let mut builder = Uri::builder().path_and_query(joined);
    if let Some(scheme) = upstream.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = upstream.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.build().map_err(ForwardError::Query)
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
}

/// Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
fn connection_tokens(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// The request headers sent upstream: end-to-end headers kept as they came (the signature
/// header among them); hop-by-hop, framing and any inbound forwarding or identity headers
/// dropped; `X-Forwarded-*` and the verified identity set by hubgate.
pub fn upstream_headers(parts: &Parts, client: &ClientContext) -> HeaderMap {
    let named = connection_tokens(&parts.headers);
    let mut out = HeaderMap::with_capacity(parts.headers.len() + 4);
    for (name, value) in &parts.headers {
        let drop = is_hop_by_hop(name)
            || named.contains(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == XFP
            || name == XFH
            || name == FORWARDED
            || client.is_identity_header(name);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    client.set_identity_headers(&mut out);
    out.insert(XFP, HeaderValue::from_static("https"));
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(host) = host {
        out.insert(XFH, host);
    }
    out
}

fn response_headers(headers: &HeaderMap) -> HeaderMap {
    let named = connection_tokens(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_hop_by_hop(name) && !named.contains(name) && name != header::CONTENT_LENGTH {
            out.append(name.clone(), value.clone());
        }
    }
    out
}
