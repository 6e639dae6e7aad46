//! `abuse`: normal clients chat while attackers, from other addresses, do
//! what the outside probe of the server did: endless stream headers and
//! opening tags, clients that never read what is sent to them, input floods
//! over TCP and WebSocket, and half-open connections piling up (past the
//! per-address limit). The same chat runs first without them; the report
//! sets the normal clients' p99 and loss of both runs side by side, with
//! the server's memory and what became of each attack.
//!
//! Normal users are accounts 1 ..= `users` (on 127.0.0.1 .. 127.0.0.16 as
//! usual); attackers use the accounts after them and the addresses
//! 127.0.K.x, one /24 per kind of attack, so the server's per-address
//! connection limit applies to them (start the server with an empty
//! `limits.connection_allowlist`: loopback is allowed by default).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use rookery_bench::client::{Connection, StreamError, Target, Transport};

use super::chat::{ChatReport, Placement};
use crate::{Cli, emit, rss_kib, server_pids};

/// What an abuse run does.
#[derive(Debug, Clone, clap::Args)]
pub struct AbuseLoad {
    /// Normal users (accounts 1 ..= users), chatting.
    #[arg(long)]
    pub users: usize,
    /// Their messages per second, all together.
    #[arg(long)]
    pub rate: u64,
    /// Seconds of chat, quiet and under attack alike.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Attackers of each kind (each needing accounts for the kinds that log in).
    #[arg(long, default_value_t = 4)]
    pub attackers: usize,
    /// The server's HTTP address (for the HTTP and WebSocket attacks).
    #[arg(long)]
    pub http: SocketAddr,
    /// The kinds of attack (all when not given), to tell what each costs.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kinds: Vec<Kind>,
}

/// The kinds of attack, each from its own /24 of loopback (127.0.K.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// An opening stream tag that never ends (attributes after attributes), before TLS.
    EndlessHeader,
    /// After login, an opening stanza tag that never ends.
    EndlessTag,
    /// A client with a tiny receive buffer that reads nothing, and three
    /// others sending it 50 kB messages as fast as they may.
    SlowReader,
    /// Messages as fast as the connection takes them (TCP).
    Flood,
    /// Messages as fast as the connection takes them (WebSocket).
    WebsocketFlood,
    /// Connections that send half a stream header or HTTP request and wait,
    /// 150 per address (over the limit of 100).
    HalfOpen,
}

/// Senders per slow reader: each is held to the server's input rate, and
/// the socket buffers on the way take a few megabytes before the reader's
/// queue on the server grows at all.
const SLOW_READER_SENDERS: usize = 3;

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::EndlessHeader,
        Kind::EndlessTag,
        Kind::SlowReader,
        Kind::Flood,
        Kind::WebsocketFlood,
        Kind::HalfOpen,
    ];

    /// The third byte of the kind's addresses.
    fn subnet(self) -> u8 {
        Kind::ALL.iter().position(|k| *k == self).expect("listed") as u8 + 1
    }

    /// Accounts used per attacker.
    fn accounts(self) -> usize {
        match self {
            Kind::EndlessTag | Kind::Flood | Kind::WebsocketFlood => 1,
            Kind::SlowReader => 1 + SLOW_READER_SENDERS,
            Kind::EndlessHeader | Kind::HalfOpen => 0,
        }
    }
}

/// What became of one kind of attack.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    /// Connections (or logins) tried.
    attempts: u64,
    /// Refused at once (closed before anything was read, or the per-address limit).
    refused: u64,
    /// Ended by the server, by stream error condition (`closed` without one).
    ended: BTreeMap<String, u64>,
    /// Bytes the attackers got into their sockets.
    bytes_sent: u64,
    /// Bytes of stanzas the server took from the flooding attackers (their
    /// messages, to themselves, coming back), whatever the sockets held.
    bytes_taken: u64,
    /// Seconds the flooding connections were open, all together.
    connection_seconds: f64,
    /// `bytes_taken` per second of connection: the input rate each
    /// flooding connection got on average (its burst included).
    bytes_per_second_per_connection: Option<f64>,
    /// Connections still open at the end.
    open_at_end: u64,
    /// Anything that went wrong on the attacker's side (not the server's doing).
    errors: u64,
}

