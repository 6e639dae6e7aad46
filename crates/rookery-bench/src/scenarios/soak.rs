//! `soak`: a long run of mixed load on many sessions (1:1 chat, presence
//! changes, clients that disconnect and log in again) with the server's
//! memory, CPU and open files sampled throughout. Reports the trend of the
//! server's memory over the second half of the run (what a leak shows as),
//! and accounts for every numbered message: delivered once, duplicated, or
//! lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use rookery_bench::client::{Connection, Sender};

use super::{Latency, Pacer};
use crate::{Cli, CpuWindow, emit, log_in, open_files, rss_kib, server_pids, target};

/// What a soak run does.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct SoakLoad {
    /// Sessions held through the run.
    #[arg(long)]
    pub users: usize,
    /// 1:1 messages per second, all users together.
    #[arg(long)]
    pub rate: u64,
    /// Presence changes (a new status) per second, all users together.
    #[arg(long, default_value_t = 0)]
    pub presence_rate: u64,
    /// Reconnections per second: a random user closes its stream and logs in again.
    #[arg(long, default_value_t = 0)]
    pub reconnect_rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 3600)]
    pub duration: u64,
    /// Seconds between samples of the server.
    #[arg(long, default_value_t = 10)]
    pub sample: u64,
}

/// One look at the server and the load.
#[derive(Debug, Serialize)]
struct Sample {
    /// Seconds since the load started.
    at_s: f64,
    rss_kib: Option<u64>,
    open_files: Option<usize>,
    /// Cores the server used on average since the last sample.
    server_cores: Option<f64>,
    sent: u64,
    delivered: u64,
    presence_sent: u64,
    reconnects: u64,
    errors: u64,
    /// Latency of the messages that arrived since the last sample.
    latency_ms_p99: f64,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    scenario: &'static str,
    users: usize,
    target_rate: u64,
    presence_rate: u64,
    reconnect_rate: u64,
    duration_s: u64,
    sent: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    presence_sent: u64,
    reconnects: u64,
    /// Failed logins, sends and reconnections of the load's clients.
    errors: u64,
    #[serde(flatten)]
    latency: Latency,
    /// Least-squares slope of the server's resident memory over the second
    /// half of the run, in KiB per hour.
    rss_slope_kib_per_hour: Option<f64>,
    /// The same slope as a share of the mean, per hour.
    rss_slope_percent_per_hour: Option<f64>,
    /// Standard deviation of the samples around that line, in KiB: the noise
    /// a slope must stand out from.
    rss_noise_kib: Option<f64>,
    rss_mean_kib_second_half: Option<f64>,
    rss_max_kib: Option<u64>,
    server_cpu_us_per_message: Option<f64>,
    samples: Vec<Sample>,
}

/// Every numbered message that arrived, and how fast.
#[derive(Debug, Default)]
struct Tracker {
    /// One bit per sequence number: arrived at least once.
    arrived: Vec<u64>,
    delivered: u64,
    duplicated: u64,
    /// Latencies (µs) since the last sample.
    window: Vec<u64>,
    /// Latencies of the whole run, by bucket of about 2 %.
    histogram: Vec<u64>,
}

/// Latency buckets grow by this factor.
const BUCKET_GROWTH: f64 = 1.02;

