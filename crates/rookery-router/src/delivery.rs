//! The recipient side: what a session does with a stanza delivered to it,
//! including client state indication (XEP-0352).

use minidom::Element;
use rookery_stream::ns;

use crate::stanza::PresenceType;
use crate::{Router, Session};

/// A server-generated XEP-0191 block list push.
fn is_blocklist_push(stanza: &Element) -> bool {
    stanza.is("iq", ns::CLIENT)
        && stanza.attr("from").is_none()
        && stanza
            .children()
            .any(|child| child.has_ns(crate::namespaces::BLOCKING))
}

/// A server-generated roster push (RFC 6121 2.1.6); a client's iq always
/// carries the `from` the server stamped on it.
fn is_roster_push(stanza: &Element) -> bool {
    stanza.is("iq", ns::CLIENT)
        && stanza.attr("from").is_none()
        && stanza
            .children()
            .any(|child| child.has_ns(crate::namespaces::ROSTER))
}

/// True for presence an inactive client can do without for a while.
fn holdable(stanza: &Element) -> bool {
    stanza.is("presence", ns::CLIENT)
        && matches!(
            PresenceType::of(stanza),
            Some(PresenceType::Available | PresenceType::Unavailable)
        )
}

impl Router {
    /// Takes a stanza delivered to the session into its outbox, or holds it while inactive.
    pub fn accept_delivery(&self, session: &mut Session, stanza: Element) {
        if is_blocklist_push(&stanza) && !session.blocklist_requested {
            // XEP-0191: pushes go only to clients that fetched the block list.
            return;
        }
        if is_roster_push(&stanza) {
            session.subscribers = None;
            if !session.info.interested {
                return;
            }
        }
        if session.inactive && holdable(&stanza) {
            // Only the latest presence of each sender matters.
            let from = stanza.attr("from").map(str::to_owned);
            session
                .held
                .retain(|held| held.attr("from").map(str::to_owned) != from);
            session.held.push(stanza);
            if session.held.len() > self.config.csi_hold_limit {
                self.flush_held(session);
            }
            return;
        }
        self.flush_held(session);
        session.outbox.push(stanza);
    }

    /// XEP-0352: the client became active or inactive.
    pub fn set_client_state(&self, session: &mut Session, inactive: bool) {
        session.inactive = inactive;
        if !inactive {
            self.flush_held(session);
        }
    }

    fn flush_held(&self, session: &mut Session) {
        if !session.held.is_empty() {
            let held = std::mem::take(&mut session.held);
            session.outbox.extend(held);
        }
    }
}
