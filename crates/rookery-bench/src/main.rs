//! rookery-bench: load for any XMPP server, measured against the server process.
//!
//! Scenarios log in many accounts (`<prefix>1` .. `<prefix>N` with one password),
//! spreading connections over loopback source addresses, and report what the
//! clients saw and what the server process spent (memory, CPU) from /proc.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::sync::Semaphore;

use rookery_bench::client::{Connection, Target, TlsMode};
use rookery_bench::process;

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
    /// Transport security.
    #[arg(long, value_enum, default_value = "starttls")]
    tls: TlsMode,
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
        /// Online users.
        #[arg(long)]
        users: usize,
        /// Messages per second, all users together.
        #[arg(long)]
        rate: u64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// With several servers: whom a user writes to.
        #[arg(long, value_enum, default_value = "any")]
        placement: Placement,
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

/// Where the recipients of the chat scenario are, relative to their sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
enum Placement {
    /// Anyone.
    Any,
    /// A user on the sender's server.
    Same,
    /// A user on another server.
    Cross,
}

#[derive(Debug, Serialize)]
struct ConnectionsReport {
    scenario: &'static str,
    sessions: usize,
    failures: usize,
    ramp_seconds: f64,
    logins_per_second: f64,
    server_rss_before_kib: Option<u64>,
    server_rss_after_kib: Option<u64>,
    server_kib_per_session: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ChatReport {
    scenario: &'static str,
    servers: usize,
    placement: Placement,
    users: usize,
    target_rate: u64,
    sent: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    achieved_rate: f64,
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
    server_cpu_seconds: Option<f64>,
    server_cpu_us_per_message: Option<f64>,
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
        mechanism: cli.mechanism.clone(),
        sources,
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

/// Resident memory of every measured process together, in KiB.
fn rss_kib(pids: &[u32]) -> Option<u64> {
    (!pids.is_empty())
        .then(|| pids.iter().map(|pid| process::rss_kib(*pid).ok()).sum())
        .flatten()
}

/// CPU time of every measured process together, in seconds.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    (!pids.is_empty())
        .then(|| pids.iter().map(|pid| process::cpu_seconds(*pid).ok()).sum())
        .flatten()
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
        } => connections(&cli, *users, *concurrency, *hold).await,
        Scenario::Chat {
            users,
            rate,
            duration,
            placement,
        } => chat(&cli, *users, *rate, *duration, *placement).await,
        Scenario::Failover { pairs, wait } => failover(&cli, *pairs, *wait).await,
    }
}

async fn login_all(
    cli: &Cli,
    users: usize,
    concurrency: usize,
) -> (Vec<Connection>, usize, Duration) {
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(users);
    for n in 1..=users {
        let (target, semaphore) = (target(cli, n), semaphore.clone());
        let user = format!("{}{n}", cli.user_prefix);
        let password = cli.password.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.expect("open");
            let mut connection = Connection::login(&target, n, &user, &password, "bench").await?;
            connection.go_online().await?;
            anyhow::Ok(connection)
        }));
    }
    let mut connections = Vec::with_capacity(users);
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

