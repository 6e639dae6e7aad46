//! The module interface: a XEP module answers the iq payloads it owns (a
//! table keyed by namespace and element, looked up once per iq), may act at
//! defined points of a session's life (hooks), and keeps its own typed state
//! per session ([`ModuleStates`](rookery_cluster::ModuleStates)), which moves
//! with stream-management resumption and take-over to another node.

use std::sync::Arc;

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;
use rookery_cluster::Route;

use crate::stanza::MessageType;
use crate::{Router, Session};

/// Where an iq to be handled by the server is addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IqTarget {
    /// The server itself (`to` is the domain).
    Server,
    /// An account on this server (its bare JID); the sender's own when `to` was absent.
    Account(BareJid),
}

/// Whether an iq asks or changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    /// `get`.
    Get,
    /// `set`.
    Set,
}

/// Everything a handler gets for one iq.
pub struct IqContext<'a> {
    /// The router, for storage and delivery.
    pub router: &'a Router,
    /// The sending session.
    pub session: &'a mut Session,
    /// The whole iq, `from` stamped.
    pub iq: &'a Element,
    /// Its single payload element.
    pub payload: &'a Element,
    /// `get` or `set`.
    pub iq_type: IqType,
    /// What it is addressed to.
    pub target: IqTarget,
}

impl IqContext<'_> {
    /// True when the iq is addressed to the sender's own account.
    pub fn to_self(&self) -> bool {
        self.target == IqTarget::Account(self.session.user())
    }

    /// Who asks: the iq's (stamped) `from` as a bare JID. For a client that
    /// is its account; for an external component, the address at it that
    /// sent the iq (`user@gateway.example`), not the component itself.
    pub fn requester(&self) -> BareJid {
        crate::stanza::from(self.iq).map_or_else(|| self.session.user(), |from| from.to_bare())
    }
}

/// A moment in a session's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEvent {
    /// A resource was bound.
    Bound,
    /// A session was resumed (XEP-0198) on a new connection, on this node or
    /// taken over from another.
    Resumed,
    /// The session ended.
    Ended,
    /// The client said it is inactive (XEP-0352).
    Inactive,
    /// The client said it is active again (XEP-0352).
    Active,
}

/// Whose side of a routed message a module looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The sender's: it left one of the user's sessions.
    Sent,
    /// The recipient's: it reached sessions of the user.
    Received,
}

/// A message between users the router routed, as a module that copies it
/// to some of a user's sessions sees it ([`Extension::on_routed`]).
#[derive(Debug)]
pub struct Routed<'a> {
    /// The sender's side or the recipient's.
    pub side: Side,
    /// The user whose sessions may get copies (the sender or the recipient).
    pub user: &'a BareJid,
    /// The message as the client sent it, `from` stamped.
    pub message: &'a Element,
    /// Its type.
    pub message_type: MessageType,
    /// The user's sessions as routing saw them.
    pub routes: &'a [Arc<Route>],
    /// Sessions that have the message already: the sending session, and
    /// those it was delivered to.
    pub have_it: &'a [&'a FullJid],
}

/// The hooks a module uses: the router calls a hook only on the modules
/// that asked for it, so a hook costs nothing while no module uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// [`Extension::on_stanza`].
    pub stanza: bool,
    /// [`Extension::on_delivery`].
    pub delivery: bool,
    /// [`Extension::on_session`].
    pub session: bool,
    /// [`Extension::on_routed`], for messages to or from a user with a
    /// session that carries this mark ([`rookery_cluster::Marks`], set by
    /// the module on the sessions that asked for copies).
    pub routed: Option<&'static str>,
}

/// One XEP module.
#[async_trait]
pub trait Extension: Send + Sync {
    /// The iq payloads the module answers, as (namespace, element name):
    /// [`handle_iq`](Self::handle_iq) gets exactly these. Two modules
    /// claiming the same payload is a programming error, refused when the
    /// router is built.
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)];

    /// The hooks it uses.
    fn hooks(&self) -> Hooks {
        Hooks::default()
    }

    /// The label of the service the module hosts, if any: `conference`
    /// hosts `conference.<domain>`. Every stanza addressed to the service or
    /// to an entity at it (a room, an occupant) comes to
    /// [`handle_service`](Self::handle_service).
    fn service(&self) -> Option<&'static str> {
        None
    }

    /// A stanza addressed to the module's service, `from` stamped (by the
    /// sender's server: it is who it says). Answers go back with
    /// [`Router::route`], which reaches the sender on any node.
    async fn handle_service(&self, _router: &Router, _stanza: Element) {}

    /// Disco features (XEP-0030) the module adds to the server.
    fn server_features(&self) -> &'static [&'static str] {
        &[]
    }

    /// Stream features the module offers once a client authenticated.
    fn stream_features(&self) -> Vec<Element> {
        Vec::new()
    }

    /// Disco features the module adds to accounts.
    fn account_features(&self) -> &'static [&'static str] {
        &[]
    }

    /// Answers an iq get or set, with one of the module's payloads, addressed
    /// to the server or to an account; `None` answers `service-unavailable`
    /// (the module does not serve that target or type).
    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element>;

    /// A stanza from the session's client (`from` stamped), before it is
    /// routed (with [`Hooks::stanza`]): the module gives it back, changed or
    /// not, to let it go on, or keeps it (it handled or dropped it; it
    /// answers through `session.outbox` or [`Router::route`]).
    async fn on_stanza(
        &self,
        _router: &Router,
        _session: &mut Session,
        stanza: Element,
    ) -> Option<Element> {
        Some(stanza)
    }

    /// A stanza is about to reach the session's client (with
    /// [`Hooks::delivery`]): the module gives it back to let it through, or
    /// keeps it (drops it, or holds it for later).
    fn on_delivery(
        &self,
        _router: &Router,
        _session: &mut Session,
        stanza: Element,
    ) -> Option<Element> {
        Some(stanza)
    }

    /// With [`Hooks::routed`]: whether the module copies this message at all
    /// (a cheap look at the message alone, before routing looks up or keeps
    /// anything for [`on_routed`](Self::on_routed)).
    fn copies_message(&self, _message: &Element, _message_type: MessageType) -> bool {
        true
    }

    /// A message was routed between users, and a session of the sender or
    /// the recipient carries the module's mark (with [`Hooks::routed`]):
    /// the copies to send, each with the session it is for. The router
    /// sends them as it sends messages (durably in a cluster).
    fn on_routed(&self, _routed: &Routed<'_>) -> Vec<(Arc<Route>, Element)> {
        Vec::new()
    }

    /// True for a copy this module made in [`on_routed`](Self::on_routed):
    /// one that cannot reach its session is dropped, not routed again (the
    /// message itself went elsewhere).
    fn is_copy(&self, _message: &Element) -> bool {
        false
    }

    /// The session reached `event` (with [`Hooks::session`]).
    async fn on_session(&self, _router: &Router, _session: &mut Session, _event: SessionEvent) {}

    /// Answers an iq sent before authentication (in-band registration), or `None`.
    async fn handle_unauthenticated_iq(&self, _router: &Router, _iq: &Element) -> Option<Element> {
        None
    }
}
