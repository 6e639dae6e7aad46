//! External components (XEP-0114): a component is registered in the bus
//! like a session, under its domain, on whichever node it connected to, so
//! every node reaches it. What it sends enters the router as a peer
//! server's stanzas would: the recipient's side of the rules only (a
//! component has no roster, no carbons, no offline storage of its own).

use std::collections::HashSet;

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

/// The resource every component is bound at: one connection per domain in
/// the whole cluster (a newer one replaces an older one it raced with).
pub const COMPONENT_RESOURCE: &str = "rookery-component";

/// Most (sender, recipient) pairs of directed presence one component keeps
/// (each gets unavailable presence when it disconnects).
pub const MAX_COMPONENT_DIRECTED: usize = 10_000;

/// A connected component as the router sees it: its session in the bus,
/// and which of its addresses sent directed presence to whom.
pub struct ComponentSession {
    /// Its session: the bus entry, the mailbox, errors to send back (`outbox`).
    pub session: Session,
    /// (from, to) of available presence sent and not yet made unavailable.
    directed: HashSet<(Jid, Jid)>,
}

impl Router {
    /// True if a component of `domain` is connected to some node.
    pub fn component_connected(&self, domain: &BareJid) -> bool {
        !self.bus.routes(domain).is_empty()
    }

    /// Registers the component of `domain` on this node, at
    /// `<domain>/rookery-component`. The caller refuses a second connection
    /// while one shows in the registry; one that raced past (two nodes whose
    /// views were a moment behind) replaces the older, which is told to end
    /// with `conflict`, as a client resource is.
    pub async fn bind_component(
        &self,
        domain: &BareJid,
        mailbox: Mailbox,
    ) -> Result<ComponentSession, BindError> {
        let jid = domain
            .with_resource_str(COMPONENT_RESOURCE)
            .expect("a valid resource");
        let session = Session::new(jid, SessionId::next(), mailbox);
        let replaced = self
            .bus
            .bind(self.route_of(&session))
            .await
            .map_err(|_| BindError::Unavailable)?;
        if let Some(replaced) = replaced {
            tracing::info!(component = %domain, "Replacing an older connection of the component.");
            self.bus
                .close(&replaced, rookery_stream::Condition::Conflict.into())
                .await;
        }
        Ok(ComponentSession {
            session,
            directed: HashSet::new(),
        })
    }

    /// Ends a component's registration: those its addresses sent directed
    /// presence to see them go, and what it did not take is rerouted (to the
    /// component if it is connected again, on any node, else answered with
    /// an error).
    pub async fn end_component(&self, component: ComponentSession, undelivered: Vec<Element>) {
        let ComponentSession { session, directed } = component;
        if let Err(error) = self.bus.unbind(&session.jid, session.id).await {
            tracing::warn!(jid = %session.jid, %error, "Component could not be unbound.");
        }
        for (from, to) in directed {
            let mut unavailable =
                stanza::stanza("presence", from.as_str(), to.to_string().as_str());
            rookery_stream::xml::set_attr(&mut unavailable, "type", "unavailable");
            self.deliver_presence(unavailable, &to).await;
        }
        for stanza in undelivered {
            self.reroute_stranded(&session.jid, stanza).await;
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
    pub async fn handle_component_stanza(&self, component: &mut ComponentSession, stanza: Element) {
        let to = match stanza::to(&stanza) {
            Ok(Some(to)) => to,
            _ => {
                if !stanza::is_error_or_result(&stanza) {
                    component.session.outbox.push(error_reply(
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
            Some(Kind::Message) => {
                self.handle_message(&mut component.session, stanza, Some(to))
                    .await
            }
            Some(Kind::Iq) => {
                Box::pin(self.handle_iq(&mut component.session, stanza, Some(to))).await
            }
            Some(Kind::Presence) => {
                Box::pin(self.handle_component_presence(component, stanza, to)).await
            }
            None => {}
        }
    }

    /// Presence from a component: directed presence as from a client;
    /// subscriptions on the recipient's side only (the component keeps
    /// its own rosters, if any).
    async fn handle_component_presence(
        &self,
        component: &mut ComponentSession,
        presence: Element,
        to: Jid,
    ) {
        let Some(kind) = PresenceType::of(&presence) else {
            return component.session.outbox.push(error_reply(
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
                let pair = (from, to.clone());
                if !component.directed.contains(&pair)
                    && component.directed.len() >= MAX_COMPONENT_DIRECTED
                {
                    let text = Some("Too many entities got directed presence from you.");
                    return component.session.outbox.push(error_reply(
                        &presence,
                        ErrorCondition::RESOURCE_CONSTRAINT,
                        text,
                        None,
                    ));
                }
                component.directed.insert(pair);
                self.deliver_presence(presence, &to).await
            }
            (_, PresenceType::Unavailable) => {
                component.directed.remove(&(from, to.clone()));
                self.deliver_presence(presence, &to).await
            }
            _ => self.deliver_presence(presence, &to).await,
        }
    }

    /// A component probes `contact`: the contact's presence if the contact
    /// lets `from` see it (subscription `from` on the contact's roster),
    /// else `unsubscribed` (RFC 6121 4.3.2).
    async fn answer_component_probe(&self, from: &Jid, contact: &BareJid) {
        if self.blocks(contact, from).await {
            // XEP-0191 3.5: a blocked entity learns nothing.
            return;
        }
        if self.sees_presence(contact, from).await {
            return self.send_current_presence(contact, &from.to_bare()).await;
        }
        let mut answer = stanza::stanza("presence", contact.as_str(), from.as_str());
        rookery_stream::xml::set_attr(&mut answer, "type", "unsubscribed");
        self.deliver_presence(answer, from).await;
    }
}
