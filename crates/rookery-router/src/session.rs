//! The router's view of one bound client session.

use std::collections::HashSet;
use std::sync::Arc;

use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_cluster::{Mailbox, ModuleStates, RouteInfo, SessionId};

/// A bound session: what routing knows and keeps about one connected resource.
///
/// The session task owns it; the router reads and updates it while handling
/// the session's stanzas and deliveries.
#[derive(Debug)]
pub struct Session {
    /// The bound full JID.
    pub jid: FullJid,
    /// Its bare JID, the account, kept to spare an allocation per stanza.
    pub account: BareJid,
    /// This session instance.
    pub id: SessionId,
    /// Routing state, mirrored in the bus.
    pub info: RouteInfo,
    /// Entities that got directed presence and must get unavailable at the end (RFC 6121 4.6).
    pub directed: HashSet<Jid>,
    /// Offline messages wait for this session, a page at a time
    /// ([`Router::next_offline_page`](crate::Router::next_offline_page)).
    pub offline_pending: bool,
    /// The id of the last offline message handed to the client: the next
    /// page is read after it (they stay stored until the client has them).
    pub offline_after: i64,
    /// What the client asked of the server's modules (their own state,
    /// typed: [`ModuleStates::get_mut`]); moves with the session.
    pub modules: ModuleStates,
    /// Stanzas for the client, written out by the session task after each step.
    pub outbox: Vec<Element>,
    /// The session's own mailbox (its route in the bus).
    pub mailbox: Mailbox,
    /// A newer session took over the same full JID; this one ends without
    /// broadcasting unavailable presence (the resource is still online).
    pub replaced: bool,
    /// The contacts subscribed to the user's presence (roster items with a
    /// `from` subscription), read from storage at the first broadcast and
    /// kept until the next roster push reaches the session: every change to
    /// the roster is pushed to all of the user's sessions on every node.
    pub subscribers: Option<Arc<[BareJid]>>,
}

impl Session {
    /// A freshly bound session.
    pub fn new(jid: FullJid, id: SessionId, mailbox: Mailbox) -> Self {
        Session {
            account: jid.to_bare(),
            jid,
            id,
            info: RouteInfo::default(),
            directed: HashSet::new(),
            offline_pending: false,
            offline_after: 0,
            modules: ModuleStates::default(),
            outbox: Vec::new(),
            mailbox,
            replaced: false,
            subscribers: None,
        }
    }

    /// The account of the session.
    pub fn user(&self) -> BareJid {
        self.account.clone()
    }

    /// Takes the stanzas waiting for the client.
    pub fn take_outbox(&mut self) -> Vec<Element> {
        std::mem::take(&mut self.outbox)
    }
}
