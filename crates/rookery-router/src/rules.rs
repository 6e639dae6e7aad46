//! RFC 6121 section 8.5 delivery rules as pure functions of a stanza's type
//! and the recipient's sessions. Everything here is decided from data; the
//! router acts on the outcome.

use std::sync::Arc;

use rookery_cluster::Route;

use crate::stanza::{ErrorCondition, MessageType, PresenceType};

/// What to do with a message addressed to a local account.
#[derive(Debug, Clone)]
pub enum MessageOutcome {
    /// Deliver to these sessions.
    Deliver(Vec<Arc<Route>>),
    /// Keep it in offline storage (RFC 6121 section 8.5.2.2.2, XEP-0160).
    Offline,
    /// Bounce with this error.
    Bounce(ErrorCondition),
    /// Drop it silently.
    Drop,
}

/// Available sessions with a non-negative priority.
fn non_negative(routes: &[Arc<Route>]) -> impl Iterator<Item = &Arc<Route>> {
    routes
        .iter()
        .filter(|route| route.info.available() && route.info.priority >= 0)
}

/// A message to the bare JID of an existing account (section 8.5.2).
pub fn message_to_bare(message_type: MessageType, routes: &[Arc<Route>]) -> MessageOutcome {
    match message_type {
        MessageType::Normal | MessageType::Chat => {
            let Some(top) = non_negative(routes).map(|route| route.info.priority).max() else {
                return MessageOutcome::Offline;
            };
            // The "most available" resources: every one at the highest priority.
            MessageOutcome::Deliver(
                non_negative(routes)
                    .filter(|route| route.info.priority == top)
                    .cloned()
                    .collect(),
            )
        }
        MessageType::Headline => {
            let targets: Vec<_> = non_negative(routes).cloned().collect();
            if targets.is_empty() {
                MessageOutcome::Drop
            } else {
                MessageOutcome::Deliver(targets)
            }
        }
        MessageType::Groupchat => MessageOutcome::Bounce(ErrorCondition::SERVICE_UNAVAILABLE),
        MessageType::Error => MessageOutcome::Drop,
    }
}

/// A message to a full JID of an existing account (section 8.5.3).
pub fn message_to_full(
    message_type: MessageType,
    exact: Option<&Arc<Route>>,
    routes: &[Arc<Route>],
) -> MessageOutcome {
    if let Some(route) = exact {
        return MessageOutcome::Deliver(vec![route.clone()]);
    }
    match message_type {
        MessageType::Normal | MessageType::Chat | MessageType::Headline => {
            message_to_bare(message_type, routes)
        }
        MessageType::Groupchat => MessageOutcome::Bounce(ErrorCondition::SERVICE_UNAVAILABLE),
        MessageType::Error => MessageOutcome::Drop,
    }
}

/// A message to an account that does not exist (section 8.5.1).
pub fn message_to_nobody(message_type: MessageType) -> MessageOutcome {
    match message_type {
        MessageType::Error | MessageType::Headline => MessageOutcome::Drop,
        _ => MessageOutcome::Bounce(ErrorCondition::SERVICE_UNAVAILABLE),
    }
}

/// Sessions that receive a presence addressed to a bare JID: every available one (section 8.5.2.1.2).
pub fn presence_to_bare(routes: &[Arc<Route>]) -> Vec<Arc<Route>> {
    routes
        .iter()
        .filter(|route| route.info.available())
        .cloned()
        .collect()
}

/// What happens to a presence addressed to a full JID with no such session (section 8.5.3.2.2).
pub fn presence_to_missing_full(presence_type: PresenceType) -> PresenceFallback {
    if presence_type.is_subscription() {
        PresenceFallback::AsBare
    } else {
        PresenceFallback::Drop
    }
}

/// Outcome for a presence to a full JID that is not bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceFallback {
    /// Handle it as addressed to the bare JID.
    AsBare,
    /// Ignore it.
    Drop,
}

#[cfg(test)]
mod tests;
