//! The delivery rules, checked from tables of sessions and stanza types.

use std::sync::Arc;

use jid::FullJid;
use minidom::Element;
use rookery_cluster::{Mailbox, Route, RouteInfo, SessionId};

use super::*;

/// A session: `(resource, Some(priority))` is available, `None` bound without presence.
fn routes(sessions: &[(&str, Option<i8>)]) -> Vec<Arc<Route>> {
    sessions
        .iter()
        .map(|(resource, priority)| {
            let (mailbox, inbox) = Mailbox::new();
            std::mem::forget(inbox);
            Arc::new(Route {
                jid: FullJid::new(&format!("alice@localhost/{resource}")).unwrap(),
                session: SessionId::next(),
                node: 0,
                info: RouteInfo {
                    presence: priority
                        .map(|_| Arc::new(Element::bare("presence", "jabber:client"))),
                    priority: priority.unwrap_or(0),
                    ..RouteInfo::default()
                },
                mailbox: Some(mailbox),
            })
        })
        .collect()
}

fn describe(outcome: &MessageOutcome) -> String {
    match outcome {
        MessageOutcome::Deliver(routes) => {
            let mut resources: Vec<_> = routes
                .iter()
                .map(|r| r.jid.resource().to_string())
                .collect();
            resources.sort();
            format!("deliver {}", resources.join(","))
        }
        MessageOutcome::Offline => "offline".into(),
        MessageOutcome::Bounce(error) => format!("bounce {}", error.condition),
        MessageOutcome::Drop => "drop".into(),
    }
}

#[test]
fn messages_to_the_bare_jid() {
    use MessageType::*;
    type Case<'a> = (MessageType, &'a [(&'a str, Option<i8>)], &'a str);
    let cases: &[Case] = &[
        (Chat, &[("a", Some(1)), ("b", Some(5))], "deliver b"),
        (
            Chat,
            &[("a", Some(5)), ("b", Some(5)), ("c", Some(0))],
            "deliver a,b",
        ),
        (Normal, &[("a", Some(0))], "deliver a"),
        (Chat, &[("a", Some(-1))], "offline"),
        (Chat, &[("a", None)], "offline"),
        (Chat, &[], "offline"),
        (Normal, &[("a", Some(-5)), ("b", Some(0))], "deliver b"),
        (
            Headline,
            &[("a", Some(1)), ("b", Some(0)), ("c", Some(-1))],
            "deliver a,b",
        ),
        (Headline, &[("c", Some(-1))], "drop"),
        (Groupchat, &[("a", Some(1))], "bounce service-unavailable"),
        (Error, &[("a", Some(1))], "drop"),
    ];
    for (message_type, sessions, expected) in cases {
        let outcome = message_to_bare(*message_type, &routes(sessions));
        assert_eq!(
            describe(&outcome),
            *expected,
            "{message_type:?} {sessions:?}"
        );
    }
}

#[test]
fn messages_to_a_full_jid() {
    use MessageType::*;
    let all = routes(&[("phone", Some(-1)), ("laptop", Some(3)), ("idle", None)]);
    let phone = all.iter().find(|r| r.jid.resource().as_str() == "phone");
    let idle = all.iter().find(|r| r.jid.resource().as_str() == "idle");
    assert_eq!(
        describe(&message_to_full(Chat, phone, &all)),
        "deliver phone",
        "negative priority still gets direct messages"
    );
    assert_eq!(
        describe(&message_to_full(Chat, idle, &all)),
        "deliver idle",
        "a bound session without presence too"
    );
    for (message_type, expected) in [
        (Chat, "deliver laptop"),
        (Normal, "deliver laptop"),
        (Headline, "deliver laptop"),
        (Groupchat, "bounce service-unavailable"),
        (Error, "drop"),
    ] {
        assert_eq!(
            describe(&message_to_full(message_type, None, &all)),
            expected,
            "{message_type:?} to a gone resource"
        );
    }
    assert_eq!(describe(&message_to_full(Chat, None, &[])), "offline");
}

#[test]
fn messages_to_accounts_that_do_not_exist() {
    use MessageType::*;
    for (message_type, expected) in [
        (Chat, "bounce service-unavailable"),
        (Normal, "bounce service-unavailable"),
        (Groupchat, "bounce service-unavailable"),
        (Headline, "drop"),
        (Error, "drop"),
    ] {
        assert_eq!(describe(&message_to_nobody(message_type)), expected);
    }
}

#[test]
fn presence_goes_to_every_available_session() {
    let all = routes(&[("a", Some(-3)), ("b", Some(2)), ("c", None)]);
    let mut targets: Vec<_> = presence_to_bare(&all)
        .iter()
        .map(|r| r.jid.resource().to_string())
        .collect();
    targets.sort();
    assert_eq!(targets, ["a", "b"]);
    assert_eq!(
        presence_to_missing_full(PresenceType::Available),
        PresenceFallback::Drop
    );
    assert_eq!(
        presence_to_missing_full(PresenceType::Unavailable),
        PresenceFallback::Drop
    );
    assert_eq!(
        presence_to_missing_full(PresenceType::Subscribe),
        PresenceFallback::AsBare
    );
    assert_eq!(
        presence_to_missing_full(PresenceType::Unsubscribed),
        PresenceFallback::AsBare
    );
}
