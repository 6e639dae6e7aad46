//! Interop with an independent client library: tokio-xmpp (xmpp-rs), from crates.io.
//! Every scenario of the core issue runs through its real client stack:
//! STARTTLS, SCRAM, binding, stream management with resumption.

use std::time::Duration;

use futures::StreamExt;
use rookery_test_support::TestServer;
use rookery_test_support::xmpp_rs::{TestConnector, client};
use tokio_xmpp::parsers::jid::{BareJid, Jid};
use tokio_xmpp::parsers::message::{Lang, Message, MessageType};
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::{Client, Event, Stanza};

const WAIT: Duration = Duration::from_secs(15);

/// A tokio-xmpp client and the stanzas it received that no one waited for yet.
struct Peer {
    client: Client,
    pending: Vec<Stanza>,
}

impl std::ops::Deref for Peer {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Peer {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

fn peer(client: Client) -> Peer {
    Peer {
        client,
        pending: Vec::new(),
    }
}

async fn next_event(peer: &mut Peer) -> Event {
    tokio::time::timeout(WAIT, peer.client.next())
        .await
        .expect("an event in time")
        .expect("the client stream goes on")
}

/// Waits for the client to be online; returns whether the session was resumed.
async fn online(peer: &mut Peer) -> bool {
    loop {
        match next_event(peer).await {
            Event::Online { resumed, .. } => return resumed,
            Event::Disconnected(error) => panic!("disconnected: {error}"),
            Event::Stanza(stanza) => peer.pending.push(stanza),
        }
    }
}

/// The first stanza `pick` accepts, earlier arrivals first; the others stay pending.
async fn wait_stanza<T>(peer: &mut Peer, mut pick: impl FnMut(&Stanza) -> Option<T>) -> T {
    if let Some((index, found)) = peer
        .pending
        .iter()
        .enumerate()
        .find_map(|(i, s)| pick(s).map(|f| (i, f)))
    {
        peer.pending.remove(index);
        return found;
    }
    loop {
        if let Event::Stanza(stanza) = next_event(peer).await {
            match pick(&stanza) {
                Some(found) => return found,
                None => peer.pending.push(stanza),
            }
        }
    }
}

async fn wait_body(peer: &mut Peer, text: &str) -> Message {
    wait_stanza(peer, |stanza| match stanza {
        Stanza::Message(message) if message.bodies.values().any(|b| b == text) => {
            Some(message.clone())
        }
        _ => None,
    })
    .await
}

async fn wait_presence(peer: &mut Peer, from_bare: &str, type_: PresenceType) -> Presence {
    wait_stanza(peer, |stanza| match stanza {
        Stanza::Presence(presence)
            if presence.type_ == type_
                && presence
                    .from
                    .as_ref()
                    .is_some_and(|f| f.to_bare().as_str() == from_bare) =>
        {
            Some(presence.clone())
        }
        _ => None,
    })
    .await
}

fn jid(s: &str) -> Jid {
    Jid::new(s).unwrap()
}

fn chat(to: &str, body: &str) -> Stanza {
    Stanza::Message(Message::chat(Some(jid(to))).with_body(Lang::new(), body.to_owned()))
}

async fn send(peer: &mut Peer, stanza: Stanza) {
    peer.client.send_stanza(stanza).await.expect("sent");
}

async fn start() -> TestServer {
    let server = TestServer::start().await;
    for user in ["alice", "bob"] {
        server.create_user(user, "secret").await;
    }
    server
}

/// alice and bob subscribe to each other through the tokio-xmpp clients.
async fn befriend(alice: &mut Peer, bob: &mut Peer) {
    send(
        alice,
        Stanza::Presence(Presence::subscribe().with_to(jid("bob@localhost"))),
    )
    .await;
    wait_presence(bob, "alice@localhost", PresenceType::Subscribe).await;
    send(
        bob,
        Stanza::Presence(Presence::subscribed().with_to(jid("alice@localhost"))),
    )
    .await;
    send(
        bob,
        Stanza::Presence(Presence::subscribe().with_to(jid("alice@localhost"))),
    )
    .await;
    wait_presence(alice, "bob@localhost", PresenceType::Subscribed).await;
    wait_presence(alice, "bob@localhost", PresenceType::Subscribe).await;
    send(
        alice,
        Stanza::Presence(Presence::subscribed().with_to(jid("alice@localhost"))),
    )
    .await;
    send(
        alice,
        Stanza::Presence(Presence::subscribed().with_to(jid("bob@localhost"))),
    )
    .await;
}

#[tokio::test]
async fn two_users_subscribe_see_presence_and_chat() {
    let server = start().await;
    let mut alice = peer(client(
        "alice@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    let mut bob = peer(client(
        "bob@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    assert!(!online(&mut alice).await);
    assert!(!online(&mut bob).await);
    send(&mut alice, Stanza::Presence(Presence::available())).await;
    send(&mut bob, Stanza::Presence(Presence::available())).await;
    befriend(&mut alice, &mut bob).await;
    // Each sees the other's presence once subscribed.
    wait_presence(&mut alice, "bob@localhost", PresenceType::None).await;
    wait_presence(&mut bob, "alice@localhost", PresenceType::None).await;
    // The roster says both.
    let roster = alice
        .client
        .send_iq(
            None,
            tokio_xmpp::IqRequest::Get(
                tokio_xmpp::parsers::roster::Roster {
                    ver: None,
                    items: vec![],
                }
                .into(),
            ),
        )
        .await;
    let response = roster.await.expect("roster answer");
    let tokio_xmpp::IqResponse::Result(Some(payload)) = response else {
        panic!("{response:?}")
    };
    let roster = tokio_xmpp::parsers::roster::Roster::try_from(payload).unwrap();
    assert_eq!(roster.items.len(), 1);
    assert_eq!(roster.items[0].jid, BareJid::new("bob@localhost").unwrap());
    assert_eq!(
        roster.items[0].subscription,
        tokio_xmpp::parsers::roster::Subscription::Both
    );
    // Chat both ways.
    send(&mut alice, chat("bob@localhost", "hi bob, it's alice")).await;
    let message = wait_body(&mut bob, "hi bob, it's alice").await;
    assert_eq!(message.type_, MessageType::Chat);
    assert_eq!(message.from.unwrap().to_string(), "alice@localhost/xmpp-rs");
    send(&mut bob, chat("alice@localhost", "hello alice")).await;
    wait_body(&mut alice, "hello alice").await;
    alice.client.send_end().await.unwrap();
    wait_presence(&mut bob, "alice@localhost", PresenceType::Unavailable).await;
}

#[tokio::test]
async fn offline_messages_reach_a_tokio_xmpp_client() {
    let server = start().await;
    let mut bob = peer(client(
        "bob@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    online(&mut bob).await;
    send(&mut bob, Stanza::Presence(Presence::available())).await;
    send(&mut bob, chat("alice@localhost", "left while you were out")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut alice = peer(client(
        "alice@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    online(&mut alice).await;
    send(&mut alice, Stanza::Presence(Presence::available())).await;
    let message = wait_body(&mut alice, "left while you were out").await;
    let delay = message
        .payloads
        .iter()
        .find(|p| p.is("delay", "urn:xmpp:delay"))
        .expect("delay stamp");
    tokio_xmpp::parsers::delay::Delay::try_from(delay.clone()).expect("a valid XEP-0203 delay");
}

#[tokio::test]
async fn carbons_on_a_second_resource() {
    let server = start().await;
    let mut bob = peer(client(
        "bob@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    let mut phone = peer(client(
        "alice@localhost/phone",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    let mut laptop = peer(client(
        "alice@localhost/laptop",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    for c in [&mut bob, &mut phone, &mut laptop] {
        online(c).await;
        send(c, Stanza::Presence(Presence::available())).await;
    }
    let enable = laptop
        .client
        .send_iq(
            None,
            tokio_xmpp::IqRequest::Set(tokio_xmpp::parsers::carbons::Enable.into()),
        )
        .await;
    assert!(matches!(
        enable.await.unwrap(),
        tokio_xmpp::IqResponse::Result(_)
    ));
    send(&mut bob, chat("alice@localhost/phone", "to the phone")).await;
    wait_body(&mut phone, "to the phone").await;
    let carbon = wait_stanza(&mut laptop, |stanza| match stanza {
        Stanza::Message(message) => message
            .payloads
            .iter()
            .find(|p| p.is("received", "urn:xmpp:carbons:2"))
            .cloned(),
        _ => None,
    })
    .await;
    let received =
        tokio_xmpp::parsers::carbons::Received::try_from(carbon).expect("a valid received carbon");
    assert_eq!(
        received
            .forwarded
            .message
            .bodies
            .values()
            .next()
            .map(String::as_str),
        Some("to the phone")
    );
    send(&mut phone, chat("bob@localhost", "from the phone")).await;
    let sent = wait_stanza(&mut laptop, |stanza| match stanza {
        Stanza::Message(message) => message
            .payloads
            .iter()
            .find(|p| p.is("sent", "urn:xmpp:carbons:2"))
            .cloned(),
        _ => None,
    })
    .await;
    let sent = tokio_xmpp::parsers::carbons::Sent::try_from(sent).expect("a valid sent carbon");
    assert_eq!(
        sent.forwarded
            .message
            .bodies
            .values()
            .next()
            .map(String::as_str),
        Some("from the phone")
    );
}

#[tokio::test]
async fn stream_management_resumes_and_delivers_what_arrived_meanwhile() {
    let server = start().await;
    let mut bob = peer(client(
        "bob@localhost/xmpp-rs",
        "secret",
        TestConnector::new(server.starttls()),
    ));
    let connector = TestConnector::new(server.starttls());
    let mut alice = peer(client(
        "alice@localhost/xmpp-rs",
        "secret",
        connector.clone(),
    ));
    online(&mut bob).await;
    online(&mut alice).await;
    send(&mut alice, Stanza::Presence(Presence::available())).await;
    send(&mut bob, chat("alice@localhost/xmpp-rs", "first")).await;
    wait_body(&mut alice, "first").await;
    // The network fails; messages arrive while alice is away.
    connector.cut();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&mut bob, chat("alice@localhost/xmpp-rs", "second")).await;
    send(&mut bob, chat("alice@localhost/xmpp-rs", "third")).await;
    // tokio-xmpp reconnects by itself and resumes the session.
    assert!(
        online(&mut alice).await,
        "the session was resumed, not re-bound"
    );
    wait_body(&mut alice, "second").await;
    wait_body(&mut alice, "third").await;
    assert_eq!(server.sessions(), 2);
}
