//! The routing seam between sessions: a registry of bound sessions ("who is
//! where") and delivery of [`Mail`] to them ("deliver this there").
//!
//! [`Bus`] is the one interface the router uses; [`LocalBus`] implements it in
//! process for a single node. A clustered bus keeps the same contract: lookups
//! are synchronous reads of a local view, delivery hands mail to a local
//! mailbox or publishes it to the node that holds the session.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_stream::{SmState, StreamError};
use tokio::sync::oneshot;

pub mod conformance;
mod local;
mod module_state;

pub use local::LocalBus;
pub use module_state::{ModuleState, ModuleStates};

/// Identifies one session instance, so that a stale unbind cannot remove a newer
/// session that bound the same full JID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A process-unique id.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        SessionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Identifies a node process: a random number drawn at each start (an
/// "incarnation"), so that a restarted node is a new node. 0 is the process
/// of a single-node server.
pub type NodeId = u64;

/// What routing needs to know about a session (RFC 6121 section 8).
#[derive(Debug, Clone, Default)]
pub struct RouteInfo {
    /// The last available presence broadcast by the session; `None` while unavailable.
    pub presence: Option<Arc<Element>>,
    /// Presence priority (-128..=127); meaningful while available.
    pub priority: i8,
    /// What modules set on the session for routing to read on every node
    /// (`carbons`: the session enabled message carbons, XEP-0280).
    pub marks: Marks,
    /// The session requested the roster (an "interested resource").
    pub interested: bool,
}

/// Named flags a module sets on a session, published with its routing state
/// so that routing on every node sees them (the carbons module marks the
/// sessions that want copies). Few per session, most sessions none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks(Vec<String>);

impl Marks {
    /// True when the session carries `mark`.
    pub fn contains(&self, mark: &str) -> bool {
        self.0.iter().any(|set| set == mark)
    }

    /// Sets or clears `mark`; true when that changed something.
    pub fn set(&mut self, mark: &str, on: bool) -> bool {
        match (self.contains(mark), on) {
            (false, true) => {
                self.0.push(mark.to_owned());
                self.0.sort_unstable();
                true
            }
            (true, false) => {
                self.0.retain(|set| set != mark);
                true
            }
            _ => false,
        }
    }

    /// The marks, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// True when the session carries none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: Into<String>> FromIterator<S> for Marks {
    fn from_iter<I: IntoIterator<Item = S>>(marks: I) -> Self {
        let mut marks: Vec<String> = marks.into_iter().map(Into::into).collect();
        marks.sort_unstable();
        marks.dedup();
        Marks(marks)
    }
}

impl RouteInfo {
    /// True once the session sent initial presence (an "available resource").
    pub fn available(&self) -> bool {
        self.presence.is_some()
    }
}

/// A session as seen by the registry.
#[derive(Debug, Clone)]
pub struct Route {
    /// The bound full JID.
    pub jid: FullJid,
    /// This session instance.
    pub session: SessionId,
    /// The node holding the session.
    pub node: NodeId,
    /// Routing-relevant state.
    pub info: RouteInfo,
    /// The session's inbox, when the session is on this node.
    pub mailbox: Option<Mailbox>,
}

/// The sending side of a session's inbox.
///
/// The channel (futures' unbounded mpsc) allocates per queued mail and next
/// to nothing while empty: an idle session's inbox costs about a hundred
/// bytes, where a block-preallocating channel would hold a kilobyte and more
/// per session. It is bounded in bytes by its [`Backlog`] instead: mail
/// past the bound is refused (given back, so the router decides again
/// without this session) and the inbox is marked overflowed, which tells the
/// session to end (its client does not keep up).
#[derive(Debug, Clone)]
pub struct Mailbox {
    sender: mpsc::UnboundedSender<(Mail, usize)>,
    backlog: Arc<Backlog>,
}

/// The receiving side of a session's inbox.
#[derive(Debug)]
pub struct Inbox {
    receiver: mpsc::UnboundedReceiver<(Mail, usize)>,
    backlog: Arc<Backlog>,
}

/// The bytes of stanzas waiting in one inbox, against its bound.
#[derive(Debug)]
struct Backlog {
    /// Bytes queued (about: see `rookery_stream::xml::approximate_size`).
    bytes: AtomicUsize,
    /// Most bytes queued at once.
    limit: usize,
    /// Set once mail was refused for lack of room; never cleared.
    overflowed: AtomicBool,
    /// Wakes the session when it overflows.
    overflow: tokio::sync::Notify,
}

