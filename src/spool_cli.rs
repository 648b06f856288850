//! `hubgate spool …`: inspect and repair a spool, safe while gates run on it (SQLite WAL lets
//! readers and one writer side by side; PostgreSQL is shared by design), and `migrate` the
//! PostgreSQL schema ahead of time. Output for people, or `--json` for scripts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use hubgate::spool::{EventInfo, EventState, ListFilter, ReplayTarget, SpoolSettings};
use serde_json::{json, Value};

/// The options are global: accepted before or after the subcommand (`hubgate spool summary
/// --config F` and `hubgate spool --config F summary` are the same).
#[derive(Args)]
pub struct SpoolArgs {
    /// The spool database; by default `[spool] path` of the configuration.
    #[arg(long, global = true)]
    path: Option<PathBuf>,
    /// The configuration file to take the spool path from (also HUBGATE_CONFIG).
    #[arg(long, global = true, env = "HUBGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable output: one JSON document.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SpoolCommand,
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Pending, in-flight and dead events and the oldest undelivered age, per route.
    Summary,
    /// Events, oldest first.
    List {
        #[arg(long)]
        route: Option<String>,
        /// pending, in_flight or dead.
        #[arg(long)]
        state: Option<String>,
        /// Only events with a greater id (paging).
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One event with its headers and body.
    Show { id: i64 },
    /// Make dead events pending again: one by id, or all (of a route).
    Replay {
        id: Option<i64>,
        #[arg(long, conflicts_with = "id")]
        all_dead: bool,
        #[arg(long, requires = "all_dead")]
        route: Option<String>,
    },
    /// Apply the PostgreSQL schema migrations this hubgate knows (for roles that may not
    /// create tables while serving); a gate otherwise applies them at start.
    Migrate,
    /// Delete dead events older than a duration (e.g. 7d).
    Purge {
        #[arg(long)]
        older_than: String,
        #[arg(long)]
        route: Option<String>,
    },
}

pub fn run(args: SpoolArgs, env: &dyn Fn(&str) -> Option<String>) -> ExitCode {
    let settings = match spool_settings(&args, env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hubgate spool: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    let where_ = settings.location();
    match runtime.block_on(execute(settings, args.command, args.json)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubgate spool: {where_}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--path` (a SQLite spool), or the configuration's `[spool]`.
fn spool_settings(
    args: &SpoolArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SpoolSettings, String> {
    if let Some(p) = &args.path {
        return Ok(SpoolSettings::new(p.clone()));
    }
    let config =
        hubgate::Config::from_sources(args.config.as_deref(), env).map_err(|e| e.to_string())?;
    config.spool.ok_or_else(|| {
        format!(
            "{}: no [spool] is configured (or give --path)",
            config.source
        )
    })
}

async fn execute(
    settings: SpoolSettings,
    command: SpoolCommand,
    as_json: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    if let SpoolCommand::Migrate = command {
        let (found, now) = hubgate::spool::migrate(&settings).await?;
        if as_json {
            print_json(&json!({ "found": found, "version": now }));
        } else if found == now {
            println!("schema version {now}: up to date");
        } else {
            println!("schema migrated from version {found} to {now}");
        }
        return Ok(());
    }
    let ops = hubgate::spool::operations(settings).await?;
    let now = SystemTime::now();
    match command {
        SpoolCommand::Migrate => unreachable!("handled above"),
        SpoolCommand::Summary => {
            let s = ops.summary().await?;
            if as_json {
                let routes: Vec<Value> = s
                    .routes
                    .iter()
                    .map(|r| {
                        json!({
                            "route": r.route, "pending": r.pending, "in_flight": r.in_flight, "dead": r.dead,
                            "oldest_undelivered_age_seconds": r.oldest_undelivered.map(|t| age(now, t)),
                            "oldest_dead_age_seconds": r.oldest_dead.map(|t| age(now, t)),
                        })
                    })
                    .collect();
                print_json(&json!({ "routes": routes, "dedupe_keys": s.dedupe_keys }));
            } else {
                println!(
                    "{:<24} {:>9} {:>9} {:>9}  oldest undelivered",
                    "route", "pending", "in_flight", "dead"
                );
                for r in &s.routes {
                    let oldest = r
                        .oldest_undelivered
                        .map(|t| human_age(now, t))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {:>9} {:>9} {:>9}  {oldest}",
                        r.route, r.pending, r.in_flight, r.dead
                    );
                }
                if s.routes.is_empty() {
                    println!("(no events)");
                }
                println!("dedupe keys: {}", s.dedupe_keys);
            }
        }
        SpoolCommand::List {
            route,
            state,
            after,
            limit,
        } => {
            let state = state.map(|s| parse_state(&s)).transpose()?;
            let events = ops
                .list(ListFilter {
                    route,
                    state,
                    after_id: after,
                    limit,
                })
                .await?;
            if as_json {
                print_json(&Value::Array(
                    events.iter().map(|e| info_json(e, now)).collect(),
                ));
            } else {
                println!(
                    "{:>8}  {:<20} {:<9} {:>8} {:>9}  {:<10} last error",
                    "id", "route", "state", "attempts", "bytes", "age"
                );
                for e in &events {
                    println!(
                        "{:>8}  {:<20} {:<9} {:>8} {:>9}  {:<10} {}",
                        e.id,
                        e.route,
                        e.state.as_str(),
                        e.attempts,
                        e.body_len,
                        human_age(now, e.received_at),
                        e.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        SpoolCommand::Show { id } => {
            let d = ops.show(id).await?;
            if as_json {
                let mut v = info_json(&d.info, now);
                v["query"] = json!(d.query);
                v["headers"] = Value::Array(
                    d.headers
                        .iter()
                        .map(|(n, val)| {
                            json!([n.as_str(), String::from_utf8_lossy(val.as_bytes())])
                        })
                        .collect(),
                );
                v["body"] = json!(String::from_utf8_lossy(&d.body));
                print_json(&v);
            } else {
                let i = &d.info;
                println!("id:        {}", i.id);
                println!("route:     {}", i.route);
                println!("state:     {} ({} attempts)", i.state.as_str(), i.attempts);
                println!("received:  {} ago", human_age(now, i.received_at));
                println!("client:    {}", i.client_identity.as_deref().unwrap_or("-"));
                println!("error:     {}", i.last_error.as_deref().unwrap_or("-"));
                if let Some(q) = &d.query {
                    println!("query:     {q}");
                }
                println!("headers:");
                for (n, v) in &d.headers {
                    println!("  {n}: {}", String::from_utf8_lossy(v.as_bytes()));
                }
                println!("body ({} bytes):", d.body.len());
                println!("{}", String::from_utf8_lossy(&d.body));
            }
        }
        SpoolCommand::Replay {
            id,
            all_dead,
            route,
        } => {
            let target = match (id, all_dead) {
                (Some(id), false) => ReplayTarget::One(id),
                (None, true) => ReplayTarget::AllDead { route },
                _ => return Err("give an event id or --all-dead".into()),
            };
            let n = ops.replay(target).await?;
            report(as_json, "replayed", n);
        }
        SpoolCommand::Purge { older_than, route } => {
            let d = humantime::parse_duration(&older_than)
                .map_err(|e| format!("--older-than {older_than}: {e}"))?;
            let n = ops.purge_dead(d, route).await?;
            report(as_json, "purged", n);
        }
    }
    Ok(())
}

fn report(as_json: bool, what: &str, n: u64) {
    if as_json {
        print_json(&json!({ what: n }));
    } else {
        println!("{what} {n} event(s)");
    }
}

fn parse_state(s: &str) -> Result<EventState, String> {
    match s {
        "pending" => Ok(EventState::Pending),
        "in_flight" => Ok(EventState::InFlight),
        "dead" => Ok(EventState::Dead),
        _ => Err(format!("--state {s}: one of pending, in_flight, dead")),
    }
}

fn info_json(e: &EventInfo, now: SystemTime) -> Value {
    json!({
        "id": e.id, "route": e.route, "state": e.state.as_str(), "attempts": e.attempts,
        "received_unix": unix(e.received_at), "age_seconds": age(now, e.received_at),
        "next_attempt_unix": unix(e.next_attempt_at), "last_error": e.last_error,
        "client_identity": e.client_identity, "body_bytes": e.body_len,
    })
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialise")
    );
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn age(now: SystemTime, t: SystemTime) -> f64 {
    now.duration_since(t).map_or(0.0, |d| d.as_secs_f64())
}

fn human_age(now: SystemTime, t: SystemTime) -> String {
    let secs = now.duration_since(t).unwrap_or(Duration::ZERO).as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}