async fn connections(cli: &Cli, users: usize, concurrency: usize, hold: u64) -> anyhow::Result<()> {
    let pids = server_pids(cli);
    let before = rss_kib(&pids);
    let (connections, failures, ramp) = login_all(cli, users, concurrency).await;
    // Let the server settle (allocator, pending writes) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(&pids);
    let per_session = match (before, after) {
        (Some(before), Some(after)) if !connections.is_empty() => {
            Some((after as f64 - before as f64) / connections.len() as f64)
        }
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let report = ConnectionsReport {
        scenario: "connections",
        sessions: connections.len(),
        failures,
        ramp_seconds: ramp.as_secs_f64(),
        logins_per_second: connections.len() as f64 / ramp.as_secs_f64(),
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        server_kib_per_session: per_session,
    };
    eprintln!(
        "{} sessions ({} failed) in {:.1} s: {:.0} logins/s; server memory {:?} KiB -> {:?} KiB, {:.1} KiB per session",
        report.sessions,
        failures,
        report.ramp_seconds,
        report.logins_per_second,
        before,
        after,
        per_session.unwrap_or(f64::NAN)
    );
    emit(cli, &report)?;
    drop(connections);
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

async fn chat(
    cli: &Cli,
    users: usize,
    rate: u64,
    duration: u64,
    placement: Placement,
) -> anyhow::Result<()> {
    let servers = cli.server.len();
    anyhow::ensure!(
        users >= 2 * servers,
        "chat needs at least two users per server"
    );
    anyhow::ensure!(
        servers > 1 || placement != Placement::Cross,
        "--placement cross needs several servers"
    );
    let pids = server_pids(cli);
    let (connections, failures, _) = login_all(cli, users, 100).await;
    anyhow::ensure!(failures == 0, "{failures} logins failed");
    let epoch = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let (latency_tx, mut latency_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let mut senders = Vec::new();
    for connection in connections {
        let (mut receiver, sender) = connection.split();
        senders.push(sender);
        let latency_tx = latency_tx.clone();
        tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                if element.name() != "message" {
                    continue;
                }
                let Some(body) = element.get_child("body", "jabber:client").map(|b| b.text())
                else {
                    continue;
                };
                let mut parts = body.split(' ');
                let (Some(seq), Some(at)) = (
                    parts.next().and_then(|s| s.parse().ok()),
                    parts.next().and_then(|s| s.parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let now = epoch.elapsed().as_micros() as u64;
                let _ = latency_tx.send((seq, now.saturating_sub(at)));
            }
        });
    }
    drop(latency_tx);
    let cpu_before = cpu_seconds(&pids);
    let per_user = rate as f64 / users as f64;
    let domain = cli.domain.clone();
    let prefix = cli.user_prefix.clone();
    let mut tasks = Vec::new();
    for (index, mut sender) in senders.into_iter().enumerate() {
        let (sent, domain, prefix) = (sent.clone(), domain.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / per_user);
            // Spread the users' ticks over the interval.
            tokio::time::sleep(interval.mul_f64(index as f64 / users as f64)).await;
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + Duration::from_secs(duration);
            while Instant::now() < end {
                ticker.tick().await;
                let to = recipient(index, users, servers, placement) + 1;
                let seq = sent.fetch_add(1, Ordering::Relaxed);
                let at = epoch.elapsed().as_micros() as u64;
                let xml = format!("<message to='{prefix}{to}@{domain}' type='chat' id='m{seq}'><body>{seq} {at}</body></message>");
                if sender.send(&xml).await.is_err() {
                    break;
                }
            }
            sender
        }));
    }
    let mut senders = Vec::new();
    for task in tasks {
        senders.push(task.await?);
    }
    let sending = epoch.elapsed();
    // Stragglers.
    let mut latencies = Vec::new();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let total = sent.load(Ordering::Relaxed);
    while let Ok(Some((seq, latency))) = tokio::time::timeout_at(deadline, latency_rx.recv()).await
    {
        let count = seen.entry(seq).or_default();
        *count += 1;
        if *count == 1 {
            latencies.push(latency);
        }
        if seen.len() as u64 == total {
            break;
        }
    }
    let cpu_after = cpu_seconds(&pids);
    drop(senders);
    latencies.sort_unstable();
    let delivered = seen.len() as u64;
    let duplicated = seen.values().map(|c| u64::from(c - 1)).sum();
    let cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| after - before);
    let report = ChatReport {
        scenario: "chat",
        servers,
        placement,
        users,
        target_rate: rate,
        sent: total,
        delivered,
        lost: total - delivered,
        duplicated,
        achieved_rate: total as f64 / sending.as_secs_f64(),
        latency_ms_p50: percentile(&latencies, 0.50),
        latency_ms_p90: percentile(&latencies, 0.90),
        latency_ms_p99: percentile(&latencies, 0.99),
        latency_ms_max: latencies.last().map_or(f64::NAN, |l| *l as f64 / 1000.0),
        server_cpu_seconds: cpu,
        server_cpu_us_per_message: cpu
            .filter(|_| delivered > 0)
            .map(|cpu| cpu * 1e6 / delivered as f64),
    };
    eprintln!(
        "sent {} delivered {} lost {} dup {}; {:.0} msg/s; latency p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms; server CPU {:?} s ({:?} us/message)",
        report.sent,
        report.delivered,
        report.lost,
        report.duplicated,
        report.achieved_rate,
        report.latency_ms_p50,
        report.latency_ms_p90,
        report.latency_ms_p99,
        report.latency_ms_max,
        report.server_cpu_seconds,
        report.server_cpu_us_per_message
    );
    emit(cli, &report)
}