impl Tracker {
    fn arrived(&mut self, seq: u64, latency_us: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.arrived.len() {
            self.arrived.resize(word + 1, 0);
        }
        if self.arrived[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        self.arrived[word] |= 1 << bit;
        self.delivered += 1;
        self.window.push(latency_us);
        let bucket = ((latency_us.max(1) as f64).ln() / BUCKET_GROWTH.ln()) as usize;
        if bucket >= self.histogram.len() {
            self.histogram.resize(bucket + 1, 0);
        }
        self.histogram[bucket] += 1;
    }

    /// The p99 of the window, in ms, and a fresh window.
    fn take_window_p99(&mut self) -> f64 {
        let mut window = std::mem::take(&mut self.window);
        window.sort_unstable();
        crate::percentile(&window, 0.99)
    }

    /// Percentiles of the whole run from the histogram (each within 2 %).
    fn latency(&self) -> Latency {
        let total: u64 = self.histogram.iter().sum();
        let at = |p: f64| -> f64 {
            if total == 0 {
                return f64::NAN;
            }
            let rank = ((total as f64 - 1.0) * p).round() as u64;
            let mut seen = 0;
            for (bucket, count) in self.histogram.iter().enumerate() {
                seen += count;
                if seen > rank {
                    return BUCKET_GROWTH.powi(bucket as i32) / 1000.0;
                }
            }
            f64::NAN
        };
        Latency {
            latency_ms_p50: at(0.50),
            latency_ms_p90: at(0.90),
            latency_ms_p99: at(0.99),
            latency_ms_max: at(1.0),
        }
    }
}

/// What the users' tasks share.
struct Shared {
    epoch: Instant,
    run: u32,
    users: usize,
    sent: AtomicU64,
    presence_sent: AtomicU64,
    reconnects: AtomicU64,
    errors: AtomicU64,
    tracker: Mutex<Tracker>,
    /// Tells user `n` (index n - 1) to reconnect.
    reconnect: Vec<Notify>,
    /// Share of a user's ticks that are presence changes.
    presence_share: f64,
}

/// The soak scenario.
pub async fn soak(cli: &Cli, load: &SoakLoad) -> anyhow::Result<()> {
    let SoakLoad {
        users,
        rate,
        presence_rate,
        reconnect_rate,
        duration,
        sample,
    } = *load;
    anyhow::ensure!(users >= 2, "soak needs at least two users");
    let pids = server_pids(cli);
    let numbers: Vec<usize> = (1..=users).collect();
    eprintln!("soak: logging in {users} users");
    let (connections, failures, ramp) = log_in(cli, &numbers, 100, true).await;
    anyhow::ensure!(failures == 0, "{failures} logins failed");
    eprintln!("soak: {users} online in {:.1} s", ramp.as_secs_f64());
    let events = (rate + presence_rate) as f64;
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        run: rand::random(),
        users,
        sent: AtomicU64::new(0),
        presence_sent: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        tracker: Mutex::new(Tracker::default()),
        reconnect: (0..users).map(|_| Notify::new()).collect(),
        presence_share: if events > 0.0 {
            presence_rate as f64 / events
        } else {
            0.0
        },
    });
    let cpu = CpuWindow::start(&pids);
    let per_user = events / users as f64;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|(n, connection)| {
            let shared = shared.clone();
            let target = target(cli, n);
            let (user, password) = (format!("{}{n}", cli.user_prefix), cli.password.clone());
            let to_prefix = cli.user_prefix.clone();
            let domain = cli.domain.clone();
            tokio::spawn(async move {
                let login = Login {
                    target,
                    n,
                    user,
                    password,
                };
                let mut sender = listen(&shared, connection);
                let mut pacer = Pacer::start(n - 1, shared.users, per_user, duration).await;
                loop {
                    tokio::select! {
                        more = pacer.tick() => {
                            if !more {
                                break;
                            }
                            let stanza = next_stanza(&shared, n, &to_prefix, &domain);
                            if sender.send(&stanza).await.is_err() {
                                shared.errors.fetch_add(1, Ordering::Relaxed);
                                sender = login.again(&shared, sender).await;
                            }
                        }
                        () = shared.reconnect[n - 1].notified() => {
                            shared.reconnects.fetch_add(1, Ordering::Relaxed);
                            sender = login.again(&shared, sender).await;
                        }
                    }
                }
                sender
            })
        })
        .collect();
    // Reconnections of random users, and the samples.
    let churn = (reconnect_rate > 0).then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut ticker =
                tokio::time::interval(Duration::from_secs_f64(1.0 / reconnect_rate as f64));
            loop {
                ticker.tick().await;
                shared.reconnect[rand::random_range(0..shared.users)].notify_one();
            }
        })
    });
    let mut samples = Vec::new();
    let mut sampler = tokio::time::interval(Duration::from_secs(sample));
    sampler.tick().await;
    let mut window = CpuWindow::start(&pids);
    let end = shared.epoch + Duration::from_secs(duration);
    while Instant::now() < end {
        sampler.tick().await;
        let (server_cpu, _) = window.spent();
        window = CpuWindow::start(&pids);
        let taken = take_sample(&shared, &pids, server_cpu, sample);
        eprintln!(
            "soak: {:>6.0} s rss {:?} KiB files {:?} cores {:.2} sent {} delivered {} p99 {:.2} ms reconnects {} errors {}",
            taken.at_s,
            taken.rss_kib,
            taken.open_files,
            taken.server_cores.unwrap_or(f64::NAN),
            taken.sent,
            taken.delivered,
            taken.latency_ms_p99,
            taken.reconnects,
            taken.errors
        );
        samples.push(taken);
    }
    if let Some(churn) = churn {
        churn.abort();
    }
    let mut senders = Vec::new();
    for task in tasks {
        senders.push(task.await?);
    }
    // Stragglers, including messages stored for users that were reconnecting.
    let sent = shared.sent.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.tracker.lock().expect("tracker").delivered < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (server_cpu, _) = cpu.spent();
    for sender in &mut senders {
        let _ = sender.close().await;
    }
    let tracker = shared.tracker.lock().expect("tracker");
    let trend = rss_trend(&samples);
    let report = SoakReport {
        scenario: "soak",
        users,
        target_rate: rate,
        presence_rate,
        reconnect_rate,
        duration_s: duration,
        sent,
        delivered: tracker.delivered,
        lost: sent - tracker.delivered,
        duplicated: tracker.duplicated,
        presence_sent: shared.presence_sent.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        latency: tracker.latency(),
        rss_slope_kib_per_hour: trend.map(|t| t.slope_per_hour),
        rss_slope_percent_per_hour: trend.map(|t| 100.0 * t.slope_per_hour / t.mean),
        rss_noise_kib: trend.map(|t| t.noise),
        rss_mean_kib_second_half: trend.map(|t| t.mean),
        rss_max_kib: samples.iter().filter_map(|s| s.rss_kib).max(),
        server_cpu_us_per_message: crate::per_unit(server_cpu, tracker.delivered, 1e6),
        samples,
    };
    drop(tracker);
    eprintln!(
        "soak: sent {} delivered {} lost {} dup {}; p99 {:.2} ms; rss slope {:?} KiB/h ({:?} %/h) noise {:?} KiB",
        report.sent,
        report.delivered,
        report.lost,
        report.duplicated,
        report.latency.latency_ms_p99,
        report.rss_slope_kib_per_hour,
        report.rss_slope_percent_per_hour,
        report.rss_noise_kib
    );
    emit(cli, &report)
}

