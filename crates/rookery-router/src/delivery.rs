//! The recipient side: what a session does with a stanza delivered to it
//! (the modules' delivery hooks first: client state indication, XEP-0352,
//! is one, in rookery-ext).

use minidom::Element;
use rookery_stream::ns;

use crate::{Router, Session, SessionEvent};

/// A push the server generated (an iq with no `from`; a client's iq always
/// carries the `from` the server stamped on it) with a payload in `namespace`.
pub fn is_server_push(stanza: &Element, namespace: &str) -> bool {
    stanza.is("iq", ns::CLIENT)
        && stanza.attr("from").is_none()
        && stanza.children().any(|child| child.has_ns(namespace))
}

impl Router {
    /// Takes a stanza delivered to the session into its outbox, after the
    /// modules' delivery hooks (which may keep it). What the router itself
    /// drops never reaches the hooks: a hook sees only what will be sent
    /// unless it keeps it.
    pub fn accept_delivery(&self, session: &mut Session, mut stanza: Element) {
        if is_server_push(&stanza, crate::namespaces::ROSTER) {
            // A roster push (RFC 6121 2.1.6): the roster changed.
            session.subscribers = None;
            if !session.info.interested {
                return;
            }
        }
        for module in &self.delivery_hooks {
            match module.on_delivery(self, session, stanza) {
                Some(passed) => stanza = passed,
                None => return,
            }
        }
        session.outbox.push(stanza);
    }

    /// XEP-0352: the client said it became inactive, or active again; the
    /// modules with [`Hooks::session`](crate::Hooks) hear it.
    pub async fn set_client_state(&self, session: &mut Session, inactive: bool) {
        let event = match inactive {
            true => SessionEvent::Inactive,
            false => SessionEvent::Active,
        };
        self.session_event(session, event).await;
    }
}
