//! The LocalBus registry contract.

use super::*;
use crate::{Mail, Mailbox};
use minidom::Element;

fn route(jid: &str, priority: i8) -> (Route, crate::Inbox) {
    let (mailbox, inbox) = Mailbox::new();
    let route = Route {
        jid: FullJid::new(jid).unwrap(),
        session: SessionId::next(),
        node: 0,
        info: RouteInfo {
            priority,
            ..RouteInfo::default()
        },
        mailbox: Some(mailbox),
    };
    (route, inbox)
}

#[tokio::test]
async fn binding_the_same_full_jid_replaces_the_older_session() {
    let bus = LocalBus::new();
    let (phone, _phone_inbox) = route("alice@localhost/phone", 0);
    let (laptop, _laptop_inbox) = route("alice@localhost/laptop", 0);
    assert!(bus.bind(phone.clone()).await.unwrap().is_none());
    assert!(bus.bind(laptop).await.unwrap().is_none());
    let (phone2, _phone2_inbox) = route("alice@localhost/phone", 5);
    let replaced = bus
        .bind(phone2.clone())
        .await
        .unwrap()
        .expect("the old phone session is replaced");
    assert_eq!(replaced.session, phone.session);
    assert_eq!(
        bus.routes(&BareJid::new("alice@localhost").unwrap()).len(),
        2
    );
    assert_eq!(bus.route(&phone.jid).unwrap().session, phone2.session);
    // The stale session's unbind does not remove the new one.
    bus.unbind(&phone.jid, phone.session).await.unwrap();
    assert_eq!(bus.route(&phone.jid).unwrap().session, phone2.session);
    bus.unbind(&phone2.jid, phone2.session).await.unwrap();
    assert!(bus.route(&phone.jid).is_none());
    assert_eq!(bus.local_sessions(), 1);
}

#[tokio::test]
async fn updates_apply_only_to_the_current_session() {
    let bus = LocalBus::new();
    let (phone, _inbox) = route("alice@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    let info = RouteInfo {
        priority: 7,
        carbons: true,
        ..RouteInfo::default()
    };
    bus.update(&phone.jid, SessionId(u64::MAX), info.clone())
        .await
        .unwrap();
    assert_eq!(bus.route(&phone.jid).unwrap().info.priority, 0);
    bus.update(&phone.jid, phone.session, info).await.unwrap();
    let current = bus.route(&phone.jid).unwrap();
    assert_eq!((current.info.priority, current.info.carbons), (7, true));
}

#[tokio::test]
async fn mail_reaches_the_inbox_and_comes_back_when_the_session_is_gone() {
    let bus = LocalBus::new();
    let (phone, mut inbox) = route("alice@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    bus.close(&phone, rookery_stream::Condition::Conflict.into())
        .await;
    assert!(matches!(
        inbox.recv().await,
        Some(Mail::Close(rookery_stream::StreamError {
            condition: rookery_stream::Condition::Conflict,
            ..
        }))
    ));
    let stanza = Element::bare("message", "jabber:client");
    bus.deliver(&phone, stanza.clone(), crate::Durability::Durable)
        .await
        .unwrap();
    assert!(matches!(
        inbox.recv().await,
        Some(Mail::Stanza { receipt: None, .. })
    ));
    drop(inbox);
    assert_eq!(
        bus.deliver(&phone, stanza.clone(), crate::Durability::BestEffort)
            .await,
        Err(stanza)
    );
}

#[tokio::test]
async fn resumption_ids_point_at_the_live_session_only() {
    let bus = LocalBus::new();
    let (phone, _inbox) = route("alice@localhost/phone", 0);
    bus.bind(phone.clone()).await.unwrap();
    bus.register_resumable("abc", &phone.jid, phone.session)
        .await
        .unwrap();
    assert_eq!(bus.resumable("abc").await.unwrap().session, phone.session);
    let (newer, _newer_inbox) = route("alice@localhost/phone", 0);
    bus.bind(newer).await.unwrap();
    assert!(
        bus.resumable("abc").await.is_none(),
        "a replaced session cannot be resumed"
    );
    bus.unregister_resumable("abc").await.unwrap();
    assert!(bus.resumable("abc").await.is_none());
}

#[tokio::test]
async fn sessions_whose_inbox_is_gone_are_not_routed_to() {
    let bus = LocalBus::new();
    let (alive, _alive_inbox) = route("alice@localhost/alive", 0);
    let (dead, dead_inbox) = route("alice@localhost/dead", 0);
    bus.bind(alive.clone()).await.unwrap();
    bus.bind(dead).await.unwrap();
    drop(dead_inbox);
    let routes = bus.routes(&BareJid::new("alice@localhost").unwrap());
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].jid, alive.jid);
}
