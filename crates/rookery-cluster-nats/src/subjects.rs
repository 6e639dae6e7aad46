//! Every NATS subject, stream, consumer and bucket name Rookery uses, in one place.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jid::FullJid;

use rookery_cluster::NodeId;

/// KV bucket of bound sessions: who is where.
pub const SESSIONS: &str = "rookery_sessions";
/// KV bucket of stream management resumption ids.
pub const RESUME: &str = "rookery_resume";
/// KV bucket of cleanup locks: one node cleans up after a dead one.
pub const CLEANUP: &str = "rookery_cleanup";
/// JetStream stream of deliveries to nodes (a work queue).
pub const DELIVER_STREAM: &str = "ROOKERY_DELIVER";
/// Subjects captured by the delivery stream.
pub const DELIVER_ALL: &str = "rookery.deliver.>";
/// Heartbeats of every node.
pub const HEARTBEAT_ALL: &str = "rookery.heartbeat.*";

/// Deliveries to one node.
pub fn deliver(node: NodeId) -> String {
    format!("rookery.deliver.{node:016x}")
}

/// The durable consumer through which a node receives its deliveries.
pub fn deliver_consumer(node: NodeId) -> String {
    format!("deliver-{node:016x}")
}

/// The consumer that drains a dead node's deliveries.
pub fn recover_consumer(node: NodeId) -> String {
    format!("recover-{node:016x}")
}

/// Heartbeats of one node.
pub fn heartbeat(node: NodeId) -> String {
    format!("rookery.heartbeat.{node:016x}")
}

/// Requests to one node (take-over, close).
pub fn control(node: NodeId) -> String {
    format!("rookery.control.{node:016x}")
}

/// The registry key of a full JID: both parts base64url, so any JID is a valid key.
pub fn session_key(jid: &FullJid) -> String {
    format!(
        "{}.{}",
        B64.encode(jid.to_bare().as_str()),
        B64.encode(jid.resource().as_str())
    )
}

/// The full JID of a registry key.
pub fn session_jid(key: &str) -> Option<FullJid> {
    let (bare, resource) = key.split_once('.')?;
    let bare = String::from_utf8(B64.decode(bare).ok()?).ok()?;
    let resource = String::from_utf8(B64.decode(resource).ok()?).ok()?;
    FullJid::new(&format!("{bare}/{resource}")).ok()
}

/// The cleanup lock key of a node.
pub fn cleanup_key(node: NodeId) -> String {
    format!("{node:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_any_jid() {
        for jid in [
            "alice@localhost/phone",
            "ünïcode@example.org/Ressource mit Leerzeichen/und/Schrägstrichen",
            "a@b/.",
        ] {
            let jid = FullJid::new(jid).unwrap();
            let key = session_key(&jid);
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "{key}"
            );
            assert_eq!(session_jid(&key), Some(jid));
        }
        assert_eq!(session_jid("garbage"), None);
    }
}
