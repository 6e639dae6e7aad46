//! `floor`: this machine's own latency floor under the `chat` scenario's load.
//!
//! A relay in another process (this binary's hidden `floor-relay`) forwards
//! fixed-size frames between plain TCP connections on loopback: each
//! connection has a reading task, and a frame goes through the recipient's
//! inbox (a channel) to the recipient's writing task. That is the least any
//! server of that shape does for a message (Rookery's session tasks and
//! ejabberd's processes both have it), without TLS, XML, authentication or
//! routing rules. The client paces and times frames as `chat` paces and
//! times messages, without TLS or XML on its side either. What is left is
//! the machine: the system calls and the wake-ups of the chain (sender,
//! relay, recipient). No server measured by `chat` at the same rate and
//! number of users can show a lower latency than this, so a latency target
//! below it cannot be met on this machine.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use rookery_bench::process;

use super::chat::{Placement, recipient};
use super::{Delivery, Pacer, arrivals};
use crate::{Cli, CpuWindow, Load, emit, per_unit};

/// Bytes in a frame: about a chat message of the `chat` scenario.
const FRAME: usize = 160;
/// How long the relay waits for all its connections.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

type Frame = [u8; FRAME];

#[derive(Debug, Serialize)]
pub struct FloorReport {
    scenario: &'static str,
    connections: usize,
    target_rate: u64,
    #[serde(flatten)]
    delivery: Delivery,
    /// The relay process's CPU per message.
    relay_cpu_us_per_message: Option<f64>,
    bench_cpu_us_per_message: Option<f64>,
    /// The CPUs the relay could run on.
    relay_cpus: Option<String>,
    /// Whether the relay ended by itself once the connections closed.
    relay_stopped: bool,
}