#[derive(Debug, Serialize)]
struct AbuseReport {
    scenario: &'static str,
    quiet: ChatReport,
    under_attack: ChatReport,
    /// p99 under attack over p99 without (target: at most 2).
    p99_ratio: f64,
    attackers_per_kind: usize,
    attacks: BTreeMap<Kind, Outcome>,
    server_rss_kib_before: Option<u64>,
    server_rss_kib_peak: Option<u64>,
    server_rss_kib_after: Option<u64>,
}

/// What the attackers share.
struct Arena {
    server: SocketAddr,
    http: SocketAddr,
    domain: String,
    mechanism: String,
    prefix: String,
    password: String,
    tls: rookery_bench::client::TlsMode,
    /// The first attacker account number.
    first_account: usize,
    /// Set when the run under attack is over.
    stop: Arc<AtomicBool>,
    outcomes: Mutex<BTreeMap<Kind, Outcome>>,
}

impl Arena {
    fn record(&self, kind: Kind, update: impl FnOnce(&mut Outcome)) {
        update(
            self.outcomes
                .lock()
                .expect("outcomes")
                .entry(kind)
                .or_default(),
        );
    }

    fn ended(&self, kind: Kind, condition: Option<&str>) {
        let condition = condition.unwrap_or("closed").to_owned();
        self.record(kind, |o| *o.ended.entry(condition).or_default() += 1);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn address(kind: Kind, worker: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            kind.subnet(),
            (worker % 250 + 1) as u8,
        ))
    }

    /// How attacker `worker` of `kind` logs in as its `nth` account.
    fn target(&self, kind: Kind, worker: usize, websocket: bool) -> Target {
        Target {
            address: if websocket { self.http } else { self.server },
            domain: self.domain.clone(),
            tls: if websocket {
                rookery_bench::client::TlsMode::None
            } else {
                self.tls
            },
            transport: if websocket {
                Transport::WebSocket {
                    path: "/xmpp-websocket".into(),
                }
            } else {
                Transport::Tcp
            },
            mechanism: self.mechanism.clone(),
            sources: vec![Arena::address(kind, worker)],
            receive_buffer: (kind == Kind::SlowReader).then_some(4096),
        }
    }

    /// The account of attacker `worker` of `kind`, its `nth` (from 0).
    fn account(&self, kind: Kind, attackers: usize, worker: usize, nth: usize) -> String {
        let mut before = 0;
        for other in Kind::ALL {
            if other == kind {
                break;
            }
            before += other.accounts() * attackers;
        }
        let number = self.first_account + before + worker * kind.accounts() + nth;
        format!("{}{number}", self.prefix)
    }

    async fn login(&self, target: &Target, user: &str) -> anyhow::Result<Connection> {
        let mut connection = Connection::login(target, 0, user, &self.password, "attack").await?;
        connection.go_online().await?;
        Ok(connection)
    }
}

