//! `connections`: ramp to N idle sessions and weigh the server.

use std::time::Duration;

use rookery_bench::process;
use serde::Serialize;

use crate::{Cli, emit, login_all, rss_kib, server_pids};

#[derive(Debug, Serialize)]
pub struct ConnectionsReport {
    scenario: &'static str,
    sessions: usize,
    failures: usize,
    ramp_seconds: f64,
    logins_per_second: f64,
    server_rss_before_kib: Option<u64>,
    server_rss_after_kib: Option<u64>,
    server_kib_per_session: Option<f64>,
    /// Growth of the kernel's slab memory per connection over the ramp. On
    /// loopback it holds both ends of each connection (the server's socket
    /// and the bench's), and whatever else the machine did meanwhile.
    kernel_slab_kib_per_connection: Option<f64>,
}

pub async fn connections(
    cli: &Cli,
    users: usize,
    concurrency: usize,
    hold: u64,
) -> anyhow::Result<()> {
    let pids = server_pids(cli);
    let before = rss_kib(&pids);
    let slab_before = process::kernel_slab_kib().ok();
    let (connections, failures, ramp) = login_all(cli, users, concurrency).await;
    // Let the server settle (allocator, pending writes) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(&pids);
    let slab_after = process::kernel_slab_kib().ok();
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
        kernel_slab_kib_per_connection: slab_before
            .zip(slab_after)
            .filter(|_| !connections.is_empty())
            .map(|(before, after)| (after as f64 - before as f64) / connections.len() as f64),
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
