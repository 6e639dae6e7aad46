//! Router scenarios: the module interface.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;
use rookery_cluster::{LocalBus, Mailbox, ModuleState};
use rookery_store::Store;

use super::*;

const NS: &str = "urn:example:counter";

/// What the test module keeps per session.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counted {
    asked: u32,
}

impl ModuleState for Counted {
    const KEY: &'static str = "test-counter";
}

/// A module that owns `<count xmlns='urn:example:counter'/>`, counts per
/// session how often it was asked, records session events and keeps
/// `<secret/>` messages from clients.
#[derive(Default)]
struct Counter {
    events: Mutex<Vec<(String, SessionEvent)>>,
    /// What reached its service (`counter.localhost`): name, type, to.
    served: Mutex<Vec<(String, String, String)>>,
    /// What it kept from clients before routing (`<drop/>`).
    dropped: Mutex<Vec<Element>>,
}

#[async_trait]
impl Extension for Counter {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "count")]
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            stanza: true,
            delivery: true,
            session: true,
            routed: None,
        }
    }

    async fn on_stanza(&self, _: &Router, _: &mut Session, stanza: Element) -> Option<Element> {
        if stanza.has_child("drop", NS) {
            self.dropped.lock().unwrap().push(stanza);
            return None;
        }
        Some(stanza)
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        let counted = cx.session.modules.get_mut::<Counted>();
        counted.asked += 1;
        let mut answer = Element::bare("count", NS);
        rookery_stream::xml::set_attr(&mut answer, "asked", counted.asked.to_string());
        Some(stanza::iq_result(cx.iq, Some(answer)))
    }

    fn on_delivery(&self, _: &Router, _: &mut Session, stanza: Element) -> Option<Element> {
        (!stanza.has_child("secret", NS)).then_some(stanza)
    }

    async fn on_session(&self, _: &Router, session: &mut Session, event: SessionEvent) {
        let mut events = self.events.lock().unwrap();
        events.push((session.jid.resource().to_string(), event));
    }

    fn service(&self) -> Option<&'static str> {
        Some("counter")
    }

    async fn handle_service(&self, router: &Router, stanza: Element) {
        let attr = |name| stanza.attr(name).unwrap_or_default().to_owned();
        self.served
            .lock()
            .unwrap()
            .push((stanza.name().to_owned(), attr("type"), attr("to")));
        if stanza.name() == "message" {
            // An echo, back through routing.
            let mut echo = Element::bare("message", "jabber:client");
            rookery_stream::xml::set_attr(&mut echo, "from", attr("to"));
            rookery_stream::xml::set_attr(&mut echo, "to", attr("from"));
            echo.append_child(
                Element::builder("body", "jabber:client")
                    .append("echo")
                    .build(),
            );
            router.route(echo).await;
        }
    }
}

/// A module claiming a payload the counter owns.
struct Impostor;

#[async_trait]
impl Extension for Impostor {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "count")]
    }

    async fn handle_iq(&self, _: &mut IqContext<'_>) -> Option<Element> {
        None
    }
}

async fn router(modules: Vec<Arc<dyn Extension>>) -> (Router, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = rookery_store_sqlite::SqliteStore::open(&dir.path().join("test.db"))
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let bus = Arc::new(LocalBus::new());
    let router = Router::new(RouterConfig::new("localhost"), store, bus, modules);
    (router, dir)
}

fn stanza(xml: &str) -> Element {
    xml.parse().unwrap()
}

fn count_iq(id: &str) -> Element {
    stanza(&format!(
        "<iq xmlns='jabber:client' type='get' id='{id}' from='alice@localhost/phone'><count xmlns='{NS}'/></iq>"
    ))
}

