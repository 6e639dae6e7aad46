//! rookery-bench: load for any XMPP server, measured against the server process.
//!
//! Scenarios log in many accounts (`<prefix>1` .. `<prefix>N` with one password),
//! spreading connections over loopback source addresses, and report what the
//! clients saw and what the server process spent (memory, CPU) from /proc.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::sync::Semaphore;

use rookery_bench::client::{Connection, Target, TlsMode, Transport};
use rookery_bench::process;

mod scenarios;

use scenarios::chat::Placement;

/// Load generator for XMPP servers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Server address; several (comma-separated) for the nodes of a cluster:
    /// account n connects to the ((n-1) mod count)-th.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:5222")]
    server: Vec<SocketAddr>,
    /// XMPP domain of the accounts.
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Transport security; with --websocket, `direct` is wss:// and `none` ws://.
    #[arg(long, value_enum, default_value = "starttls")]
    tls: TlsMode,
    /// Speak XMPP over WebSocket (RFC 7395) at this path of the server's
    /// HTTP address (e.g. /xmpp-websocket) instead of an XML stream over TCP.
    #[arg(long, value_name = "PATH")]
    websocket: Option<String>,
    /// SASL mechanism.
    #[arg(long, default_value = "SCRAM-SHA-256")]
    mechanism: String,
    /// Accounts are <prefix>1 .. <prefix>N.
    #[arg(long, default_value = "bench")]
    user_prefix: String,
    /// Password of every bench account.
    #[arg(long, default_value = "secret")]
    password: String,
    /// Spread connections over 127.0.0.1 .. 127.0.0.<n> (loopback targets only).
    #[arg(long, default_value_t = 16)]
    source_ips: u8,
    /// The server processes to measure (default: those listening on the server ports).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Also write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The fault checker: starts a cluster of its own (Rookery nodes, NATS,
    /// PostgreSQL on loopback), chats with stream management across it and
    /// injects faults drawn from a seed; reports lost, duplicated and
    /// reordered messages. Needs no --server.
    Check {
        /// The rookery binary (default: beside this one).
        #[arg(long)]
        rookery: Option<PathBuf>,
        /// The schedule's seed (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds of faults (at least one round of every kind).
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Rookery nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// NATS servers: 1 or 3.
        #[arg(long, default_value_t = 1)]
        nats: usize,
        /// Chat users.
        #[arg(long, default_value_t = 60)]
        users: usize,
        /// Messages per second, all users together.
        #[arg(long, default_value_t = 60.0)]
        rate: f64,
        /// Kinds of fault (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<rookery_bench::check::FaultKind>,
        /// The nodes' failure timeout, seconds.
        #[arg(long, default_value_t = 2.0)]
        failure_timeout: f64,
        /// Where the run keeps its processes' files and logs.
        #[arg(long, default_value = "target/check")]
        folder: PathBuf,
        /// Keep the folder after the run.
        #[arg(long)]
        keep: bool,
    },
    /// Print "user password" lines for the accounts, for `rookery user import`.
    Accounts {
        /// Number of accounts.
        #[arg(long)]
        users: usize,
    },
    /// Ramp to N authenticated sessions (roster fetched, presence sent), hold them idle.
    Connections {
        /// Sessions to open.
        #[arg(long)]
        users: usize,
        /// Logins in flight at once.
        #[arg(long, default_value_t = 100)]
        concurrency: usize,
        /// Seconds to hold the sessions after the ramp.
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// M online users send 1:1 messages to random others at a fixed aggregate rate.
    Chat {
        #[command(flatten)]
        load: Load,
        /// With several servers: whom a user writes to.
        #[arg(long, value_enum, default_value = "any")]
        placement: Placement,
        /// Step the rate up from --rate until p99 exceeds --max-p99-ms or a
        /// message is lost, then narrow the gap between the last pass and
        /// the first failure; report the highest sustained rate.
        #[arg(long)]
        find_max: bool,
        /// Latency bound of --find-max, in milliseconds.
        #[arg(long, default_value_t = 100.0)]
        max_p99_ms: f64,
        /// Rate factor between --find-max steps.
        #[arg(long, default_value_t = 1.25)]
        step_factor: f64,
        /// Most --find-max steps up.
        #[arg(long, default_value_t = 20)]
        max_steps: usize,
        /// --find-max steps after the first failure, each halfway between
        /// the highest passing rate and the lowest failing one.
        #[arg(long, default_value_t = 3)]
        refine_steps: usize,
    },
    /// Create the accounts by in-band registration (XEP-0077).
    Register {
        /// Number of accounts.
        #[arg(long)]
        users: usize,
        /// Registrations in flight at once.
        #[arg(long, default_value_t = 20)]
        concurrency: usize,
    },
    /// Users with rosters of R contacts (half of them online) change presence;
    /// fan-out rate and latency. Sets the rosters up on first use.
    Presence {
        /// Accounts (the odd-numbered half goes online).
        #[arg(long)]
        users: usize,
        /// Contacts per roster (a multiple of 4).
        #[arg(long, default_value_t = 20)]
        contacts: usize,
        /// Presence changes per second, all online users together.
        #[arg(long)]
        rate: u64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Most seconds the first run may take to subscribe the rosters (a
        /// single-threaded server on SQLite may need minutes for thousands).
        #[arg(long, default_value_t = 900)]
        setup_timeout: u64,
    },
    /// Full logins (connect, TLS, SASL, bind, close) as fast as the server takes them.
    LoginStorm {
        /// Accounts to log in as, in turn.
        #[arg(long)]
        users: usize,
        /// Logins in all.
        #[arg(long)]
        logins: usize,
        /// Logins in flight at once.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Stop after this many seconds even if not all logins are done.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
    /// This machine's latency floor for `chat`: frames paced and timed as
    /// `chat` messages, between plain TCP connections through a bare relay
    /// process (no TLS, XML or routing). No server is involved: a server's
    /// `chat` latency at the same rate cannot be lower.
    Floor {
        #[command(flatten)]
        load: Load,
        /// Run the relay on these CPUs (a `taskset -c` list, such as the one
        /// a server is confined to) rather than on the bench's.
        #[arg(long, value_name = "LIST")]
        relay_cpus: Option<String>,
    },
    /// Hours of mixed load on many sessions: 1:1 chat, presence changes and
    /// reconnections, with the server's memory, CPU and open files sampled;
    /// the memory trend over the second half, and every message accounted for.
    Soak {
        #[command(flatten)]
        load: scenarios::soak::SoakLoad,
    },
    /// Normal clients chat, quietly and then while attackers from other
    /// addresses send endless headers and tags, read nothing, flood and hold
    /// half-open connections; the normal clients' p99 and loss in both runs.
    Abuse {
        #[command(flatten)]
        load: scenarios::abuse::AbuseLoad,
    },
    /// The relay process of `floor` (started by it).
    #[command(hide = true)]
    FloorRelay {
        /// Connections to wait for.
        #[arg(long)]
        connections: usize,
    },
    /// Pairs of users on the first and second server see each other's
    /// presence; the first server's process is killed (SIGKILL) and the time
    /// until the second server's users see their contacts go unavailable is
    /// measured. For clusters; the killed node is not restarted.
    Failover {
        /// Pairs of users (accounts 1 .. 2 x pairs).
        #[arg(long)]
        pairs: usize,
        /// How long to wait for the unavailable presences, in seconds.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

/// The paced load of `chat` and `floor`.
#[derive(Debug, Clone, Copy, clap::Args)]
struct Load {
    /// Online users (connections), each sending to random others.
    #[arg(long)]
    users: usize,
    /// Messages per second, all users together.
    #[arg(long)]
    rate: u64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

/// How account `n` (from 1) reaches its server.
fn target(cli: &Cli, n: usize) -> Target {
    let server = cli.server[(n - 1) % cli.server.len()];
    let sources = if server.ip().is_loopback() && server.is_ipv4() && cli.source_ips > 1 {
        (1..=cli.source_ips)
            .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
            .collect()
    } else {
        Vec::new()
    };
    Target {
        address: server,
        domain: cli.domain.clone(),
        tls: cli.tls,
        transport: match &cli.websocket {
            Some(path) => Transport::WebSocket { path: path.clone() },
            None => Transport::Tcp,
        },
        mechanism: cli.mechanism.clone(),
        sources,
        receive_buffer: None,
    }
}

/// The server processes to measure: given, or found by their ports.
fn server_pids(cli: &Cli) -> Vec<u32> {
    if !cli.server_pid.is_empty() {
        return cli.server_pid.clone();
    }
    cli.server
        .iter()
        .filter_map(|server| match process::pid_listening_on(server.port()) {
            Ok(pid) => Some(pid),
            Err(error) => {
                eprintln!("note: server process not found ({error}); no server-side figures");
                None
            }
        })
        .collect()
}

/// `read` of every measured process, summed; `None` without processes or
/// when one cannot be read.
fn sum_over<T: std::iter::Sum>(pids: &[u32], read: fn(u32) -> anyhow::Result<T>) -> Option<T> {
    (!pids.is_empty())
        .then(|| pids.iter().map(|pid| read(*pid).ok()).sum())
        .flatten()
}

/// Resident memory of every measured process together, in KiB.
fn rss_kib(pids: &[u32]) -> Option<u64> {
    sum_over(pids, process::rss_kib)
}

/// Open files of every measured process together.
fn open_files(pids: &[u32]) -> Option<usize> {
    sum_over(pids, process::open_files)
}

/// The CPU time (user and system) spent over a measurement window by the
/// measured servers and by the bench itself (it shares the machine).
struct CpuWindow {
    pids: Vec<u32>,
    servers: Option<f64>,
    bench: Option<f64>,
}

impl CpuWindow {
    /// Opens the window now.
    fn start(pids: &[u32]) -> CpuWindow {
        CpuWindow {
            pids: pids.to_vec(),
            servers: sum_over(pids, process::cpu_seconds),
            bench: process::cpu_seconds(std::process::id()).ok(),
        }
    }

    /// Whether the servers' CPU could be read at the start.
    fn measures_servers(&self) -> bool {
        self.servers.is_some()
    }

    /// Seconds spent since the start: (servers, bench).
    fn spent(&self) -> (Option<f64>, Option<f64>) {
        let since = |before: Option<f64>, now: Option<f64>| before.zip(now).map(|(b, n)| n - b);
        (
            since(self.servers, sum_over(&self.pids, process::cpu_seconds)),
            since(self.bench, process::cpu_seconds(std::process::id()).ok()),
        )
    }
}

/// `seconds` per unit of work in `scale` (1e6 for µs, 1e3 for ms); `None`
/// when nothing was done or nothing measured.
fn per_unit(seconds: Option<f64>, units: u64, scale: f64) -> Option<f64> {
    seconds
        .filter(|_| units > 0)
        .map(|seconds| seconds * scale / units as f64)
}

fn emit<T: Serialize + std::fmt::Debug>(cli: &Cli, report: &T) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = &cli.json {
        std::fs::write(path, &json)?;
    }
    println!("{json}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.websocket.is_some() && cli.tls == TlsMode::Starttls {
        anyhow::bail!(
            "WebSocket has no STARTTLS: give --tls direct (wss://) or --tls none (ws://)"
        );
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match &cli.scenario {
        Scenario::Accounts { users } => {
            for n in 1..=*users {
                println!("{}{n} {}", cli.user_prefix, cli.password);
            }
            Ok(())
        }
        Scenario::Connections {
            users,
            concurrency,
            hold,
        } => scenarios::connections::connections(&cli, *users, *concurrency, *hold).await,
        Scenario::Chat {
            load,
            placement,
            find_max,
            max_p99_ms,
            step_factor,
            max_steps,
            refine_steps,
        } => {
            let search = find_max.then_some(scenarios::chat::Search {
                max_p99_ms: *max_p99_ms,
                factor: *step_factor,
                steps: *max_steps,
                refine: *refine_steps,
            });
            scenarios::chat::chat(&cli, load, *placement, search).await
        }
        Scenario::Presence {
            users,
            contacts,
            rate,
            duration,
            setup_timeout,
        } => {
            let setup_timeout = Duration::from_secs(*setup_timeout);
            scenarios::presence::presence(&cli, *users, *contacts, *rate, *duration, setup_timeout)
                .await
        }
        Scenario::Register { users, concurrency } => {
            scenarios::register::register(&cli, *users, *concurrency).await
        }
        Scenario::LoginStorm {
            users,
            logins,
            concurrency,
            duration,
        } => {
            scenarios::login_storm::login_storm(&cli, *users, *logins, *concurrency, *duration)
                .await
        }
        Scenario::Floor { load, relay_cpus } => {
            scenarios::floor::floor(&cli, load, relay_cpus.as_deref()).await
        }
        Scenario::FloorRelay { connections } => scenarios::floor::relay(*connections).await,
        Scenario::Soak { load } => scenarios::soak::soak(&cli, load).await,
        Scenario::Abuse { load } => scenarios::abuse::abuse(&cli, load).await,
        Scenario::Failover { pairs, wait } => {
            scenarios::failover::failover(&cli, *pairs, *wait).await
        }
        Scenario::Check {
            rookery,
            seed,
            duration,
            nodes,
            nats,
            users,
            rate,
            faults,
            failure_timeout,
            folder,
            keep,
        } => {
            let rookery = match rookery {
                Some(path) => path.clone(),
                None => std::env::current_exe()?.with_file_name("rookery"),
            };
            let seed = seed.unwrap_or_else(rand::random);
            eprintln!("check: seed {seed}");
            let settings = rookery_bench::check::CheckSettings {
                rookery,
                folder: folder.clone(),
                keep: *keep,
                seed,
                nodes: *nodes,
                nats: *nats,
                users: *users,
                rate: *rate,
                duration: Duration::from_secs(*duration),
                faults: if faults.is_empty() {
                    rookery_bench::check::FaultKind::ALL.to_vec()
                } else {
                    faults.clone()
                },
                failure_timeout: *failure_timeout,
                shutdown_grace: 5,
                settle: Duration::from_secs(120),
            };
            let report = rookery_bench::check::run(&settings).await?;
            emit(&cli, &report)?;
            eprintln!(
                "check: seed {seed}: {} faults; {}; of the lost, with a lone NATS server's store {}; inversions away from faults {}; {}",
                report.faults.len(),
                report.chat,
                report.lost_with_nats_store,
                report.inversions_away_from_faults,
                if report.passed() { "passed" } else { "FAILED" }
            );
            anyhow::ensure!(report.passed(), "the check failed (seed {seed})");
            Ok(())
        }
    }
}

/// Logs in accounts 1 ..= `users`, `concurrency` at a time, each going
/// online (roster fetched, initial presence sent); the connections, the
/// failures and the time taken.
async fn login_all(
    cli: &Cli,
    users: usize,
    concurrency: usize,
) -> (Vec<Connection>, usize, Duration) {
    let numbers: Vec<usize> = (1..=users).collect();
    let (connections, failures, elapsed) = log_in(cli, &numbers, concurrency, true).await;
    let connections = connections.into_iter().map(|(_, c)| c).collect();
    (connections, failures, elapsed)
}

/// Logs in the accounts `numbers`, `concurrency` at a time; with
/// `go_online`, each also fetches its roster and sends initial presence.
/// The connections with their account numbers, the failures and the time taken.
async fn log_in(
    cli: &Cli,
    numbers: &[usize],
    concurrency: usize,
    go_online: bool,
) -> (Vec<(usize, Connection)>, usize, Duration) {
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let tasks: Vec<_> = numbers
        .iter()
        .map(|&n| {
            let (target, semaphore) = (target(cli, n), semaphore.clone());
            let (user, password) = (format!("{}{n}", cli.user_prefix), cli.password.clone());
            tokio::spawn(async move {
                let _permit = semaphore.acquire().await.expect("open");
                let mut connection =
                    Connection::login(&target, n, &user, &password, "bench").await?;
                if go_online {
                    connection.go_online().await?;
                }
                anyhow::Ok((n, connection))
            })
        })
        .collect();
    let mut connections = Vec::with_capacity(numbers.len());
    let mut failures = 0;
    for task in tasks {
        match task.await {
            Ok(Ok(connection)) => connections.push(connection),
            Ok(Err(error)) => {
                if failures < 5 {
                    eprintln!("login failed: {error:#}");
                }
                failures += 1;
            }
            Err(_) => failures += 1,
        }
    }
    (connections, failures, started.elapsed())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}
