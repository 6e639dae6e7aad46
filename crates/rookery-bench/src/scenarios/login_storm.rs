//! `login-storm`: full logins (TCP, TLS as configured, SASL, bind) as fast as
//! the server takes them, each connection closed once bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rookery_bench::client::Connection;
use serde::Serialize;

use crate::{Cli, CpuWindow, emit, per_unit, percentile, server_pids, target};

/// What the storm measured.
#[derive(Debug, Serialize)]
pub struct LoginStormReport {
    scenario: &'static str,
    mechanism: String,
    logins: usize,
    failures: usize,
    seconds: f64,
    logins_per_second: f64,
    login_ms_p50: f64,
    login_ms_p99: f64,
    server_cpu_seconds: Option<f64>,
    server_cpu_ms_per_login: Option<f64>,
    /// The load generator's own CPU per login (it shares the machine).
    bench_cpu_ms_per_login: Option<f64>,
}

/// `logins` logins over accounts 1 ..= `users`, `concurrency` at a time,
/// stopping early after `duration` seconds.
pub async fn login_storm(
    cli: &Cli,
    users: usize,
    logins: usize,
    concurrency: usize,
    duration: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(users > 0 && concurrency > 0, "need users and concurrency");
    let pids = server_pids(cli);
    let window = CpuWindow::start(&pids);
    let next = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_secs(duration);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = next.clone();
            let targets: Vec<_> = (1..=users).map(|n| target(cli, n)).collect();
            let (prefix, password) = (cli.user_prefix.clone(), cli.password.clone());
            tokio::spawn(async move {
                let (mut times, mut failures) = (Vec::new(), 0usize);
                loop {
                    let attempt = next.fetch_add(1, Ordering::Relaxed);
                    if attempt >= logins || Instant::now() >= end {
                        break;
                    }
                    let n = attempt % users + 1;
                    let begun = Instant::now();
                    let user = format!("{prefix}{n}");
                    match Connection::login(&targets[n - 1], attempt, &user, &password, "storm")
                        .await
                    {
                        Ok(connection) => {
                            times.push(begun.elapsed().as_micros() as u64);
                            connection.close().await;
                        }
                        Err(error) => {
                            if failures < 3 {
                                eprintln!("login failed: {error:#}");
                            }
                            failures += 1;
                        }
                    }
                }
                (times, failures)
            })
        })
        .collect();
    let (mut times, mut failures) = (Vec::new(), 0);
    for worker in workers {
        let (worker_times, worker_failures) = worker.await?;
        times.extend(worker_times);
        failures += worker_failures;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (cpu, bench_cpu) = window.spent();
    times.sort_unstable();
    let report = LoginStormReport {
        scenario: "login-storm",
        mechanism: cli.mechanism.clone(),
        logins: times.len(),
        failures,
        seconds,
        logins_per_second: times.len() as f64 / seconds,
        login_ms_p50: percentile(&times, 0.50),
        login_ms_p99: percentile(&times, 0.99),
        server_cpu_seconds: cpu,
        server_cpu_ms_per_login: per_unit(cpu, times.len() as u64, 1e3),
        bench_cpu_ms_per_login: per_unit(bench_cpu, times.len() as u64, 1e3),
    };
    eprintln!(
        "{} logins ({failures} failed) in {seconds:.1} s: {:.0} logins/s; login p50 {:.1} ms p99 {:.1} ms; server CPU {:.2?} ms per login; bench CPU {:.2?} ms per login",
        report.logins,
        report.logins_per_second,
        report.login_ms_p50,
        report.login_ms_p99,
        report.server_cpu_ms_per_login,
        report.bench_cpu_ms_per_login
    );
    emit(cli, &report)?;
    anyhow::ensure!(report.logins > 0, "no login succeeded");
    Ok(())
}
