//! A gate's life: [`start`] binds the listeners, opens the spool and starts delivery;
//! [`Running::reload`] swaps in a new configuration (or keeps the last good one);
//! [`Running::serve_until_signalled`] reloads on SIGHUP and returns on SIGTERM/SIGINT;
//! [`Running::shutdown`] drains: `/readyz` turns 503, the listener stops accepting, in-flight
//! requests finish within `server.drain_timeout`, spool deliveries finish or stay pending, and
//! the spool closes. The binary only calls these.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::deliver::spool::{SpoolDelivery, Target};
use crate::metrics::Metrics;
use crate::pki::unix_now;
use crate::spool::Spool;
use crate::state::{Generation, Shared};
use crate::{listener, Error};

use super::admin;

/// Why a reload was refused although the new configuration is valid.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("[spool] can only change on restart (the spool stays open while serving)")]
    SpoolChanged,
    #[error("server.max_body_bytes exceeds the running server.max_buffered_bytes ({0}), which changes only on restart")]
    BodyOverBudget(u64),
}

/// Where the configuration comes from, for start and for every reload: an optional file with
/// `HUBGATE_*` variables on top, read through an environment reader.
pub struct ConfigSource {
    path: Option<PathBuf>,
    env: Box<EnvReader>,
}

/// Reads one environment variable.
type EnvReader = dyn Fn(&str) -> Option<String> + Send + Sync;

impl ConfigSource {
    /// The file (if any) and the process environment.
    pub fn process(path: Option<&Path>) -> ConfigSource {
        ConfigSource::with_env(path, crate::config::process_env)
    }

    /// The file (if any) and the variables `env` gives (a map in tests).
    pub fn with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> ConfigSource {
        ConfigSource {
            path: path.map(Path::to_owned),
            env: Box::new(env),
        }
    }

    /// Reads and validates the configuration.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::from_sources(self.path.as_deref(), &self.env)
    }
}

/// A running gate.
pub struct Running {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    /// Stops the listener (and spool delivery) to start the drain.
    stop: watch::Sender<bool>,
    /// Stops the admin listener once the drain is over.
    stop_admin: watch::Sender<bool>,
    task: JoinHandle<()>,
    delivery: Option<JoinHandle<()>>,
}

/// Binds the listeners, opens the spool, starts spool delivery and starts serving.
pub async fn start(generation: Generation) -> Result<Running, Error> {
    let config = generation.config();
    let addr = config.server.listen;
    let bind_err = |addr| move |source| Error::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err(addr))?;
    let local_addr = listener.local_addr().map_err(bind_err(addr))?;
    let admin = match config.admin {
        None => None,
        Some(a) => Some(TcpListener::bind(a).await.map_err(bind_err(a))?),
    };
    let metrics = Arc::new(Metrics::new());
    metrics.set_certificates(config);
    let spool = match config.spool.clone() {
        None => None,
        Some(settings) => Some(Spool::connect(settings).await?),
    };
    let shared = Arc::new(Shared::new(generation, metrics, spool));
    let (stop, stopped) = watch::channel(false);
    let (stop_admin, admin_stopped) = watch::channel(false);
    let delivery = shared.spool.as_ref().map(|spool| {
        let deliver = SpoolDelivery::new(
            delivery_targets(Arc::downgrade(&shared)),
            shared.metrics.clone(),
            spool.settings().dead_letter_4xx,
        );
        spool.start_delivery(Arc::new(deliver), stopped.clone())
    });
    let admin_addr = match admin {
        None => None,
        Some(l) => {
            let a = l.local_addr().map_err(bind_err(addr))?;
            tokio::spawn(admin::serve(l, shared.clone(), admin_stopped));
            info!(listen = %a, "admin listening");
            Some(a)
        }
    };
    tokio::spawn(super::crls::keep_fresh(shared.clone(), stopped.clone()));
    let task = tokio::spawn(listener::serve(listener, shared.clone(), stopped));
    info!(listen = %local_addr, "hubgate listening");
    Ok(Running {
        local_addr,
        admin_addr,
        shared,
        stop,
        stop_admin,
        task,
        delivery,
    })
}

