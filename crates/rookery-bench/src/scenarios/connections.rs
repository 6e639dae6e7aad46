//! `connections`: ramp to N idle sessions and weigh the server.

use std::time::{Duration, Instant};

use rookery_bench::process;
use serde::Serialize;

use crate::{Cli, emit, login_all, open_files, rss_kib, server_pids};

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
    /// When every client then drops its connection at once: how far the
    /// server's resident memory rose above what it held with all sessions.
    server_rss_rise_on_disconnect_kib: Option<u64>,
    /// ... and how long until the server's open files were back to their
    /// number before the ramp (its sockets released; give or take
    /// `FILES_SLACK` that storage may have opened meanwhile), within 10 s.
    server_files_released_seconds: Option<f64>,
}

pub async fn connections(
    cli: &Cli,
    users: usize,
    concurrency: usize,
    hold: u64,
) -> anyhow::Result<()> {
    let pids = server_pids(cli);
    let before = rss_kib(&pids);
    let files_before = open_files(&pids);
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
    let sessions = connections.len();
    let held = rss_kib(&pids);
    drop(connections);
    let (rise, released) = watch_disconnect(&pids, held, files_before).await;
    let report = ConnectionsReport {
        scenario: "connections",
        sessions,
        failures,
        ramp_seconds: ramp.as_secs_f64(),
        logins_per_second: sessions as f64 / ramp.as_secs_f64(),
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        server_kib_per_session: per_session,
        kernel_slab_kib_per_connection: slab_before
            .zip(slab_after)
            .filter(|_| sessions > 0)
            .map(|(before, after)| (after as f64 - before as f64) / sessions as f64),
        server_rss_rise_on_disconnect_kib: rise,
        server_files_released_seconds: released.map(|d| d.as_secs_f64()),
    };
    eprintln!(
        "{} sessions ({} failed) in {:.1} s: {:.0} logins/s; server memory {:?} KiB -> {:?} KiB, {:.1} KiB per session; on disconnect: memory +{:?} KiB, files released after {:.2?}",
        report.sessions,
        failures,
        report.ramp_seconds,
        report.logins_per_second,
        before,
        after,
        per_session.unwrap_or(f64::NAN),
        rise,
        released
    );
    emit(cli, &report)
}

/// Files a server may have opened during the ramp besides its sockets
/// (database connections of a pool, log files).
const FILES_SLACK: usize = 64;

/// After every client dropped its connection: the highest rise of the
/// servers' resident memory over `held`, and the time until their open files
/// are back to `files_before` (give or take [`FILES_SLACK`]; sampled every 50 ms, for at most 10 s).
async fn watch_disconnect(
    pids: &[u32],
    held: Option<u64>,
    files_before: Option<usize>,
) -> (Option<u64>, Option<Duration>) {
    let dropped = Instant::now();
    let (mut peak, mut released) = (held, None);
    while dropped.elapsed() < Duration::from_secs(10) {
        peak = peak.max(rss_kib(pids));
        if released.is_none()
            && open_files(pids)
                .zip(files_before)
                .is_some_and(|(now, before)| now <= before + FILES_SLACK)
        {
            released = Some(dropped.elapsed());
        }
        if released.is_some() && dropped.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rise = held.zip(peak).map(|(held, peak)| peak.saturating_sub(held));
    (rise, released)
}
