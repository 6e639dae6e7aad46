//! The bus conformance suite: the same checks run against every [`Bus`]
//! (`LocalBus` here, `NatsBus` on a real nats-server in
//! rookery-test-support's tests).
//!
//! A test file calls [`bus_conformance_tests!`](crate::bus_conformance_tests)
//! with an expression that builds a fresh bus (each check gets its own, and
//! uses user names of its own); the macro expands to one `#[tokio::test]` per
//! check. A clustered bus updates its view of the registry a moment after a
//! call returns, so what a check reads back from the view it waits for, up
//! to [`SETTLE`].

use std::time::Duration;

use jid::{BareJid, FullJid};
use minidom::Element;

use crate::{
    Bus, Durability, Inbox, Mail, Mailbox, Receipt, Route, RouteInfo, SessionId, SessionSnapshot,
};

/// How long a check waits for the bus's view to show a change.
pub const SETTLE: Duration = Duration::from_secs(5);

/// A session of this bus's node at `jid`, with its inbox.
fn session(bus: &dyn Bus, jid: &str, priority: i8) -> (Route, Inbox) {
    let (mailbox, inbox) = Mailbox::new();
    let route = Route {
        jid: FullJid::new(jid).expect("a full JID"),
        session: SessionId::next(),
        node: bus.node(),
        info: RouteInfo {
            priority,
            ..RouteInfo::default()
        },
        mailbox: Some(mailbox),
    };
    (route, inbox)
}