/// Frames between `users` connections through a relay process, `rate` a
/// second in all for `duration` seconds; the relay on `relay_cpus` if given.
pub async fn floor(cli: &Cli, load: &Load, relay_cpus: Option<&str>) -> anyhow::Result<()> {
    let Load {
        users,
        rate,
        duration,
    } = *load;
    anyhow::ensure!(users >= 2, "floor needs at least two connections");
    let bench = std::env::current_exe()?;
    let mut relay = match relay_cpus {
        // taskset replaces itself with the relay: the process is the relay's.
        Some(cpus) => {
            let mut taskset = tokio::process::Command::new("taskset");
            taskset.args(["-c", cpus]).arg(bench);
            taskset
        }
        None => tokio::process::Command::new(bench),
    };
    let mut relay = relay
        .args(["floor-relay", "--connections", &users.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the relay")?;
    let pids: Vec<u32> = relay.id().into_iter().collect();
    let mut lines = BufReader::new(relay.stdout.take().context("relay output")?).lines();
    let port: u16 = lines
        .next_line()
        .await?
        .and_then(|line| line.strip_prefix("port ")?.parse().ok())
        .context("the relay did not say its port")?;
    let mut streams = Vec::with_capacity(users);
    for index in 0..users as u32 {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&index.to_le_bytes()).await?;
        streams.push(stream);
    }
    anyhow::ensure!(
        lines.next_line().await?.as_deref() == Some("ready"),
        "the relay did not take the connections"
    );
    let relay_cpus = pids
        .first()
        .and_then(|pid| process::cpus_allowed(*pid).ok());

    let epoch = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let (latency_tx, mut latency_rx) = mpsc::unbounded_channel();
    let per_user = rate as f64 / users as f64;
    let window = CpuWindow::start(&pids);
    let mut senders = Vec::with_capacity(users);
    for (index, stream) in streams.into_iter().enumerate() {
        let (mut reader, mut writer) = stream.into_split();
        let latency_tx = latency_tx.clone();
        tokio::spawn(async move {
            let mut frame = [0; FRAME];
            while reader.read_exact(&mut frame).await.is_ok() {
                let (_, seq, at) = read_frame(&frame);
                let now = epoch.elapsed().as_micros() as u64;
                let _ = latency_tx.send((seq, now.saturating_sub(at)));
            }
        });
        let sent = sent.clone();
        senders.push(tokio::spawn(async move {
            let mut pacer = Pacer::start(index, users, per_user, duration).await;
            while pacer.tick().await {
                let to = recipient(index, users, 1, Placement::Any) as u32;
                let seq = sent.fetch_add(1, Ordering::Relaxed);
                let at = epoch.elapsed().as_micros() as u64;
                if writer.write_all(&frame(to, seq, at)).await.is_err() {
                    break;
                }
            }
            writer
        }));
    }
    drop(latency_tx);
    let mut writers = Vec::with_capacity(users);
    for sender in senders {
        writers.push(sender.await?);
    }
    let sending = epoch.elapsed();
    let total = sent.load(Ordering::Relaxed);
    let arrived = arrivals(&mut latency_rx, total, Duration::from_secs(3)).await;
    let (relay_cpu, bench_cpu) = window.spent();
    // Closing the writing halves ends the relay's reading tasks, then the relay.
    drop(writers);
    let relay_stopped = match tokio::time::timeout(Duration::from_secs(5), relay.wait()).await {
        Ok(status) => status?.success(),
        Err(_) => {
            relay.kill().await?;
            false
        }
    };
    let delivered = arrived.delivered;
    let report = FloorReport {
        scenario: "floor",
        connections: users,
        target_rate: rate,
        delivery: Delivery::new(total, &arrived, sending),
        relay_cpu_us_per_message: per_unit(relay_cpu, delivered, 1e6),
        bench_cpu_us_per_message: per_unit(bench_cpu, delivered, 1e6),
        relay_cpus,
        relay_stopped,
    };
    eprintln!(
        "floor: {}; relay CPU {} us/frame",
        report.delivery,
        report
            .relay_cpu_us_per_message
            .map_or("n/a".to_owned(), |us| format!("{us:.1}")),
    );
    emit(cli, &report)
}

/// The relay: says its port on standard output, takes `connections`
/// connections (each first sends its number, 4 bytes little-endian), says
/// `ready`, then forwards every frame to the connection its first 4 bytes
/// name, until all connections have closed.
pub async fn relay(connections: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    println!("port {}", listener.local_addr()?.port());
    let mut readers = Vec::with_capacity(connections);
    let mut inboxes = Vec::with_capacity(connections);
    let mut writing = Vec::with_capacity(connections);
    let accepted = tokio::time::timeout(ACCEPT_TIMEOUT, async {
        let mut slots: Vec<Option<TcpStream>> = (0..connections).map(|_| None).collect();
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let mut number = [0; 4];
            stream.read_exact(&mut number).await?;
            let slot = slots
                .get_mut(u32::from_le_bytes(number) as usize)
                .context("connection number out of range")?;
            anyhow::ensure!(slot.replace(stream).is_none(), "connection number taken");
        }
        anyhow::Ok(slots.into_iter().flatten())
    })
    .await
    .context("the connections did not come")??;
    for stream in accepted {
        let (reader, mut writer) = stream.into_split();
        let (inbox, mut mail) = mpsc::unbounded_channel::<Frame>();
        readers.push(reader);
        inboxes.push(inbox);
        writing.push(tokio::spawn(async move {
            while let Some(frame) = mail.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
        }));
    }
    println!("ready");
    let inboxes = Arc::new(inboxes);
    let reading: Vec<_> = readers
        .into_iter()
        .map(|mut reader| {
            let inboxes = inboxes.clone();
            tokio::spawn(async move {
                let mut frame = [0; FRAME];
                while reader.read_exact(&mut frame).await.is_ok() {
                    let (to, _, _) = read_frame(&frame);
                    // A frame for no connection ends its sender's connection.
                    let Some(inbox) = inboxes.get(to as usize) else {
                        break;
                    };
                    let _ = inbox.send(frame);
                }
            })
        })
        .collect();
    for task in reading {
        task.await?;
    }
    drop(inboxes);
    for task in writing {
        task.await?;
    }
    Ok(())
}

/// A frame to connection `to` with sequence number `seq`, sent at `at` µs.
fn frame(to: u32, seq: u64, at: u64) -> Frame {
    let mut frame = [b' '; FRAME];
    frame[..4].copy_from_slice(&to.to_le_bytes());
    frame[4..12].copy_from_slice(&seq.to_le_bytes());
    frame[12..20].copy_from_slice(&at.to_le_bytes());
    frame
}

/// (to, seq, at) of a frame.
fn read_frame(frame: &Frame) -> (u32, u64, u64) {
    let field = |range: std::ops::Range<usize>| {
        let mut bytes = [0; 8];
        bytes[..range.len()].copy_from_slice(&frame[range]);
        u64::from_le_bytes(bytes)
    };
    (field(0..4) as u32, field(4..12), field(12..20))
}

#[cfg(test)]
mod tests {
    use super::{frame, read_frame};

    #[test]
    fn a_frame_reads_back_as_written() {
        let written = frame(70_000, u64::MAX - 1, 1 << 40);
        assert_eq!(read_frame(&written), (70_000, u64::MAX - 1, 1 << 40));
    }
}
