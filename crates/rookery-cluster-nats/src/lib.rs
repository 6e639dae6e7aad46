//! [`NatsBus`]: the bus of a Rookery cluster, on NATS.
//!
//! - **Registry** (`registry.rs`): bound sessions live in the JetStream KV bucket
//!   `rookery_sessions`; every node watches it and answers `routes()` from its
//!   local view. The newest bind of a full JID wins; the node holding the older
//!   session sees it in its watch and closes that session with `conflict`.
//! - **Delivery** (`delivery.rs`): every delivery is one publish to the recipient node's subject
//!   on the `ROOKERY_DELIVER` work-queue stream. Messages are published with an
//!   awaited acknowledgement, so once `deliver` returns they survive any node.
//!   The receiving node hands each stanza to the session with a receipt; the
//!   JetStream message is acknowledged when the stanza is safe.
//! - **Membership** (`membership.rs`, with the failure detector as a type
//!   without I/O): nodes publish heartbeats. A node silent for
//!   `failure_timeout`, or replaced by a new process of the same name, is dead.
//! - **Cleanup** (`cleanup.rs`): one live node (the winner of a KV lock)
//!   removes a dead node's sessions, tells their contacts, and replays its
//!   unacknowledged deliveries through the router.
//! - **Control** (`control.rs`): requests between nodes (take a session over
//!   for a resuming client, close one).
//!
//! This file holds [`NatsBus`] itself: joining (streams, buckets, consumer),
//! the state kept after NATS lost its store, the tasks, and the [`Bus`]
//! implementation, which calls into the modules above.

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

mod cleanup;
mod codec;
mod control;
mod delivery;
mod membership;
mod registry;
pub mod subjects;

use cleanup::Cleanup;
use control::serve_control;
use delivery::{consume_deliveries, keep_held};
use registry::{Local, View, check_registry, watch_sessions};

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
/// The recipients of a best-effort delivery to several sessions of one node,
/// as a JSON array of full JIDs (instead of [`HEADER_TO`]); the stanza comes
/// without `to`, set for each on arrival.
const HEADER_TO_EACH: &str = "Rookery-To-Each";
/// The addresses of one batched delivery (its header) take at most this
/// many bytes (several hundred sessions): JetStream refuses a message whose
/// headers pass 64 KiB, and a core publish never hears of the refusal.
const BATCH_BYTES: usize = 48 * 1024;

/// `items` in order, in runs whose addresses (`jid` of each) as a JSON
/// array take at most `limit` bytes each (an address longer than that goes
/// alone).
fn chunks_by_bytes<T>(items: &[T], jid: impl Fn(&T) -> &FullJid, limit: usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    // The brackets, then each address quoted and escaped, with its comma.
    let mut bytes = 2;
    for (index, item) in items.iter().enumerate() {
        let size = serde_json::to_string(jid(item).as_str()).map_or(0, |json| json.len()) + 1;
        if index > start && bytes + size > limit {
            chunks.push(&items[start..index]);
            start = index;
            bytes = 2;
        }
        bytes += size;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}
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
            batches: true,
        }
    }

    /// Notes that `what` fails, since now unless it failed already.
    fn failing(&self, what: &Mutex<Option<Instant>>) {
        what.lock()
            .expect("readiness lock")
            .get_or_insert_with(Instant::now);
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

    async fn deliver_each(&self, routes: &[Arc<Route>], stanza: &Element) {
        // Sessions of one peer node share one message, when the peer reads
        // such messages and NATS is up; the rest go one by one.
        let mut by_node: HashMap<NodeId, Vec<Arc<Route>>> = HashMap::new();
        for route in routes {
            by_node.entry(route.node).or_default().push(route.clone());
        }
        for (node, routes) in by_node {
            if routes.len() > 1
                && node != self.node
                && self.healthy()
                && !self.known_dead(node)
                && self.batches_to(node)
            {
                for chunk in chunks_by_bytes(&routes, |route| &route.jid, BATCH_BYTES) {
                    if let Err(error) = self.publish_batch(node, chunk, stanza).await {
                        tracing::warn!(%error, node = format!("{node:016x}"), sessions = chunk.len(), "A batched delivery could not be published; sending one by one.");
                        rookery_cluster::deliver_one_by_one(self, chunk, stanza).await;
                    }
                }
                continue;
            }
            rookery_cluster::deliver_one_by_one(self, &routes, stanza).await;
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

    #[test]
    fn a_batch_of_one_still_gets_its_address() {
        let stanza: Element = "<presence xmlns='jabber:client'/>".parse().unwrap();
        let to = FullJid::new("a@localhost/r").unwrap();
        let copies = delivery::each_copy(delivery::Recipients::Each(vec![to.clone()]), stanza);
        assert_eq!(copies.len(), 1);
        assert_eq!(copies[0].0, to);
        assert_eq!(copies[0].1.attr("to"), Some("a@localhost/r"));
    }

    #[test]
    fn batches_of_addresses_stop_at_their_size() {
        let all: Vec<FullJid> = (0..10)
            .map(|n| FullJid::new(&format!("user{n}@localhost/r")).unwrap())
            .collect();
        // Each address takes 17 bytes, 2 quotes and a comma; the brackets 2:
        // 42 bytes hold two.
        let chunks = chunks_by_bytes(&all, |jid| jid, 42);
        assert_eq!(chunks.len(), 5);
        assert!(chunks.iter().all(|chunk| chunk.len() == 2));
        for chunk in &chunks {
            let json = serde_json::to_string(&chunk.iter().map(|j| j.as_str()).collect::<Vec<_>>())
                .unwrap();
            assert!(json.len() <= 42, "{json}");
        }
        let flat: Vec<&FullJid> = chunks.into_iter().flatten().collect();
        assert_eq!(flat, all.iter().collect::<Vec<_>>(), "all, in order");
        assert_eq!(chunks_by_bytes(&all, |jid| jid, BATCH_BYTES).len(), 1);
        assert!(chunks_by_bytes(&[], |jid| jid, 42).is_empty());
        // An address that needs escaping counts as written.
        let quoted = FullJid::new("user@localhost/a\"b").unwrap();
        assert_eq!(
            chunks_by_bytes(&[quoted.clone(), quoted], |jid| jid, 20).len(),
            2
        );
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
