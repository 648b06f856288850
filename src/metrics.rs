//! Prometheus metrics (prometheus-client, OpenMetrics text). One [`Metrics`] lives as long as the
//! process and outlives configuration reloads; certificate expiry gauges are refreshed from the
//! current configuration at scrape time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::pki::CertInfo;

/// A route's path as a label value, shared rather than copied per request.
pub type RouteLabel = Arc<String>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteLabel,
    verdict: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteReason {
    route: RouteLabel,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOnly {
    route: RouteLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpoolLabels {
    route: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    kind: &'static str,
    path: String,
    subject: String,
}

/// All of hubgate's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    signature_failures: Family<RouteReason, Counter>,
    challenges: Family<RouteReason, Counter>,
    handshake_failures: Family<Reason, Counter>,
    upstream_seconds: Family<RouteOnly, Histogram>,
    upstream_errors: Family<RouteReason, Counter>,
    reloads: Family<ResultLabel, Counter>,
    spool_deliveries: Family<RouteReason, Counter>,
    batch_parts: Family<RouteReason, Counter>,
    batches_unsplit: Family<RouteReason, Counter>,
    spool_events: Family<SpoolLabels, Gauge>,
    spool_oldest: Family<RouteOnly, Gauge<f64, std::sync::atomic::AtomicU64>>,
    refused_connections: Family<Reason, Counter>,
    open_connections: Gauge,
    parked_connections: Gauge,
    log_lines_dropped: Counter,
    crl_fetch_failures: Counter,
    spool_stored: Counter,
    spool_commits: Counter,
    spool_commit_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    spool_failed_commits: Counter,
    /// Serialises bringing the spool counters up to date (two scrapes at once).
    spool_stats_lock: Mutex<()>,
    cert_expiry: Family<CertLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Expiry dates of the current configuration's certificates, for scrape time.
    certs: Mutex<Vec<(CertLabels, i64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hubgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, verdict and status",
            requests.clone(),
        );
        let signature_failures = Family::<RouteReason, Counter>::default();
        registry.register(
            "signature_failures",
            "Rejected X-Hub-Signature(-256) by route and reason",
            signature_failures.clone(),
        );
        let challenges = Family::<RouteReason, Counter>::default();
        registry.register(
            "challenges",
            "Verification requests by route and outcome (ok or the refusal reason)",
            challenges.clone(),
        );
        let handshake_failures = Family::<Reason, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes by reason",
            handshake_failures.clone(),
        );
        let upstream_seconds = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
        });
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding to the backend's complete answer",
            upstream_seconds.clone(),
        );
        let upstream_errors = Family::<RouteReason, Counter>::default();
        registry.register(
            "upstream_errors",
            "Forwarding failures by route and kind",
            upstream_errors.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        let spool_deliveries = Family::<RouteReason, Counter>::default();
        registry.register(
            "spool_deliveries",
            "Spool delivery attempts by route and outcome (done, retry, dead)",
            spool_deliveries.clone(),
        );
        let batch_parts = Family::<RouteReason, Counter>::default();
        registry.register(
            "batch_parts",
            "Parts of split Meta batches by route and outcome (delivered, stored, duplicate, failed)",
            batch_parts.clone(),
        );
        let batches_unsplit = Family::<RouteReason, Counter>::default();
        registry.register(
            "batches_unsplit",
            "Bodies on splitting routes delivered whole, by reason (not_json, no_entry_array, empty_batch)",
            batches_unsplit.clone(),
        );
        let spool_events = Family::<SpoolLabels, Gauge>::default();
        registry.register(
            "spool_events",
            "Events in the spool by route and state (pending, in_flight, dead)",
            spool_events.clone(),
        );
        let spool_oldest = Family::<RouteOnly, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "spool_oldest_pending_age_seconds",
            "Age of the oldest undelivered event per route",
            spool_oldest.clone(),
        );
        let refused_connections = Family::<Reason, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections closed before TLS (bad PROXY header, source not allowed)",
            refused_connections.clone(),
        );
        let crl_fetch_failures = Counter::default();
        registry.register(
            "crl_fetch_failures",
            "Failed fetches of revocation lists from client_auth.crl_urls",
            crl_fetch_failures.clone(),
        );
        let log_lines_dropped = Counter::default();
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up",
            log_lines_dropped.clone(),
        );
        let spool_stored = Counter::default();
        registry.register(
            "spool_stored_events",
            "Events stored in the spool by this process",
            spool_stored.clone(),
        );
        let spool_commits = Counter::default();
        registry.register(
            "spool_commits",
            "Durable spool commits (each one fsync of the log; stored events / commits = events per fsync)",
            spool_commits.clone(),
        );
        let spool_commit_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "spool_commit_seconds",
            "Time spent in durable spool commits",
            spool_commit_seconds.clone(),
        );
        let spool_failed_commits = Counter::default();
        registry.register(
            "spool_failed_commits",
            "Spool batches that failed (nothing in them was stored)",
            spool_failed_commits.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open client connections",
            open_connections.clone(),
        );
        let parked_connections = Gauge::default();
        registry.register(
            "parked_connections",
            "Idle HTTP/1.1 client connections holding no HTTP state (only the TLS session)",
            parked_connections.clone(),
        );
        let cert_expiry = Family::<CertLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until each server certificate and trust anchor expires (negative: expired)",
            cert_expiry.clone(),
        );
        Metrics {
            registry,
            requests,
            signature_failures,
            challenges,
            handshake_failures,
            upstream_seconds,
            upstream_errors,
            reloads,
            spool_deliveries,
            batch_parts,
            batches_unsplit,
            spool_events,
            spool_oldest,
            refused_connections,
            open_connections,
            parked_connections,
            log_lines_dropped,
            crl_fetch_failures,
            spool_stored,
            spool_commits,
            spool_commit_seconds,
            spool_failed_commits,
            spool_stats_lock: Mutex::new(()),
            cert_expiry,
            certs: Mutex::new(Vec::new()),
        }
    }

    /// Counts a finished request under its verdict and status.
    pub fn request(&self, route: &RouteLabel, verdict: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                verdict,
                status,
            })
            .inc();
    }

    /// Counts a refused signature by its reason.
    pub fn signature_failure(&self, route: &RouteLabel, reason: &'static str) {
        Self::by_reason(&self.signature_failures, route, reason);
    }

    /// Counts a verification request: `ok` or the refusal's reason.
    pub fn challenge(&self, route: &RouteLabel, outcome: &'static str) {
        Self::by_reason(&self.challenges, route, outcome);
    }

    /// Counts parts of a split batch: `delivered`, `stored`, `duplicate` or `failed`.
    pub fn batch_parts(&self, route: &RouteLabel, outcome: &'static str, n: u64) {
        if n > 0 {
            self.batch_parts
                .get_or_create(&RouteReason {
                    route: route.clone(),
                    reason: outcome,
                })
                .inc_by(n);
        }
    }

    /// Counts a body a splitting route delivered whole, and why.
    pub fn batch_unsplit(&self, route: &RouteLabel, reason: &'static str) {
        Self::by_reason(&self.batches_unsplit, route, reason);
    }

    /// Counts a failed fetch of a revocation list (`crl_urls`).
    pub fn crl_fetch_failed(&self) {
        self.crl_fetch_failures.inc();
    }

    /// Counts a failed forward by its kind.
    pub fn upstream_error(&self, route: &RouteLabel, reason: &'static str) {
        Self::by_reason(&self.upstream_errors, route, reason);
    }

    fn by_reason(family: &Family<RouteReason, Counter>, route: &RouteLabel, reason: &'static str) {
        family
            .get_or_create(&RouteReason {
                route: route.clone(),
                reason,
            })
            .inc();
    }

    pub fn upstream_latency(&self, route: &RouteLabel, elapsed: Duration) {
        self.upstream_seconds
            .get_or_create(&RouteOnly {
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&Reason { reason })
            .inc();
    }

    /// Counts one spool delivery attempt's outcome.
    pub fn spool_delivery(&self, route: &RouteLabel, outcome: &crate::spool::DeliveryOutcome) {
        use crate::spool::DeliveryOutcome;
        let reason = match outcome {
            DeliveryOutcome::Done => "done",
            DeliveryOutcome::Retry(_) => "retry",
            DeliveryOutcome::Permanent(_) => "dead",
        };
        self.spool_deliveries
            .get_or_create(&RouteReason {
                route: route.clone(),
                reason,
            })
            .inc();
    }

    /// Brings the spool's counters up to date with the spool's own (counted since it opened).
    pub fn set_spool_stats(&self, stats: &crate::spool::SpoolStats) {
        let _one_at_a_time = self.spool_stats_lock.lock().expect("metrics lock");
        let up_to = |c: &Counter, v: u64| {
            let shown = c.get();
            if v > shown {
                c.inc_by(v - shown);
            }
        };
        up_to(&self.spool_stored, stats.accepted);
        up_to(&self.spool_commits, stats.commits);
        up_to(&self.spool_failed_commits, stats.failed_commits);
        let seconds = stats.commit_nanos as f64 / 1e9;
        let shown = self.spool_commit_seconds.get();
        if seconds > shown {
            self.spool_commit_seconds.inc_by(seconds - shown);
        }
    }

    /// Sets the spool gauges from a fresh summary.
    pub fn set_spool(&self, summary: &crate::spool::Summary, now: std::time::SystemTime) {
        self.spool_events.clear();
        self.spool_oldest.clear();
        for r in &summary.routes {
            for (state, n) in [
                ("pending", r.pending),
                ("in_flight", r.in_flight),
                ("dead", r.dead),
            ] {
                let labels = SpoolLabels {
                    route: r.route.clone(),
                    state,
                };
                self.spool_events.get_or_create(&labels).set(n as i64);
            }
            let age = r
                .oldest_undelivered
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0.0, |d| d.as_secs_f64());
            self.spool_oldest
                .get_or_create(&RouteOnly {
                    route: Arc::new(r.route.clone()),
                })
                .set(age);
        }
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.refused_connections
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_parked(&self) {
        self.parked_connections.inc();
    }

    pub fn connection_unparked(&self) {
        self.parked_connections.dec();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result }).inc();
    }

    /// Remembers the certificates of the configuration now in force.
    pub fn set_certificates(&self, config: &Config) {
        let mut certs = Vec::new();
        if let Some(info) = config.server.cert_chain.first().and_then(CertInfo::parse) {
            let labels = CertLabels {
                kind: "server",
                path: config.server.cert_path.display().to_string(),
                subject: info.subject,
            };
            certs.push((labels, info.not_after));
        }
        for a in &config.client_auth.anchors {
            let labels = CertLabels {
                kind: "trust_anchor",
                path: a.path.display().to_string(),
                subject: a.subject.clone(),
            };
            certs.push((labels, a.not_after));
        }
        // A CRL's nextUpdate, the same way: seconds left before it is stale.
        for c in &config.client_auth.crls {
            if let Some(next) = c.next_update {
                let labels = CertLabels {
                    kind: "crl",
                    path: c.path.display().to_string(),
                    subject: c.issuer.clone(),
                };
                certs.push((labels, next));
            }
        }
        *self.certs.lock().expect("metrics lock") = certs;
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self, now_unix: i64) -> String {
        {
            let certs = self.certs.lock().expect("metrics lock");
            self.cert_expiry.clear();
            for (labels, not_after) in certs.iter() {
                self.cert_expiry
                    .get_or_create(labels)
                    .set((not_after - now_unix) as f64);
            }
            // Counted by the log buffer; brought up to date here (under the lock: two scrapes
            // at once must not both add the difference).
            let dropped = crate::logging::dropped_lines();
            let shown = self.log_lines_dropped.get();
            if dropped > shown {
                self.log_lines_dropped.inc_by(dropped - shown);
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}