#[tokio::test]
async fn a_module_answers_its_payloads_keeps_state_per_session_and_hears_of_sessions() {
    let counter = Arc::new(Counter::default());
    let (router, _dir) = router(vec![counter.clone()]).await;
    let alice = BareJid::new("alice@localhost").unwrap();
    let requested = alice.with_resource_str("phone").unwrap();
    let (mailbox, mut inbox) = Mailbox::new();
    let mut session = router.bind(&alice, Some(requested), mailbox).await.unwrap();

    for (id, asked) in [("a", "1"), ("b", "2")] {
        router.handle_stanza(&mut session, count_iq(id)).await;
        let reply = session.take_outbox().pop().unwrap();
        assert_eq!(
            reply.attr("type"),
            Some("result"),
            "{}",
            String::from(&reply)
        );
        assert_eq!(
            reply.get_child("count", NS).unwrap().attr("asked"),
            Some(asked)
        );
    }
    // A payload no module owns.
    let other = stanza(
        "<iq xmlns='jabber:client' type='get' id='c' from='alice@localhost/phone'><other xmlns='urn:example:counter'/></iq>",
    );
    router.handle_stanza(&mut session, other).await;
    let reply = session.take_outbox().pop().unwrap();
    assert!(String::from(&reply).contains("service-unavailable"));

    // The stanza hook sees a client's stanza before routing: it keeps one,
    // the other goes on (to an account that does not exist: an error).
    for payload in [format!("<drop xmlns='{NS}'/>"), "<body>hi</body>".into()] {
        let message = stanza(&format!(
            "<message xmlns='jabber:client' from='alice@localhost/phone' to='nobody@localhost' type='chat'>{payload}</message>"
        ));
        router.handle_stanza(&mut session, message).await;
    }
    assert_eq!(counter.dropped.lock().unwrap().len(), 1);
    let mut bounced = Vec::new();
    while let Some(rookery_cluster::Mail::Stanza { stanza, .. }) = inbox.try_recv() {
        bounced.push(stanza);
    }
    assert_eq!(bounced.len(), 1, "only the passed message was routed");
    assert_eq!(bounced[0].attr("type"), Some("error"));
    assert!(bounced[0].has_child("body", "jabber:client"));

    // The delivery hook keeps what the module wants kept.
    let secret = stanza(&format!(
        "<message xmlns='jabber:client' to='alice@localhost/phone'><secret xmlns='{NS}'/></message>"
    ));
    router.accept_delivery(&mut session, secret);
    let plain = stanza(
        "<message xmlns='jabber:client' to='alice@localhost/phone'><body>hi</body></message>",
    );
    router.accept_delivery(&mut session, plain);
    let delivered = session.take_outbox();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].has_child("body", "jabber:client"));

    // The state travels with the session (here as another node gets it).
    let wire = std::mem::take(&mut session.modules).to_wire();
    session.modules = rookery_cluster::ModuleStates::from_wire(wire);
    router.handle_stanza(&mut session, count_iq("d")).await;
    let reply = session.take_outbox().pop().unwrap();
    assert_eq!(
        reply.get_child("count", NS).unwrap().attr("asked"),
        Some("3")
    );

    router.end_session(session, Vec::new()).await;
    assert_eq!(
        *counter.events.lock().unwrap(),
        [
            ("phone".to_owned(), SessionEvent::Bound),
            ("phone".to_owned(), SessionEvent::Ended)
        ]
    );
}

/// A module that copies routed messages to the sessions marked `copy-me`,
/// and records what it was shown.
#[derive(Default)]
struct Copier {
    /// Side, user, and the sessions that had the message, per call.
    seen: Mutex<Vec<(Side, String, Vec<String>)>>,
}

const COPY_MARK: &str = "copy-me";

#[async_trait]
impl Extension for Copier {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            routed: Some(COPY_MARK),
            ..Hooks::default()
        }
    }

    async fn handle_iq(&self, _: &mut IqContext<'_>) -> Option<Element> {
        None
    }

    fn copies_message(&self, message: &Element, _: stanza::MessageType) -> bool {
        !message.has_child("private", NS)
    }

    fn on_routed(&self, routed: &Routed<'_>) -> Vec<(Arc<Route>, Element)> {
        let have_it: Vec<String> = routed.have_it.iter().map(|j| j.to_string()).collect();
        self.seen
            .lock()
            .unwrap()
            .push((routed.side, routed.user.to_string(), have_it));
        routed
            .routes
            .iter()
            .filter(|route| {
                route.info.marks.contains(COPY_MARK) && !routed.have_it.contains(&&route.jid)
            })
            .map(|route| {
                let side = format!("{:?}", routed.side);
                let copy = stanza(&format!(
                    "<message xmlns='jabber:client' to='{}'><copy xmlns='{NS}' side='{side}'/></message>",
                    route.jid
                ));
                (route.clone(), copy)
            })
            .collect()
    }

    fn is_copy(&self, message: &Element) -> bool {
        message.has_child("copy", NS)
    }
}

