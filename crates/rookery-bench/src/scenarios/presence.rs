//! `presence`: users with rosters of R contacts, half of them online, change
//! their presence; each change fans out to the sender's online contacts.
//!
//! Contacts form a ring: user n has the R/2 users before it and the R/2 after
//! it (mutual subscriptions, set up through the server on first use and kept).
//! The odd-numbered users go online, so each online user has about R/2 online
//! contacts; they send presence updates at a fixed aggregate rate, each
//! carrying a sequence number and a send time in its status.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rookery_bench::client::{Connection, Receiver, Sender};
use serde::Serialize;

use super::Latency;
use crate::{Cli, CpuWindow, emit, per_unit, server_pids};

/// What the presence scenario measured.
#[derive(Debug, Serialize)]
pub struct PresenceReport {
    scenario: &'static str,
    users: usize,
    contacts: usize,
    online: usize,
    target_rate: u64,
    changes_sent: u64,
    deliveries_expected: u64,
    deliveries: u64,
    lost: u64,
    fanout_per_second: f64,
    #[serde(flatten)]
    latency: Latency,
    server_cpu_seconds: Option<f64>,
    server_cpu_us_per_delivery: Option<f64>,
}

/// The contacts of user `n` (1-based) among `users` in a ring.
fn contacts_of(n: usize, users: usize, contacts: usize) -> Vec<usize> {
    let half = contacts / 2;
    (1..=half)
        .flat_map(|k| [(n - 1 + k) % users + 1, (n - 1 + users - k) % users + 1])
        .collect()
}

fn bare(cli: &Cli, n: usize) -> String {
    format!("{}{n}@{}", cli.user_prefix, cli.domain)
}

/// Number of roster items of the connection's user with a mutual subscription.
async fn mutual_contacts(connection: &mut Connection) -> anyhow::Result<usize> {
    connection
        .send("<iq type='get' id='presence-roster'><query xmlns='jabber:iq:roster'/></iq>")
        .await?;
    let roster = connection
        .until(|e| e.attr("id") == Some("presence-roster"))
        .await?;
    Ok(roster
        .get_child("query", "jabber:iq:roster")
        .map_or(0, |query| {
            query
                .children()
                .filter(|item| item.attr("subscription") == Some("both"))
                .count()
        }))
}

/// Logs in the accounts `numbers` (without going online); every login must succeed.
async fn log_in(cli: &Cli, numbers: &[usize]) -> anyhow::Result<Vec<(usize, Connection)>> {
    let (connections, failures, _) = crate::log_in(cli, numbers, 100, false).await;
    anyhow::ensure!(failures == 0, "{failures} logins failed");
    Ok(connections)
}

/// Makes every user's contacts mutual subscriptions, unless they are already.
async fn set_up_rosters(
    cli: &Cli,
    users: usize,
    contacts: usize,
    setup_timeout: Duration,
) -> anyhow::Result<()> {
    let numbers: Vec<usize> = (1..=users).collect();
    let mut connections = log_in(cli, &numbers).await?;
    // Every session fetches its roster: subscription approvals and roster
    // pushes go to "interested" resources only (RFC 6121 3.1.6, 2.1.6).
    let mut complete = true;
    for (_, connection) in &mut connections {
        if mutual_contacts(connection).await? < contacts {
            complete = false;
        }
    }
    if complete {
        for (_, connection) in connections {
            connection.close().await;
        }
        return Ok(());
    }
    eprintln!("setting up rosters: {users} users with {contacts} contacts each");
    // Everyone goes online, approves every request and asks each contact.
    let (approved_tx, mut approved_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let mut senders = Vec::new();
    for (n, connection) in connections {
        let (mut receiver, sender) = connection.split();
        let approved_tx = approved_tx.clone();
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let replies = sender.clone();
        tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                // A contact's approval also shows as a roster push with a `to`
                // subscription; pushes are answered as clients must.
                if element.name() == "iq" && element.attr("type") == Some("set") {
                    if let Some(query) = element.get_child("query", "jabber:iq:roster") {
                        for item in query.children() {
                            if matches!(item.attr("subscription"), Some("to" | "both"))
                                && let Some(jid) = item.attr("jid")
                            {
                                let _ = approved_tx.send((n, jid.to_owned()));
                            }
                        }
                    }
                    let id = element.attr("id").unwrap_or_default();
                    let result = format!("<iq type='result' id='{id}'/>");
                    let _ = replies.lock().await.send(&result).await;
                    continue;
                }
                if element.name() != "presence" {
                    continue;
                }
                let from = element.attr("from").unwrap_or_default().to_owned();
                match element.attr("type") {
                    Some("subscribe") => {
                        let reply = format!("<presence type='subscribed' to='{from}'/>");
                        let _ = replies.lock().await.send(&reply).await;
                    }
                    Some("subscribed") => {
                        let contact = from.split('/').next().unwrap_or_default().to_owned();
                        let _ = approved_tx.send((n, contact));
                    }
                    _ => {}
                }
            }
        });
        senders.push((n, sender));
    }
    drop(approved_tx);
    for (n, sender) in &senders {
        let mut requests = vec![String::from("<presence/>")];
        for contact in contacts_of(*n, users, contacts) {
            requests.push(format!(
                "<presence type='subscribe' to='{}'/>",
                bare(cli, contact)
            ));
        }
        let requests: Vec<&str> = requests.iter().map(String::as_str).collect();
        sender.lock().await.send_all(&requests).await?;
    }
    // A server may repeat an approval; each contact counts once.
    let mut approvals: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut done = 0;
    let deadline = tokio::time::Instant::now() + setup_timeout;
    let mut progress = tokio::time::interval(Duration::from_secs(30));
    progress.tick().await;
    while done < users {
        let approval = tokio::select! {
            approval = tokio::time::timeout_at(deadline, approved_rx.recv()) => approval,
            _ = progress.tick() => {
                eprintln!("{done} of {users} users have all their contacts");
                continue;
            }
        };
        match approval {
            Ok(Some((n, contact))) => {
                let approved = approvals.entry(n).or_default();
                if approved.insert(contact) && approved.len() == contacts {
                    done += 1;
                }
            }
            _ => anyhow::bail!("only {done} of {users} users got all their contacts to approve"),
        }
    }
    for (_, sender) in senders {
        let _ = sender.lock().await.close().await;
    }
    // Let the servers finish the sessions' ends before the measured run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// The presence scenario.
