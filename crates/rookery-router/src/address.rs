//! Addressing in one place: where a stanza's `to` leads. Message, presence
//! and iq routing all ask [`Router::resolve`].

use std::sync::Arc;

use jid::{BareJid, Jid};

use crate::{Extension, Router};

/// Where an address leads.
#[derive(Clone)]
pub enum Destination {
    /// An account of the served domain (a bare or full JID with a local part).
    Account,
    /// The served domain itself.
    Server,
    /// A service a module hosts here (`conference.<domain>` and the entities
    /// at it).
    Service(Arc<dyn Extension>),
    /// An external component (XEP-0114) configured for this domain (the
    /// component's domain), connected to any node or to none.
    Component(BareJid),
    /// Another domain: `remote-server-not-found` until federation plugs in here.
    Remote,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Account => f.write_str("Account"),
            Destination::Server => f.write_str("Server"),
            Destination::Service(module) => {
                write!(f, "Service({})", module.service().unwrap_or_default())
            }
            Destination::Component(domain) => write!(f, "Component({domain})"),
            Destination::Remote => f.write_str("Remote"),
        }
    }
}

impl Router {
    /// The domains this server hosts beside its own: the services of its
    /// modules and its external components, sorted.
    pub fn hosted_domains(&self) -> Vec<&str> {
        let mut domains: Vec<&str> = self
            .services
            .keys()
            .chain(self.components.keys())
            .map(String::as_str)
            .collect();
        domains.sort_unstable();
        domains
    }

    /// Where `to` leads.
    pub fn resolve(&self, to: &Jid) -> Destination {
        let domain = to.domain().as_str();
        if domain == self.config.domain {
            return if to.node().is_some() {
                Destination::Account
            } else {
                Destination::Server
            };
        }
        if let Some(module) = self.services.get(domain) {
            return Destination::Service(module.clone());
        }
        match self.components.get(domain) {
            Some(component) => Destination::Component(component.clone()),
            None => Destination::Remote,
        }
    }
}