/// Bytes an inbox may hold when no bound is given.
pub const DEFAULT_INBOX_BYTES: usize = 2 * 1024 * 1024;

impl Inbox {
    /// The next mail; `None` once every mailbox is dropped and the inbox is empty.
    pub async fn recv(&mut self) -> Option<Mail> {
        let (mail, size) = self.receiver.next().await?;
        self.backlog.bytes.fetch_sub(size, Ordering::Relaxed);
        Some(mail)
    }

    /// The next mail if one is waiting.
    pub fn try_recv(&mut self) -> Option<Mail> {
        let (mail, size) = self.receiver.try_recv().ok()?;
        self.backlog.bytes.fetch_sub(size, Ordering::Relaxed);
        Some(mail)
    }

    /// Refuses further mail; what is queued stays readable.
    pub fn close(&mut self) {
        self.receiver.close();
    }

    /// Completes once mail was refused because the inbox was full (at once
    /// if it already was): the session's client does not keep up.
    pub async fn overflowed(&self) {
        self.backlog.overflowed().await
    }

    /// The next mail, or, when `watch` is set, [`InboxEvent::Overflowed`] as
    /// soon as the inbox overflowed.
    pub async fn recv_watching(&mut self, watch: bool) -> InboxEvent {
        let next = async {
            match self.receiver.next().await {
                Some((mail, size)) => {
                    self.backlog.bytes.fetch_sub(size, Ordering::Relaxed);
                    InboxEvent::Mail(mail)
                }
                None => InboxEvent::Closed,
            }
        };
        if !watch {
            return next.await;
        }
        tokio::select! {
            biased;
            event = next => event,
            () = self.backlog.overflowed() => InboxEvent::Overflowed,
        }
    }

    /// True once mail was refused because the inbox was full.
    pub fn is_overflowed(&self) -> bool {
        self.backlog.overflowed.load(Ordering::Acquire)
    }

    /// Bytes of stanzas waiting.
    pub fn queued_bytes(&self) -> usize {
        self.backlog.bytes.load(Ordering::Relaxed)
    }
}

/// What [`Inbox::recv_watching`] saw.
#[derive(Debug)]
pub enum InboxEvent {
    /// Mail for the session.
    Mail(Mail),
    /// Every mailbox is gone and the inbox is empty.
    Closed,
    /// Mail was refused for lack of room: the session's client does not keep up.
    Overflowed,
}

impl Backlog {
    async fn overflowed(&self) {
        loop {
            let notified = self.overflow.notified();
            if self.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl Mailbox {
    /// A new mailbox and its inbox, holding at most [`DEFAULT_INBOX_BYTES`].
    pub fn new() -> (Mailbox, Inbox) {
        Self::bounded(DEFAULT_INBOX_BYTES)
    }

    /// A new mailbox and its inbox, holding at most `limit` bytes of stanzas.
    pub fn bounded(limit: usize) -> (Mailbox, Inbox) {
        let (sender, receiver) = mpsc::unbounded();
        let backlog = Arc::new(Backlog {
            bytes: AtomicUsize::new(0),
            limit,
            overflowed: AtomicBool::new(false),
            overflow: tokio::sync::Notify::new(),
        });
        (
            Mailbox {
                sender,
                backlog: backlog.clone(),
            },
            Inbox { receiver, backlog },
        )
    }

    /// Puts mail in the inbox; gives it back if the session is gone or its
    /// inbox is full. Control mail (close, take-over) always finds room.
    pub fn send(&self, mail: Mail) -> Result<(), Mail> {
        let size = match &mail {
            Mail::Stanza { stanza, .. } => rookery_stream::xml::approximate_size(stanza),
            Mail::Close(_) | Mail::Takeover(_) => 0,
        };
        if size > 0 {
            let backlog = &self.backlog;
            if backlog.overflowed.load(Ordering::Relaxed) {
                return Err(mail);
            }
            let queued = backlog.bytes.fetch_add(size, Ordering::Relaxed) + size;
            if queued > backlog.limit {
                backlog.bytes.fetch_sub(size, Ordering::Relaxed);
                backlog.overflowed.store(true, Ordering::Release);
                backlog.overflow.notify_waiters();
                return Err(mail);
            }
        }
        self.sender.unbounded_send((mail, size)).map_err(|error| {
            self.backlog.bytes.fetch_sub(size, Ordering::Relaxed);
            error.into_inner().0
        })
    }

    /// Puts a stanza (without receipt) in the inbox; gives it back if the
    /// session is gone or its inbox is full.
    pub fn send_stanza(&self, stanza: Element) -> Result<(), Element> {
        self.send(Mail::Stanza {
            stanza: Box::new(stanza),
            receipt: None,
        })
        .map_err(|mail| match mail {
            Mail::Stanza { stanza, .. } => *stanza,
            _ => unreachable!("the channel gives back what it was given"),
        })
    }

    /// True once the inbox takes no more stanzas: it was dropped, or it
    /// overflowed and its session is ending.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.backlog.overflowed.load(Ordering::Relaxed)
    }
}

/// Proof of a durable delivery, acknowledged once the stanza is safe:
/// acknowledged by the client, written out, or rerouted and stored. Until
/// then the delivery is kept where it came from, so that a node dying in
/// between loses nothing (it is delivered again: a duplicate, which stream
/// management allows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
// Untagged: a delivery receipt stays a plain string on the wire, as before
// stored ones existed.
#[serde(untagged)]
pub enum Receipt {
    /// A delivery through the bus, acknowledged through it (NATS: the reply
    /// subject of the JetStream message).
    Delivery(String),
    /// A message read from offline storage, removed from it by the router.
    Stored(StoredReceipt),
}

/// A message handed out of offline storage and still kept there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredReceipt {
    /// The user it was stored for (a bare JID).
    pub user: String,
    /// Its id in storage.
    pub id: i64,
    /// A digest of the stanza as handed out ([`stanza_digest`]), to find it
    /// among what a session ending did not deliver: it is then left in
    /// storage rather than stored again.
    pub digest: u64,
}

/// A digest of a stanza's XML, stable for the same stanza within one build
/// (and across a take-over, which carries stanzas as XML).
pub fn stanza_digest(stanza: &Element) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    String::from(stanza).hash(&mut hasher);
    hasher.finish()
}

