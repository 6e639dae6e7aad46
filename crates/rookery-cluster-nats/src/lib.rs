//! [`NatsBus`]: the bus of a Rookery cluster, on NATS.
//!
//! - **Registry**: bound sessions live in the JetStream KV bucket
//!   `rookery_sessions`; every node watches it and answers `routes()` from its
//!   local view. The newest bind of a full JID wins; the node holding the older
//!   session sees it in its watch and closes that session with `conflict`.
//! - **Delivery**: every delivery is one publish to the recipient node's subject
//!   on the `ROOKERY_DELIVER` work-queue stream. Messages are published with an
//!   awaited acknowledgement, so once `deliver` returns they survive any node.
//!   The receiving node hands each stanza to the session with a receipt; the
//!   JetStream message is acknowledged when the stanza is safe.
//! - **Membership** (`membership.rs`, with the failure detector as a type
//!   without I/O): nodes publish heartbeats. A node silent for
//!   `failure_timeout`, or replaced by a new process of the same name, is dead:
//!   one live node (the winner of a KV lock) removes its sessions, tells their
//!   contacts, and replays its unacknowledged deliveries through the router.

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use jid::{BareJid, FullJid};
use minidom::Element;
use rookery_cluster::{
    Bus, BusError, Durability, Mail, Mailbox, NodeId, Peer, Receipt, Recovery, Route, RouteInfo,
    SessionId, SessionSnapshot,
};
use rookery_stream::{Condition, StreamError};
use tokio::task::JoinHandle;

mod codec;
mod membership;
pub mod subjects;

use codec::{Control, Heartbeat, ResumeRecord, SessionRecord, WireSnapshot};
use membership::Member;

/// Settings of the clustered bus.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// This node's name (stable across restarts).
    pub name: String,
    /// NATS server URLs.
    pub urls: Vec<String>,
    /// Interval between heartbeats.
    pub heartbeat: Duration,
    /// Silence after which a node counts as dead.
    pub failure_timeout: Duration,
    /// Replicas of the JetStream state (3 on a three-server NATS cluster).
    pub replicas: usize,
    /// Where clients reach this node (`host:port`), for see-other-host.
    pub address: Option<String>,
}

const HEADER_TO: &str = "Rookery-To";
const HEADER_DURABLE: &str = "Rookery-Durable";
/// How long a durable publish waits for JetStream's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a durable publish is retried (a JetStream leader election).
const PUBLISH_RETRY: Duration = Duration::from_secs(4);
/// The KV header naming the operation of a registry revision.
const KV_OPERATION: &str = "KV-Operation";
/// Most registry revisions read one by one when the watch is behind; beyond
/// that the watch starts over.
const CATCH_UP_LIMIT: u64 = 2000;
/// How long joining waits for JetStream to be ready.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the registry or the delivery consumer may fail before the node
/// stops taking new sessions: longer than a JetStream leader election after
/// a NATS server died (2 to 6 s), during which binding is retried.
const NOT_READY_AFTER: Duration = Duration::from_secs(10);
/// How long JetStream waits for a delivery's acknowledgement before it
/// delivers it again. Deliveries that sessions hold (until their clients
/// acknowledge them) are kept from that by progress signals; one lost on its
/// way to this node (its NATS connection broke) comes again after this.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// How often held deliveries are signalled in progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Held deliveries older than this are forgotten (their session is long gone).
const HELD_AT_MOST: Duration = Duration::from_secs(24 * 3600);
/// Registry checks in a row (one a second) that must find the cluster's
/// state gone before a node makes it again, on a NATS cluster: a server
/// restarted with an empty store answers "not found" while it catches up.
/// On a lone NATS server the answer is the truth at once.
const LOST_STATE_CHECKS: u32 = 3;
/// How often the delivery consumer is checked for removal by a peer.
const CONSUMER_CHECK: Duration = Duration::from_secs(1);

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

/// What this node knows of the registry.
#[derive(Debug, Default)]
struct View {
    /// Read for every stanza: foldhash, as [`rookery_cluster::LocalBus`]'s registry.
    users: foldhash::HashMap<BareJid, Vec<Arc<Route>>>,
    revisions: HashMap<FullJid, u64>,
}

impl View {
    fn get(&self, jid: &FullJid) -> Option<&Arc<Route>> {
        self.users
            .get(&jid.to_bare())?
            .iter()
            .find(|route| route.jid == *jid)
    }

    fn upsert(&mut self, route: Route, revision: u64) {
        let jid = route.jid.clone();
        let routes = self.users.entry(jid.to_bare()).or_default();
        routes.retain(|existing| existing.jid != jid);
        routes.push(Arc::new(route));
        self.revisions.insert(jid, revision);
    }

    /// Forgets the routes of JIDs the registry lacks (`registered`: those
    /// it holds), except this node's live sessions (`local`): a registry
    /// made again by a peer after NATS lost its store lacks them until this
    /// node registers them anew, from this view (`restore_state`).
    fn forget_unregistered(&mut self, registered: &HashSet<FullJid>, node: NodeId, local: &Local) {
        let stale: Vec<FullJid> = self
            .users
            .values()
            .flatten()
            .filter(|route| !registered.contains(&route.jid) && !is_live_here(route, node, local))
            .map(|route| route.jid.clone())
            .collect();
        for jid in stale {
            self.remove(&jid);
        }
    }

    fn remove(&mut self, jid: &FullJid) {
        let bare = jid.to_bare();
        if let Some(routes) = self.users.get_mut(&bare) {
            routes.retain(|route| route.jid != *jid);
            if routes.is_empty() {
                self.users.remove(&bare);
            }
        }
        self.revisions.remove(jid);
    }
}

/// This node's sessions: session instance and inbox by full JID.
type Local = foldhash::HashMap<FullJid, (SessionId, Mailbox)>;

/// True when `route` is a live session of this node (`node`): `local` holds
/// that very session instance.
fn is_live_here(route: &Route, node: NodeId, local: &Local) -> bool {
    route.node == node
        && local
            .get(&route.jid)
            .is_some_and(|(own, _)| *own == route.session)
}

