//! Wire forms of what crosses nodes: registry records, heartbeats, control
//! requests and session snapshots. Changing them is a wire compatibility decision.

use std::sync::Arc;

use jid::{FullJid, Jid};
use minidom::Element;
use rookery_cluster::{NodeId, Receipt, RouteInfo, SessionId, SessionSnapshot};
use rookery_stream::{Condition, SmState, StreamError};
use serde::{Deserialize, Serialize};

/// A bound session in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    /// The node holding it.
    pub node: NodeId,
    /// The session instance.
    pub session: u64,
    /// Last available presence, as XML.
    pub presence: Option<String>,
    /// Presence priority.
    pub priority: i8,
    /// Carbons enabled.
    pub carbons: bool,
    /// Roster requested.
    pub interested: bool,
}

impl SessionRecord {
    /// The record of a session.
    pub fn new(node: NodeId, session: SessionId, info: &RouteInfo) -> Self {
        SessionRecord {
            node,
            session: session.0,
            presence: info.presence.as_deref().map(String::from),
            priority: info.priority,
            carbons: info.carbons,
            interested: info.interested,
        }
    }

    /// Its routing state.
    pub fn info(&self) -> RouteInfo {
        RouteInfo {
            presence: self
                .presence
                .as_deref()
                .and_then(|xml| xml.parse::<Element>().ok())
                .map(Arc::new),
            priority: self.priority,
            carbons: self.carbons,
            interested: self.interested,
        }
    }
}

/// A resumption id in the registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumeRecord {
    /// The session's full JID.
    pub jid: String,
    /// The session instance.
    pub session: u64,
}

/// A node's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    /// The configured node name.
    pub name: String,
    /// This process.
    pub node: NodeId,
    /// Bound sessions on the node.
    pub sessions: usize,
    /// Where clients reach the node.
    pub address: Option<String>,
    /// Accepting new sessions.
    pub accepting: bool,
    /// The node is shutting down cleanly.
    pub leaving: bool,
}

/// A request to another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Control {
    /// Hand over a session to a resuming connection elsewhere.
    TakeOver {
        /// The session's full JID.
        jid: String,
        /// The session instance.
        session: u64,
    },
    /// End a session's stream.
    Close {
        /// The session's full JID.
        jid: String,
        /// The session instance.
        session: u64,
        /// The stream error condition name.
        condition: String,
        /// Content (see-other-host).
        content: Option<String>,
    },
}

/// A stream error on the wire.
pub fn condition_from_name(name: &str) -> Condition {
    [
        Condition::Conflict,
        Condition::SystemShutdown,
        Condition::NotAuthorized,
        Condition::SeeOtherHost,
        Condition::PolicyViolation,
        Condition::ResourceConstraint,
    ]
    .into_iter()
    .find(|condition| condition.as_str() == name)
    .unwrap_or(Condition::UndefinedCondition)
}

/// A session snapshot on the wire (without the inbox, which stays behind).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSnapshot {
    /// Full JID.
    pub jid: String,
    /// Session instance.
    pub session: u64,
    /// Routing state.
    pub record: SessionRecord,
    /// Stream management id.
    pub sm_id: Option<String>,
    /// Stanzas handled from the client.
    pub sm_inbound: u32,
    /// Last acknowledged count.
    pub sm_acked: u32,
    /// Unacknowledged stanzas, as XML.
    pub sm_unacked: Vec<String>,
    /// Receipts with the count at which each stanza was sent.
    pub receipts: Vec<(u32, Receipt)>,
    /// Directed presence recipients.
    pub directed: Vec<String>,
    /// The id of the last offline message handed out.
    #[serde(default)]
    pub offline_after: i64,
    /// The modules' state of the session, as JSON by module.
    #[serde(default)]
    pub modules: std::collections::BTreeMap<String, String>,
}

impl WireSnapshot {
    /// The wire form of a snapshot.
    pub fn from_snapshot(snapshot: &SessionSnapshot, node: NodeId) -> Self {
        WireSnapshot {
            jid: snapshot.jid.to_string(),
            session: snapshot.session.0,
            record: SessionRecord::new(node, snapshot.session, &snapshot.info),
            sm_id: snapshot.sm.id.clone(),
            sm_inbound: snapshot.sm.inbound,
            sm_acked: snapshot.sm.acked,
            sm_unacked: snapshot.sm.unacked().iter().map(String::from).collect(),
            receipts: snapshot.receipts.clone(),
            directed: snapshot.directed.iter().map(|j| j.to_string()).collect(),
            offline_after: snapshot.offline_after,
            modules: snapshot.modules.to_wire(),
        }
    }

    /// Back to a snapshot; stanzas that no longer parse are dropped with a log line.
    pub fn into_snapshot(self) -> Option<SessionSnapshot> {
        let parse = |xml: String| match xml.parse::<Element>() {
            Ok(element) => Some(element),
            Err(error) => {
                tracing::error!(%error, "A stanza of a session snapshot does not parse.");
                None
            }
        };
        let mut sm = SmState::new(self.sm_id);
        sm.inbound = self.sm_inbound;
        sm.acked = self.sm_acked;
        for stanza in self.sm_unacked.into_iter().filter_map(parse) {
            sm.sent(stanza);
        }
        Some(SessionSnapshot {
            jid: FullJid::new(&self.jid).ok()?,
            session: SessionId(self.session),
            info: self.record.info(),
            sm,
            receipts: self.receipts,
            directed: self
                .directed
                .iter()
                .filter_map(|j| Jid::new(j).ok())
                .collect(),
            offline_after: self.offline_after,
            modules: rookery_cluster::ModuleStates::from_wire(self.modules),
            inbox: None,
        })
    }
}

/// A close request's stream error.
pub fn stream_error(condition: &str, content: Option<String>) -> StreamError {
    StreamError {
        condition: condition_from_name(condition),
        text: None,
        content,
    }
}