/// Everything a session can be sent.
#[derive(Debug)]
pub enum Mail {
    /// A stanza for the client, with the receipt of its durable delivery if any.
    Stanza {
        /// The stanza.
        stanza: Box<Element>,
        /// To acknowledge once the stanza is safe.
        receipt: Option<Receipt>,
    },
    /// End the stream with this error: `conflict` when a newer login bound the
    /// same full JID, `system-shutdown` when the server stops, `not-authorized`
    /// when the account was removed.
    Close(StreamError),
    /// A resuming connection takes the session over (XEP-0198).
    Takeover(oneshot::Sender<SessionSnapshot>),
}

/// How much a delivery must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The delivery survives the loss of any node once `deliver` returns (messages).
    Durable,
    /// Sent on its way; lost if a node fails at the wrong moment (presence, iq).
    BestEffort,
}

/// The state of a session that moves to a resuming connection.
#[derive(Debug)]
pub struct SessionSnapshot {
    /// The bound full JID.
    pub jid: FullJid,
    /// The session instance.
    pub session: SessionId,
    /// Routing state.
    pub info: RouteInfo,
    /// Stream management counters and unacknowledged stanzas.
    pub sm: SmState,
    /// Receipts of unacknowledged stanzas, with the stream management count
    /// at which each stanza was sent.
    pub receipts: Vec<(u32, Receipt)>,
    /// Entities that received directed presence from the session.
    pub directed: Vec<Jid>,
    /// The id of the last offline message handed to the session (its
    /// messages above it are still to be read).
    pub offline_after: i64,
    /// What the client asked of the server's modules.
    pub modules: ModuleStates,
    /// The inbox, with whatever arrived meanwhile, when the session stays on this node.
    pub inbox: Option<Inbox>,
}

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus cannot reach its backend (NATS); retry later.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// How long a take-over may take before the resuming client is told it failed.
pub const TAKEOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`Bus::deliver_each`] as one best-effort [`Bus::deliver`] per route.
pub async fn deliver_one_by_one<B: Bus + ?Sized>(bus: &B, routes: &[Arc<Route>], stanza: &Element) {
    for route in routes {
        let mut copy = stanza.clone();
        rookery_stream::xml::set_attr(&mut copy, "to", route.jid.as_str());
        if bus
            .deliver(route, copy, Durability::BestEffort)
            .await
            .is_err()
        {
            tracing::debug!(jid = %route.jid, "Session went away before delivery.");
        }
    }
}