/// Resolves a spooled event's route in the configuration current at each attempt.
fn delivery_targets(
    shared: Weak<Shared>,
) -> impl Fn(&str) -> Result<Target, String> + Send + Sync + 'static {
    move |route| {
        // Weak: the spool (inside `Shared`) owns the delivery task that owns this.
        let shared = shared.upgrade().ok_or("shutting down")?;
        let generation = shared.current();
        let state = generation
            .routes
            .get(route)
            .ok_or_else(|| format!("route {route} is not configured"))?;
        Ok(Target {
            upstream: generation.upstream.clone(),
            uri: state.route.upstream.clone(),
            label: state.label.clone(),
        })
    }
}

impl Running {
    /// The address the TLS listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The process's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Swaps in a new configuration: new connections get it, open ones finish on the old one.
    /// On error nothing changes. Settings that need a new socket or are sized at start
    /// (`server.listen`, `admin.listen`, `server.max_connections`, …) keep their old values,
    /// with a warning.
    pub fn reload(&self, config: Config) -> Result<(), Error> {
        let result = self.prepare(config);
        self.shared.metrics.reload(result.is_ok());
        let generation = result?;
        let old = &self.shared.started_with;
        let new = generation.config();
        let fixed = [
            ("server.listen", new.server.listen != old.server.listen),
            ("admin.listen", new.admin != old.admin),
            ("[admin] inspector settings", new.inspector != old.inspector),
            (
                "server.max_connections",
                new.server.max_connections != old.server.max_connections,
            ),
            (
                "server.max_buffered_bytes",
                new.server.max_buffered_bytes != old.server.max_buffered_bytes,
            ),
            ("[spool] settings", new.spool != old.spool),
            ("[dedupe] sync settings", new.sync_dedupe != old.sync_dedupe),
        ];
        for (key, _) in fixed.iter().filter(|(_, changed)| *changed) {
            warn!("{key} changed: it takes effect only on restart; the running value stays");
        }
        self.shared.metrics.set_certificates(new);
        let routes = new.routes.len();
        self.shared.current.store(Arc::new(generation));
        self.shared.reloaded.notify_one();
        info!(routes, "configuration reloaded");
        Ok(())
    }

    /// Builds the generation a reload would swap in, refusing changes that need a restart.
    fn prepare(&self, config: Config) -> Result<Generation, Error> {
        // Lists fetched from crl_urls stay in force across reloads (the fetcher replaces them).
        let config = super::crls::with_fetched(config, &self.shared.fetched_crls());
        let generation = Generation::new(config)?;
        let config = generation.config();
        let open = self.shared.spool.as_ref().map(Spool::settings);
        let same = match (open, config.spool.as_ref()) {
            (None, None) => true,
            (Some(open), Some(wanted)) => open.same_store(wanted),
            _ => false,
        };
        if !same {
            return Err(ReloadError::SpoolChanged.into());
        }
        let budget = self.shared.started_with.server.max_buffered_bytes;
        if config.server.max_body_bytes as u64 > budget {
            return Err(ReloadError::BodyOverBudget(budget).into());
        }
        Ok(generation)
    }

    /// Reads the configuration from `source` again and reloads it, logging its warnings; a
    /// configuration that fails to load or build leaves the last good one in force (and is
    /// counted as a failed reload).
    pub fn reload_from(&self, source: &ConfigSource) -> Result<(), Error> {
        let config = source
            .load()
            .inspect_err(|_| self.shared.metrics.reload(false))?;
        for w in config.warnings(unix_now()) {
            warn!("{w}");
        }
        self.reload(config)
    }

    /// Serves until SIGTERM or SIGINT. SIGHUP reloads from `source` and never exits.
    pub async fn serve_until_signalled(&self, source: &ConfigSource) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: draining and shutting down"); return Ok(()) }
                _ = int.recv() => { info!("SIGINT: draining and shutting down"); return Ok(()) }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading the configuration");
                    if let Err(e) = self.reload_from(source) {
                        error!("reload failed, the last good configuration stays in force: {e}");
                    }
                }
            }
        }
    }

    /// Drains and stops: `/readyz` answers 503 `draining` at once; the listener stops
    /// accepting and lets in-flight requests finish within the drain deadline; spool
    /// deliveries finish (or stay pending); then the admin listener stops and the spool closes.
    pub async fn shutdown(self) {
        self.shared.start_draining();
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Some(delivery) = self.delivery {
            let _ = delivery.await;
        }
        let _ = self.stop_admin.send(true);
        if let Some(spool) = &self.shared.spool {
            spool.close().await;
        }
    }

    /// Waits until the server stops (it only stops through `shutdown`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