pub async fn presence(
    cli: &Cli,
    users: usize,
    contacts: usize,
    rate: u64,
    duration: u64,
    setup_timeout: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        contacts >= 4 && contacts.is_multiple_of(4) && contacts < users,
        "--contacts must be a multiple of 4, below --users"
    );
    set_up_rosters(cli, users, contacts, setup_timeout).await?;
    let pids = server_pids(cli);
    let online: Vec<usize> = (1..=users).filter(|n| n % 2 == 1).collect();
    let is_online = |n: usize| n % 2 == 1;
    let connections = log_in(cli, &online).await?;
    let epoch = Instant::now();
    let (latency_tx, mut latency_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let mut senders: Vec<(usize, Sender)> = Vec::new();
    for (n, connection) in connections {
        let (receiver, mut sender) = connection.split();
        sender.send("<presence/>").await?;
        tokio::spawn(receive(receiver, bare(cli, n), epoch, latency_tx.clone()));
        senders.push((n, sender));
    }
    drop(latency_tx);
    // Initial presence and probe answers settle first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    while latency_rx.try_recv().is_ok() {}
    let online_contacts: HashMap<usize, u64> = online
        .iter()
        .map(|&n| {
            let count = contacts_of(n, users, contacts)
                .into_iter()
                .filter(|&c| is_online(c))
                .count();
            (n, count as u64)
        })
        .collect();
    let window = CpuWindow::start(&pids);
    let sent = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(0));
    let per_user = rate as f64 / online.len() as f64;
    let paced = senders
        .into_iter()
        .map(|(n, sender)| {
            let (sent, expected) = (sent.clone(), expected.clone());
            let fanout = online_contacts[&n];
            let mut away = false;
            let next = move || {
                away = !away;
                let show = if away { "<show>away</show>" } else { "" };
                let seq = sent.fetch_add(1, Ordering::Relaxed);
                expected.fetch_add(fanout, Ordering::Relaxed);
                let at = epoch.elapsed().as_micros() as u64;
                format!("<presence>{show}<status>{seq} {at}</status></presence>")
            };
            (sender, next)
        })
        .collect();
    let mut senders = super::send_paced(paced, per_user, duration).await?;
    let sending = epoch.elapsed();
    let total_expected = expected.load(Ordering::Relaxed);
    let mut latencies = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while (latencies.len() as u64) < total_expected {
        match tokio::time::timeout_at(deadline, latency_rx.recv()).await {
            Ok(Some((_, latency))) => latencies.push(latency),
            _ => break,
        }
    }
    let (cpu, _) = window.spent();
    for sender in &mut senders {
        let _ = sender.close().await;
    }
    latencies.sort_unstable();
    let deliveries = latencies.len() as u64;
    let changes = sent.load(Ordering::Relaxed);
    let report = PresenceReport {
        scenario: "presence",
        users,
        contacts,
        online: online.len(),
        target_rate: rate,
        changes_sent: changes,
        deliveries_expected: total_expected,
        deliveries,
        lost: total_expected.saturating_sub(deliveries),
        fanout_per_second: deliveries as f64 / sending.as_secs_f64(),
        latency: Latency::of(&latencies),
        server_cpu_seconds: cpu,
        server_cpu_us_per_delivery: per_unit(cpu, deliveries, 1e6),
    };
    eprintln!(
        "{changes} presence changes, {deliveries} of {total_expected} deliveries ({:.0}/s); latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms; server CPU {:.1?} us per delivery",
        report.fanout_per_second,
        report.latency.latency_ms_p50,
        report.latency.latency_ms_p99,
        report.latency.latency_ms_max,
        report.server_cpu_us_per_delivery
    );
    emit(cli, &report)
}

/// Reads presence updates from contacts and reports their latency.
async fn receive(
    mut receiver: Receiver,
    me: String,
    epoch: Instant,
    latency: tokio::sync::mpsc::UnboundedSender<(u64, u64)>,
) {
    while let Some(element) = receiver.next().await {
        if element.name() != "presence" || element.attr("type").is_some() {
            continue;
        }
        let from = element.attr("from").unwrap_or_default();
        if from.split('/').next() == Some(me.as_str()) {
            continue; // Our own presence, reflected.
        }
        let Some(status) = element
            .get_child("status", "jabber:client")
            .map(|s| s.text())
        else {
            continue;
        };
        let mut parts = status.split(' ');
        let (Some(seq), Some(at)) = (
            parts.next().and_then(|s| s.parse().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            continue;
        };
        let now = epoch.elapsed().as_micros() as u64;
        let _ = latency.send((seq, now.saturating_sub(at)));
    }
}
