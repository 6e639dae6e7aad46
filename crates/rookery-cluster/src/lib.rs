//! The routing seam between sessions: a registry of bound sessions ("who is
//! where") and delivery of [`Mail`] to them ("deliver this there").
//!
//! [`Bus`] is the one interface the router uses; [`LocalBus`] implements it in
//! process for a single node. A clustered bus keeps the same contract: lookups
//! are synchronous reads of a local view, delivery hands mail to a local
//! mailbox or publishes it to the node that holds the session.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::StreamExt;
use futures::channel::mpsc;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_stream::{SmState, StreamError};
use tokio::sync::oneshot;

mod local;

pub use local::LocalBus;

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
    /// The session enabled message carbons (XEP-0280).
    pub carbons: bool,
    /// The session requested the roster (an "interested resource").
    pub interested: bool,
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
/// per session.
#[derive(Debug, Clone)]
pub struct Mailbox(mpsc::UnboundedSender<Mail>);

/// The receiving side of a session's inbox.
#[derive(Debug)]
pub struct Inbox(mpsc::UnboundedReceiver<Mail>);

impl Inbox {
    /// The next mail; `None` once every mailbox is dropped and the inbox is empty.
    pub async fn recv(&mut self) -> Option<Mail> {
        self.0.next().await
    }

    /// The next mail if one is waiting.
    pub fn try_recv(&mut self) -> Option<Mail> {
        self.0.try_recv().ok()
    }

    /// Refuses further mail; what is queued stays readable.
    pub fn close(&mut self) {
        self.0.close();
    }
}

impl Mailbox {
    /// A new mailbox and its inbox.
    pub fn new() -> (Mailbox, Inbox) {
        let (sender, receiver) = mpsc::unbounded();
        (Mailbox(sender), Inbox(receiver))
    }

    /// Puts mail in the inbox; gives it back if the session is gone.
    pub fn send(&self, mail: Mail) -> Result<(), Mail> {
        self.0
            .unbounded_send(mail)
            .map_err(|error| error.into_inner())
    }

    /// Puts a stanza (without receipt) in the inbox; gives it back if the session is gone.
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

    /// True once the inbox was dropped.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Proof of a durable delivery, acknowledged through the bus once the stanza is
/// safe: acknowledged by the client, written out, or rerouted and stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Receipt(pub String);

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
    /// Client state indication: the client is inactive.
    pub inactive: bool,
    /// Stanzas held back while inactive.
    pub held: Vec<Element>,
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
    /// Tells a session to end its stream with `error`.
    async fn close(&self, route: &Route, error: StreamError);
    /// Takes a session over for a resuming connection.
    async fn take_over(&self, route: &Route) -> Option<SessionSnapshot>;
    /// A durable delivery is safe: forget it.
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