/// How a user logs in again.
struct Login {
    target: rookery_bench::client::Target,
    n: usize,
    user: String,
    password: String,
}

impl Login {
    /// Closes `old` and logs in again (retrying every second); the new sender.
    async fn again(&self, shared: &Arc<Shared>, mut old: Sender) -> Sender {
        // The old reader goes on until the server closes: nothing written to
        // the old connection is missed.
        let _ = old.close().await;
        loop {
            let connection =
                Connection::login(&self.target, self.n, &self.user, &self.password, "bench").await;
            match connection {
                Ok(mut connection) => match connection.go_online().await {
                    Ok(()) => return listen(shared, connection),
                    Err(_) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Reads what `connection` receives into the tracker; its sending half.
fn listen(shared: &Arc<Shared>, connection: Connection) -> Sender {
    let (mut receiver, sender) = connection.split();
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some(element) = receiver.next().await {
            if let Some((seq, at)) = super::read_numbered(&element, shared.run) {
                let now = shared.epoch.elapsed().as_micros() as u64;
                shared
                    .tracker
                    .lock()
                    .expect("tracker")
                    .arrived(seq, now.saturating_sub(at));
            }
        }
    });
    sender
}

/// A numbered message to a random other user, or now and then a presence change.
fn next_stanza(shared: &Shared, n: usize, prefix: &str, domain: &str) -> String {
    if shared.presence_share > 0.0 && rand::random::<f64>() < shared.presence_share {
        let count = shared.presence_sent.fetch_add(1, Ordering::Relaxed);
        return format!("<presence><status>soak {count}</status></presence>");
    }
    let to = loop {
        let to = rand::random_range(1..=shared.users);
        if to != n {
            break to;
        }
    };
    let seq = shared.sent.fetch_add(1, Ordering::Relaxed);
    let at = shared.epoch.elapsed().as_micros() as u64;
    super::numbered_message(seq, at, shared.run, &format!("{prefix}{to}@{domain}"))
}

fn take_sample(shared: &Shared, pids: &[u32], server_cpu: Option<f64>, every: u64) -> Sample {
    let mut tracker = shared.tracker.lock().expect("tracker");
    Sample {
        at_s: shared.epoch.elapsed().as_secs_f64(),
        rss_kib: rss_kib(pids),
        open_files: open_files(pids),
        server_cores: server_cpu.map(|seconds| seconds / every as f64),
        sent: shared.sent.load(Ordering::Relaxed),
        delivered: tracker.delivered,
        presence_sent: shared.presence_sent.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        latency_ms_p99: tracker.take_window_p99(),
    }
}

/// A straight line through the memory samples of the second half.
#[derive(Debug, Clone, Copy)]
struct Trend {
    slope_per_hour: f64,
    mean: f64,
    noise: f64,
}

/// Least squares over the samples of the second half of the run.
fn rss_trend(samples: &[Sample]) -> Option<Trend> {
    let half = samples.last()?.at_s / 2.0;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.at_s >= half)
        .filter_map(|s| s.rss_kib.map(|rss| (s.at_s, rss as f64)))
        .collect();
    fit(&points)
}

fn fit(points: &[(f64, f64)]) -> Option<Trend> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let residuals: f64 = points
        .iter()
        .map(|p| (p.1 - (mean_y + slope * (p.0 - mean_x))).powi(2))
        .sum();
    Some(Trend {
        slope_per_hour: slope * 3600.0,
        mean: mean_y,
        noise: (residuals / (n - 2.0)).sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_straight_line_has_its_slope_and_no_noise() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 60.0, 1000.0 + i as f64))
            .collect();
        let trend = fit(&points).unwrap();
        assert!((trend.slope_per_hour - 60.0).abs() < 1e-9);
        assert!(trend.noise < 1e-9);
        assert!((trend.mean - 1004.5).abs() < 1e-9);
        let flat: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, if i % 2 == 0 { 100.0 } else { 102.0 }))
            .collect();
        let trend = fit(&flat).unwrap();
        assert!(trend.slope_per_hour.abs() < 3600.0 * 0.25, "{trend:?}");
        assert!((trend.noise - 1.05).abs() < 0.1, "{trend:?}");
    }

    #[test]
    fn the_tracker_counts_each_message_once_and_its_percentiles() {
        let mut tracker = Tracker::default();
        for seq in 0..100 {
            tracker.arrived(seq, 1000 * (seq + 1));
        }
        tracker.arrived(5, 1);
        tracker.arrived(200, 500);
        assert_eq!(tracker.delivered, 101);
        assert_eq!(tracker.duplicated, 1);
        let latency = tracker.latency();
        // 99th of 101 latencies: 99 ms, within the 2 % of a bucket.
        assert!(
            (latency.latency_ms_p99 - 99.0).abs() < 99.0 * 0.021,
            "{latency:?}"
        );
        assert!(
            (latency.latency_ms_p50 - 50.0).abs() < 50.0 * 0.021,
            "{latency:?}"
        );
        assert!((tracker.take_window_p99() - 99.0).abs() < 1.0);
        assert!(tracker.take_window_p99().is_nan(), "a fresh window");
    }
}
