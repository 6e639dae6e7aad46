//! The recipient side: what a session does with a stanza delivered to it,
//! including client state indication (XEP-0352).

use minidom::Element;
use rookery_stream::ns;

use crate::stanza::PresenceType;
use crate::{Router, Session};

/// A push the server generated (an iq with no `from`; a client's iq always
/// carries the `from` the server stamped on it) with a payload in `namespace`.
pub fn is_server_push(stanza: &Element, namespace: &str) -> bool {
    stanza.is("iq", ns::CLIENT)
        && stanza.attr("from").is_none()
        && stanza.children().any(|child| child.has_ns(namespace))
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
    pub fn accept_delivery(&self, session: &mut Session, mut stanza: Element) {
        for module in &self.delivery_hooks {
            match module.on_delivery(self, session, stanza) {
                Some(passed) => stanza = passed,
                None => return,
            }
        }
        if is_server_push(&stanza, crate::namespaces::ROSTER) {
            // A roster push (RFC 6121 2.1.6): the roster changed.
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
            let held_bytes: usize = session
                .held
                .iter()
                .map(rookery_stream::xml::approximate_size)
                .sum();
            if session.held.len() > self.config.csi_hold_limit || held_bytes > crate::CSI_HOLD_BYTES
            {
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
