//! The `hubgate` command: parses the command line, sets up logging, installs the crypto
//! provider, and hands over to the library. Exit codes: 0 success, 1 runtime failure,
//! 2 configuration error.

// One unsafe call, to the allocator (`return_freed_memory`); the library forbids unsafe code.
#![deny(unsafe_code)]

mod demo;
mod spool_cli;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use hubgate::config::ClientAuthMode;
use hubgate::gate::signature::Signer;
use hubgate::ConfigSource;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "hubgate",
    version,
    about = "Admit only genuine Meta webhook traffic to your application"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "HUBGATE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gate (configuration: the file, then HUBGATE_* variables on top).
    Run {
        /// The configuration file; optional when HUBGATE_* variables configure everything.
        #[arg(long, env = "HUBGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate everything `run` would load, print a summary, exit non-zero on error.
    Check {
        #[arg(long, env = "HUBGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Sign a body read from stdin: prints the X-Hub-Signature-256 value ("sha256=<hex>").
    Sign {
        /// The app secret.
        #[arg(long, env = "HUBGATE_SIGN_SECRET")]
        secret: String,
    },
    /// Inspect and repair the durable spool (safe while the gate runs).
    Spool(spool_cli::SpoolArgs),
    /// Probe a running gate's admin endpoint (for container health checks): exit 0 on 200.
    Health {
        /// The URL to probe; by default /readyz on HUBGATE_ADMIN_LISTEN or 127.0.0.1:9901.
        #[arg(long)]
        url: Option<String>,
    },
    /// Play Meta against a throwaway gate on 127.0.0.1 (the default without a config).
    Demo {
        /// Loopback address for the demo gate.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Run the self-test and exit instead of serving until Ctrl-C.
        #[arg(long)]
        exit_after_selftest: bool,
    },
}

/// mimalloc instead of glibc's malloc: measured on the benchmark's keep-alive and idle-connection
/// scenarios, fewer CPU cycles per request and less memory per connection (README, Performance).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = init_logging(cli.log_format);
    // A gate holds one descriptor per connection: lift the soft limit to the hard one.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        warn!("cannot raise the open-file limit: {e}");
    }
    // One crypto provider for the whole process; the library also passes it explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let command = cli.command.unwrap_or_else(|| {
        let config = env("HUBGATE_CONFIG").map(PathBuf::from);
        if config.is_some() || hubgate::config::env_configured(&env) {
            Command::Run { config }
        } else {
            Command::Demo {
                listen: "127.0.0.1:8443".parse().expect("valid address"),
                exit_after_selftest: false,
            }
        }
    });
    let code = match command {
        Command::Sign { secret } => sign(&secret),
        Command::Check { config } => check(config.as_deref()),
        Command::Health { url } => runtime().block_on(health(url)),
        Command::Spool(args) => spool_cli::run(args, &env),
        Command::Run { config } => runtime().block_on(run(config.as_deref())),
        Command::Demo {
            listen,
            exit_after_selftest,
        } => match runtime().block_on(demo::run(listen, exit_after_selftest)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("demo failed: {e:#}");
                ExitCode::FAILURE
            }
        },
    };
    logging.finish();
    code
}

/// The log output (hubgate::logging): every line goes into one buffer that a thread of its own
/// writes to stderr in batches, so a slow terminal, pipe or disk never blocks a request; when
/// the buffer is full, lines are dropped and counted.
struct Logging {
    /// Writes what is buffered when dropped.
    guard: hubgate::logging::LogGuard,
    buffer: hubgate::logging::LogBuffer,
}

impl Logging {
    /// Writes what is buffered, and says how many lines were dropped, if any.
    fn finish(self) {
        let dropped = self.buffer.dropped();
        drop(self.guard);
        if dropped > 0 {
            eprintln!(
                "hubgate: {dropped} log line(s) were dropped: the log writer could not keep up"
            );
        }
    }
}

fn init_logging(format: LogFormat) -> Logging {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a terminal, and never when NO_COLOR is set non-empty (https://no-color.org):
    // a log file or pipe gets plain text.
    let ansi = std::io::stderr().is_terminal() && env("NO_COLOR").is_none_or(|v| v.is_empty());
    let (buffer, guard) = hubgate::logging::LogBuffer::start(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(buffer.clone());
    let format = match format {
        LogFormat::Text => {
            builder.init();
            hubgate::logging::Format::Text
        }
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            hubgate::logging::Format::Json
        }
    };
    // Access lines skip tracing's formatter; the filter still decides whether there are any.
    let access = tracing::enabled!(target: "hubgate::access", tracing::Level::INFO);
    hubgate::logging::install(buffer.clone(), format, access);
    Logging { guard, buffer }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_freed_memory)
        .build()
        .expect("cannot start the async runtime")
}

/// Called by each runtime thread as it runs out of work: at most once a second, freed memory
/// goes back to the operating system.
///
/// Both allocators in the process keep what they free: mimalloc (Rust's allocations) purges
/// freed pages only when the thread that owns them calls into it again, and glibc's malloc (the
/// C code: aws-lc's keys and handshakes, SQLite) keeps them in its per-thread arenas. A gate that
/// goes quiet after a burst (a storm of handshakes, parked connections giving back hyper's
/// buffers) would otherwise hold its peak until the next burst. Measured (README, Performance):
/// 1,000 parked mTLS connections 28 MiB instead of up to 36; after the 10,000-connection soak,
/// RSS back to within a few MiB of its baseline. Cheap when busy: one clock read per park, one
/// collection per second per thread.
fn return_freed_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    if LAST
        .get()
        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
    {
        return;
    }
    LAST.set(Some(now));
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time;
    // `false`: only memory free for longer than mimalloc's purge delay (1 s) is returned.
    #[cfg(feature = "mimalloc")]
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(false)
    };
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena in turn).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0)
    };
}

