//! The admin listener: `/healthz` (the process answers), `/readyz` (serving, not draining,
//! certificates in date, spool readable) and `/metrics` (OpenMetrics text); with the inspector
//! on, its page and API too ([`crate::inspect::api`]). Plain HTTP/1.1, meant for loopback or a pod
//! network; it never serves webhook routes, and the webhook listener never serves these paths.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::config::ClientAuthMode;
use crate::inspect::{self, api::AdminBody};
use crate::pki::{unix_now, CertInfo};
use crate::state::Shared;

pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The inspector's paths (when it is on), else the admin listener's own.
async fn route(shared: &Shared, req: Request<Incoming>) -> Response<AdminBody> {
    if let Some(inspector) = shared
        .inspector
        .as_ref()
        .filter(|_| inspect::api::owns(req.uri().path()))
    {
        let settings = shared.started_with.inspector.as_ref();
        let api = inspect::api::Api {
            inspector,
            token: settings.and_then(|s| s.token.as_ref()),
            spool: shared.spool.as_ref(),
        };
        return api.handle(req).await;
    }
    respond(shared, &req).await.map(Either::Left)
}

async fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness(shared).await {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            if let Some(spool) = &shared.spool {
                shared.metrics.set_spool_stats(&spool.stats());
                match spool.summary().await {
                    Ok(summary) => shared
                        .metrics
                        .set_spool(&summary, std::time::SystemTime::now()),
                    Err(e) => warn!(error = %e, "cannot read the spool summary for /metrics"),
                }
            }
            let mut r = text(StatusCode::OK, shared.metrics.encode(unix_now()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Ready when not draining, the server certificate is in date, with client auth on at least
/// one trust anchor is, and the spool (if any) is open and readable. The backend's health is
/// deliberately not part of it. A drain answers `draining` while in-flight requests finish, so
/// that a load balancer stops sending new ones.
async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.draining() {
        return Err("draining".into());
    }
    if let Some(spool) = &shared.spool {
        spool.ready().await.map_err(|e| e.to_string())?;
    }
    let current = shared.current();
    let config = current.config();
    let now = unix_now();
    let leaf = config.server.cert_chain.first().and_then(CertInfo::parse);
    match leaf {
        Some(info) if info.not_after > now => {}
        _ => return Err("server certificate expired or unreadable".into()),
    }
    if config.client_auth.mode != ClientAuthMode::Off
        && !config.client_auth.anchors.iter().any(|a| a.not_after > now)
    {
        return Err("every client_auth trust anchor has expired".into());
    }
    // A stale CRL under the hard policy refuses every chain its CA signs.
    if config.client_auth.crl_policy == crate::config::CrlPolicy::Hard {
        if let Some(url) = crate::ops::crls::unfetched(config, &shared.fetched_crls()) {
            return Err(format!(
                "the revocation list at {url} has not been fetched yet (crl_policy = \"hard\")"
            ));
        }
        if let Some(c) = config
            .client_auth
            .crls
            .iter()
            .find(|c| c.next_update.is_some_and(|n| n <= now))
        {
            return Err(format!(
                "the CRL {} of {} is past its nextUpdate (crl_policy = \"hard\" refuses its chains)",
                c.path.display(),
                c.issuer
            ));
        }
    }
    Ok(())
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
