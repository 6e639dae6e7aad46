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
    /// Carbons enabled: the previous version's form of the `carbons` mark,
    /// still written and read for a rolling upgrade (drop a release later).
    pub carbons: bool,
    /// Roster requested.
    pub interested: bool,
    /// The modules' marks ([`rookery_cluster::Marks`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<String>,
}

/// The mark the previous version wrote as `carbons`.
const CARBONS_MARK: &str = "carbons";

impl SessionRecord {
    /// The record of a session.
    pub fn new(node: NodeId, session: SessionId, info: &RouteInfo) -> Self {
        SessionRecord {
            node,
            session: session.0,
            presence: info.presence.as_deref().map(String::from),
            priority: info.priority,
            carbons: info.marks.contains(CARBONS_MARK),
            interested: info.interested,
            marks: info.marks.iter().map(String::from).collect(),
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
            marks: self
                .marks
                .iter()
                .map(String::as_str)
                .chain(self.carbons.then_some(CARBONS_MARK))
                .collect(),
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
    /// The node reads deliveries to several of its sessions in one message
    /// (`Rookery-To-Each`): peers batch best-effort deliveries to it only
    /// then (a node of an earlier version does not, and gets one each).
    #[serde(default)]
    pub batches: bool,
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
    /// Client state indication, as nodes before the csi module kept it:
    /// still written (a node of the previous version requires these two)
    /// and read (from such a node) for one release, so that a rolling
    /// upgrade's take-overs keep an inactive session's held presence.
    #[serde(default)]
    pub inactive: bool,
    /// Held presence, as XML (see `inactive`).
    #[serde(default)]
    pub held: Vec<String>,
}

/// The csi module's key in `modules` (rookery_ext::csi::CsiSession).
const CSI_KEY: &str = "csi";

/// The csi module's state as the previous version's two fields.
#[derive(Default, Serialize, Deserialize)]
struct CsiWire {
    held: Vec<String>,
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
            inactive: false,
            held: Vec::new(),
            modules: snapshot.modules.to_wire(),
        }
        .with_legacy_csi()
    }

    /// Fills the previous version's CSI fields from the csi module's state.
    fn with_legacy_csi(mut self) -> Self {
        if let Some(json) = self.modules.get(CSI_KEY) {
            self.inactive = true;
            self.held = serde_json::from_str::<CsiWire>(json)
                .map(|csi| csi.held)
                .unwrap_or_default();
        }
        self
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
        let mut modules = self.modules;
        if self.inactive && !modules.contains_key(CSI_KEY) {
            // From a node of the previous version.
            let csi = CsiWire { held: self.held };
            if let Ok(json) = serde_json::to_string(&csi) {
                modules.insert(CSI_KEY.to_owned(), json);
            }
        }
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
            modules: rookery_cluster::ModuleStates::from_wire(modules),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rookery_cluster::{ModuleStates, RouteInfo};

    use super::*;

    const HELD: &str = "<presence xmlns='jabber:client' from='bob@localhost/desk'/>";

    #[test]
    fn a_heartbeat_of_the_previous_version_says_it_reads_no_batches() {
        let old =
            r#"{"name":"n","node":1,"sessions":0,"address":null,"accepting":true,"leaving":false}"#;
        let heartbeat: Heartbeat = serde_json::from_str(old).unwrap();
        assert!(!heartbeat.batches);
    }

    #[test]
    fn the_carbons_mark_is_also_the_previous_version_s_carbons_flag() {
        let info = RouteInfo {
            marks: ["carbons", "other"].into_iter().collect(),
            ..RouteInfo::default()
        };
        let record = SessionRecord::new(1, SessionId(2), &info);
        // An old node reads the flag.
        assert!(record.carbons);
        assert_eq!(record.info().marks, info.marks);

        // From an old node: the flag, no marks.
        let mut json = serde_json::to_value(&record).unwrap();
        json.as_object_mut().unwrap().remove("marks");
        let old: SessionRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.info().marks, ["carbons"].into_iter().collect());

        // No marks: none written, none read.
        let plain = SessionRecord::new(1, SessionId(2), &RouteInfo::default());
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("marks") && !plain.carbons, "{json}");
        assert!(plain.info().marks.is_empty());
    }

    #[test]
    fn the_previous_version_s_csi_fields_are_written_and_read_for_a_rolling_upgrade() {
        let csi = serde_json::to_string(&CsiWire {
            held: vec![HELD.into()],
        })
        .unwrap();
        let snapshot = SessionSnapshot {
            jid: FullJid::new("alice@localhost/phone").unwrap(),
            session: SessionId(7),
            info: RouteInfo::default(),
            sm: SmState::new(Some("r".into())),
            receipts: Vec::new(),
            directed: Vec::new(),
            offline_after: 0,
            modules: ModuleStates::from_wire(BTreeMap::from([(CSI_KEY.into(), csi)])),
            inbox: None,
        };
        // Written for an old node, which requires both fields.
        let wire = WireSnapshot::from_snapshot(&snapshot, 1);
        assert!(wire.inactive);
        assert_eq!(wire.held, [HELD]);

        // Read from an old node: no modules, the two fields.
        let mut json: serde_json::Value = serde_json::to_value(&wire).unwrap();
        json.as_object_mut().unwrap().remove("modules");
        let old: WireSnapshot = serde_json::from_value(json).unwrap();
        let restored = old.into_snapshot().unwrap();
        let modules = restored.modules.to_wire();
        let csi: CsiWire = serde_json::from_str(&modules[CSI_KEY]).unwrap();
        assert_eq!(csi.held, [HELD]);

        // An active session has neither.
        let mut active = snapshot;
        active.modules = ModuleStates::default();
        let wire = WireSnapshot::from_snapshot(&active, 1);
        assert!(!wire.inactive && wire.held.is_empty());
        assert!(wire.into_snapshot().unwrap().modules.is_empty());
    }
}