fn sign(secret: &str) -> ExitCode {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        eprintln!("hubgate sign: cannot read stdin: {e}");
        return ExitCode::FAILURE;
    }
    let signer = Signer::new(&[hubgate::config::Secret::new(secret)], false);
    println!("{}", signer.sign(&body));
    ExitCode::SUCCESS
}

/// Loads and validates the config and builds what `run` would build. Returns it with warnings.
fn load(source: &ConfigSource) -> Result<(hubgate::Generation, Vec<String>), ExitCode> {
    let config = source.load().map_err(|e| {
        eprintln!("config error: {e}");
        ExitCode::from(2)
    })?;
    let warnings = config.warnings(hubgate::unix_now());
    let file = config.source.clone();
    let generation = hubgate::Generation::new(config).map_err(|e| {
        eprintln!("config error: {file}: {e}");
        ExitCode::from(2)
    })?;
    Ok((generation, warnings))
}

/// The configuration source of `check` and `run`, or exit code 2 when nothing configures hubgate.
fn source(path: Option<&Path>) -> Result<ConfigSource, ExitCode> {
    if path.is_none() && !hubgate::config::env_configured(&env) {
        eprintln!("config error: no configuration: give --config FILE, set HUBGATE_CONFIG, or set HUBGATE_* variables (see README.md)");
        return Err(ExitCode::from(2));
    }
    Ok(ConfigSource::process(path))
}

/// GETs the admin URL once, with a short deadline; 0 on 200, 1 otherwise.
async fn health(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let admin = env("HUBGATE_ADMIN_LISTEN").unwrap_or_else(|| "127.0.0.1:9901".into());
        let admin = admin
            .replace("0.0.0.0", "127.0.0.1")
            .replace("[::]", "[::1]");
        format!("http://{admin}/readyz")
    });
    match tokio::time::timeout(std::time::Duration::from_secs(3), probe(&url)).await {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("{url}: {status}");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("{url}: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{url}: no answer within 3 s");
            ExitCode::FAILURE
        }
    }
}

async fn probe(url: &str) -> anyhow::Result<u16> {
    use http_body_util::Empty;
    let uri: http::Uri = url.parse()?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow::anyhow!("no host in {url}"))?
        .clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path())
        .header(http::header::HOST, authority.as_str())
        .body(Empty::<bytes::Bytes>::new())?;
    Ok(sender.send_request(req).await?.status().as_u16())
}

/// The process environment, as the configuration reads it.
fn env(name: &str) -> Option<String> {
    hubgate::config::process_env(name)
}

fn check(path: Option<&Path>) -> ExitCode {
    let (generation, warnings) = match source(path).and_then(|s| load(&s)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let config = generation.config();
    println!("{}: OK", config.source);
    println!("  listen          {}", config.server.listen);
    if let Some(info) = config
        .server
        .cert_chain
        .first()
        .and_then(hubgate::pki::CertInfo::parse)
    {
        println!(
            "  server cert     {} (expires {})",
            info.subject, info.not_after_text
        );
    }
    println!("  max body        {} bytes", config.server.max_body_bytes);
    println!("  client auth     {}", config.client_auth.mode);
    for a in &config.client_auth.anchors {
        println!(
            "    anchor        {} [{}] sha256 {} expires {}",
            a.subject,
            a.path.display(),
            a.sha256,
            a.not_after_text
        );
    }
    if config.client_auth.mode != ClientAuthMode::Off {
        println!("    allowed CN    {:?}", config.client_auth.allowed_cn);
    }
    println!("  upstream        timeout {:?}", config.upstream.timeout);
    if let Some(spool) = &config.spool {
        println!(
            "  spool           {} (dedupe window {}, retry horizon {})",
            spool.location(),
            humantime::format_duration(spool.dedupe_window),
            humantime::format_duration(spool.retry_horizon)
        );
    }
    if let Some(admin) = config.admin {
        println!("  admin           http://{admin} (/healthz /readyz /metrics)");
    }
    for r in &config.routes {
        println!(
            "  route           {} -> {}  ({}, client cert {}, {} secret(s){})",
            r.path,
            r.upstream,
            match r.delivery {
                hubgate::config::Delivery::Sync => "sync",
                hubgate::config::Delivery::Spool => "spool",
            },
            match r.client_cert {
                hubgate::config::RouteClientCert::Required => "required",
                hubgate::config::RouteClientCert::None => "none",
            },
            r.app_secrets.len(),
            if r.legacy_sha1 {
                ", legacy sha1 accepted"
            } else {
                ""
            }
        );
    }
    for w in &warnings {
        println!("WARNING: {w}");
    }
    ExitCode::SUCCESS
}

async fn run(path: Option<&Path>) -> ExitCode {
    let source = match source(path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let (generation, warnings) = match load(&source) {
        Ok(v) => v,
        Err(code) => return code,
    };
    for w in &warnings {
        warn!("{w}");
        eprintln!("WARNING: {w}");
    }
    let config = generation.config();
    info!(config = %config.source, routes = config.routes.len(), client_auth = %config.client_auth.mode, "starting");
    // A runtime thread passes through `return_freed_memory` when it runs out of work; this
    // wakes one once a second, so that a gate gone quiet (every connection parked, nothing
    // else due for minutes) still gives back what its last connections freed.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
        }
    });
    let running = match hubgate::ops::lifecycle::start(generation).await {
        Ok(r) => r,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = running.serve_until_signalled(&source).await {
        error!("cannot handle signals: {e}");
    }
    running.shutdown().await;
    info!("stopped");
    ExitCode::SUCCESS
}
