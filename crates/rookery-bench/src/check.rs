//! The fault checker, in the spirit of Jepsen: a Rookery cluster of its own
//! (nodes, one or three NATS servers, PostgreSQL, all on loopback), clients
//! with stream management sending numbered messages across the nodes
//! ([`crate::reliable`]), and a schedule of faults drawn from a seed, so that a
//! failing run can be replayed: nodes killed (SIGKILL), stopped (SIGTERM),
//! frozen (SIGSTOP, as a long pause of a VM) and cut off from NATS (a proxy
//! between each node and each NATS server); NATS servers killed and started
//! with their store or with an empty one; PostgreSQL restarted as after a
//! crash. One fault at a time, each followed by the cluster's recovery.
//!
//! At the end every message the server acknowledged must have reached its
//! recipient (duplicates, which stream management allows, are counted), and
//! messages that arrived after a later one of the same sender are counted,
//! apart for those sent and delivered away from any fault.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{RngExt as _, SeedableRng as _};
use serde::Serialize;

use crate::client::{Target, TlsMode, Transport};
use crate::harness::{Folder, Nats, Node, NodeSettings, Postgres, Proxy};
use crate::reliable::{Chat, Report, Settings};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of a node, started again after a moment.
    Kill,
    /// SIGTERM of a node (it must end within its shutdown grace), started again.
    Term,
    /// SIGSTOP of a node for up to three failure timeouts, then SIGCONT.
    Pause,
    /// A node cut off from every NATS server for up to three failure timeouts.
    Partition,
    /// A NATS server killed and started again with its store.
    Nats,
    /// A NATS server killed and started again with an empty store (a lost disk).
    NatsEmpty,
    /// PostgreSQL stopped as in a crash and started again.
    Postgres,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Kill,
        FaultKind::Term,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Nats,
        FaultKind::NatsEmpty,
        FaultKind::Postgres,
    ];
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    /// The `rookery` binary.
    pub rookery: PathBuf,
    /// The run's folder (logs, stores); removed at the end unless `keep`.
    pub folder: PathBuf,
    /// Keep the folder.
    pub keep: bool,
    /// The schedule's seed.
    pub seed: u64,
    /// Rookery nodes.
    pub nodes: usize,
    /// NATS servers: 1, or 3 (a cluster, JetStream with 3 replicas).
    pub nats: usize,
    /// Chat users, spread over the nodes.
    pub users: usize,
    /// Messages per second, all users together.
    pub rate: f64,
    /// How long faults are injected; at least one round (each kind once, in
    /// an order drawn from the seed) is run whatever the duration.
    pub duration: Duration,
    /// The kinds of fault to draw from.
    pub faults: Vec<FaultKind>,
    /// The nodes' failure timeout, seconds.
    pub failure_timeout: f64,
    /// The nodes' shutdown grace, seconds.
    pub shutdown_grace: u64,
    /// How long the clients may take to settle at the end.
    pub settle: Duration,
}

/// One fault as it was injected.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// Its kind.
    pub kind: FaultKind,
    /// The node or server it hit.
    pub target: String,
    /// Seconds from the start of the chat.
    pub started_s: f64,
    /// When the fault was undone.
    pub undone_s: f64,
    /// When the cluster was ready again.
    pub recovered_s: f64,
}

/// The outcome.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// The seed (`--seed` replays the schedule).
    pub seed: u64,
    /// Nodes and NATS servers.
    pub nodes: usize,
    /// NATS servers.
    pub nats: usize,
    /// The faults, in order.
    pub faults: Vec<Fault>,
    /// What the clients saw.
    pub chat: Report,
    /// Of `chat.lost`, those a lone NATS server took with its store:
    /// acknowledged from [`STORE_WINDOW`] before it was killed until it was
    /// restarted empty, found in the store it lost (the run's folder keeps
    /// it), and never delivered. A lone server's store is the only copy of the
    /// deliveries it holds (three servers and three replicas keep them), so
    /// these are counted apart; none may be lost otherwise.
    pub lost_with_nats_store: u64,
    /// The first lost messages not counted in `lost_with_nats_store` (what
    /// the check fails on), described with when each was sent and
    /// acknowledged, to look for in the kept node logs.
    pub lost_unexcused: Vec<String>,
    /// Inversions of messages sent and delivered away from any fault (from
    /// a fault's start to some seconds after the cluster recovered).
    pub inversions_away_from_faults: u64,
    /// Dead incarnations cleaned up more than once (should be empty).
    pub repeated_cleanups: Vec<String>,
    /// What went wrong beside the messages: a node that did not stop within
    /// its grace, or did not become ready again.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when nothing acknowledged was lost and no problem was seen.
    pub fn passed(&self) -> bool {
        self.chat.lost == self.lost_with_nats_store
            && self.chat.acknowledged > 0
            && self.repeated_cleanups.is_empty()
            && self.problems.is_empty()
    }
}

