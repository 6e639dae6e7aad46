//! `failover`: kill a cluster node and time until its users' contacts see them go.

use std::time::{Duration, Instant};

use rookery_bench::client::Connection;
use rookery_bench::process;
use serde::Serialize;

use crate::{Cli, emit, server_pids, target};

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
pub async fn failover(cli: &Cli, pairs: usize, wait: u64) -> anyhow::Result<()> {
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