/// The clustered bus.
pub struct NatsBus {
    node: NodeId,
    config: NatsConfig,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    sessions: kv::Store,
    resume: kv::Store,
    cleanup: kv::Store,
    deliveries: stream::Stream,
    view: RwLock<View>,
    /// Sessions on this node: the session instance and its inbox.
    local: RwLock<Local>,
    /// Full JIDs whose bind is being written to the registry: a deletion seen
    /// meanwhile is the end of an earlier session (its revision is older than
    /// the write under way), not a peer removing the new one.
    binding: Mutex<HashSet<FullJid>>,
    members: RwLock<HashMap<NodeId, Member>>,
    recovery: OnceLock<Weak<dyn Recovery>>,
    accepting: AtomicBool,
    /// Since when the NATS connection is up (`None` while it is down).
    connected_since: Arc<Mutex<Option<Instant>>>,
    /// The newest registry revision the view has seen.
    applied: AtomicU64,
    /// When the view was last found to hold the whole registry.
    confirmed: Mutex<Option<Instant>>,
    /// Durable deliveries published, for their message ids.
    published: AtomicU64,
    /// Tells the registry watch to start over.
    rewatch: tokio::sync::Notify,
    /// When the registry stream this node's sessions are written in was
    /// created: another time means NATS lost its store and a peer made the
    /// stream again, without this node's sessions.
    registry_created: Mutex<Option<stream::Info>>,
    /// Since when the registry checks find no usable registry (binding needs it).
    registry_failing: Mutex<Option<Instant>>,
    /// Since when the delivery consumer cannot read this node's deliveries.
    deliveries_down: Mutex<Option<Instant>>,
    /// Dead incarnations this node is cleaning up or has cleaned up: each
    /// once, however many signs of its death arrive.
    cleanups: Mutex<HashMap<NodeId, Cleanup>>,
    /// Cleanup attempts started, for their numbers.
    attempts: AtomicU64,
    /// Ended sessions whose registry entry could not be removed yet.
    unregistered: Mutex<Vec<(FullJid, SessionId)>>,
    /// Deliveries held by sessions of this node, not yet acknowledged: the
    /// reply subject, when it was handed over, when last signalled.
    held: Mutex<HashMap<String, (Instant, Instant)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The cleanup lock's value once the cleanup is done.
const CLEANUP_DONE: &[u8] = b"done";

/// What became of a cleanup lock held by another.
enum Lock {
    /// This node holds it now.
    Taken,
    /// The cleanup it guards is done.
    Done,
    /// A live node holds it.
    Held,
}

/// Where this node is with the cleanup after a dead incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanup {
    /// Under way here: this attempt's number (a node that comes back and
    /// dies again gets a new attempt, and the old one must not finish).
    Running(u64),
    /// Done (here or by a peer): its deliveries were replayed.
    Done,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("name", &self.config.name)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Opens a KV bucket, creating its stream if needed. The stream is created
/// directly with the standard KV layout: asking async-nats to create the bucket
/// also queries account details that NATS 2.9 (Debian's) does not answer in the
/// form it expects.
async fn bucket(
    jetstream: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, BusError> {
    if let Ok(store) = jetstream.get_key_value(name).await {
        return Ok(store);
    }
    jetstream
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_bytes: -1,
            max_message_size: -1,
            max_age,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            num_replicas: replicas,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    jetstream.get_key_value(name).await.map_err(unavailable)
}

impl NatsBus {
    /// Connects to NATS, creates the JetStream state if needed, and loads the registry.
    pub async fn connect(config: NatsConfig) -> Result<Arc<NatsBus>, BusError> {
        let node: NodeId = rand::random::<u64>() | 1;
        let addresses = config
            .urls
            .iter()
            .map(|url| url.parse::<async_nats::ServerAddr>().map_err(unavailable))
            .collect::<Result<Vec<_>, _>>()?;
        let name = config.name.clone();
        let connected_since = Arc::new(Mutex::new(None));
        let since = connected_since.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("rookery {name}"))
            .event_callback(move |event| {
                let name = name.clone();
                match event {
                    async_nats::Event::Connected => {
                        *since.lock().expect("connection lock") = Some(Instant::now())
                    }
                    async_nats::Event::Disconnected => {
                        *since.lock().expect("connection lock") = None
                    }
                    _ => {}
                }
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!(node = %name, "Lost the connection to NATS; reconnecting.")
                        }
                        async_nats::Event::Connected => {
                            tracing::info!(node = %name, "Connected to NATS.")
                        }
                        event => tracing::info!(node = %name, %event, "NATS connection event."),
                    }
                }
            })
            .connect(addresses)
            .await
            .map_err(unavailable)?;
        let jetstream = jetstream::new(client.clone());
        // A NATS cluster that is starting may not have elected its JetStream
        // leaders yet: keep trying for a while before giving up.
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let (sessions, resume, cleanup, deliveries) = loop {
            match Self::jetstream_state(&jetstream, config.replicas).await {
                Ok(state) => break state,
                Err(error) if Instant::now() < deadline => {
                    tracing::warn!(%error, "JetStream is not ready; retrying.");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        };
        let bus = Arc::new(NatsBus {
            node,
            config,
            client,
            jetstream,
            sessions,
            resume,
            cleanup,
            deliveries,
            view: RwLock::new(View::default()),
            local: RwLock::default(),
            binding: Mutex::new(HashSet::new()),
            members: RwLock::new(HashMap::new()),
            recovery: OnceLock::new(),
            accepting: AtomicBool::new(true),
            connected_since,
            applied: AtomicU64::new(0),
            confirmed: Mutex::new(None),
            published: AtomicU64::new(0),
            rewatch: tokio::sync::Notify::new(),
            registry_created: Mutex::new(None),
            registry_failing: Mutex::new(None),
            deliveries_down: Mutex::new(None),
            cleanups: Mutex::new(HashMap::new()),
            attempts: AtomicU64::new(0),
            unregistered: Mutex::new(Vec::new()),
            held: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        if let Ok(Some(info)) = bus.registry_info().await {
            *bus.registry_created.lock().expect("registry lock") = Some(info);
        }
        let (loaded, watch) = tokio::sync::oneshot::channel();
        bus.spawn(watch_sessions(bus.clone(), Some(loaded)));
        tokio::time::timeout(Duration::from_secs(30), watch)
            .await
            .map_err(|_| BusError::Unavailable("the session registry did not load in time".into()))?
            .map_err(|_| BusError::Unavailable("the session registry watch ended".into()))?;
        bus.spawn(serve_control(bus.clone()));
        bus.spawn(check_registry(bus.clone()));
        bus.spawn(membership::publish_heartbeats(bus.clone()));
        bus.spawn(keep_held(bus.clone()));
        bus.spawn(membership::follow_members(bus.clone()));
        tracing::info!(node = %bus.config.name, incarnation = format!("{node:016x}"), "Joined the cluster.");
        Ok(bus)
    }

    /// Opens (creating them if needed) the registry buckets and the delivery stream.
    async fn jetstream_state(
        jetstream: &jetstream::Context,
        replicas: usize,
    ) -> Result<(kv::Store, kv::Store, kv::Store, stream::Stream), BusError> {
        let sessions = bucket(jetstream, subjects::SESSIONS, replicas, Duration::ZERO).await?;
        let resume = bucket(
            jetstream,
            subjects::RESUME,
            replicas,
            Duration::from_secs(24 * 3600),
        )
        .await?;
        let cleanup = bucket(
            jetstream,
            subjects::CLEANUP,
            replicas,
            Duration::from_secs(3600),
        )
        .await?;
        let deliveries = jetstream
            .get_or_create_stream(stream::Config {
                name: subjects::DELIVER_STREAM.to_owned(),
                subjects: vec![subjects::DELIVER_ALL.to_owned()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                // Covers the publish retries; a longer window only costs memory.
                duplicate_window: PUBLISH_RETRY * 3,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok((sessions, resume, cleanup, deliveries))
    }

    /// Starts receiving deliveries and watching for dead nodes; `recovery` (the
    /// router) reroutes what is stranded.
    pub fn start(self: &Arc<Self>, recovery: Weak<dyn Recovery>) {
        let _ = self.recovery.set(recovery);
        self.spawn(consume_deliveries(self.clone()));
        self.spawn(membership::detect_failures(self.clone()));
    }

    /// Stops taking new sessions (announced in heartbeats).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// True while this node takes new sessions.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Leaves the cluster: a last heartbeat says so, so peers clean up at once.
    pub async fn leave(&self) {
        self.stop_accepting();
        let heartbeat = self.heartbeat(true);
        if self.healthy() {
            let _ = self
                .client
                .publish(
                    subjects::heartbeat(self.node),
                    serde_json::to_vec(&heartbeat).unwrap_or_default().into(),
                )
                .await;
            let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.client.flush()).await;
        }
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        tracing::info!(node = %self.config.name, "Left the cluster.");
    }

    /// Runs a task of this node: every one ends when the node leaves (the
    /// finished ones are forgotten as new ones start).
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.retain(|task| !task.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// Runs a JetStream operation, trying again (for up to `PUBLISH_RETRY`)
    /// while JetStream elects new leaders after a NATS server failed, unless
    /// the error is one that `retryable` says a retry cannot fix.
    async fn retrying<T, E, F, Fut>(
        &self,
        mut operation: F,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, Result<E, BusError>>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let deadline = Instant::now() + PUBLISH_RETRY;
        let mut pause = Duration::from_millis(50);
        loop {
            let failure = match tokio::time::timeout(PUBLISH_TIMEOUT, operation()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) if !retryable(&error) => return Err(Ok(error)),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if Instant::now() + pause > deadline || !self.healthy() {
                return Err(Err(BusError::Unavailable(failure)));
            }
            tracing::debug!(error = %failure, "JetStream did not take it yet; retrying.");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The registry stream's description, asked of JetStream now (the
    /// bucket's own is what it was when the bucket was opened); `None` when
    /// the stream does not exist (NATS lost its store).
    async fn registry_info(&self) -> Result<Option<stream::Info>, BusError> {
        match self
            .jetstream
            .get_stream(format!("KV_{}", subjects::SESSIONS))
            .await
        {
            Ok(stream) => Ok(Some(stream.cached_info().clone())),
            Err(error)
                if matches!(error.kind(), GetStreamErrorKind::JetStream(error)
                    if error.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Makes the cluster's JetStream state again after NATS lost it (a
    /// server restarted with an empty store) and registers this node's
    /// sessions anew; the watch starts over. Peers do the same for theirs.
    async fn restore_state(&self) {
        tracing::error!(
            node = %self.config.name,
            "NATS lost the cluster's state (a server restarted with an empty store?); \
             making it again and registering this node's sessions anew."
        );
        if let Err(error) = Self::jetstream_state(&self.jetstream, self.config.replicas).await {
            tracing::warn!(%error, "The cluster's state cannot be made again yet; retrying.");
            return;
        }
        let Ok(Some(info)) = self.registry_info().await else {
            return;
        };
        // Revisions of the lost store mean nothing in the new one.
        let own: Vec<Route> = {
            let mut view = self.view.write().expect("view lock");
            for revision in view.revisions.values_mut() {
                *revision = 0;
            }
            let local = self.local.read().expect("local lock");
            view.users
                .values()
                .flatten()
                .filter(|route| is_live_here(route, self.node, &local))
                .map(|route| Route::clone(route))
                .collect()
        };
        self.applied.store(0, Ordering::Relaxed);
        let mut registered = 0;
        for route in own {
            let record = SessionRecord::new(self.node, route.session, &route.info);
            let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
            match self
                .sessions
                .put(subjects::session_key(&route.jid), value)
                .await
            {
                Ok(revision) => {
                    registered += 1;
                    self.view
                        .write()
                        .expect("view lock")
                        .upsert(route, revision);
                }
                Err(error) => {
                    tracing::warn!(jid = %route.jid, %error, "A session could not be registered anew.")
                }
            }
        }
        *self.registry_created.lock().expect("registry lock") = Some(info);
        self.rewatch.notify_one();
        tracing::warn!(registered, "The cluster's state is back.");
        // Until now peers could not see these sessions, and stored what they
        // had for them.
        if let Some(recovery) = self.recovery() {
            recovery.registered_anew();
        }
    }

    /// True once this node has been on NATS for a whole failure timeout: only
    /// then can it tell a silent peer from its own outage.
    fn heard_long_enough(&self) -> bool {
        self.healthy()
            && self
                .connected_since
                .lock()
                .expect("connection lock")
                .is_some_and(|since| since.elapsed() > self.config.failure_timeout)
    }

    fn recovery(&self) -> Option<Arc<dyn Recovery>> {
        self.recovery.get().and_then(Weak::upgrade)
    }

    fn heartbeat(&self, leaving: bool) -> Heartbeat {
        Heartbeat {
            name: self.config.name.clone(),
            node: self.node,
            sessions: self.local.read().expect("local lock").len(),
            address: self.config.address.clone(),
            accepting: self.accepting() && !leaving,
            leaving,
        }
    }

    fn local_mailbox(&self, jid: &FullJid) -> Option<Mailbox> {
        self.local
            .read()
            .expect("local lock")
            .get(jid)
            .map(|(_, mailbox)| mailbox.clone())
    }

    /// The inbox of this very session instance, if it is on this node: a
    /// newer session of the same full JID must not be closed or taken over
    /// in its place.
    fn session_mailbox(&self, jid: &FullJid, session: SessionId) -> Option<Mailbox> {
        self.local
            .read()
            .expect("local lock")
            .get(jid)
            .filter(|(own, _)| *own == session)
            .map(|(_, mailbox)| mailbox.clone())
    }

    /// Applies one registry change to the view; closes a local session a newer bind replaced.
    fn apply(
        &self,
        key: &str,
        operation: kv::Operation,
        value: &[u8],
        revision: u64,
    ) -> Option<FullJid> {
        self.applied.fetch_max(revision, Ordering::Relaxed);
        let jid = subjects::session_jid(key)?;
        tracing::debug!(%jid, ?operation, revision, "Registry change.");
        let mut view = self.view.write().expect("view lock");
        if view
            .revisions
            .get(&jid)
            .is_some_and(|known| *known >= revision)
        {
            return Some(jid);
        }
        match operation {
            kv::Operation::Put => {
                let record: SessionRecord = serde_json::from_slice(value).ok()?;
                let session = SessionId(record.session);
                let mailbox = {
                    let mut local = self.local.write().expect("local lock");
                    match local.get(&jid) {
                        Some((own, mailbox)) if record.node == self.node && *own == session => {
                            Some(mailbox.clone())
                        }
                        // While a bind of this JID is being written, a write by this
                        // node for another session is the earlier session's last
                        // update; the bind under way follows it.
                        Some(_)
                            if record.node == self.node
                                && self.binding.lock().expect("binding lock").contains(&jid) =>
                        {
                            None
                        }
                        Some((_, mailbox)) => {
                            // A newer login elsewhere (or a resumption) took this full JID.
                            let _ = mailbox.send(Mail::Close(Condition::Conflict.into()));
                            local.remove(&jid);
                            None
                        }
                        None => None,
                    }
                };
                let route = Route {
                    jid: jid.clone(),
                    session,
                    node: record.node,
                    info: record.info(),
                    mailbox,
                };
                view.upsert(route, revision);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if !self.binding.lock().expect("binding lock").contains(&jid) {
                    self.close_removed(&jid);
                }
                view.remove(&jid);
            }
        }
        Some(jid)
    }

    /// A local session left the registry without this node removing it: a
    /// peer took this node for dead (it was cut off longer than the failure
    /// timeout) and cleaned up after it. Nobody can route to the session any
    /// more, so it ends and its client reconnects, binding anew.
    fn close_removed(&self, jid: &FullJid) {
        let Some((_, mailbox)) = self.local.write().expect("local lock").remove(jid) else {
            return;
        };
        tracing::warn!(%jid, "A peer removed this session from the registry; ending it.");
        let _ = mailbox.send(Mail::Close(StreamError::new(
            Condition::InternalServerError,
            "This node was cut off from its cluster; please reconnect.",
        )));
    }

    async fn publish_delivery(
        &self,
        route: &Route,
        stanza: &Element,
        durability: Durability,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_TO, route.jid.as_str());
        let durable = durability == Durability::Durable;
        headers.insert(HEADER_DURABLE, if durable { "1" } else { "0" });
        let payload = Bytes::from(String::from(stanza));
        let subject = subjects::deliver(route.node);
        if !durable {
            return self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(unavailable);
        }
        // Retried while JetStream elects a new leader (a NATS server died);
        // the message id lets JetStream drop a copy whose ack was lost.
        let id = format!(
            "{:016x}-{}",
            self.node,
            self.published.fetch_add(1, Ordering::Relaxed)
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let jetstream = &self.jetstream;
        self.retrying(
            || async {
                jetstream
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
                    .map_err(async_nats::Error::from)
            },
            |_: &async_nats::Error| true,
        )
        .await
        .map(|_| ())
        .map_err(|error| error.map_or_else(|bus| bus, unavailable))
    }

    /// Cleans up after the dead incarnation `dead`: once, however many signs
    /// of its death reach this node (a silent heartbeat, a new process of the
    /// same name, its sessions still in the registry), and once in the
    /// cluster (the KV lock). Sessions of it that linger in the registry are
    /// removed again whenever they show up; its deliveries are replayed once.
    async fn clean_up(&self, dead: NodeId) {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed);
        let state = {
            let mut cleanups = self.cleanups.lock().expect("cleanups lock");
            let state = cleanups.get(&dead).copied();
            if state.is_none() {
                cleanups.insert(dead, Cleanup::Running(attempt));
            }
            state
        };
        match state {
            Some(Cleanup::Running(_)) => return,
            Some(Cleanup::Done) => {
                // Already cleaned up; sessions of it seen since (a registry
                // entry that could not be removed then) go now.
                self.remove_lingering(dead).await;
                return;
            }
            None => {}
        }
        let done = self.clean_up_once(dead, attempt).await;
        let mut cleanups = self.cleanups.lock().expect("cleanups lock");
        if cleanups.get(&dead) != Some(&Cleanup::Running(attempt)) {
            return; // It came back meanwhile; a later death has its own attempt.
        }
        if done {
            cleanups.insert(dead, Cleanup::Done);
        } else {
            // Alive after all, or left to a peer: looked at again if it stays silent.
            cleanups.remove(&dead);
        }
    }

    /// True while `attempt` is the cleanup under way for `dead`: false once
    /// the node spoke again (peers' heartbeats end the attempt).
    fn still_dead(&self, dead: NodeId, attempt: u64) -> bool {
        self.cleanups.lock().expect("cleanups lock").get(&dead) == Some(&Cleanup::Running(attempt))
            && !self.is_member(dead)
    }

    /// The cleanup proper; false when it was not done (the node spoke again,
    /// this node lost NATS meanwhile, or a live peer holds the lock).
    async fn clean_up_once(&self, dead: NodeId, attempt: u64) -> bool {
        // One node cleans up: the one that creates the lock. While NATS is
        // unreachable, keep trying, unless the node turns out to be alive.
        let key = subjects::cleanup_key(dead);
        loop {
            while !self.heard_long_enough() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !self.still_dead(dead, attempt) {
                return false; // It spoke again.
            }
            let lock = self
                .cleanup
                .create(&key, Bytes::from(self.node.to_string()));
            match tokio::time::timeout(PUBLISH_TIMEOUT, lock).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match self.take_over_cleanup(&key).await {
                        Lock::Taken => break,
                        Lock::Done => {
                            // Done by a peer; its removals reach the view
                            // through the watch, and lingering ones go here.
                            self.remove_lingering(dead).await;
                            return true;
                        }
                        Lock::Held => return false,
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "Cleanup after a dead node waits for NATS.")
                }
                Err(_) => tracing::warn!("Cleanup after a dead node waits for NATS."),
            }
        }
        if !self.heard_long_enough() || !self.still_dead(dead, attempt) {
            // Our connection dropped meanwhile, or the node spoke again: not dead after all.
            let _ = self.cleanup.delete(&key).await;
            return false;
        }
        let Some(recovery) = self.recovery() else {
            return false;
        };
        tracing::warn!(
            dead = format!("{dead:016x}"),
            "A node stopped answering; cleaning up after it."
        );
        let started = Instant::now();
        let removed = self.remove_sessions(dead).await;
        for route in &removed {
            recovery.session_lost(route.clone()).await;
        }
        let replayed = self.replay(dead, attempt, &*recovery).await;
        if !self.still_dead(dead, attempt) {
            // It was frozen or cut off, not dead, and spoke again while its
            // sessions went: it ends them itself, and is alive from now on.
            let _ = self.cleanup.delete(&key).await;
            tracing::warn!(
                dead = format!("{dead:016x}"),
                sessions = removed.len(),
                replayed,
                "A node taken for dead spoke again; its cleanup stopped."
            );
            return false;
        }
        let _ = self
            .cleanup
            .put(&key, Bytes::from_static(CLEANUP_DONE))
            .await;
        tracing::warn!(
            dead = format!("{dead:016x}"),
            sessions = removed.len(),
            replayed,
            took = ?started.elapsed(),
            "Cleaned up after a dead node."
        );
        true
    }

    fn is_member(&self, node: NodeId) -> bool {
        self.members
            .read()
            .expect("members lock")
            .contains_key(&node)
    }

    /// Removes sessions of an incarnation cleaned up already that showed up
    /// since, and tells their contacts.
    async fn remove_lingering(&self, dead: NodeId) {
        let removed = self.remove_sessions(dead).await;
        if removed.is_empty() {
            return;
        }
        tracing::info!(
            dead = format!("{dead:016x}"),
            sessions = removed.len(),
            "Sessions of a node cleaned up already were removed."
        );
        if let Some(recovery) = self.recovery() {
            for route in removed {
                recovery.session_lost(route).await;
            }
        }
    }

    /// Removes the sessions of `dead` from the registry and from the view;
    /// returns those that were still its (a JID bound again meanwhile keeps
    /// its new session, and its contacts are not told it went away).
    async fn remove_sessions(&self, dead: NodeId) -> Vec<Route> {
        let lost: Vec<Arc<Route>> = {
            let view = self.view.read().expect("view lock");
            view.users
                .values()
                .flatten()
                .filter(|route| route.node == dead)
                .cloned()
                .collect()
        };
        let mut removed = Vec::with_capacity(lost.len());
        for route in lost {
            let key = subjects::session_key(&route.jid);
            // The registry's entry now, not the view's revision: after NATS
            // lost its store, revisions the view knew mean nothing.
            let rebound = match self.sessions.entry(&key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<SessionRecord>(&entry.value) {
                        Ok(record) if record.node != dead => true,
                        _ => {
                            if let Err(error) = self
                                .sessions
                                .delete_expect_revision(&key, Some(entry.revision))
                                .await
                            {
                                tracing::debug!(jid = %route.jid, %error, "Session of a dead node not removed.");
                            }
                            false
                        }
                    }
                }
                Ok(_) => false,
                Err(error) => {
                    tracing::debug!(jid = %route.jid, %error, "Session of a dead node not read.");
                    false
                }
            };
            // Gone from the view whatever the registry said: nothing may be
            // routed to a dead node again (a replay would go round in
            // circles). A registry entry that could not be removed shows up
            // again and goes then (`remove_lingering`).
            {
                let mut view = self.view.write().expect("view lock");
                if view
                    .get(&route.jid)
                    .is_some_and(|now| now.node == dead && now.session == route.session)
                {
                    view.remove(&route.jid);
                }
            }
            // (The watch may have applied the removal first.)
            if !rebound {
                removed.push(Route::clone(&route));
            }
        }
        removed
    }

    /// Removes the registry entry of a session of this node that ended. When
    /// NATS cannot take it now, it is tried again once NATS is back (the
    /// registry check), so that no contact sees a session that is gone.
    async fn remove_registration(&self, jid: &FullJid, session: SessionId, revision: Option<u64>) {
        if !self.healthy() {
            self.unregistered
                .lock()
                .expect("unregistered lock")
                .push((jid.clone(), session));
            return;
        }
        let delete = self
            .sessions
            .delete_expect_revision(subjects::session_key(jid), revision);
        match tokio::time::timeout(PUBLISH_TIMEOUT, delete).await {
            Ok(Ok(())) => {
                // A new bind of the same JID may have landed meanwhile: only
                // this session's entry goes.
                let mut view = self.view.write().expect("view lock");
                if view
                    .get(jid)
                    .is_some_and(|route| route.session == session && route.node == self.node)
                {
                    view.remove(jid);
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%jid, %error, "Session not unregistered (replaced meanwhile?).");
            }
            Err(_) => {
                self.unregistered
                    .lock()
                    .expect("unregistered lock")
                    .push((jid.clone(), session));
            }
        }
    }

    /// Tries again the removals of ended sessions that NATS did not take.
    async fn retry_unregistered(&self) {
        let pending = std::mem::take(&mut *self.unregistered.lock().expect("unregistered lock"));
        for (jid, session) in pending {
            if self.local_mailbox(&jid).is_some() {
                continue; // Bound again here meanwhile.
            }
            let revision = {
                let view = self.view.read().expect("view lock");
                match view.get(&jid) {
                    Some(route) if route.session == session && route.node == self.node => {
                        view.revisions.get(&jid).copied()
                    }
                    _ => continue,
                }
            };
            self.remove_registration(&jid, session, revision).await;
        }
    }

    /// Peers took this node for dead and cleaned up after it (it was frozen
    /// or cut off): the lock of that cleanup goes, so that a real death later
    /// is cleaned up again.
    async fn forget_cleanup(&self) {
        let key = subjects::cleanup_key(self.node);
        let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.cleanup.delete(&key)).await;
    }

    /// Notes that `what` fails, since now unless it failed already.
    fn failing(&self, what: &Mutex<Option<Instant>>) {
        what.lock()
            .expect("readiness lock")
            .get_or_insert_with(Instant::now);
    }

    /// Notes a delivery handed to a session, to signal it in progress until
    /// it is acknowledged.
    fn hold(&self, receipt: &Receipt) {
        if let Receipt::Delivery(reply) = receipt {
            let now = Instant::now();
            self.held
                .lock()
                .expect("held lock")
                .insert(reply.clone(), (now, now));
        }
    }

    /// Forgets a held delivery: acknowledged, or now held by another node.
    fn release(&self, receipt: &Receipt) {
        if let Receipt::Delivery(reply) = receipt {
            self.held.lock().expect("held lock").remove(reply);
        }
    }

    /// True once this node knows `node` is dead (cleaned up or being cleaned up).
    fn known_dead(&self, node: NodeId) -> bool {
        self.cleanups
            .lock()
            .expect("cleanups lock")
            .contains_key(&node)
    }

    /// Takes the cleanup lock `key` from a cleaner that is dead itself.
    async fn take_over_cleanup(&self, key: &str) -> Lock {
        let Ok(Some(entry)) = self.cleanup.entry(key).await else {
            return Lock::Held;
        };
        if entry.value.as_ref() == CLEANUP_DONE {
            return Lock::Done;
        }
        let holder = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|value| value.parse::<NodeId>().ok());
        if holder == Some(self.node) {
            return Lock::Taken; // Ours, from an attempt that left work undone.
        }
        if holder.is_some_and(|holder| self.is_member(holder)) {
            return Lock::Held;
        }
        match self
            .cleanup
            .update(key, Bytes::from(self.node.to_string()), entry.revision)
            .await
        {
            Ok(_) => Lock::Taken,
            Err(_) => Lock::Held,
        }
    }

    /// Routes again every delivery a dead node did not acknowledge.
    async fn replay(&self, dead: NodeId, attempt: u64, recovery: &dyn Recovery) -> usize {
        let _ = self
            .deliveries
            .delete_consumer(&subjects::deliver_consumer(dead))
            .await;
        let name = subjects::recover_consumer(dead);
        let consumer = match self
            .deliveries
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::deliver(dead),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, "The dead node's deliveries could not be read.");
                return 0;
            }
        };
        // Peers that learn of the death later than this node may still
        // publish to it for a moment: the stream is drained for a whole
        // failure timeout, so that nothing stays behind with no reader.
        let until = Instant::now() + self.config.failure_timeout;
        let mut replayed = 0;
        loop {
            let batch = consumer
                .fetch()
                .max_messages(256)
                .expires(Duration::from_millis(500))
                .messages()
                .await;
            let Ok(mut batch) = batch else { break };
            let mut count = 0;
            while let Some(Ok(message)) = batch.next().await {
                count += 1;
                if let Some((to, stanza, _)) = decode_delivery(&message) {
                    recovery.reroute(to, stanza).await;
                    replayed += 1;
                }
                let _ = message.ack().await;
            }
            if (count == 0 && Instant::now() >= until) || !self.still_dead(dead, attempt) {
                // Drained; or the node was alive after all and reads its
                // deliveries itself again (they are its new sessions').
                break;
            }
        }
        let _ = self.deliveries.delete_consumer(&name).await;
        replayed
    }
}

/// Reads a delivery: recipient, stanza, durability.
fn decode_delivery(message: &jetstream::Message) -> Option<(FullJid, Element, bool)> {
    let headers = message.headers.as_ref()?;
    let to = FullJid::new(headers.get(HEADER_TO)?.as_str()).ok()?;
    let durable = headers
        .get(HEADER_DURABLE)
        .is_some_and(|value| value.as_str() == "1");
    let stanza = std::str::from_utf8(&message.payload)
        .ok()?
        .parse::<Element>()
        .ok()?;
    Some((to, stanza, durable))
}

/// Keeps the view in step with the registry; `loaded` fires once it caught up.
async fn watch_sessions(bus: Arc<NatsBus>, mut loaded: Option<tokio::sync::oneshot::Sender<()>>) {
    loop {
        // JetStream requests may go unanswered while NATS servers fail over.
        let watch = tokio::time::timeout(PUBLISH_TIMEOUT, bus.sessions.watch_with_history(">"))
            .await
            .unwrap_or_else(|_| Err(kv::WatchError::new(kv::WatchErrorKind::TimedOut)));
        match watch {
            Ok(mut watch) => {
                let mut seen: Option<HashSet<FullJid>> = Some(HashSet::new());
                let empty = tokio::time::timeout(PUBLISH_TIMEOUT, bus.registry_info()).await;
                if matches!(empty, Ok(Ok(Some(info))) if info.state.messages == 0) {
                    seen = None;
                    // Nothing registered: the view is stale.
                    // (The view's lock before the sessions', as everywhere.)
                    let mut view = bus.view.write().expect("view lock");
                    let local = bus.local.read().expect("local lock");
                    view.forget_unregistered(&HashSet::new(), bus.node, &local);
                    drop((local, view));
                    if let Some(loaded) = loaded.take() {
                        let _ = loaded.send(());
                    }
                }
                loop {
                    let entry = tokio::select! {
                        entry = watch.next() => entry,
                        _ = bus.rewatch.notified() => break,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    let jid = bus.apply(&entry.key, entry.operation, &entry.value, entry.revision);
                    if let (Some(seen), Some(jid)) = (&mut seen, jid) {
                        seen.insert(jid);
                    }
                    if entry.delta == 0 {
                        if let Some(seen) = seen.take() {
                            // Caught up: what the view has that the registry lacks is stale.
                            let mut view = bus.view.write().expect("view lock");
                            let local = bus.local.read().expect("local lock");
                            view.forget_unregistered(&seen, bus.node, &local);
                        }
                        if let Some(loaded) = loaded.take() {
                            let _ = loaded.send(());
                        }
                    }
                }
                tracing::warn!("The session registry watch ended; restarting it.");
            }
            Err(error) => {
                tracing::warn!(%error, "The session registry cannot be watched; retrying.")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Restarts the registry watch when it falls behind the registry: a watch
/// whose NATS server died can stay silent for a long time before noticing.
async fn check_registry(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut behind = 0;
    let mut known = 0;
    // Checks in a row that found the registry gone, or made anew: a NATS
    // server that restarted and is still catching up with its cluster may
    // answer so for a moment while the state is whole on the others.
    let mut missing = 0;
    let mut replacements = 0;
    let needed = if bus.config.replicas > 1 {
        LOST_STATE_CHECKS
    } else {
        1
    };
    loop {
        ticker.tick().await;
        if !bus.healthy() {
            continue;
        }
        let asked = Instant::now();
        let info = match tokio::time::timeout(PUBLISH_TIMEOUT, bus.registry_info()).await {
            Ok(Ok(Some(info))) => info,
            Ok(Ok(None)) => {
                bus.failing(&bus.registry_failing);
                missing += 1;
                if missing >= needed {
                    missing = 0;
                    bus.restore_state().await;
                    known = 0;
                }
                continue;
            }
            Ok(Err(error)) => {
                bus.failing(&bus.registry_failing);
                tracing::debug!(%error, "The session registry cannot be checked.");
                continue;
            }
            Err(_) => {
                bus.failing(&bus.registry_failing);
                tracing::debug!("The session registry check timed out.");
                continue;
            }
        };
        let replaced = {
            let mut created = bus.registry_created.lock().expect("registry lock");
            match &*created {
                Some(known) => known.created != info.created,
                None => {
                    *created = Some(info.clone());
                    false
                }
            }
        };
        missing = 0;
        if replaced {
            // A peer made the state again before this node noticed it was gone.
            replacements += 1;
            if replacements >= needed {
                replacements = 0;
                bus.restore_state().await;
                known = 0;
            }
            continue;
        }
        replacements = 0;
        *bus.registry_failing.lock().expect("readiness lock") = None;
        bus.retry_unregistered().await;
        let state = info.state;
        tracing::trace!(
            registry = state.last_sequence,
            applied = bus.applied.load(Ordering::Relaxed),
            "Registry check."
        );
        let mut applied = bus.applied.load(Ordering::Relaxed);
        if applied < known && state.last_sequence.saturating_sub(applied) <= CATCH_UP_LIMIT {
            // The watch still lacks revisions that existed a check ago: read
            // them one at a time, with plain requests, which work while
            // consumers are being moved.
            catch_up(&bus, applied + 1, state.last_sequence).await;
            applied = bus.applied.load(Ordering::Relaxed);
        }
        known = state.last_sequence;
        if state.last_sequence > applied {
            behind += 1;
        } else {
            behind = 0;
            *bus.confirmed.lock().expect("confirmed lock") = Some(asked);
        }
        // Once is a write in flight; twice in a row is a stuck watch.
        if behind >= 2 {
            tracing::warn!(
                registry = state.last_sequence,
                applied,
                "The session registry watch fell behind; restarting it."
            );
            bus.rewatch.notify_one();
            behind = 0;
        }
    }
}

/// Applies registry revisions `from..=to` read one by one; stops at the first
/// that cannot be read (a revision replaced since is skipped: its key has a
/// later one in the range).
async fn catch_up(bus: &NatsBus, from: u64, to: u64) {
    for revision in from..=to {
        let read = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            bus.sessions.stream.get_raw_message(revision),
        )
        .await;
        match read {
            Ok(Ok(message)) => {
                let Some(key) = message.subject.strip_prefix(bus.sessions.prefix.as_str()) else {
                    bus.applied.fetch_max(revision, Ordering::Relaxed);
                    continue;
                };
                let operation = match message.headers.get(KV_OPERATION).map(|v| v.as_str()) {
                    Some("DEL") => kv::Operation::Delete,
                    Some("PURGE") => kv::Operation::Purge,
                    _ => kv::Operation::Put,
                };
                bus.apply(key, operation, &message.payload, revision);
            }
            Ok(Err(error)) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                bus.applied.fetch_max(revision, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, revision, "A registry revision cannot be read.");
                return;
            }
            Err(_) => return,
        }
    }
}

/// Hands deliveries for this node to local sessions; reroutes the others.
async fn consume_deliveries(bus: Arc<NatsBus>) {
    loop {
        let name = subjects::deliver_consumer(bus.node);
        let consumer = bus
            .deliveries
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::deliver(bus.node),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // Receipts are acknowledged when clients acknowledge,
                    // and signalled in progress until then (`keep_held`).
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 1_000_000,
                    ..Default::default()
                },
            )
            .await;
        let messages = match consumer {
            Ok(consumer) => consumer.messages().await,
            Err(error) => {
                bus.failing(&bus.deliveries_down);
                if error.to_string().contains("10100") {
                    // "Filtered consumer not unique": a peer that took this
                    // node for dead drains its deliveries. It stops once it
                    // hears this node again, but a peer that died while
                    // draining leaves its consumer behind: this node is
                    // alive, so the drain ends here (what the peer had not
                    // acknowledged comes to this node's consumer).
                    bus.forget_cleanup().await;
                    let _ = bus
                        .deliveries
                        .delete_consumer(&subjects::recover_consumer(bus.node))
                        .await;
                }
                tracing::warn!(%error, "The delivery consumer cannot be created; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "Deliveries cannot be read; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *bus.deliveries_down.lock().expect("readiness lock") = None;
        // A peer that took this node for dead (a partition, not a crash)
        // deletes this consumer when it replays the deliveries, and the pull
        // stream may not notice for long: deliveries to this node's new
        // sessions would wait in the stream meanwhile. So the consumer is
        // looked up now and then, and made again when it is gone.
        let mut check = tokio::time::interval(CONSUMER_CHECK);
        check.tick().await;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = check.tick() => {
                    match bus.deliveries.consumer_info(&name).await {
                        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                            tracing::warn!("A peer removed this node's delivery consumer; making it again.");
                            bus.forget_cleanup().await;
                            break;
                        }
                        Err(error) if error.kind() == ConsumerInfoErrorKind::StreamNotFound => {
                            tracing::warn!("The delivery stream is gone (NATS lost its store); waiting for it.");
                            break;
                        }
                        _ => continue,
                    }
                }
            };
            let Some(Ok(message)) = message else { break };
            let Some((to, stanza, durable)) = decode_delivery(&message) else {
                tracing::error!("A delivery could not be decoded; dropping it.");
                let _ = message.ack().await;
                continue;
            };
            tracing::debug!(%to, durable, "Delivery received.");
            let stranded = match bus.local_mailbox(&to) {
                Some(mailbox) => {
                    let receipt = message
                        .reply
                        .as_ref()
                        .filter(|_| durable)
                        .map(|reply| Receipt::Delivery(reply.to_string()));
                    let handed = receipt.is_some();
                    if let Some(receipt) = &receipt {
                        bus.hold(receipt);
                    }
                    match mailbox.send(Mail::Stanza {
                        stanza: Box::new(stanza),
                        receipt,
                    }) {
                        Ok(()) if handed => continue,
                        Ok(()) => None,
                        Err(Mail::Stanza { stanza, receipt }) => {
                            if let Some(receipt) = &receipt {
                                bus.release(receipt);
                            }
                            Some(*stanza)
                        }
                        Err(_) => None,
                    }
                }
                None => Some(stanza),
            };
            if let (Some(stanza), Some(recovery)) = (stranded, bus.recovery()) {
                recovery.reroute(to, stanza).await;
            }
            let _ = message.ack().await;
        }
        bus.failing(&bus.deliveries_down);
        tracing::warn!("The delivery stream ended; reconnecting it.");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Answers take-over and close requests from other nodes.
async fn serve_control(bus: Arc<NatsBus>) {
    loop {
        let mut requests = match bus.client.subscribe(subjects::control(bus.node)).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::warn!(%error, "Control requests cannot be received; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(request) = requests.next().await {
            let Ok(control) = serde_json::from_slice::<Control>(&request.payload) else {
                continue;
            };
            match control {
                Control::TakeOver { jid, session } => {
                    let answer = take_over_here(&bus, &jid, SessionId(session)).await;
                    if let Some(reply) = request.reply {
                        let payload = answer
                            .and_then(|snapshot| serde_json::to_vec(&snapshot).ok())
                            .unwrap_or_default();
                        let _ = bus.client.publish(reply, payload.into()).await;
                    }
                }
                Control::Close {
                    jid,
                    session,
                    condition,
                    content,
                } => {
                    let Ok(jid) = FullJid::new(&jid) else {
                        continue;
                    };
                    let local = bus.local.read().expect("local lock").get(&jid).cloned();
                    if let Some((own, mailbox)) = local
                        && own == SessionId(session)
                    {
                        let _ = mailbox.send(Mail::Close(codec::stream_error(&condition, content)));
                    }
                }
            }
        }
    }
}

/// Takes a local session over for a node that resumes it, with what waited in its inbox.
async fn take_over_here(bus: &NatsBus, jid: &str, session: SessionId) -> Option<WireSnapshot> {
    let jid = FullJid::new(jid).ok()?;
    let (own, mailbox) = bus.local.read().expect("local lock").get(&jid).cloned()?;
    if own != session {
        return None;
    }
    let mut snapshot = rookery_cluster::take_over_local(&mailbox).await?;
    bus.local.write().expect("local lock").remove(&jid);
    if let Some(mut inbox) = snapshot.inbox.take() {
        inbox.close();
        while let Some(mail) = inbox.try_recv() {
            if let Mail::Stanza { stanza, receipt } = mail {
                snapshot.sm.sent(*stanza);
                if let Some(receipt) = receipt {
                    snapshot.receipts.push((snapshot.sm.sent_count(), receipt));
                }
            }
        }
    }
    // The node taking the session over holds its deliveries from now on.
    for (_, receipt) in &snapshot.receipts {
        bus.release(receipt);
    }
    Some(WireSnapshot::from_snapshot(&snapshot, bus.node))
}

/// Tells JetStream that the deliveries sessions hold are in progress, so
/// that they are not delivered again while their clients have not yet
/// acknowledged them.
async fn keep_held(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(PROGRESS_EVERY / 2);
    loop {
        ticker.tick().await;
        let due: Vec<String> = {
            let mut held = bus.held.lock().expect("held lock");
            held.retain(|_, (since, _)| since.elapsed() < HELD_AT_MOST);
            let now = Instant::now();
            held.iter_mut()
                .filter(|(_, (_, signalled))| signalled.elapsed() >= PROGRESS_EVERY)
                .map(|(reply, (_, signalled))| {
                    *signalled = now;
                    reply.clone()
                })
                .collect()
        };
        for reply in due {
            if let Err(error) = bus.client.publish(reply, Bytes::from_static(b"+WPI")).await {
                tracing::debug!(%error, "A held delivery could not be signalled in progress.");
            }
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn bind(&self, route: Route) -> Result<Option<Route>, BusError> {
        let key = subjects::session_key(&route.jid);
        let record = SessionRecord::new(self.node, route.session, &route.info);
        let previous = self
            .view
            .read()
            .expect("view lock")
            .get(&route.jid)
            .filter(|previous| previous.session != route.session || previous.node != self.node)
            .map(|previous| Route::clone(previous));
        self.binding
            .lock()
            .expect("binding lock")
            .insert(route.jid.clone());
        if let Some(mailbox) = &route.mailbox {
            self.local
                .write()
                .expect("local lock")
                .insert(route.jid.clone(), (route.session, mailbox.clone()));
        }
        let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        let put = self
            .retrying(|| self.sessions.put(&key, value.clone()), |_| true)
            .await;
        let bound = match put {
            Ok(revision) => {
                self.view
                    .write()
                    .expect("view lock")
                    .upsert(route.clone(), revision);
                Ok(previous)
            }
            Err(error) => {
                self.local.write().expect("local lock").remove(&route.jid);
                Err(error.map_or_else(|bus| bus, unavailable))
            }
        };
        self.binding
            .lock()
            .expect("binding lock")
            .remove(&route.jid);
        bound
    }

    async fn update(
        &self,
        jid: &FullJid,
        session: SessionId,
        info: RouteInfo,
    ) -> Result<(), BusError> {
        let (revision, mailbox) = {
            let view = self.view.read().expect("view lock");
            match view.get(jid) {
                Some(route) if route.session == session && route.node == self.node => (
                    view.revisions.get(jid).copied().unwrap_or(0),
                    route.mailbox.clone(),
                ),
                _ => return Ok(()),
            }
        };
        let record = SessionRecord::new(self.node, session, &info);
        let key = subjects::session_key(jid);
        let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        let updated = self
            .retrying(
                || self.sessions.update(&key, value.clone(), revision),
                |error: &kv::UpdateError| error.kind() != kv::UpdateErrorKind::WrongLastRevision,
            )
            .await;
        match updated {
            Ok(revision) => {
                let route = Route {
                    jid: jid.clone(),
                    session,
                    node: self.node,
                    info,
                    mailbox,
                };
                self.view
                    .write()
                    .expect("view lock")
                    .upsert(route, revision);
                Ok(())
            }
            // The revision moved on: someone else holds the JID now, nothing to update.
            Err(Ok(_)) => Ok(()),
            Err(Err(error)) => Err(error),
        }
    }

    async fn unbind(&self, jid: &FullJid, session: SessionId) -> Result<(), BusError> {
        {
            let mut local = self.local.write().expect("local lock");
            if local.get(jid).is_some_and(|(own, _)| *own == session) {
                local.remove(jid);
            }
        }
        let revision = {
            let view = self.view.read().expect("view lock");
            match view.get(jid) {
                Some(route) if route.session == session && route.node == self.node => {
                    view.revisions.get(jid).copied()
                }
                _ => return Ok(()),
            }
        };
        self.remove_registration(jid, session, revision).await;
        Ok(())
    }

    fn routes(&self, user: &BareJid) -> Vec<Arc<Route>> {
        let view = self.view.read().expect("view lock");
        let Some(routes) = view.users.get(user) else {
            return Vec::new();
        };
        // A session of this node whose inbox is gone (its task ended
        // abnormally, or it overflowed and is ending) is no target, as on
        // LocalBus; peers' sessions carry no mailbox here.
        routes
            .iter()
            .filter(|route| !route.mailbox.as_ref().is_some_and(Mailbox::is_closed))
            .cloned()
            .collect()
    }

    fn route(&self, jid: &FullJid) -> Option<Arc<Route>> {
        self.view.read().expect("view lock").get(jid).cloned()
    }

    async fn deliver(
        &self,
        route: &Route,
        stanza: Element,
        durability: Durability,
    ) -> Result<(), Element> {
        let local = (route.node == self.node)
            .then(|| self.local_mailbox(&route.jid))
            .flatten();
        if durability == Durability::BestEffort
            && let Some(mailbox) = &local
        {
            // Nothing to keep: a session of this node takes it directly.
            return mailbox.send_stanza(stanza);
        }
        if route.node != self.node && self.known_dead(route.node) {
            // A route the view still had: its node is gone, and what was
            // published to it is replayed once and no more.
            return Err(stanza);
        }
        if self.healthy() {
            match self.publish_delivery(route, &stanza, durability).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(jid = %route.jid, %error, "Delivery through NATS failed.")
                }
            }
        }
        // Without NATS, sessions on this node are still served directly.
        match local {
            Some(mailbox) => mailbox.send_stanza(stanza),
            None => Err(stanza),
        }
    }

    async fn close(&self, route: &Route, error: StreamError) {
        if route.node == self.node {
            if let Some(mailbox) = self.session_mailbox(&route.jid, route.session) {
                let _ = mailbox.send(Mail::Close(error));
            }
            return;
        }
        let control = Control::Close {
            jid: route.jid.to_string(),
            session: route.session.0,
            condition: error.condition.as_str().to_owned(),
            content: error.content,
        };
        let payload = serde_json::to_vec(&control).unwrap_or_default();
        let _ = self
            .client
            .publish(subjects::control(route.node), payload.into())
            .await;
    }

    async fn take_over(&self, route: &Route) -> Option<SessionSnapshot> {
        if route.node == self.node {
            let mailbox = self.session_mailbox(&route.jid, route.session)?;
            let snapshot = rookery_cluster::take_over_local(&mailbox).await;
            if snapshot.is_some() {
                let mut local = self.local.write().expect("local lock");
                if local
                    .get(&route.jid)
                    .is_some_and(|(own, _)| *own == route.session)
                {
                    local.remove(&route.jid);
                }
            }
            return snapshot;
        }
        let control = Control::TakeOver {
            jid: route.jid.to_string(),
            session: route.session.0,
        };
        let payload = serde_json::to_vec(&control).ok()?;
        let request = self
            .client
            .request(subjects::control(route.node), payload.into());
        let answer = tokio::time::timeout(rookery_cluster::TAKEOVER_TIMEOUT, request)
            .await
            .ok()?
            .ok()?;
        let snapshot = serde_json::from_slice::<WireSnapshot>(&answer.payload)
            .ok()?
            .into_snapshot()?;
        for (_, receipt) in &snapshot.receipts {
            self.hold(receipt);
        }
        Some(snapshot)
    }

    async fn acknowledge(&self, receipt: Receipt) {
        let Receipt::Delivery(reply) = receipt else {
            return;
        };
        self.held.lock().expect("held lock").remove(&reply);
        if let Err(error) = self
            .client
            .publish(reply, Bytes::from_static(b"+ACK"))
            .await
        {
            tracing::debug!(%error, "Delivery acknowledgement not sent.");
        }
    }

    async fn register_resumable(
        &self,
        id: &str,
        jid: &FullJid,
        session: SessionId,
    ) -> Result<(), BusError> {
        let record = ResumeRecord {
            jid: jid.to_string(),
            session: session.0,
        };
        let put = self
            .resume
            .put(id, serde_json::to_vec(&record).unwrap_or_default().into());
        tokio::time::timeout(PUBLISH_TIMEOUT, put)
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        Ok(())
    }

    async fn unregister_resumable(&self, id: &str) -> Result<(), BusError> {
        if !self.healthy() {
            // The record expires; a resumption checks the session it names.
            return Ok(());
        }
        tokio::time::timeout(PUBLISH_TIMEOUT, self.resume.delete(id))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    async fn resumable(&self, id: &str) -> Option<Arc<Route>> {
        let value = tokio::time::timeout(PUBLISH_TIMEOUT, self.resume.get(id))
            .await
            .ok()?
            .ok()??;
        let record: ResumeRecord = serde_json::from_slice(&value).ok()?;
        let jid = FullJid::new(&record.jid).ok()?;
        self.route(&jid)
            .filter(|route| route.session == SessionId(record.session))
    }

    fn local_sessions(&self) -> usize {
        self.local.read().expect("local lock").len()
    }

    fn local_routes(&self) -> Vec<Arc<Route>> {
        let view = self.view.read().expect("view lock");
        view.users
            .values()
            .flatten()
            .filter(|route| route.node == self.node)
            .cloned()
            .collect()
    }

    fn peers(&self) -> Vec<Peer> {
        let members = self.members.read().expect("members lock");
        members
            .values()
            .filter(|member| member.heartbeat.accepting)
            .map(|member| Peer {
                name: member.heartbeat.name.clone(),
                address: member.heartbeat.address.clone(),
                sessions: member.heartbeat.sessions,
            })
            .collect()
    }

    fn healthy(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn registry_can_lag(&self) -> bool {
        true
    }

    fn registry_confirmed(&self) -> Option<Instant> {
        *self.confirmed.lock().expect("confirmed lock")
    }

    fn ready(&self) -> bool {
        self.healthy()
            && [&self.deliveries_down, &self.registry_failing]
                .iter()
                .all(|since| {
                    since
                        .lock()
                        .expect("readiness lock")
                        .is_none_or(|since| since.elapsed() < NOT_READY_AFTER)
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(jid: &str, session: u64, node: NodeId) -> Route {
        Route {
            jid: FullJid::new(jid).expect("a full JID"),
            session: SessionId(session),
            node,
            info: RouteInfo::default(),
            mailbox: None,
        }
    }

    fn jids(view: &View) -> Vec<String> {
        let mut jids: Vec<String> = view.revisions.keys().map(|jid| jid.to_string()).collect();
        jids.sort();
        jids
    }

    /// A registry a peer made again after NATS lost its store holds the
    /// peer's sessions only: this node keeps its own live ones (and
    /// registers them anew), but forgets what it no longer holds.
    #[test]
    fn a_registry_lacking_this_node_s_live_sessions_does_not_make_them_stale() {
        const HERE: NodeId = 1;
        const PEER: NodeId = 2;
        let mut view = View::default();
        view.upsert(route("alice@localhost/a", 10, HERE), 5);
        view.upsert(route("alice@localhost/old", 11, HERE), 6);
        view.upsert(route("bob@localhost/b", 20, PEER), 7);
        view.upsert(route("carol@localhost/c", 30, PEER), 8);
        let mut local = Local::default();
        local.insert(
            FullJid::new("alice@localhost/a").expect("a full JID"),
            (SessionId(10), Mailbox::new().0),
        );
        // A newer session of the same JID is local now: the route's is over.
        local.insert(
            FullJid::new("alice@localhost/old").expect("a full JID"),
            (SessionId(12), Mailbox::new().0),
        );
        let registered: HashSet<FullJid> =
            [FullJid::new("bob@localhost/b").expect("a full JID")].into();

        view.forget_unregistered(&registered, HERE, &local);
        assert_eq!(jids(&view), ["alice@localhost/a", "bob@localhost/b"]);
        assert_eq!(view.users.len(), 2, "no user is left without routes");

        // An empty registry: only the live local session stays.
        view.forget_unregistered(&HashSet::new(), HERE, &local);
        assert_eq!(jids(&view), ["alice@localhost/a"]);
    }
}