/// Who is where, and delivery there.
#[async_trait]
pub trait Bus: Send + Sync {
    /// This node.
    fn node(&self) -> NodeId;
    /// Registers a bound session. If a session with the same full JID exists it
    /// is replaced, and its route is returned so the caller can close it.
    async fn bind(&self, route: Route) -> Result<Option<Route>, BusError>;
    /// Updates the routing state of a bound session.
    async fn update(
        &self,
        jid: &FullJid,
        session: SessionId,
        info: RouteInfo,
    ) -> Result<(), BusError>;
    /// Removes a session if it is still the one registered under its JID.
    async fn unbind(&self, jid: &FullJid, session: SessionId) -> Result<(), BusError>;
    /// All sessions of a user.
    fn routes(&self, user: &BareJid) -> Vec<Arc<Route>>;
    /// The session bound to a full JID.
    fn route(&self, jid: &FullJid) -> Option<Arc<Route>>;
    /// Delivers a stanza to a session; gives it back if the session is gone.
    async fn deliver(
        &self,
        route: &Route,
        stanza: Element,
        durability: Durability,
    ) -> Result<(), Element>;
    /// Delivers `stanza` to each of `routes`, best effort, with `to` set to
    /// each route's JID (presence and roster pushes to many sessions); what
    /// finds its session gone is dropped. A bus may carry the routes of one
    /// node in one message.
    async fn deliver_each(&self, routes: &[Arc<Route>], stanza: &Element) {
        deliver_one_by_one(self, routes, stanza).await;
    }

    /// Tells a session to end its stream with `error`.
    async fn close(&self, route: &Route, error: StreamError);
    /// Takes a session over for a resuming connection.
    async fn take_over(&self, route: &Route) -> Option<SessionSnapshot>;
    /// A durable delivery of the bus is safe: forget it. (Receipts of
    /// stored messages are the router's; the bus ignores them.)
    async fn acknowledge(&self, receipt: Receipt);
    /// Makes a session resumable under `id`.
    async fn register_resumable(
        &self,
        id: &str,
        jid: &FullJid,
        session: SessionId,
    ) -> Result<(), BusError>;
    /// Forgets a resumption id.
    async fn unregister_resumable(&self, id: &str) -> Result<(), BusError>;
    /// The session resumable under `id`, if it is still registered.
    async fn resumable(&self, id: &str) -> Option<Arc<Route>>;
    /// Number of bound sessions on this node.
    fn local_sessions(&self) -> usize;
    /// Every session on this node (for shutdown).
    fn local_routes(&self) -> Vec<Arc<Route>>;
    /// The other live nodes, for redirecting clients (see-other-host).
    fn peers(&self) -> Vec<Peer> {
        Vec::new()
    }
    /// False while the bus cannot route beyond this node (NATS lost).
    fn healthy(&self) -> bool {
        true
    }
    /// True while new sessions can be bound: healthy, and in a cluster the
    /// registry and this node's deliveries answer (`/ready`).
    fn ready(&self) -> bool {
        self.healthy()
    }
    /// True when this node's view of the registry can be behind the truth
    /// (a cluster: a login on another node a moment ago), so that a message
    /// may go to offline storage while its recipient is online after all.
    fn registry_can_lag(&self) -> bool {
        false
    }
    /// The latest moment this node's view of the registry was known to hold
    /// every session bound before it (`None`: not known lately). A message
    /// stored offline before that moment went to a user who was offline.
    fn registry_confirmed(&self) -> Option<std::time::Instant> {
        Some(std::time::Instant::now())
    }
}

/// Another live node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its name.
    pub name: String,
    /// Where clients reach it (`host:port`), if it said.
    pub address: Option<String>,
    /// Its bound sessions.
    pub sessions: usize,
}

/// What a clustered bus asks of the router when deliveries or sessions are
/// stranded (a session ended or moved, a node died).
#[async_trait]
pub trait Recovery: Send + Sync {
    /// A stanza for `to` reached this node, but that session is not here: route it again.
    async fn reroute(&self, to: FullJid, stanza: Element);
    /// A session vanished with its node: its contacts learn it is gone.
    async fn session_lost(&self, route: Route);
    /// This node's sessions were registered anew after the registry was
    /// lost: peers that could not see them meanwhile stored their messages.
    fn registered_anew(&self);
}

/// Takes over a session on this node through its inbox.
pub async fn take_over_local(mailbox: &Mailbox) -> Option<SessionSnapshot> {
    let (reply, answer) = oneshot::channel();
    mailbox.send(Mail::Takeover(reply)).ok()?;
    tokio::time::timeout(TAKEOVER_TIMEOUT, answer)
        .await
        .ok()?
        .ok()
}
