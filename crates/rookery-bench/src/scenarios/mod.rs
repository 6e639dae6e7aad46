//! One module per scenario.

pub mod abuse;
pub mod chat;
pub mod connections;
pub mod failover;
pub mod floor;
pub mod login_storm;
pub mod presence;
pub mod register;
pub mod soak;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use rookery_bench::client::Sender;

use crate::percentile;

/// What arrived of the numbered messages sent.
pub struct Arrivals {
    /// The latency of each message's first arrival, in µs, sorted.
    pub latencies: Vec<u64>,
    /// Messages that arrived (once or more).
    pub delivered: u64,
    /// Arrivals beyond the first.
    pub duplicated: u64,
}

/// What became of the numbered messages of a paced run: the figures every
/// paced scenario reports (at the top level of its JSON).
#[derive(Debug, Serialize)]
pub struct Delivery {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Messages sent per second of sending.
    pub achieved_rate: f64,
    #[serde(flatten)]
    pub latency: Latency,
}

/// Percentiles of latencies, in milliseconds (at the top level of a
/// scenario's JSON).
#[derive(Debug, Serialize)]
pub struct Latency {
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
}

impl Latency {
    /// The percentiles of `sorted` latencies given in µs.
    pub fn of(sorted: &[u64]) -> Latency {
        Latency {
            latency_ms_p50: percentile(sorted, 0.50),
            latency_ms_p90: percentile(sorted, 0.90),
            latency_ms_p99: percentile(sorted, 0.99),
            latency_ms_max: sorted.last().map_or(f64::NAN, |l| *l as f64 / 1000.0),
        }
    }
}

impl Delivery {
    /// The figures of `sent` messages sent over `sending`, of which `arrived` arrived.
    pub fn new(sent: u64, arrived: &Arrivals, sending: Duration) -> Delivery {
        Delivery {
            sent,
            delivered: arrived.delivered,
            lost: sent - arrived.delivered,
            duplicated: arrived.duplicated,
            achieved_rate: sent as f64 / sending.as_secs_f64(),
            latency: Latency::of(&arrived.latencies),
        }
    }
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} delivered {} lost {} dup {}; {:.0}/s; latency p50 {:.3} ms p90 {:.3} ms p99 {:.3} ms max {:.2} ms",
            self.sent,
            self.delivered,
            self.lost,
            self.duplicated,
            self.achieved_rate,
            self.latency.latency_ms_p50,
            self.latency.latency_ms_p90,
            self.latency.latency_ms_p99,
            self.latency.latency_ms_max
        )
    }
}

/// Takes (sequence number, latency in µs) pairs until all `sent` messages
/// have arrived or `wait` has passed.
pub async fn arrivals(
    latency_rx: &mut UnboundedReceiver<(u64, u64)>,
    sent: u64,
    wait: Duration,
) -> Arrivals {
    let mut latencies = Vec::new();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some((seq, latency))) = tokio::time::timeout_at(deadline, latency_rx.recv()).await
    {
        let count = seen.entry(seq).or_default();
        *count += 1;
        if *count == 1 {
            latencies.push(latency);
        }
        if seen.len() as u64 == sent {
            break;
        }
    }
    latencies.sort_unstable();
    Arrivals {
        latencies,
        delivered: seen.len() as u64,
        duplicated: seen.values().map(|c| u64::from(c - 1)).sum(),
    }
}

/// A numbered message of the paced scenarios: its body is
/// `<seq> <sent at, µs since the epoch> <run>`.
pub fn numbered_message(seq: u64, at: u64, run: u32, to: &str) -> String {
    format!("<message to='{to}' type='chat' id='m{seq}'><body>{seq} {at} {run}</body></message>")
}

/// The sequence number and sending time of a numbered message of run `run`
/// (`None` for anything else, and for messages of another run, stored
/// offline when they were late).
pub fn read_numbered(element: &minidom::Element, run: u32) -> Option<(u64, u64)> {
    if element.name() != "message" {
        return None;
    }
    let body = element.get_child("body", "jabber:client")?.text();
    let mut parts = body.split(' ');
    let seq = parts.next()?.parse().ok()?;
    let at = parts.next()?.parse().ok()?;
    let from_run: u32 = parts.next()?.parse().ok()?;
    (from_run == run).then_some((seq, at))
}

/// The ticks of one of `count` senders, `per_user` a second for `duration`
/// seconds: the senders' first ticks spread evenly over the interval, a late
/// tick caught up.
pub struct Pacer {
    ticker: tokio::time::Interval,
    end: Instant,
}

impl Pacer {
    /// Waits for sender `index`'s turn in the first interval.
    pub async fn start(index: usize, count: usize, per_user: f64, duration: u64) -> Pacer {
        let interval = Duration::from_secs_f64(1.0 / per_user);
        tokio::time::sleep(interval.mul_f64(index as f64 / count as f64)).await;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Pacer {
            ticker,
            end: Instant::now() + Duration::from_secs(duration),
        }
    }

    /// Waits for the next tick; false once the duration is over.
    pub async fn tick(&mut self) -> bool {
        if Instant::now() >= self.end {
            return false;
        }
        self.ticker.tick().await;
        true
    }
}

/// Each sender sends what its `next` makes at the pace of a [`Pacer`];
/// gives the senders back when all are done.
pub async fn send_paced<M>(
    senders: Vec<(Sender, M)>,
    per_user: f64,
    duration: u64,
) -> anyhow::Result<Vec<Sender>>
where
    M: FnMut() -> String + Send + 'static,
{
    let count = senders.len();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(index, (mut sender, mut next))| {
            tokio::spawn(async move {
                let mut pacer = Pacer::start(index, count, per_user, duration).await;
                while pacer.tick().await {
                    if sender.send(&next()).await.is_err() {
                        break;
                    }
                }
                sender
            })
        })
        .collect();
    let mut senders = Vec::with_capacity(count);
    for task in tasks {
        senders.push(task.await?);
    }
    Ok(senders)
}
