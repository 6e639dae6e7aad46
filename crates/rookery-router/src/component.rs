//! External components (XEP-0114): a component is registered in the bus
//! like a session, under its domain, on whichever node it connected to, so
//! every node reaches it. What it sends enters the router as a peer
//! server's stanzas would: the recipient's side of the rules only (a
//! component has no roster, no carbons, no offline storage of its own).

use jid::{BareJid, Jid};
use minidom::Element;
use rookery_cluster::{Mailbox, SessionId};

use crate::stanza::{self, ErrorCondition, Kind, MessageType, PresenceType, error_reply};
use crate::{BindError, Destination, Router, Session};

/// The error a stanza gets back when it cannot reach a component: for a
/// message or an iq request; nothing for presence, results and errors.
fn unreachable_reply(stanza: &Element) -> Option<Element> {
    let answer = match Kind::of(stanza)? {
        Kind::Message => !matches!(
            MessageType::of(stanza),
            MessageType::Error | MessageType::Headline
        ),
        Kind::Iq => !stanza::is_error_or_result(stanza),
        Kind::Presence => false,
    };
    answer.then(|| error_reply(stanza, ErrorCondition::SERVICE_UNAVAILABLE, None, None))
}

impl Router {
    /// True if a component of `domain` is connected to some node.
    pub fn component_connected(&self, domain: &BareJid) -> bool {
        !self.bus.routes(domain).is_empty()
    }

    /// Registers the component of `domain` on this node, as a session whose
    /// full JID is the domain with a resource of its own.
    pub async fn bind_component(
        &self,
        domain: &BareJid,
        mailbox: Mailbox,
    ) -> Result<Session, BindError> {
        let resource = format!("rookery-component-{}", rookery_stream::random_id());
        let jid = domain
            .with_resource_str(&resource)
            .expect("generated resources are valid");
        let session = Session::new(jid, SessionId::next(), mailbox);
        let route = self.route_of(&session);
        self.bus
            .bind(route)
            .await
            .map_err(|_| BindError::Unavailable)?;
        Ok(session)
    }

    /// Ends a component's registration: those it sent directed presence to
    /// see it go, and what it did not take gets its error.
    pub async fn end_component(&self, mut session: Session, undelivered: Vec<Element>) {
        if let Err(error) = self.bus.unbind(&session.jid, session.id).await {
            tracing::warn!(jid = %session.jid, %error, "Component could not be unbound.");
        }
        for jid in std::mem::take(&mut session.directed) {
            let mut unavailable = stanza::stanza(
                "presence",
                session.account.as_str(),
                jid.to_string().as_str(),
            );
            rookery_stream::xml::set_attr(&mut unavailable, "type", "unavailable");
            self.deliver_presence(unavailable, &jid).await;
        }
        for stanza in undelivered {
            if let Some(error) = unreachable_reply(&stanza) {
                self.route(error).await;
            }
        }
    }

    /// Sends a stanza to the component of `domain`, on whichever node it is
    /// connected; gives it back when none is.
    pub(crate) async fn send_to_component(
        &self,
        domain: &BareJid,
        stanza: Element,
    ) -> Result<(), Element> {
        match self.bus.routes(domain).first() {
            Some(route) => self.send_to(route, stanza).await,
            None => Err(stanza),
        }
    }

    /// Sends a stanza to a component; when it cannot get there, the error
    /// for the sender (see [`unreachable_reply`]).
    pub(crate) async fn to_component(&self, domain: &BareJid, stanza: Element) -> Option<Element> {
        let stanza = self.send_to_component(domain, stanza).await.err()?;
        tracing::debug!(component = %domain, name = stanza.name(), "Component not connected.");
        unreachable_reply(&stanza)
    }

    /// A stanza the component sent (`from` at its domain, `to` present; see
    /// `rookery_stream::ComponentStream`). Errors for it go back through
    /// the session's outbox or the bus.
    pub async fn handle_component_stanza(&self, component: &mut Session, stanza: Element) {
        let to = match stanza::to(&stanza) {
            Ok(Some(to)) => to,
            _ => {
                if !stanza::is_error_or_result(&stanza) {
                    component.outbox.push(error_reply(
                        &stanza,
                        ErrorCondition::JID_MALFORMED,
                        None,
                        None,
                    ));
                }
                return;
            }
        };
        match Kind::of(&stanza) {
            // The client paths serve: a component has no carbons-enabled
            // sessions, and its iqs to the server or an account are
            // answered as any entity's.
            Some(Kind::Message) => self.handle_message(component, stanza, Some(to)).await,
            Some(Kind::Iq) => Box::pin(self.handle_iq(component, stanza, Some(to))).await,
            Some(Kind::Presence) => {
                Box::pin(self.handle_component_presence(component, stanza, to)).await
            }
            None => {}
        }
    }

    /// Presence from a component: directed presence as from a client;
    /// subscriptions on the recipient's side only (the component keeps
    /// its own rosters, if any).
    async fn handle_component_presence(&self, component: &mut Session, presence: Element, to: Jid) {
        let Some(kind) = PresenceType::of(&presence) else {
            return component.outbox.push(error_reply(
                &presence,
                ErrorCondition::BAD_REQUEST,
                Some("Unknown presence type."),
                None,
            ));
        };
        let from = stanza::from(&presence).expect("the stream checked 'from'");
        match (self.resolve(&to), kind) {
            (Destination::Account, PresenceType::Probe) => {
                self.answer_component_probe(&from, &to.to_bare()).await
            }
            (
                Destination::Account,
                PresenceType::Subscribe
                | PresenceType::Subscribed
                | PresenceType::Unsubscribe
                | PresenceType::Unsubscribed,
            ) => {
                let mut presence = presence;
                rookery_stream::xml::set_attr(&mut presence, "from", from.to_bare().to_string());
                self.subscription_inbound(presence, &to.to_bare(), &from.to_bare(), kind)
                    .await
            }
            (_, PresenceType::Available) => {
                component.directed.insert(to.clone());
                self.deliver_presence(presence, &to).await
            }
            (_, PresenceType::Unavailable) => {
                component.directed.remove(&to);
                self.deliver_presence(presence, &to).await
            }
            _ => self.deliver_presence(presence, &to).await,
        }
    }

    /// A component probes `contact`: the contact's presence if the contact
    /// lets `from` see it (subscription `from` on the contact's roster),
    /// else `unsubscribed` (RFC 6121 4.3.2).
    async fn answer_component_probe(&self, from: &Jid, contact: &BareJid) {
        if self.sees_presence(contact, from).await {
            return self.send_current_presence(contact, &from.to_bare()).await;
        }
        if self.blocks(contact, from).await {
            return;
        }
        let mut answer = stanza::stanza("presence", contact.as_str(), from.as_str());
        rookery_stream::xml::set_attr(&mut answer, "type", "unsubscribed");
        self.deliver_presence(answer, from).await;
    }
}
