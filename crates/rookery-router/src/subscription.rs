//! The presence subscription state machine of RFC 6121 (section 3 and appendix A),
//! as pure transitions over one side's view of a contact.

use rookery_store::Subscription;

use crate::stanza::PresenceType;

/// One user's subscription state towards one contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubState {
    /// The roster item's subscription.
    pub subscription: Subscription,
    /// "Pending Out": the user asked the contact and awaits an answer.
    pub ask: bool,
    /// "Pending In": the contact asked the user; the request is stored.
    pub pending_in: bool,
    /// The user pre-approved the contact's request (section 3.4).
    pub approved: bool,
}

/// What follows from the user sending a subscription stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// The user's new state.
    pub next: SubState,
    /// Route the stanza to the contact.
    pub forward: bool,
}

/// What follows from a contact's subscription stanza reaching the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    /// The user's new state.
    pub next: SubState,
    /// Deliver the stanza to the user's available resources.
    pub deliver: bool,
    /// Answer the contact on the user's behalf with this type.
    pub auto_reply: Option<PresenceType>,
}

fn with(subscription: Subscription, to: Option<bool>, from: Option<bool>) -> Subscription {
    Subscription::from_flags(
        to.unwrap_or(subscription.has_to()),
        from.unwrap_or(subscription.has_from()),
    )
}

/// The user sends `kind` to the contact (appendix A.2).
pub fn outbound(state: SubState, kind: PresenceType) -> Outbound {
    let mut next = state;
    let forward = match kind {
        PresenceType::Subscribe => {
            if !state.subscription.has_to() {
                next.ask = true;
            }
            true
        }
        PresenceType::Subscribed => {
            if state.pending_in {
                next.subscription = with(state.subscription, None, Some(true));
                next.pending_in = false;
                next.approved = false;
                true
            } else {
                if !state.subscription.has_from() {
                    // Pre-approval: answer the contact's future request at once.
                    next.approved = true;
                }
                false
            }
        }
        PresenceType::Unsubscribe => {
            next.subscription = with(state.subscription, Some(false), None);
            next.ask = false;
            true
        }
        PresenceType::Unsubscribed => {
            next.subscription = with(state.subscription, None, Some(false));
            next.pending_in = false;
            next.approved = false;
            true
        }
        _ => false,
    };
    Outbound { next, forward }
}

/// The contact's `kind` reaches the user (appendix A.3).
pub fn inbound(state: SubState, kind: PresenceType) -> Inbound {
    let mut next = state;
    let mut deliver = false;
    let mut auto_reply = None;
    match kind {
        PresenceType::Subscribe => {
            if state.subscription.has_from() {
                auto_reply = Some(PresenceType::Subscribed);
            } else if state.approved {
                next.subscription = with(state.subscription, None, Some(true));
                next.approved = false;
                auto_reply = Some(PresenceType::Subscribed);
            } else {
                next.pending_in = true;
                deliver = true;
            }
        }
        PresenceType::Subscribed if state.ask => {
            next.subscription = with(state.subscription, Some(true), None);
            next.ask = false;
            deliver = true;
        }
        PresenceType::Unsubscribe if (state.subscription.has_from() || state.pending_in) => {
            next.subscription = with(state.subscription, None, Some(false));
            next.pending_in = false;
            next.approved = false;
            deliver = true;
        }
        PresenceType::Unsubscribed if (state.subscription.has_to() || state.ask) => {
            next.subscription = with(state.subscription, Some(false), None);
            next.ask = false;
            deliver = true;
        }
        _ => {}
    }
    Inbound {
        next,
        deliver,
        auto_reply,
    }
}

#[cfg(test)]
mod tests;
