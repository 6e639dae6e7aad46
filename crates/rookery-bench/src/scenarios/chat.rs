//! `chat`: 1:1 messages between online users at a fixed rate; latency, loss, server CPU.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Delivery;
use crate::{Cli, CpuWindow, Load, emit, login_all, per_unit, server_pids};

/// Where the recipients of the chat scenario are, relative to their sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Placement {
    /// Anyone.
    Any,
    /// A user on the sender's server.
    Same,
    /// A user on another server.
    Cross,
}

#[derive(Debug, Serialize)]
pub struct ChatReport {
    scenario: &'static str,
    servers: usize,
    placement: Placement,
    users: usize,
    target_rate: u64,
    #[serde(flatten)]
    pub(super) delivery: Delivery,
    server_cpu_seconds: Option<f64>,
    server_cpu_us_per_message: Option<f64>,
    /// The load generator's own CPU per message (it shares the machine).
    bench_cpu_us_per_message: Option<f64>,
}

/// How `--find-max` searches.
#[derive(Debug, Clone, Copy)]
pub struct Search {
    /// Stop when p99 latency exceeds this, in milliseconds.
    pub max_p99_ms: f64,
    /// Each step's rate is the previous one times this.
    pub factor: f64,
    /// Give up after this many steps up.
    pub steps: usize,
    /// After the first failing step, this many steps halfway between the
    /// highest passing rate and the lowest failing one.
    pub refine: usize,
}

impl Search {
    /// The rate of the next step, given where the search started and the
    /// steps so far as (rate, sustained) in order; `None` when it is over.
    /// The rate goes up by `factor` while every step passes; then the gap
    /// between the highest pass and the lowest failure is halved `refine`
    /// times, or until it is under 2 % of the rate.
    fn next_rate(&self, start: u64, tried: &[(u64, bool)]) -> Option<u64> {
        let Some(first_failure) = tried.iter().position(|(_, sustained)| !sustained) else {
            return match tried.last() {
                None => Some(start),
                Some(&(last, _)) => (tried.len() < self.steps)
                    .then(|| ((last as f64 * self.factor) as u64).max(last + 1)),
            };
        };
        let passed = highest_sustained(tried)?;
        let failed = tried
            .iter()
            .filter(|(_, s)| !*s)
            .map(|(rate, _)| *rate)
            .min()?;
        let refined = tried.len() - first_failure - 1;
        let middle = passed + failed.saturating_sub(passed) / 2;
        (refined < self.refine && failed > passed && (failed - passed) * 50 > passed)
            .then_some(middle)
    }
}

/// Waits between find-max steps until the servers have worked off the last
/// one: at least [`SETTLE_MIN`], then until they spend less than a tenth of a
/// core over [`SETTLE_SAMPLE`], at most [`SETTLE_MAX`]. A step that
/// overloaded a slow server leaves it a backlog for seconds after the bench
/// stopped sending; a step started on top of it would fail for the last
/// step's load, not its own.
async fn settle(pids: &[u32]) {
    tokio::time::sleep(SETTLE_MIN).await;
    let deadline = Instant::now() + SETTLE_MAX - SETTLE_MIN;
    while Instant::now() < deadline {
        let window = CpuWindow::start(pids);
        if !window.measures_servers() {
            return;
        }
        tokio::time::sleep(SETTLE_SAMPLE).await;
        match window.spent().0 {
            Some(used) if !is_idle(used, SETTLE_SAMPLE) => {}
            _ => return,
        }
    }
    eprintln!("note: the server was still busy {SETTLE_MAX:?} after the step");
}

const SETTLE_MIN: Duration = Duration::from_secs(2);
const SETTLE_SAMPLE: Duration = Duration::from_millis(500);
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// True when `cpu_seconds` spent over `window` is under a tenth of a core.
fn is_idle(cpu_seconds: f64, window: Duration) -> bool {
    cpu_seconds < 0.1 * window.as_secs_f64()
}

/// The highest rate of the steps (rate, sustained) that was sustained.
fn highest_sustained(tried: &[(u64, bool)]) -> Option<u64> {
    tried
        .iter()
        .filter(|(_, sustained)| *sustained)
        .map(|(rate, _)| *rate)
        .max()
}

/// The outcome of `--find-max`.
#[derive(Debug, Serialize)]
struct SearchReport {
    scenario: &'static str,
    max_p99_ms: f64,
    /// The highest rate sustained: everything delivered, p99 under the bound,
    /// and at least 95 % of the target rate sent.
    max_sustained_rate: Option<u64>,
    steps: Vec<ChatReport>,
}

impl ChatReport {
    fn sustained(&self, max_p99_ms: f64) -> bool {
        let delivery = &self.delivery;
        delivery.lost == 0
            && delivery.latency.latency_ms_p99 <= max_p99_ms
            && delivery.achieved_rate >= 0.95 * self.target_rate as f64
    }
}