/// Binds `jid` available at `priority`, marked `copy-me` when `marked`.
async fn online(
    router: &Router,
    jid: &str,
    priority: i8,
    marked: bool,
) -> (Session, rookery_cluster::Inbox) {
    let full = FullJid::new(jid).unwrap();
    let (mailbox, inbox) = Mailbox::new();
    let mut session = router
        .bind(&full.to_bare(), Some(full.clone()), mailbox)
        .await
        .unwrap();
    session.info.presence = Some(Arc::new(stanza(&format!(
        "<presence xmlns='jabber:client' from='{jid}'/>"
    ))));
    session.info.priority = priority;
    session.info.marks.set(COPY_MARK, marked);
    router.publish_route_info(&session).await;
    (session, inbox)
}

/// What reached an inbox: (has the message body, the copy's side).
fn received(inbox: &mut rookery_cluster::Inbox) -> Vec<(bool, Option<String>)> {
    let mut got = Vec::new();
    while let Some(rookery_cluster::Mail::Stanza { stanza, .. }) = inbox.try_recv() {
        let copy = stanza
            .get_child("copy", NS)
            .and_then(|copy| copy.attr("side"))
            .map(str::to_owned);
        got.push((stanza.has_child("body", "jabber:client"), copy));
    }
    got
}

#[tokio::test]
async fn a_copying_module_copies_routed_messages_to_marked_sessions_only() {
    let copier = Arc::new(Copier::default());
    let (router, _dir) = router(vec![copier.clone()]).await;
    let (mut phone, mut phone_inbox) = online(&router, "alice@localhost/phone", 0, false).await;
    let (_laptop, mut laptop_inbox) = online(&router, "alice@localhost/laptop", 0, true).await;
    let (_desk, mut desk_inbox) = online(&router, "bob@localhost/desk", 1, false).await;
    let (_tablet, mut tablet_inbox) = online(&router, "bob@localhost/tablet", 0, true).await;
    let (_carol, mut carol_inbox) = online(&router, "carol@localhost/pc", 0, false).await;

    let message = |to: &str| {
        stanza(&format!(
            "<message xmlns='jabber:client' from='alice@localhost/phone' to='{to}' type='chat'><body>hi</body></message>"
        ))
    };
    router
        .handle_stanza(&mut phone, message("bob@localhost"))
        .await;
    // The highest priority gets the message; the marked sessions of both
    // sides get copies; the sending session gets nothing.
    assert_eq!(received(&mut desk_inbox), [(true, None)]);
    assert_eq!(
        received(&mut tablet_inbox),
        [(false, Some("Received".into()))]
    );
    assert_eq!(received(&mut laptop_inbox), [(false, Some("Sent".into()))]);
    assert!(received(&mut phone_inbox).is_empty());
    let seen = std::mem::take(&mut *copier.seen.lock().unwrap());
    assert_eq!(
        seen,
        [
            (
                Side::Received,
                "bob@localhost".into(),
                vec!["bob@localhost/desk".into(), "alice@localhost/phone".into()]
            ),
            (
                Side::Sent,
                "alice@localhost".into(),
                vec!["alice@localhost/phone".into()]
            ),
        ]
    );

    // Carol has no marked session: the module is asked on the sender's
    // side only (the laptop is marked).
    router
        .handle_stanza(&mut phone, message("carol@localhost"))
        .await;
    assert_eq!(received(&mut carol_inbox), [(true, None)]);
    assert_eq!(received(&mut laptop_inbox), [(false, Some("Sent".into()))]);
    let seen = std::mem::take(&mut *copier.seen.lock().unwrap());
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Side::Sent);

    // A message the module does not copy: not shown to it at all.
    let private = stanza(&format!(
        "<message xmlns='jabber:client' from='alice@localhost/phone' to='bob@localhost' type='chat'><body>hi</body><private xmlns='{NS}'/></message>"
    ));
    router.handle_stanza(&mut phone, private).await;
    assert_eq!(received(&mut desk_inbox), [(true, None)]);
    assert!(received(&mut tablet_inbox).is_empty());
    assert!(received(&mut laptop_inbox).is_empty());
    assert!(copier.seen.lock().unwrap().is_empty());

    // A copy that cannot reach its session is dropped, not routed again.
    router
        .reroute_stranded(
            &FullJid::new("bob@localhost/tablet").unwrap(),
            stanza(&format!(
                "<message xmlns='jabber:client' to='bob@localhost/tablet' type='chat'><copy xmlns='{NS}' side='Received'/></message>"
            )),
        )
        .await;
    assert!(received(&mut desk_inbox).is_empty());
    assert!(received(&mut tablet_inbox).is_empty());
}

