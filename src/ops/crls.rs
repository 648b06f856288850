//! Revocation lists fetched over HTTP(S) (`[client_auth] crl_urls`): the first round right at
//! start, then every `crl_refresh` and after each reload, each fetch within `crl_fetch_timeout` and 16 MiB. A list
//! that changed rebuilds the configuration generation (the TLS verifier with it), the way a
//! reload does; a fetch that fails keeps the last list from that URL, with a warning and a
//! metric. Lists fetched join the file lists (`crls`) and are held to the same `crl_policy`.
//! Until every URL has answered once, `/readyz` fails under `crl_policy = "hard"` (every chain
//! of those CAs would be refused): [`unfetched`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::pki::{parse_crls, Crl};
use crate::state::{Generation, Shared};

/// The first `crl_urls` entry no list has been fetched from yet.
pub(crate) fn unfetched<'a>(config: &'a Config, fetched: &[Crl]) -> Option<&'a Uri> {
    config.client_auth.crl_urls.iter().find(|u| {
        !fetched
            .iter()
            .any(|c| c.url.as_deref() == Some(&u.to_string()))
    })
}

/// Largest CRL accepted.
const MAX_CRL_BYTES: usize = 16 << 20;

/// `config` with its fetched lists replaced by `fetched`.
pub(crate) fn with_fetched(mut config: Config, fetched: &[Crl]) -> Config {
    config.client_auth.crls.retain(|c| c.url.is_none());
    config.client_auth.crls.extend(fetched.iter().cloned());
    config
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

fn client() -> Result<HttpClient, String> {
    let provider = crate::pki::crypto_provider();
    let verifier =
        rustls_platform_verifier::Verifier::new(provider.clone()).map_err(|e| e.to_string())?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

async fn fetch(client: &HttpClient, url: &Uri, timeout: Duration) -> Result<Vec<Crl>, String> {
    let get = async {
        let resp = client
            .get(url.clone())
            .await
            .map_err(|e| crate::error_chain(&e))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_CRL_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(body.to_bytes())
    };
    let bytes = tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    let mut crls = parse_crls(&bytes, Path::new(&url.to_string()))?;
    for c in &mut crls {
        c.url = Some(url.to_string());
    }
    Ok(crls)
}

/// Keeps the fetched lists fresh until `stopped`.
pub(crate) async fn keep_fresh(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let client = match client() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "CRL fetching: no HTTP client; the lists in crl_urls are never loaded");
            return;
        }
    };
    loop {
        // The generation of this round (a reload meanwhile is seen at the next one).
        let current = shared.current();
        let config = current.config();
        let auth = &config.client_auth;
        if auth.crl_urls.is_empty() {
            // None configured: wait for a reload that may add some.
            tokio::select! {
                _ = shared.reloaded.notified() => continue,
                _ = stopped.changed() => return,
            }
        }
        let previous = shared.fetched_crls();
        let mut fetched = Vec::new();
        for url in &auth.crl_urls {
            match fetch(&client, url, auth.crl_fetch_timeout).await {
                Ok(list) => fetched.extend(list),
                Err(e) => {
                    let kept: Vec<Crl> = previous
                        .iter()
                        .filter(|c| c.url.as_deref() == Some(&url.to_string()))
                        .cloned()
                        .collect();
                    warn!(url = %url, error = %e, kept = kept.len(), "CRL fetch failed; the last list from this URL stays in force");
                    shared.metrics.crl_fetch_failed();
                    fetched.extend(kept);
                }
            }
        }
        let changed = fetched.len() != previous.len()
            || fetched
                .iter()
                .zip(previous.iter())
                .any(|(a, b)| a.der != b.der);
        if changed {
            let merged = with_fetched(config.clone(), &fetched);
            match Generation::new(merged) {
                Ok(generation) => {
                    shared.set_fetched_crls(fetched);
                    shared.metrics.set_certificates(generation.config());
                    shared.current.store(Arc::new(generation));
                    info!(
                        urls = auth.crl_urls.len(),
                        "revocation lists fetched and in force"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "fetched revocation lists rejected; the previous ones stay")
                }
            }
        }
        // The next round after crl_refresh, or at once after a reload (new URLs, new policy).
        tokio::select! {
            _ = tokio::time::sleep(auth.crl_refresh) => {}
            _ = shared.reloaded.notified() => {}
            _ = stopped.changed() => return,
        }
    }
}