/// How long before a lone NATS server lost its store a message still
/// acknowledged and not delivered may have been among what the store held
/// (deliveries wait in it while a node is frozen or taken for dead).
pub const STORE_WINDOW: Duration = Duration::from_secs(15);

/// How long after recovery a fault still explains an inversion.
const AFTERMATH: Duration = Duration::from_secs(5);
/// How long a node may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

struct Cluster {
    postgres: Postgres,
    nats: Vec<Nats>,
    /// `proxies[node][server]`.
    proxies: Vec<Vec<Proxy>>,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start(settings: &CheckSettings, folder: &Folder) -> anyhow::Result<Cluster> {
        let postgres = Postgres::start(&folder.path.join("postgres"))?;
        let nats = Nats::start_all(&folder.path.join("nats"), settings.nats)?;
        let mut proxies = Vec::new();
        let mut nodes = Vec::new();
        for index in 0..settings.nodes {
            let mut own = Vec::new();
            for server in &nats {
                own.push(Proxy::start(([127, 0, 0, 1], server.port).into()).await?);
            }
            let node_settings = NodeSettings {
                binary: settings.rookery.clone(),
                nats: own
                    .iter()
                    .map(|proxy| format!("nats://{}", proxy.address))
                    .collect(),
                postgres: postgres.url("postgres"),
                replicas: settings.nats,
                failure_timeout: settings.failure_timeout,
                shutdown_grace: settings.shutdown_grace,
            };
            let name = format!("node{index}");
            nodes.push(Node::start(
                &name,
                &folder.path.join(&name),
                &node_settings,
            )?);
            proxies.push(own);
        }
        let mut cluster = Cluster {
            postgres,
            nats,
            proxies,
            nodes,
        };
        let mut problems = Vec::new();
        cluster.ready(&mut problems).await?;
        anyhow::ensure!(problems.is_empty(), "{problems:?}");
        Ok(cluster)
    }