/// Waits until `holds` (the bus's view caught up), or fails with `what`.
async fn settled(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !holds() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn current(bus: &dyn Bus, jid: &FullJid) -> Option<SessionId> {
    bus.route(jid).map(|route| route.session)
}

/// The next mail, within [`SETTLE`].
async fn next_mail(inbox: &mut Inbox) -> Mail {
    tokio::time::timeout(SETTLE, inbox.recv())
        .await
        .expect("mail arrives")
        .expect("the inbox is open")
}

/// Binding a full JID bound already replaces the older session (which the
/// caller is told of); a stale session's unbind leaves the newer one.
pub async fn binding_the_same_full_jid_replaces_the_older_session(bus: &dyn Bus) {
    let user = BareJid::new("replace@localhost").unwrap();
    let (phone, _phone_inbox) = session(bus, "replace@localhost/phone", 0);
    let (laptop, _laptop_inbox) = session(bus, "replace@localhost/laptop", 0);
    assert!(bus.bind(phone.clone()).await.unwrap().is_none());
    assert!(bus.bind(laptop).await.unwrap().is_none());
    settled("both sessions seen", || bus.routes(&user).len() == 2).await;
    let (phone2, _phone2_inbox) = session(bus, "replace@localhost/phone", 5);
    let replaced = bus
        .bind(phone2.clone())
        .await
        .unwrap()
        .expect("the old phone session is replaced");
    assert_eq!(replaced.session, phone.session);
    settled("the new phone session seen", || {
        current(bus, &phone.jid) == Some(phone2.session)
    })
    .await;
    assert_eq!(bus.routes(&user).len(), 2);
    // The stale session's unbind does not remove the new one.
    bus.unbind(&phone.jid, phone.session).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(current(bus, &phone.jid), Some(phone2.session));
    bus.unbind(&phone2.jid, phone2.session).await.unwrap();
    settled("the phone unbound", || current(bus, &phone.jid).is_none()).await;
    assert_eq!(bus.routes(&user).len(), 1);
}

/// An update of a session's routing state applies only to the session
/// bound now under its JID.
pub async fn updates_apply_only_to_the_current_session(bus: &dyn Bus) {
    let (phone, _inbox) = session(bus, "update@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    settled("bound", || current(bus, &phone.jid).is_some()).await;
    let info = RouteInfo {
        priority: 7,
        marks: ["carbons"].into_iter().collect(),
        ..RouteInfo::default()
    };
    // Refused or ignored, but never applied to another session.
    let _ = bus
        .update(&phone.jid, SessionId(u64::MAX), info.clone())
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bus.route(&phone.jid).unwrap().info.priority, 0);
    bus.update(&phone.jid, phone.session, info).await.unwrap();
    settled("the update seen", || {
        bus.route(&phone.jid)
            .is_some_and(|route| route.info.priority == 7 && route.info.marks.contains("carbons"))
    })
    .await;
}

/// Stanzas and close requests reach the session's inbox, durable ones with
/// the receipt (if any) that the bus takes back; once the session is gone a
/// best-effort stanza comes back to the caller.
pub async fn mail_reaches_the_inbox_and_comes_back_when_the_session_is_gone(bus: &dyn Bus) {
    let (phone, mut inbox) = session(bus, "mail@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    settled("bound", || current(bus, &phone.jid).is_some()).await;
    bus.close(&phone, rookery_stream::Condition::Conflict.into())
        .await;
    assert!(matches!(
        next_mail(&mut inbox).await,
        Mail::Close(rookery_stream::StreamError {
            condition: rookery_stream::Condition::Conflict,
            ..
        })
    ));
    for (body, durability) in [
        ("kept", Durability::Durable),
        ("sent", Durability::BestEffort),
    ] {
        let stanza = Element::builder("message", "jabber:client")
            .append(Element::builder("body", "jabber:client").append(body))
            .build();
        bus.deliver(&phone, stanza, durability).await.unwrap();
        match next_mail(&mut inbox).await {
            Mail::Stanza { stanza, receipt } => {
                assert_eq!(
                    stanza.get_child("body", "jabber:client").unwrap().text(),
                    body
                );
                assert!(
                    durability == Durability::Durable || receipt.is_none(),
                    "best effort keeps nothing to acknowledge"
                );
                if let Some(receipt @ Receipt::Delivery(_)) = receipt {
                    bus.acknowledge(receipt).await;
                }
            }
            other => panic!("a stanza, not {other:?}"),
        }
    }
    drop(inbox);
    let stanza = Element::bare("presence", "jabber:client");
    assert_eq!(
        bus.deliver(&phone, stanza.clone(), Durability::BestEffort)
            .await,
        Err(stanza)
    );
}

/// A stanza for many sessions reaches each with its own `to`; one whose
/// inbox is gone is skipped, and the others get theirs.
pub async fn one_stanza_for_many_sessions_reaches_each_with_its_address(bus: &dyn Bus) {
    let mut inboxes = Vec::new();
    let mut routes = Vec::new();
    for resource in ["a", "b", "c"] {
        let (route, inbox) = session(bus, &format!("many@localhost/{resource}"), 0);
        bus.bind(route.clone()).await.unwrap();
        routes.push(std::sync::Arc::new(route));
        inboxes.push(inbox);
    }
    drop(inboxes.remove(1));
    let presence: Element = "<presence xmlns='jabber:client' from='someone@localhost/x'/>"
        .parse()
        .expect("a presence");
    bus.deliver_each(&routes, &presence).await;
    for (inbox, expected) in inboxes
        .iter_mut()
        .zip(["many@localhost/a", "many@localhost/c"])
    {
        match next_mail(inbox).await {
            Mail::Stanza { stanza, receipt } => {
                assert_eq!(stanza.attr("to"), Some(expected));
                assert_eq!(stanza.attr("from"), Some("someone@localhost/x"));
                assert!(
                    receipt.is_none(),
                    "best effort keeps nothing to acknowledge"
                );
            }
            other => panic!("a stanza, not {other:?}"),
        }
    }
}

/// A resuming connection takes a session over: the session's task hands
/// over its state (through its inbox, as the session task does); a session
/// whose task is gone hands over nothing.
pub async fn a_session_is_taken_over_with_its_state(bus: &dyn Bus) {
    let (phone, mut inbox) = session(bus, "takeover@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    settled("bound", || current(bus, &phone.jid).is_some()).await;
    let (jid, id) = (phone.jid.clone(), phone.session);
    let holder = tokio::spawn(async move {
        match next_mail(&mut inbox).await {
            Mail::Takeover(answer) => {
                let snapshot = SessionSnapshot {
                    jid,
                    session: id,
                    info: RouteInfo::default(),
                    sm: rookery_stream::SmState::new(Some("resume-me".into())),
                    receipts: Vec::new(),
                    directed: Vec::new(),
                    offline_after: 42,
                    modules: Default::default(),
                    inbox: Some(inbox),
                };
                let _ = answer.send(snapshot);
            }
            other => panic!("a take-over, not {other:?}"),
        }
    });
    let snapshot = bus
        .take_over(&phone)
        .await
        .expect("the session hands itself over");
    holder.await.unwrap();
    assert_eq!(snapshot.jid, phone.jid);
    assert_eq!(snapshot.session, phone.session);
    assert_eq!(snapshot.offline_after, 42);
    assert_eq!(snapshot.sm.id.as_deref(), Some("resume-me"));

    let (gone, inbox) = session(bus, "takeover@localhost/gone", 0);
    bus.bind(gone.clone()).await.unwrap();
    settled("bound", || current(bus, &gone.jid).is_some()).await;
    drop(inbox);
    assert!(bus.take_over(&gone).await.is_none());
}

/// A resumption id leads to its session while that session is the one
/// bound; not once a newer session took the JID, nor once unregistered.
pub async fn resumption_ids_point_at_the_live_session_only(bus: &dyn Bus) {
    let (phone, _inbox) = session(bus, "resume@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    settled("bound", || current(bus, &phone.jid).is_some()).await;
    let id = format!("conformance-{}", phone.session.0);
    bus.register_resumable(&id, &phone.jid, phone.session)
        .await
        .unwrap();
    assert_eq!(bus.resumable(&id).await.unwrap().session, phone.session);
    let (newer, _newer_inbox) = session(bus, "resume@localhost/phone", 0);
    bus.bind(newer.clone()).await.unwrap();
    settled("the newer session seen", || {
        current(bus, &phone.jid) == Some(newer.session)
    })
    .await;
    assert!(
        bus.resumable(&id).await.is_none(),
        "a replaced session cannot be resumed"
    );
    bus.unregister_resumable(&id).await.unwrap();
    assert!(bus.resumable(&id).await.is_none());
}

/// A session of this node whose inbox is gone is not routed to, and the
/// node counts and lists only its live sessions.
pub async fn sessions_whose_inbox_is_gone_are_not_routed_to(bus: &dyn Bus) {
    let user = BareJid::new("gone@localhost").unwrap();
    let (alive, _alive_inbox) = session(bus, "gone@localhost/alive", 0);
    let (dead, dead_inbox) = session(bus, "gone@localhost/dead", 0);
    bus.bind(alive.clone()).await.unwrap();
    bus.bind(dead).await.unwrap();
    settled("both bound", || bus.local_sessions() == 2).await;
    drop(dead_inbox);
    let routes = bus.routes(&user);
    let targets: Vec<&FullJid> = routes.iter().map(|r| &r.jid).collect();
    assert_eq!(targets, [&alive.jid]);
    assert!(bus.local_routes().iter().any(|r| r.jid == alive.jid));
}

/// Expands to one `#[tokio::test]` per conformance check.
///
/// `$make` is an async expression evaluating to something that derefs to a
/// `dyn Bus` (for example `Arc<dyn Bus>`, or a guard that also owns the
/// server the bus runs on).
#[macro_export]
macro_rules! bus_conformance_tests {
    ($make:expr) => {
        $crate::bus_conformance_tests!(@each $make;
            binding_the_same_full_jid_replaces_the_older_session,
            updates_apply_only_to_the_current_session,
            mail_reaches_the_inbox_and_comes_back_when_the_session_is_gone,
            resumption_ids_point_at_the_live_session_only,
            sessions_whose_inbox_is_gone_are_not_routed_to,
            one_stanza_for_many_sessions_reaches_each_with_its_address,
            a_session_is_taken_over_with_its_state);
    };
    (@each $make:expr; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let bus = $make.await;
                $crate::conformance::$check(&*bus).await;
            }
        )*
    };
}
