//! The open registry of XEP handlers: each module answers the iqs it owns.

use async_trait::async_trait;
use jid::BareJid;
use minidom::Element;

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
}

/// One XEP module.
#[async_trait]
pub trait Extension: Send + Sync {
    /// Disco features (XEP-0030) the module adds to the server.
    fn server_features(&self) -> &'static [&'static str] {
        &[]
    }

    /// Disco features the module adds to accounts.
    fn account_features(&self) -> &'static [&'static str] {
        &[]
    }

    /// Answers an iq get or set addressed to the server or to an account, or
    /// returns `None` when the payload is not the module's.
    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element>;

    /// Answers an iq sent before authentication (in-band registration), or `None`.
    async fn handle_unauthenticated_iq(&self, _router: &Router, _iq: &Element) -> Option<Element> {
        None
    }
}