/// A random recipient (0-based) for sender `index` among `users` spread
/// round-robin over `servers` (user i is on server i mod servers).
fn recipient(index: usize, users: usize, servers: usize, placement: Placement) -> usize {
    loop {
        let server = match placement {
            Placement::Any => rand::random_range(0..servers),
            Placement::Same => index % servers,
            Placement::Cross => (index + rand::random_range(1..servers.max(2))) % servers,
        };
        // Users on `server`: server, server + servers, ...
        let count = (users - server).div_ceil(servers);
        let to = server + servers * rand::random_range(0..count);
        if to != index {
            return to;
        }
    }
}

#[derive(Debug, Serialize)]
struct FailoverReport {
    scenario: &'static str,
    pairs: usize,
    killed_pid: u32,
    seen_unavailable: usize,
    failover_ms_p50: f64,
    failover_ms_max: f64,
}

/// Presence subscriptions between pairs across two servers, then SIGKILL of
/// the first server's process; time until the watchers see unavailable.
async fn failover(cli: &Cli, pairs: usize, wait: u64) -> anyhow::Result<()> {
    anyhow::ensure!(cli.server.len() >= 2, "failover needs two servers");
    let Some(&pid) = server_pids(cli).first() else {
        anyhow::bail!("the first server's process is not known (--server-pid)");
    };
    let domain = cli.domain.clone();
    let name = |n: usize| format!("{}{n}@{domain}", cli.user_prefix);
    // Watched users are accounts 1, 3, 5 ... on the first server, watchers
    // 2, 4, 6 ... on the second (the round-robin spread of two servers).
    let mut watched = Vec::with_capacity(pairs);
    let mut watchers = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        let (a, b) = (2 * pair + 1, 2 * pair + 2);
        let mut first = Connection::login(
            &target(cli, a),
            a,
            &format!("{}{a}", cli.user_prefix),
            &cli.password,
            "bench",
        )
        .await?;
        first.go_online().await?;
        let mut second = Connection::login(
            &target(cli, b),
            b,
            &format!("{}{b}", cli.user_prefix),
            &cli.password,
            "bench",
        )
        .await?;
        second.go_online().await?;
        // Pre-approval (RFC 6121 3.4): the watcher's request is granted at once.
        first
            .send(&format!("<presence type='subscribed' to='{}'/>", name(b)))
            .await?;
        watched.push(first);
        watchers.push((name(a), second));
    }
    // Each watcher accepts the subscription and waits for its contact's presence.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, bool, Instant)>();
    for (index, (contact, connection)) in watchers.into_iter().enumerate() {
        let seen_tx = seen_tx.clone();
        let (mut receiver, mut sender) = connection.split();
        sender
            .send(&format!("<presence type='subscribe' to='{contact}'/>"))
            .await?;
        tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                if element.name() != "presence" {
                    continue;
                }
                let from = element.attr("from").unwrap_or_default();
                if !from.starts_with(&contact) {
                    continue;
                }
                match element.attr("type") {
                    Some("subscribe") => {
                        let _ = sender
                            .send(&format!("<presence type='subscribed' to='{contact}'/>"))
                            .await;
                    }
                    None => {
                        let _ = seen_tx.send((index, true, Instant::now()));
                    }
                    Some("unavailable") => {
                        let _ = seen_tx.send((index, false, Instant::now()));
                    }
                    _ => {}
                }
            }
        });
    }
    drop(seen_tx);
    // A presence update reaches watchers whose subscription existed already.
    for connection in &mut watched {
        connection.send("<presence/>").await?;
    }
    let mut online = vec![false; pairs];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while online.iter().any(|seen| !seen) {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some((index, true, _))) => online[index] = true,
            Ok(Some(_)) => {}
            _ => anyhow::bail!(
                "{} watchers never saw their contact online",
                online.iter().filter(|seen| !**seen).count()
            ),
        }
    }
    let killed = Instant::now();
    process::kill(pid)?;
    let mut times: Vec<f64> = Vec::with_capacity(pairs);
    let mut gone = vec![false; pairs];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    while times.len() < pairs {
        match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
            Ok(Some((index, false, at))) if !gone[index] => {
                gone[index] = true;
                times.push(at.duration_since(killed).as_secs_f64() * 1000.0);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    drop(watched);
    times.sort_by(f64::total_cmp);
    let report = FailoverReport {
        scenario: "failover",
        pairs,
        killed_pid: pid,
        seen_unavailable: times.len(),
        failover_ms_p50: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        failover_ms_max: times.last().copied().unwrap_or(f64::NAN),
    };
    eprintln!(
        "killed {pid}; {} of {pairs} watchers saw unavailable: p50 {:.0} ms, max {:.0} ms after the kill",
        report.seen_unavailable, report.failover_ms_p50, report.failover_ms_max
    );
    emit(cli, &report)
}