/// The abuse scenario.
pub async fn abuse(cli: &Cli, load: &AbuseLoad) -> anyhow::Result<()> {
    let pids = server_pids(cli);
    eprintln!("abuse: the quiet run");
    let quiet = super::chat::run(cli, load.users, load.rate, load.duration, Placement::Any).await?;
    let before = rss_kib(&pids);
    let arena = Arc::new(Arena {
        server: cli.server[0],
        http: load.http,
        domain: cli.domain.clone(),
        mechanism: cli.mechanism.clone(),
        prefix: cli.user_prefix.clone(),
        password: cli.password.clone(),
        tls: cli.tls,
        first_account: load.users + 1,
        stop: Arc::new(AtomicBool::new(false)),
        outcomes: Mutex::new(BTreeMap::new()),
    });
    // The attackers run on a runtime (and thread) of their own, so that the
    // normal clients' tasks do not wait in a queue behind theirs: the two
    // share the machine's cores the way two processes would.
    let attackers_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("attackers")
        .enable_all()
        .build()?;
    let kinds = if load.kinds.is_empty() {
        &Kind::ALL[..]
    } else {
        &load.kinds[..]
    };
    let mut workers = Vec::new();
    for &kind in kinds {
        for worker in 0..load.attackers {
            let arena = arena.clone();
            let attackers = load.attackers;
            workers.push(attackers_runtime.spawn(async move {
                attack(&arena, kind, attackers, worker).await;
            }));
        }
    }
    // The server's memory through the attack.
    let peak = Arc::new(AtomicU64::new(0));
    let watch = {
        let (pids, peak) = (pids.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                if let Some(rss) = rss_kib(&pids) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    eprintln!("abuse: attackers start; the run under attack follows in 5 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let under_attack =
        super::chat::run(cli, load.users, load.rate, load.duration, Placement::Any).await?;
    arena.stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
    }
    attackers_runtime.shutdown_background();
    watch.abort();
    let peak = peak.load(Ordering::Relaxed);
    // The server lets go of what the attackers made it hold.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut attacks = std::mem::take(&mut *arena.outcomes.lock().expect("outcomes"));
    for outcome in attacks.values_mut() {
        outcome.bytes_per_second_per_connection = (outcome.connection_seconds > 0.0)
            .then(|| outcome.bytes_taken as f64 / outcome.connection_seconds);
    }
    let quiet_p99 = quiet.delivery.latency.latency_ms_p99;
    let report = AbuseReport {
        scenario: "abuse",
        p99_ratio: under_attack.delivery.latency.latency_ms_p99 / quiet_p99,
        quiet,
        under_attack,
        attackers_per_kind: load.attackers,
        attacks,
        server_rss_kib_before: before,
        server_rss_kib_peak: (peak > 0).then_some(peak),
        server_rss_kib_after: rss_kib(&pids),
    };
    eprintln!(
        "abuse: p99 {:.2} ms quiet, {:.2} ms under attack ({:.2}x); lost {} and {}; server RSS {:?} -> peak {:?} -> {:?} KiB",
        report.quiet.delivery.latency.latency_ms_p99,
        report.under_attack.delivery.latency.latency_ms_p99,
        report.p99_ratio,
        report.quiet.delivery.lost,
        report.under_attack.delivery.lost,
        report.server_rss_kib_before,
        report.server_rss_kib_peak,
        report.server_rss_kib_after
    );
    emit(cli, &report)
}

/// One attacker, until the run is over.
async fn attack(arena: &Arena, kind: Kind, attackers: usize, worker: usize) {
    while !arena.stopped() {
        let result = match kind {
            Kind::EndlessHeader => endless_header(arena, worker).await,
            Kind::EndlessTag => endless_tag(arena, attackers, worker).await,
            Kind::SlowReader => slow_reader(arena, attackers, worker).await,
            Kind::Flood => flood(arena, kind, attackers, worker, false).await,
            Kind::WebsocketFlood => flood(arena, kind, attackers, worker, true).await,
            Kind::HalfOpen => half_open(arena, worker).await,
        };
        if result.is_err() {
            arena.record(kind, |o| o.errors += 1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Attributes of 200 bytes, 200 of them: what the probe sent at a time.
fn attributes(round: usize) -> String {
    (0..200)
        .map(|n| format!(" a{round}x{n}='{}'", "v".repeat(200)))
        .collect()
}

/// The text of a refusal under the per-address connection limits.
const REFUSED: &str = "Too many connections from your address.";

/// Reads until the peer closes (or `limit`); the stream error condition seen,
/// if any (`refused` for a refusal under the per-address limits).
async fn read_to_end(tcp: &mut TcpStream, limit: Duration) -> (bool, Option<String>) {
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(limit, async {
        let mut buffer = [0; 4096];
        loop {
            match tcp.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await
    .is_ok();
    let text = String::from_utf8_lossy(&seen);
    if text.contains(REFUSED) {
        return (closed, Some("refused".into()));
    }
    let condition = text
        .find("<stream:error><")
        .map(|at| &text[at + "<stream:error><".len()..])
        .and_then(|rest| rest.split([' ', '/', '>']).next())
        .map(str::to_owned);
    (closed, condition)
}

async fn endless_header(arena: &Arena, worker: usize) -> anyhow::Result<()> {
    let kind = Kind::EndlessHeader;
    arena.record(kind, |o| o.attempts += 1);
    let mut tcp = connect_from(Arena::address(kind, worker), arena.server).await?;
    tcp.write_all(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'").await?;
    let mut sent = 0;
    for round in 0..100 {
        let chunk = attributes(round);
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += chunk.len() as u64;
        // Stop feeding once the server answered (with its error).
        let mut peek = [0; 1];
        if tokio::time::timeout(Duration::from_millis(1), tcp.peek(&mut peek))
            .await
            .is_ok()
        {
            break;
        }
    }
    arena.record(kind, |o| o.bytes_sent += sent);
    let (closed, condition) = read_to_end(&mut tcp, Duration::from_secs(70)).await;
    if condition.as_deref() == Some("refused") {
        arena.record(kind, |o| o.refused += 1);
    } else if closed {
        arena.ended(kind, condition.as_deref());
    } else {
        arena.record(kind, |o| o.open_at_end += 1);
    }
    Ok(())
}

/// Reads elements until the stream ends; its stream error condition, if any.
async fn until_ended(connection: &mut Connection, limit: Duration) -> Option<Option<String>> {
    tokio::time::timeout(limit, async {
        loop {
            match connection.next().await {
                Ok(element) => {
                    if let Some(error) = StreamError::from_element(&element) {
                        return Some(error.condition);
                    }
                }
                Err(_) => return None,
            }
        }
    })
    .await
    .ok()
}

async fn endless_tag(arena: &Arena, attackers: usize, worker: usize) -> anyhow::Result<()> {
    let kind = Kind::EndlessTag;
    arena.record(kind, |o| o.attempts += 1);
    let user = arena.account(kind, attackers, worker, 0);
    let Ok(mut connection) = arena.login(&arena.target(kind, worker, false), &user).await else {
        // Refused under the per-address limits (or the login failed).
        arena.record(kind, |o| o.refused += 1);
        return Ok(());
    };
    connection.send("<message to='nobody@localhost'").await?;
    let mut sent = 0;
    for round in 0..100 {
        let chunk = attributes(round);
        if connection.send(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len() as u64;
        if arena.stopped() {
            break;
        }
    }
    arena.record(kind, |o| o.bytes_sent += sent);
    match until_ended(&mut connection, Duration::from_secs(70)).await {
        Some(condition) => arena.ended(kind, condition.as_deref()),
        None => arena.record(kind, |o| o.open_at_end += 1),
    }
    Ok(())
}

async fn slow_reader(arena: &Arena, attackers: usize, worker: usize) -> anyhow::Result<()> {
    let kind = Kind::SlowReader;
    arena.record(kind, |o| o.attempts += 1);
    let target = arena.target(kind, worker, false);
    let reader_account = arena.account(kind, attackers, worker, 0);
    let mut reader = arena.login(&target, &reader_account).await?;
    let to = format!("{reader_account}@{}/attack", arena.domain);
    let mut senders = Vec::new();
    for nth in 1..=SLOW_READER_SENDERS {
        let sender = arena
            .login(&target, &arena.account(kind, attackers, worker, nth))
            .await?;
        let (to, stop) = (to.clone(), arena.stop.clone());
        senders.push(tokio::spawn(async move {
            let (mut drain, mut writer) = sender.split();
            // What the sender gets back (errors once the reader's storage is
            // full) is read away.
            let drained = tokio::spawn(async move { while drain.next().await.is_some() {} });
            let body = "b".repeat(50_000);
            let started = Instant::now();
            let mut sent = 0u64;
            // 20 s of 50 kB messages to a reader that reads nothing.
            for n in 0.. {
                if started.elapsed() > Duration::from_secs(20) || stop.load(Ordering::Relaxed) {
                    break;
                }
                let message =
                    format!("<message to='{to}' id='s{nth}-{n}'><body>{body}</body></message>");
                if writer.send(&message).await.is_err() {
                    break;
                }
                sent += message.len() as u64;
            }
            let _ = writer.close().await;
            drained.abort();
            sent
        }));
    }
    let mut sent = 0;
    for sender in senders {
        sent += sender.await.unwrap_or(0);
    }
    arena.record(kind, |o| o.bytes_sent += sent);
    // Now read what waits: the end of the stream shows whether the server ended it.
    match until_ended(&mut reader, Duration::from_secs(10)).await {
        Some(condition) => arena.ended(kind, condition.as_deref()),
        None => arena.record(kind, |o| o.open_at_end += 1),
    }
    Ok(())
}

async fn flood(
    arena: &Arena,
    kind: Kind,
    attackers: usize,
    worker: usize,
    websocket: bool,
) -> anyhow::Result<()> {
    arena.record(kind, |o| o.attempts += 1);
    let user = arena.account(kind, attackers, worker, 0);
    let connection = arena
        .login(&arena.target(kind, worker, websocket), &user)
        .await?;
    let (mut receiver, mut sender) = connection.split();
    // The messages come back (they are addressed to the attacker itself):
    // what returns is what the server took in, whatever the socket buffers
    // on the way held.
    let returned = Arc::new(AtomicU64::new(0));
    let drained = {
        let returned = returned.clone();
        tokio::spawn(async move {
            while let Some(element) = receiver.next().await {
                if element.name() == "message" {
                    let bytes = rookery_stream::xml::approximate_size(&element) as u64;
                    returned.fetch_add(bytes, Ordering::Relaxed);
                }
            }
        })
    };
    let body = "f".repeat(1000);
    let to = format!("{user}@{}/attack", arena.domain);
    let started = Instant::now();
    let mut sent = 0u64;
    while !arena.stopped() && started.elapsed() < Duration::from_secs(20) {
        let batch: Vec<String> = (0..10)
            .map(|_| format!("<message to='{to}'><body>{body}</body></message>"))
            .collect();
        let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
        if sender.send_all(&batch).await.is_err() {
            break;
        }
        sent += 10 * (body.len() as u64 + 60);
    }
    let seconds = started.elapsed().as_secs_f64();
    arena.record(kind, |o| {
        o.bytes_sent += sent;
        o.bytes_taken += returned.load(Ordering::Relaxed);
        o.connection_seconds += seconds;
    });
    let _ = sender.close().await;
    drained.abort();
    Ok(())
}

async fn half_open(arena: &Arena, worker: usize) -> anyhow::Result<()> {
    let kind = Kind::HalfOpen;
    let source = Arena::address(kind, worker);
    let mut held = Vec::new();
    for n in 0..150 {
        arena.record(kind, |o| o.attempts += 1);
        let (to, start): (SocketAddr, &[u8]) = if n % 2 == 0 {
            (
                arena.server,
                b"<?xml version='1.0'?><stream:stream to='local",
            )
        } else {
            (arena.http, b"GET /live HTTP/1.1\r\nHost: loc")
        };
        let Ok(mut tcp) = connect_from(source, to).await else {
            arena.record(kind, |o| o.errors += 1);
            continue;
        };
        let _ = tcp.write_all(start).await;
        held.push(tcp);
    }
    // Which the server closed at once (over the limit), and which later (timeouts).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut open = Vec::new();
    for mut tcp in held {
        let (closed, _) = read_to_end(&mut tcp, Duration::from_millis(5)).await;
        if closed {
            arena.record(kind, |o| o.refused += 1);
        } else {
            open.push(tcp);
        }
    }
    let started = Instant::now();
    while !arena.stopped() && started.elapsed() < Duration::from_secs(70) && !open.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut still = Vec::new();
        for mut tcp in open {
            let (closed, condition) = read_to_end(&mut tcp, Duration::from_millis(1)).await;
            if closed {
                arena.ended(kind, condition.as_deref());
            } else {
                still.push(tcp);
            }
        }
        open = still;
    }
    arena.record(kind, |o| o.open_at_end += open.len() as u64);
    Ok(())
}