/// The chat scenario: one run at `rate`, or with `search` the highest rate
/// the server sustains, starting at `rate`.
pub async fn chat(
    cli: &Cli,
    load: &Load,
    placement: Placement,
    search: Option<Search>,
) -> anyhow::Result<()> {
    let Load {
        users,
        rate,
        duration,
    } = *load;
    let Some(search) = search else {
        let report = run(cli, users, rate, duration, placement).await?;
        return emit(cli, &report);
    };
    let mut steps: Vec<ChatReport> = Vec::new();
    let mut tried = Vec::new();
    let pids = server_pids(cli);
    while let Some(rate) = search.next_rate(rate, &tried) {
        if !tried.is_empty() {
            settle(&pids).await;
        }
        let report = run(cli, users, rate, duration, placement).await?;
        tried.push((rate, report.sustained(search.max_p99_ms)));
        steps.push(report);
    }
    let best = highest_sustained(&tried);
    eprintln!(
        "highest sustained rate (p99 <= {} ms, nothing lost): {}",
        search.max_p99_ms,
        best.map_or("none".to_owned(), |rate| format!("{rate} msg/s"))
    );
    emit(
        cli,
        &SearchReport {
            scenario: "chat-find-max",
            max_p99_ms: search.max_p99_ms,
            max_sustained_rate: best,
            steps,
        },
    )
}

/// One chat run at a fixed rate.
pub(super) async fn run(
    cli: &Cli,
    users: usize,
    rate: u64,
    duration: u64,
    placement: Placement,
) -> anyhow::Result<ChatReport> {
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
    // Messages of earlier runs (stored offline when they were late) carry
    // another run id and are not counted.
    let run: u32 = rand::random();
    let mut senders = Vec::new();
    for connection in connections {
        let (mut receiver, sender) = connection.split();
        senders.push(sender);
        let latency_tx = latency_tx.clone();
        tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                if let Some((seq, at)) = super::read_numbered(&element, run) {
                    let now = epoch.elapsed().as_micros() as u64;
                    let _ = latency_tx.send((seq, now.saturating_sub(at)));
                }
            }
        });
    }
    drop(latency_tx);
    let window = CpuWindow::start(&pids);
    let per_user = rate as f64 / users as f64;
    let paced = senders
        .into_iter()
        .enumerate()
        .map(|(index, sender)| {
            let (sent, domain, prefix) =
                (sent.clone(), cli.domain.clone(), cli.user_prefix.clone());
            let next = move || {
                let to = recipient(index, users, servers, placement) + 1;
                let seq = sent.fetch_add(1, Ordering::Relaxed);
                let at = epoch.elapsed().as_micros() as u64;
                super::numbered_message(seq, at, run, &format!("{prefix}{to}@{domain}"))
            };
            (sender, next)
        })
        .collect();
    let mut senders = super::send_paced(paced, per_user, duration).await?;
    let sending = epoch.elapsed();
    let total = sent.load(Ordering::Relaxed);
    // Stragglers.
    let arrived = super::arrivals(&mut latency_rx, total, Duration::from_secs(3)).await;
    let (cpu, bench_cpu) = window.spent();
    for sender in &mut senders {
        let _ = sender.close().await;
    }
    drop(senders);
    let delivery = Delivery::new(total, &arrived, sending);
    let delivered = delivery.delivered;
    let report = ChatReport {
        scenario: "chat",
        servers,
        placement,
        users,
        target_rate: rate,
        delivery,
        server_cpu_seconds: cpu,
        server_cpu_us_per_message: per_unit(cpu, delivered, 1e6),
        bench_cpu_us_per_message: per_unit(bench_cpu, delivered, 1e6),
    };
    eprintln!(
        "{}; server CPU {:?} s ({:?} us/message); bench CPU {:?} us/message",
        report.delivery,
        report.server_cpu_seconds,
        report.server_cpu_us_per_message,
        report.bench_cpu_us_per_message
    );
    Ok(report)
}

/// A random recipient (0-based) for sender `index` among `users` spread
/// round-robin over `servers` (user i is on server i mod servers).
pub(super) fn recipient(index: usize, users: usize, servers: usize, placement: Placement) -> usize {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Search, is_idle};

    #[test]
    fn a_server_is_idle_under_a_tenth_of_a_core() {
        let window = Duration::from_millis(500);
        assert!(is_idle(0.0, window));
        assert!(is_idle(0.04, window), "8 % of a core");
        assert!(!is_idle(0.05, window), "10 % of a core");
        assert!(!is_idle(0.5, window), "a busy core");
    }

    const SEARCH: Search = Search {
        max_p99_ms: 100.0,
        factor: 2.0,
        steps: 4,
        refine: 2,
    };

    #[test]
    fn find_max_steps_up_then_halves_the_gap_around_the_first_failure() {
        assert_eq!(SEARCH.next_rate(1000, &[]), Some(1000));
        assert_eq!(SEARCH.next_rate(1000, &[(1000, true)]), Some(2000));
        let failed = [(1000, true), (2000, true), (4000, false)];
        assert_eq!(SEARCH.next_rate(1000, &failed), Some(3000));
        let refined = [(1000, true), (2000, true), (4000, false), (3000, true)];
        assert_eq!(SEARCH.next_rate(1000, &refined), Some(3500));
        let done = [
            (1000, true),
            (2000, true),
            (4000, false),
            (3000, false),
            (2500, true),
        ];
        assert_eq!(SEARCH.next_rate(1000, &done), None, "refined twice");
    }

    #[test]
    fn find_max_stops_when_nothing_passes_steps_run_out_or_the_gap_is_small() {
        assert_eq!(SEARCH.next_rate(1000, &[(1000, false)]), None);
        let all_passed = [(1000, true), (2000, true), (4000, true), (8000, true)];
        assert_eq!(SEARCH.next_rate(1000, &all_passed), None);
        let close = [(1000, true), (1010, false)];
        assert_eq!(SEARCH.next_rate(1000, &close), None);
    }
}
