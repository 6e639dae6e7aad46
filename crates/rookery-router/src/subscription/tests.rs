//! The state tables of RFC 6121 appendix A, row by row.

use super::*;

/// Parses the RFC's state names: "None", "None + Pending Out", "From + Pending Out", ...
fn state(name: &str) -> SubState {
    let mut parts = name.split(" + ");
    let subscription = match parts.next().unwrap() {
        "None" => Subscription::None,
        "To" => Subscription::To,
        "From" => Subscription::From,
        "Both" => Subscription::Both,
        other => panic!("{other}"),
    };
    let mut state = SubState {
        subscription,
        ..SubState::default()
    };
    for flag in parts {
        match flag {
            "Pending Out" => state.ask = true,
            "Pending In" => state.pending_in = true,
            "Pending Out+In" => {
                state.ask = true;
                state.pending_in = true;
            }
            "Approved" => state.approved = true,
            other => panic!("{other}"),
        }
    }
    state
}

const STATES: [&str; 9] = [
    "None",
    "None + Pending Out",
    "None + Pending In",
    "None + Pending Out+In",
    "To",
    "To + Pending In",
    "From",
    "From + Pending Out",
    "Both",
];

#[test]
fn inbound_subscribe() {
    // Appendix A.3.1: deliver and mark Pending In, or auto-reply when already From/Both.
    let expected = [
        ("None", "None + Pending In", true, None),
        ("None + Pending Out", "None + Pending Out+In", true, None),
        ("None + Pending In", "None + Pending In", true, None),
        ("None + Pending Out+In", "None + Pending Out+In", true, None),
        ("To", "To + Pending In", true, None),
        ("To + Pending In", "To + Pending In", true, None),
        ("From", "From", false, Some(PresenceType::Subscribed)),
        (
            "From + Pending Out",
            "From + Pending Out",
            false,
            Some(PresenceType::Subscribed),
        ),
        ("Both", "Both", false, Some(PresenceType::Subscribed)),
    ];
    for (before, after, deliver, reply) in expected {
        let outcome = inbound(state(before), PresenceType::Subscribe);
        assert_eq!(
            (outcome.next, outcome.deliver, outcome.auto_reply),
            (state(after), deliver, reply),
            "{before}"
        );
    }
}

#[test]
fn inbound_subscribed() {
    // Appendix A.3.2: only honoured while Pending Out.
    let expected = [
        ("None", "None", false),
        ("None + Pending Out", "To", true),
        ("None + Pending In", "None + Pending In", false),
        ("None + Pending Out+In", "To + Pending In", true),
        ("To", "To", false),
        ("To + Pending In", "To + Pending In", false),
        ("From", "From", false),
        ("From + Pending Out", "Both", true),
        ("Both", "Both", false),
    ];
    for (before, after, deliver) in expected {
        let outcome = inbound(state(before), PresenceType::Subscribed);
        assert_eq!(
            (outcome.next, outcome.deliver),
            (state(after), deliver),
            "{before}"
        );
    }
}

#[test]
fn inbound_unsubscribe() {
    // Appendix A.3.3.
    let expected = [
        ("None", "None", false),
        ("None + Pending Out", "None + Pending Out", false),
        ("None + Pending In", "None", true),
        ("None + Pending Out+In", "None + Pending Out", true),
        ("To", "To", false),
        ("To + Pending In", "To", true),
        ("From", "None", true),
        ("From + Pending Out", "None + Pending Out", true),
        ("Both", "To", true),
    ];
    for (before, after, deliver) in expected {
        let outcome = inbound(state(before), PresenceType::Unsubscribe);
        assert_eq!(
            (outcome.next, outcome.deliver),
            (state(after), deliver),
            "{before}"
        );
    }
}

#[test]
fn inbound_unsubscribed() {
    // Appendix A.3.4.
    let expected = [
        ("None", "None", false),
        ("None + Pending Out", "None", true),
        ("None + Pending In", "None + Pending In", false),
        ("None + Pending Out+In", "None + Pending In", true),
        ("To", "None", true),
        ("To + Pending In", "None + Pending In", true),
        ("From", "From", false),
        ("From + Pending Out", "From", true),
        ("Both", "From", true),
    ];
    for (before, after, deliver) in expected {
        let outcome = inbound(state(before), PresenceType::Unsubscribed);
        assert_eq!(
            (outcome.next, outcome.deliver),
            (state(after), deliver),
            "{before}"
        );
    }
}

#[test]
fn outbound_transitions() {
    // Appendix A.2: the user's side.
    for before in STATES {
        let s = state(before);
        let subscribe = outbound(s, PresenceType::Subscribe);
        assert!(subscribe.forward);
        assert_eq!(
            subscribe.next.ask,
            s.ask || !s.subscription.has_to(),
            "subscribe from {before}"
        );

        let unsubscribe = outbound(s, PresenceType::Unsubscribe);
        assert!(unsubscribe.forward);
        assert!(
            !unsubscribe.next.subscription.has_to() && !unsubscribe.next.ask,
            "unsubscribe from {before}"
        );
        assert_eq!(
            unsubscribe.next.subscription.has_from(),
            s.subscription.has_from()
        );

        let unsubscribed = outbound(s, PresenceType::Unsubscribed);
        assert!(
            !unsubscribed.next.subscription.has_from() && !unsubscribed.next.pending_in,
            "unsubscribed from {before}"
        );
        assert_eq!(
            unsubscribed.next.subscription.has_to(),
            s.subscription.has_to()
        );

        let subscribed = outbound(s, PresenceType::Subscribed);
        assert_eq!(
            subscribed.forward, s.pending_in,
            "approve only answers a stored request: {before}"
        );
        if s.pending_in {
            assert!(subscribed.next.subscription.has_from() && !subscribed.next.pending_in);
        }
    }
}

#[test]
fn pre_approval_is_used_by_the_next_request() {
    let approved = outbound(state("None"), PresenceType::Subscribed);
    assert!(!approved.forward && approved.next.approved);
    let request = inbound(approved.next, PresenceType::Subscribe);
    assert_eq!(request.auto_reply, Some(PresenceType::Subscribed));
    assert!(!request.deliver);
    assert_eq!(request.next, state("From"));
}