#[tokio::test]
#[should_panic(expected = "two modules answer <count xmlns='urn:example:counter'/>")]
async fn two_modules_cannot_claim_one_payload() {
    router(vec![Arc::new(Counter::default()), Arc::new(Impostor)]).await;
}

#[tokio::test]
async fn every_kind_of_stanza_to_a_hosted_service_reaches_its_module() {
    let counter = Arc::new(Counter::default());
    let (router, _dir) = router(vec![counter.clone()]).await;
    let alice = BareJid::new("alice@localhost").unwrap();
    let requested = alice.with_resource_str("phone").unwrap();
    let (mailbox, mut inbox) = Mailbox::new();
    let mut session = router.bind(&alice, Some(requested), mailbox).await.unwrap();
    let from = "from='alice@localhost/phone'";

    let message = stanza(&format!(
        "<message xmlns='jabber:client' {from} to='room@counter.localhost' type='groupchat'><body>hi</body></message>"
    ));
    router.handle_stanza(&mut session, message).await;
    // The module's echo came back through routing to the session.
    match inbox.try_recv() {
        Some(rookery_cluster::Mail::Stanza { stanza, .. }) => {
            assert_eq!(stanza.attr("from"), Some("room@counter.localhost"));
            assert_eq!(
                stanza.get_child("body", "jabber:client").unwrap().text(),
                "echo"
            );
        }
        other => panic!("no echo: {other:?}"),
    }
    let initial = stanza(&format!("<presence xmlns='jabber:client' {from}/>"));
    router.handle_stanza(&mut session, initial).await;
    session.take_outbox();
    let join = stanza(&format!(
        "<presence xmlns='jabber:client' {from} to='room@counter.localhost/alice'/>"
    ));
    router.handle_stanza(&mut session, join).await;
    let iq = stanza(&format!(
        "<iq xmlns='jabber:client' {from} to='counter.localhost' type='get' id='i1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    ));
    router.handle_stanza(&mut session, iq).await;
    assert!(
        session.take_outbox().is_empty(),
        "the service answers, not the router"
    );

    // Elsewhere is remote: refused, and the module hears nothing of it.
    let remote = stanza(&format!(
        "<message xmlns='jabber:client' {from} to='room@counter.example.org'><body>hi</body></message>"
    ));
    router.handle_stanza(&mut session, remote).await;
    let refused = session.take_outbox().pop().unwrap();
    assert!(String::from(&refused).contains("remote-server-not-found"));

    // The room got directed presence: it hears the session end.
    router.end_session(session, Vec::new()).await;
    let served = counter.served.lock().unwrap().clone();
    let expected = [
        ("message", "groupchat", "room@counter.localhost"),
        ("presence", "", "room@counter.localhost/alice"),
        ("iq", "get", "counter.localhost"),
        ("presence", "unavailable", "room@counter.localhost/alice"),
    ];
    assert_eq!(
        served,
        expected.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned()))
    );
}