    /// Waits until every node is ready; a node that ended by itself (a
    /// crash) is reported in `problems` and started again.
    async fn ready(&mut self, problems: &mut Vec<String>) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if let Some(status) = node.exited() {
                problems.push(format!("{} ended by itself ({status})", node.name));
                node.restart()?;
            }
            node.wait_ready(READY_TIMEOUT).await?;
        }
        // One fault at a time: the next waits until JetStream is whole again
        // (a server restarted, with or without its store, has caught up with
        // its replicas), as an operator waits before touching the next server.
        let deadline = Instant::now() + READY_TIMEOUT;
        for server in &self.nats {
            while !server.healthy().await {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "a NATS server did not report itself healthy within {READY_TIMEOUT:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// Runs the checker.
pub async fn run(settings: &CheckSettings) -> anyhow::Result<CheckReport> {
    anyhow::ensure!(settings.nodes >= 2, "the checker needs two nodes or more");
    anyhow::ensure!(matches!(settings.nats, 1 | 3), "one NATS server or three");
    anyhow::ensure!(!settings.faults.is_empty(), "no kind of fault to inject");
    let folder = Folder::create(settings.folder.clone(), settings.keep)?;
    let mut cluster = Cluster::start(settings, &folder).await?;
    let users: Vec<String> = (1..=settings.users).map(|n| format!("check{n}")).collect();
    let accounts: String = users
        .iter()
        .map(|user| format!("{user} secret\n"))
        .collect();
    cluster.nodes[0].command(&["user", "import", "-"], &accounts)?;
    let chat = Chat::start(Settings {
        nodes: cluster.nodes.iter().map(|node| node.starttls).collect(),
        target: Target {
            address: cluster.nodes[0].starttls,
            domain: "localhost".into(),
            tls: TlsMode::Starttls,
            transport: Transport::Tcp,
            mechanism: "SCRAM-SHA-256".into(),
            sources: Vec::new(),
            receive_buffer: None,
        },
        users,
        password: "secret".into(),
        resource: "check".into(),
        rate: settings.rate,
        login_concurrency: 20,
        login_timeout: Duration::from_secs(120),
    })
    .await?;
    let epoch = chat.ledger().epoch();
    let seconds = |at: Instant| at.saturating_duration_since(epoch).as_secs_f64();
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let mut faults = Vec::new();
    let mut problems = Vec::new();
    let end = Instant::now() + settings.duration;
    // Rounds of every kind once, each round in its own order.
    let mut bag: Vec<FaultKind> = Vec::new();
    // A calm start: the chat runs before the first fault.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while Instant::now() < end || !bag.is_empty() || faults.is_empty() {
        if bag.is_empty() {
            bag = settings.faults.clone();
            bag.shuffle(&mut rng);
        }
        let kind = bag.pop().expect("refilled");
        let node = rng.random_range(0..settings.nodes);
        let server = rng.random_range(0..settings.nats);
        // Outages of one to three failure timeouts: peers give the node up.
        let outage = Duration::from_secs_f64(settings.failure_timeout * rng.random_range(0.5..3.0));
        let brief = Duration::from_millis(rng.random_range(500..3000));
        let started = Instant::now();
        eprintln!("check: {:.1} s: {kind:?}", seconds(started));
        let target = inject(
            &mut cluster,
            settings,
            kind,
            node,
            server,
            outage,
            brief,
            &mut problems,
        )
        .await?;
        let undone = Instant::now();
        if let Err(error) = cluster.ready(&mut problems).await {
            problems.push(format!("after {kind:?} of {target}: {error:#}"));
        }
        let recovered = Instant::now();
        faults.push(Fault {
            kind,
            target,
            started_s: seconds(started),
            undone_s: seconds(undone),
            recovered_s: seconds(recovered),
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
    }
    let ledger_inversions = chat.ledger().inversions();
    let ledger = chat.shared_ledger();
    let report = chat.finish(settings.settle).await;
    // From STORE_WINDOW before a lone server was killed to its restart on an
    // empty store: a message acknowledged to its client then (the client
    // hears of it a moment after JetStream acknowledged it to the node) may
    // have been in the store, and is excused when the lost store holds it.
    let store_losses: Vec<(f64, f64)> = faults
        .iter()
        .filter(|fault| settings.nats == 1 && fault.kind == FaultKind::NatsEmpty)
        .map(|fault| (fault.started_s - STORE_WINDOW.as_secs_f64(), fault.undone_s))
        .collect();
    let in_lost_stores = if store_losses.is_empty() {
        HashSet::new()
    } else {
        message_numbers_in(
            &cluster
                .nats
                .iter()
                .flat_map(Nats::lost_stores)
                .collect::<Vec<_>>(),
        )
    };
    let (with_store, unexcused): (Vec<_>, Vec<_>) = ledger
        .lost_acknowledged_at()
        .into_iter()
        .partition(|(seq, at)| {
            let at = at.as_secs_f64();
            in_lost_stores.contains(seq)
                && store_losses
                    .iter()
                    .any(|(from, until)| (*from..=*until).contains(&at))
        });
    let lost_with_nats_store = with_store.len() as u64;
    let lost_unexcused = unexcused
        .iter()
        .take(20)
        .map(|(seq, _)| ledger.describe(*seq))
        .collect();
    let windows: Vec<(f64, f64)> = faults
        .iter()
        .map(|fault| (fault.started_s, fault.recovered_s + AFTERMATH.as_secs_f64()))
        .collect();
    let inversions_away_from_faults = ledger_inversions
        .iter()
        .filter(|inversion| {
            let (sent, arrived) = (
                inversion.sent_at.as_secs_f64(),
                inversion.arrived_at.as_secs_f64(),
            );
            !windows
                .iter()
                .any(|(start, end)| sent <= *end && arrived >= *start)
        })
        .count() as u64;
    Ok(CheckReport {
        seed: settings.seed,
        nodes: settings.nodes,
        nats: settings.nats,
        faults,
        chat: report,
        lost_with_nats_store,
        lost_unexcused,
        inversions_away_from_faults,
        repeated_cleanups: repeated_cleanups(&cluster.nodes),
        problems,
    })
}

/// Injects one fault and undoes it; returns what it hit.
#[allow(clippy::too_many_arguments)]
async fn inject(
    cluster: &mut Cluster,
    settings: &CheckSettings,
    kind: FaultKind,
    node: usize,
    server: usize,
    outage: Duration,
    brief: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<String> {
    let name = cluster.nodes[node].name.clone();
    Ok(match kind {
        FaultKind::Kill => {
            cluster.nodes[node].kill();
            tokio::time::sleep(brief).await;
            cluster.nodes[node].restart()?;
            name
        }
        FaultKind::Term => {
            let grace = Duration::from_secs(settings.shutdown_grace);
            let stopping = Instant::now();
            let ended = cluster.nodes[node]
                .terminate(grace + Duration::from_secs(10))
                .await;
            let took = stopping.elapsed();
            if !ended || took > grace + Duration::from_secs(2) {
                problems.push(format!(
                    "{name} did not stop by itself within its grace after SIGTERM ({took:?}, ended well: {ended})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.nodes[node].restart()?;
            name
        }
        FaultKind::Pause => {
            cluster.nodes[node].pause()?;
            tokio::time::sleep(outage).await;
            cluster.nodes[node].resume()?;
            name
        }
        FaultKind::Partition => {
            for proxy in &cluster.proxies[node] {
                proxy.cut();
            }
            tokio::time::sleep(outage).await;
            for proxy in &cluster.proxies[node] {
                proxy.restore();
            }
            name
        }
        FaultKind::Nats | FaultKind::NatsEmpty => {
            cluster.nats[server].kill();
            tokio::time::sleep(brief).await;
            cluster.nats[server].start(kind == FaultKind::Nats)?;
            format!("nats{server}")
        }
        FaultKind::Postgres => {
            cluster.postgres.restart()?;
            "postgres".to_owned()
        }
    })
}

/// The numbers of the checker's messages (`id='m<n>'`) found anywhere in the
/// files under `folders`: JetStream keeps a stream's messages as written, so
/// these reached the store. A removed message may still be in the bytes, so
/// this says a message was in a store, not that it was still waiting there.
fn message_numbers_in(folders: &[PathBuf]) -> HashSet<u64> {
    const MARK: &[u8] = b"id='m";
    let mut numbers = HashSet::new();
    let mut pending: Vec<PathBuf> = folders.to_vec();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|entry| entry.path()));
            }
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let mut rest = bytes.as_slice();
        while let Some(at) = rest.windows(MARK.len()).position(|window| window == MARK) {
            rest = &rest[at + MARK.len()..];
            let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
            if rest.get(digits) == Some(&b'\'')
                && let Some(number) = std::str::from_utf8(&rest[..digits])
                    .ok()
                    .and_then(|digits| digits.parse().ok())
            {
                numbers.insert(number);
            }
        }
    }
    numbers
}

/// Dead incarnations whose cleanup the nodes' logs report more than once for
/// one death: with no return between two cleanups (a node frozen or cut off
/// comes back with the same incarnation, and may be taken for dead again).
fn repeated_cleanups(nodes: &[Node]) -> Vec<String> {
    // (timestamp, incarnation, a return?) of every node's log.
    let mut events: Vec<(String, String, bool)> = Vec::new();
    for node in nodes {
        for (text, key, back) in [
            ("Cleaned up after a dead node.", "dead=\"", false),
            ("A node taken for dead is back", "incarnation=\"", true),
        ] {
            for line in node.log_lines(text) {
                let plain = strip_ansi(&line);
                let Some(at) = plain.split_whitespace().next() else {
                    continue;
                };
                if let Some(incarnation) = plain
                    .split_once(key)
                    .and_then(|(_, rest)| rest.split('"').next())
                {
                    events.push((at.to_owned(), incarnation.to_owned(), back));
                }
            }
        }
    }
    events.sort();
    let mut since_return: std::collections::BTreeMap<String, usize> = Default::default();
    let mut repeated = std::collections::BTreeSet::new();
    for (at, incarnation, back) in events {
        let count = since_return.entry(incarnation.clone()).or_default();
        if back {
            *count = 0;
        } else {
            *count += 1;
            if *count > 1 {
                repeated.insert(format!("{incarnation} (again at {at})"));
            }
        }
    }
    repeated.into_iter().collect()
}

/// A log line without its colours (Rookery colours its log when it writes
/// to a file as well).
pub fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut parts = line.split('\u{1b}');
    if let Some(first) = parts.next() {
        plain.push_str(first);
    }
    for part in parts {
        plain.push_str(part.split_once('m').map_or(part, |(_, rest)| rest));
    }
    plain
}
