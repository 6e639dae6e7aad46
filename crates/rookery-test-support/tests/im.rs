//! Instant messaging and presence (RFC 6121) end to end: real sockets, real TLS,
//! a real SQLite database, driven by the scriptable test client.

use std::time::Duration;

use minidom::Element;
use rookery_test_support::ring::ask_each_other_in_a_ring;
use rookery_test_support::{TestClient, TestServer};

const CLIENT: &str = "jabber:client";
const ROSTER: &str = "jabber:iq:roster";
const SHORT: Duration = Duration::from_millis(300);

async fn server_with(users: &[&str]) -> TestServer {
    let server = TestServer::start().await;
    for user in users {
        server.create_user(user, "secret").await;
    }
    server
}

fn body(message: &Element) -> String {
    message
        .get_child("body", CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
}

fn error_condition(stanza: &Element) -> String {
    stanza
        .get_child("error", CLIENT)
        .and_then(|e| {
            e.children()
                .find(|c| c.has_ns("urn:ietf:params:xml:ns:xmpp-stanzas"))
        })
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| panic!("no stanza error in {}", String::from(stanza)))
}

#[tokio::test]
async fn every_login_path_works() {
    let server = server_with(&["alice"]).await;
    // STARTTLS with both SCRAM variants.
    for hash in [
        rookery_stream::ScramHash::Sha1,
        rookery_stream::ScramHash::Sha256,
    ] {
        let mut client = TestClient::connect(server.starttls()).await;
        let features = client.open().await;
        assert!(features.has_child("starttls", "urn:ietf:params:xml:ns:xmpp-tls"));
        assert!(
            !features.has_child("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl"),
            "no SASL before TLS"
        );
        client.starttls().await;
        client
            .authenticate_scram("alice", "secret", hash)
            .await
            .unwrap();
        assert_eq!(
            client.bind(Some("r")).await.to_string(),
            "alice@localhost/r"
        );
    }
    // PLAIN over direct TLS (XEP-0368).
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    let features = client.open().await;
    let mechanisms: Vec<String> = features
        .get_child("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl")
        .unwrap()
        .children()
        .map(|m| m.text())
        .collect();
    assert_eq!(mechanisms, ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]);
    client.authenticate_plain("alice", "secret").await.unwrap();
    // A server-made resource.
    let jid = client.bind(None).await;
    assert!(!jid.resource().as_str().is_empty());
}

#[tokio::test]
async fn wrong_passwords_and_unknown_users_are_not_authorized() {
    let server = server_with(&["alice"]).await;
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    assert_eq!(
        client
            .authenticate_scram("alice", "nope", rookery_stream::ScramHash::Sha256)
            .await,
        Err("not-authorized".into())
    );
    assert_eq!(
        client.authenticate_plain("nobody", "secret").await,
        Err("not-authorized".into())
    );
    assert_eq!(
        client.authenticate_plain("alice", "secret").await,
        Ok(()),
        "a later attempt on the same stream may succeed"
    );
}

#[tokio::test]
async fn a_second_login_with_the_same_resource_replaces_the_first() {
    let server = server_with(&["alice", "bob"]).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    alice.befriend(&mut bob).await;
    let mut replacement = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    assert_eq!(alice.expect_stream_error().await, "conflict");
    // Bob never saw alice/phone go unavailable: the resource is still online.
    bob.assert_none(SHORT, |e| e.attr("type") == Some("unavailable"))
        .await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>still there?</body></message>")
        .await;
    assert_eq!(body(&replacement.expect_message().await), "still there?");
    assert_eq!(server.sessions(), 2);
}

#[tokio::test]
async fn roster_get_set_remove_with_pushes_and_versions() {
    let server = server_with(&["alice"]).await;
    let mut phone = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let empty = phone
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let version0 = empty
        .get_child("query", ROSTER)
        .unwrap()
        .attr("ver")
        .unwrap()
        .to_owned();

    let result = phone
        .iq("<iq type='set'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' name='Carol'><group>Friends</group></item></query></iq>")
        .await;
    assert_eq!(result.attr("type"), Some("result"));
    for client in [&mut phone, &mut laptop] {
        let push = client
            .expect(|e| e.attr("type") == Some("set") && e.has_child("query", ROSTER))
            .await;
        let item = push
            .get_child("query", ROSTER)
            .unwrap()
            .get_child("item", ROSTER)
            .unwrap();
        assert_eq!(
            (
                item.attr("jid"),
                item.attr("name"),
                item.attr("subscription")
            ),
            (Some("carol@localhost"), Some("Carol"), Some("none"))
        );
        assert_eq!(item.get_child("group", ROSTER).unwrap().text(), "Friends");
        assert_ne!(
            push.get_child("query", ROSTER).unwrap().attr("ver"),
            Some(version0.as_str())
        );
    }

    let roster = laptop
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let query = roster.get_child("query", ROSTER).unwrap();
    let version1 = query.attr("ver").unwrap().to_owned();
    assert_eq!(query.children().count(), 1);
    // Roster versioning: an up-to-date client gets an empty result.
    let current = laptop
        .iq(&format!(
            "<iq type='get'><query xmlns='jabber:iq:roster' ver='{version1}'/></iq>"
        ))
        .await;
    assert_eq!(
        (current.attr("type"), current.children().count()),
        (Some("result"), 0)
    );
    let stale = laptop
        .iq(&format!(
            "<iq type='get'><query xmlns='jabber:iq:roster' ver='{version0}'/></iq>"
        ))
        .await;
    assert_eq!(
        stale.get_child("query", ROSTER).unwrap().children().count(),
        1
    );

    phone.iq("<iq type='set'><query xmlns='jabber:iq:roster'><item jid='carol@localhost' subscription='remove'/></query></iq>").await;
    let push = laptop
        .expect(|e| e.attr("type") == Some("set") && e.has_child("query", ROSTER))
        .await;
    assert_eq!(
        push.get_child("query", ROSTER)
            .unwrap()
            .get_child("item", ROSTER)
            .unwrap()
            .attr("subscription"),
        Some("remove")
    );

    // Bad requests.
    for bad in [
        "<iq type='set'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='a@localhost'/><item jid='b@localhost'/></query></iq>",
        "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='a@localhost'><group>G</group><group>G</group></item></query></iq>",
    ] {
        assert_eq!(
            error_condition(&phone.iq(bad).await),
            "bad-request",
            "{bad}"
        );
    }
    let foreign = phone
        .iq("<iq type='get' to='bob@localhost'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    assert_eq!(foreign.attr("type"), Some("error"));
}

#[tokio::test]
async fn the_subscription_handshake_and_presence() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;

    alice
        .send("<presence type='subscribe' to='bob@localhost/ignored'/>")
        .await;
    let push = alice.expect(|e| e.has_child("query", ROSTER)).await;
    let item = push
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap();
    assert_eq!(
        (
            item.attr("jid"),
            item.attr("subscription"),
            item.attr("ask")
        ),
        (Some("bob@localhost"), Some("none"), Some("subscribe"))
    );
    let request = bob.expect(|e| e.attr("type") == Some("subscribe")).await;
    assert_eq!(
        request.attr("from"),
        Some("alice@localhost"),
        "stamped with the bare JID"
    );

    bob.send("<presence type='subscribed' to='alice@localhost'/>")
        .await;
    let push = bob.expect(|e| e.has_child("query", ROSTER)).await;
    assert_eq!(
        push.get_child("query", ROSTER)
            .unwrap()
            .get_child("item", ROSTER)
            .unwrap()
            .attr("subscription"),
        Some("from")
    );
    let push = alice.expect(|e| e.has_child("query", ROSTER)).await;
    let item = push
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap();
    assert_eq!(
        (item.attr("subscription"), item.attr("ask")),
        (Some("to"), None)
    );
    alice.expect(|e| e.attr("type") == Some("subscribed")).await;
    // Bob's current presence follows the approval.
    let presence = alice.expect_presence_from("bob@localhost/desk").await;
    assert_eq!(presence.attr("type"), None);

    // Presence updates now flow from bob to alice, not the other way round.
    bob.send("<presence><show>away</show><status>lunch</status></presence>")
        .await;
    let away = alice
        .expect(|e| e.name() == "presence" && e.get_child("show", CLIENT).is_some())
        .await;
    assert_eq!(away.get_child("status", CLIENT).unwrap().text(), "lunch");
    alice.send("<presence><show>dnd</show></presence>").await;
    bob.assert_none(SHORT, |e| {
        e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with("alice"))
    })
    .await;

    // Unsubscribed from bob: alice loses her subscription and sees bob unavailable.
    bob.send("<presence type='unsubscribed' to='alice@localhost'/>")
        .await;
    alice
        .expect(|e| e.attr("type") == Some("unsubscribed"))
        .await;
    alice
        .expect(|e| {
            e.attr("type") == Some("unavailable") && e.attr("from") == Some("bob@localhost/desk")
        })
        .await;
    let roster = alice
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let item = roster
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap()
        .clone();
    assert_eq!(item.attr("subscription"), Some("none"));
}

/// Users who ask each other at the same moment, and approve each other's
/// requests while their own are in flight, all end with mutual subscriptions
/// (each side's change to a roster item used to race the other's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_asking_each_other_at_once_end_subscribed_both_ways() {
    const USERS: usize = 30;
    let server = TestServer::start().await;
    for n in 0..USERS {
        server.create_user(&format!("ring{n}"), "secret").await;
    }
    let wrong = ask_each_other_in_a_ring("ring", USERS, 4, |_| server.starttls()).await;
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A session keeps its subscribers between roster pushes: a contact who
/// subscribes, or unsubscribes, after the user's presence went out is (or is
/// no longer) reached by the next update, also from a resource that never
/// fetched the roster and so gets no pushes itself.
#[tokio::test]
async fn presence_updates_follow_subscription_changes() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    // A second resource that never asks for the roster.
    let mut quiet = TestClient::login(server.starttls(), "alice", "secret", "quiet").await;
    quiet.send("<presence/>").await;
    quiet
        .expect(|e| e.name() == "presence" && e.attr("from") == Some("alice@localhost/quiet"))
        .await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    bob.befriend(&mut alice).await;
    let status_from = |from: &'static str, text: &'static str| {
        move |e: &Element| {
            e.name() == "presence"
                && e.attr("from") == Some(from)
                && e.get_child("status", CLIENT).map(|s| s.text()).as_deref() == Some(text)
        }
    };
    quiet
        .send("<presence><status>one</status></presence>")
        .await;
    bob.expect(status_from("alice@localhost/quiet", "one"))
        .await;
    // No roster push reached the quiet resource.
    quiet
        .assert_none(SHORT, |e| e.has_child("query", ROSTER))
        .await;
    // Bob cancels: alice's next update no longer reaches him.
    alice
        .send("<presence type='unsubscribed' to='bob@localhost'/>")
        .await;
    bob.expect(|e| e.attr("type") == Some("unavailable")).await;
    quiet
        .send("<presence><status>two</status></presence>")
        .await;
    bob.assert_none(SHORT, status_from("alice@localhost/quiet", "two"))
        .await;
}

#[tokio::test]
async fn pending_subscriptions_survive_until_the_contact_logs_in() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    alice
        .send("<presence type='subscribe' to='bob@localhost'><status>It's me</status></presence>")
        .await;
    alice.expect(|e| e.has_child("query", ROSTER)).await;
    alice.close().await;
    let server = server.restart().await;
    let mut bob = TestClient::login(server.starttls(), "bob", "secret", "desk").await;
    bob.send("<presence/>").await;
    let request = bob.expect(|e| e.attr("type") == Some("subscribe")).await;
    assert_eq!(request.attr("from"), Some("alice@localhost"));
    assert_eq!(
        request.get_child("status", CLIENT).unwrap().text(),
        "It's me"
    );
    // The request is answered once; alice's roster shows the pending state meanwhile.
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let roster = alice
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let item = roster
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap()
        .clone();
    assert_eq!(item.attr("ask"), Some("subscribe"));
    bob.send("<presence type='subscribed' to='alice@localhost'/>")
        .await;
    alice.expect(|e| e.attr("type") == Some("subscribed")).await;
}

#[tokio::test]
async fn subscribing_to_a_nonexistent_account_is_answered_with_unsubscribed() {
    let server = server_with(&["alice"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    alice
        .send("<presence type='subscribe' to='ghost@localhost'/>")
        .await;
    alice
        .expect(|e| {
            e.attr("type") == Some("unsubscribed") && e.attr("from") == Some("ghost@localhost")
        })
        .await;
}

#[tokio::test]
async fn initial_presence_probes_and_disconnects_broadcast_unavailable() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    // A second resource of alice learns bob's presence from the probe at its initial presence.
    let mut tablet = TestClient::login(server.starttls(), "alice", "secret", "tablet").await;
    tablet
        .send("<presence><priority>-1</priority></presence>")
        .await;
    tablet.expect_presence_from("bob@localhost/desk").await;
    tablet.expect_presence_from("alice@localhost/phone").await;
    bob.expect_presence_from("alice@localhost/tablet").await;
    // Unclean disconnect: contacts and own resources see unavailable.
    tablet.kill();
    let gone = bob.expect(|e| e.attr("type") == Some("unavailable")).await;
    assert_eq!(gone.attr("from"), Some("alice@localhost/tablet"));
    alice
        .expect(|e| {
            e.attr("type") == Some("unavailable")
                && e.attr("from") == Some("alice@localhost/tablet")
        })
        .await;
    // Explicit unavailable.
    alice
        .send("<presence type='unavailable'><status>bye</status></presence>")
        .await;
    let bye = bob
        .expect(|e| {
            e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
        })
        .await;
    assert_eq!(bye.get_child("status", CLIENT).unwrap().text(), "bye");
}

#[tokio::test]
async fn directed_presence_gets_unavailable_at_the_end() {
    let server = server_with(&["alice", "carol"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut carol = TestClient::online(server.starttls(), "carol", "secret", "pc").await;
    alice
        .send("<presence to='carol@localhost/pc'><status>hi carol</status></presence>")
        .await;
    let directed = carol.expect_presence_from("alice@localhost/phone").await;
    assert_eq!(
        directed.get_child("status", CLIENT).unwrap().text(),
        "hi carol"
    );
    alice.close().await;
    carol
        .expect(|e| {
            e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
        })
        .await;
}

#[tokio::test]
async fn delivery_rules_for_bare_and_full_jids() {
    let server = server_with(&["alice", "bob"]).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut high = TestClient::login(server.starttls(), "alice", "secret", "high").await;
    high.send("<presence><priority>5</priority></presence>")
        .await;
    let mut low = TestClient::login(server.starttls(), "alice", "secret", "low").await;
    low.send("<presence><priority>1</priority></presence>")
        .await;
    let mut hidden = TestClient::login(server.starttls(), "alice", "secret", "hidden").await;
    hidden
        .send("<presence><priority>-1</priority></presence>")
        .await;

    bob.send("<message to='alice@localhost' type='chat'><body>to the bare JID</body></message>")
        .await;
    assert_eq!(body(&high.expect_message().await), "to the bare JID");
    low.assert_none(SHORT, |e| e.name() == "message").await;
    hidden
        .assert_none(Duration::ZERO, |e| e.name() == "message")
        .await;

    bob.send(
        "<message to='alice@localhost/hidden' type='chat'><body>to the full JID</body></message>",
    )
    .await;
    assert_eq!(
        body(&hidden.expect_message().await),
        "to the full JID",
        "negative priority still gets direct messages"
    );

    bob.send(
        "<message to='alice@localhost/gone' type='chat'><body>to a gone resource</body></message>",
    )
    .await;
    assert_eq!(
        body(&high.expect_message().await),
        "to a gone resource",
        "treated as the bare JID"
    );

    bob.send("<message to='alice@localhost' type='headline'><body>news</body></message>")
        .await;
    assert_eq!(body(&high.expect_message().await), "news");
    assert_eq!(
        body(&low.expect_message().await),
        "news",
        "headlines go to every non-negative resource"
    );

    bob.send("<message to='alice@localhost' type='groupchat'><body>wrong</body></message>")
        .await;
    let error = bob.expect(|e| e.attr("type") == Some("error")).await;
    assert_eq!(error_condition(&error), "service-unavailable");

    bob.send("<message to='nobody@localhost' type='chat'><body>?</body></message>")
        .await;
    assert_eq!(
        error_condition(&bob.expect(|e| e.attr("type") == Some("error")).await),
        "service-unavailable"
    );
    bob.send("<message to='someone@elsewhere.example' type='chat'><body>?</body></message>")
        .await;
    assert_eq!(
        error_condition(&bob.expect(|e| e.attr("type") == Some("error")).await),
        "remote-server-not-found"
    );
}

#[tokio::test]
async fn equal_priorities_all_receive_messages_to_the_bare_jid() {
    let server = server_with(&["alice", "bob"]).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut one = TestClient::online(server.starttls(), "alice", "secret", "one").await;
    let mut two = TestClient::online(server.starttls(), "alice", "secret", "two").await;
    bob.send("<message to='alice@localhost' type='chat'><body>both</body></message>")
        .await;
    assert_eq!(body(&one.expect_message().await), "both");
    assert_eq!(body(&two.expect_message().await), "both");
}

#[tokio::test]
async fn offline_messages_arrive_with_a_delay_stamp_at_the_next_available_presence() {
    let server = server_with(&["alice", "bob"]).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    for n in 1..=3 {
        bob.send(&format!(
            "<message to='alice@localhost' type='chat' id='m{n}'><body>offline {n}</body></message>"
        ))
        .await;
    }
    bob.send("<message to='alice@localhost' type='headline'><body>not kept</body></message>")
        .await;
    bob.assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    // Negative priority does not fetch them; a later non-negative one does.
    let mut alice = TestClient::login(server.starttls(), "alice", "secret", "phone").await;
    alice
        .send("<presence><priority>-1</priority></presence>")
        .await;
    alice.assert_none(SHORT, |e| e.name() == "message").await;
    let mut laptop = TestClient::login(server.starttls(), "alice", "secret", "laptop").await;
    laptop.send("<presence/>").await;
    for n in 1..=3 {
        let message = laptop.expect_message().await;
        assert_eq!(body(&message), format!("offline {n}"), "in order");
        assert_eq!(message.attr("from"), Some("bob@localhost/desk"));
        let delay = message
            .get_child("delay", "urn:xmpp:delay")
            .expect("XEP-0203 delay");
        assert_eq!(delay.attr("from"), Some("localhost"));
        assert!(delay.attr("stamp").unwrap().ends_with('Z'));
    }
    laptop.assert_none(SHORT, |e| e.name() == "message").await;
    // Delivered once only.
    let mut again = TestClient::online(server.starttls(), "alice", "secret", "again").await;
    again.assert_none(SHORT, |e| e.name() == "message").await;
}

#[tokio::test]
async fn offline_storage_is_bounded() {
    let server = TestServer::start_with(|c| c.limits.offline_messages = 2).await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    for n in 0..3 {
        bob.send(&format!(
            "<message to='alice@localhost' id='q{n}'><body>{n}</body></message>"
        ))
        .await;
    }
    let error = bob.expect(|e| e.attr("type") == Some("error")).await;
    assert_eq!(
        (error.attr("id"), error_condition(&error).as_str()),
        (Some("q2"), "service-unavailable")
    );
}

#[tokio::test]
async fn iq_routing_and_errors() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    // An iq between resources is routed, and the answer comes back.
    alice.send("<iq type='get' id='v1' to='bob@localhost/desk'><query xmlns='jabber:iq:version'/></iq>").await;
    let request = bob.expect(|e| e.attr("id") == Some("v1")).await;
    assert_eq!(request.attr("from"), Some("alice@localhost/phone"));
    bob.send("<iq type='result' id='v1' to='alice@localhost/phone'><query xmlns='jabber:iq:version'><name>Bot</name></query></iq>").await;
    let answer = alice.expect(|e| e.attr("id") == Some("v1")).await;
    assert_eq!(
        (answer.attr("type"), answer.attr("from")),
        (Some("result"), Some("bob@localhost/desk"))
    );

    let unavailable = alice
        .iq("<iq type='get' to='bob@localhost/gone'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    assert_eq!(error_condition(&unavailable), "service-unavailable");
    let unknown = alice
        .iq("<iq type='get' to='localhost'><query xmlns='urn:example:unknown'/></iq>")
        .await;
    assert_eq!(error_condition(&unknown), "service-unavailable");
    let unknown_account = alice
        .iq("<iq type='get'><query xmlns='urn:example:unknown'/></iq>")
        .await;
    assert_eq!(error_condition(&unknown_account), "service-unavailable");
    let two_payloads = alice.iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/></iq>").await;
    assert_eq!(error_condition(&two_payloads), "bad-request");
    let malformed = alice
        .iq("<iq type='get' to='not@valid@jid'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(error_condition(&malformed), "jid-malformed");
    let remote = alice
        .iq("<iq type='get' to='elsewhere.example'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(error_condition(&remote), "remote-server-not-found");
}

#[tokio::test]
async fn contact_addresses_are_in_the_server_s_disco_and_its_caps() {
    let server = TestServer::start_with(|config| {
        config.disco.abuse_addresses = vec![
            "mailto:abuse@example.org".into(),
            "xmpp:abuse@localhost".into(),
        ];
        config.disco.support_addresses = vec!["https://example.org/help".into()];
    })
    .await;
    server.create_user("alice", "secret").await;
    let mut alice = TestClient::login(server.starttls(), "alice", "secret", "a").await;
    let caps = alice
        .features
        .clone()
        .and_then(|f| f.get_child("c", "http://jabber.org/protocol/caps").cloned())
        .expect("caps in the features");
    let info = alice
        .iq("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .await;
    let disco = xmpp_parsers::disco::DiscoInfoResult::try_from(
        info.get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap()
            .clone(),
    )
    .expect("a valid disco#info result");
    let [form] = &disco.extensions[..] else {
        panic!("one form: {:?}", disco.extensions)
    };
    assert_eq!(
        form.form_type(),
        Some("http://jabber.org/network/serverinfo")
    );
    let values = |var: &str| {
        form.fields
            .iter()
            .find(|field| field.var.as_deref() == Some(var))
            .map(|field| field.values.clone())
    };
    assert_eq!(
        values("abuse-addresses").unwrap(),
        ["mailto:abuse@example.org", "xmpp:abuse@localhost"]
    );
    assert_eq!(
        values("support-addresses").unwrap(),
        ["https://example.org/help"]
    );
    assert_eq!(values("admin-addresses"), None, "empty lists are left out");
    let hash = xmpp_parsers::caps::hash_caps(
        &xmpp_parsers::caps::compute_disco(&disco),
        xmpp_parsers::hashes::Algo::Sha_1,
    )
    .unwrap();
    assert_eq!(
        Some(hash.to_base64().as_str()),
        caps.attr("ver"),
        "the caps hash covers the form"
    );
}

#[tokio::test]
async fn server_services_disco_version_ping_last_and_caps() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::connect(server.starttls()).await;
    alice.open().await;
    alice.starttls().await;
    alice
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .unwrap();
    // XEP-0115: the caps in the stream features verify against the disco#info of their node.
    let features = alice
        .features
        .clone()
        .expect("features after authentication");
    let caps = features
        .get_child("c", "http://jabber.org/protocol/caps")
        .expect("server caps in the stream features");
    assert_eq!(caps.attr("hash"), Some("sha-1"));
    let node = format!(
        "{}#{}",
        caps.attr("node").unwrap(),
        caps.attr("ver").unwrap()
    );
    alice.bind(Some("phone")).await;
    let by_node = alice
        .iq(&format!("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info' node='{node}'/></iq>"))
        .await;
    let disco = xmpp_parsers::disco::DiscoInfoResult::try_from(
        by_node
            .get_child("query", "http://jabber.org/protocol/disco#info")
            .unwrap()
            .clone(),
    )
    .expect("a valid disco#info result");
    let hash = xmpp_parsers::caps::hash_caps(
        &xmpp_parsers::caps::compute_disco(&disco),
        xmpp_parsers::hashes::Algo::Sha_1,
    )
    .unwrap();
    assert_eq!(
        hash.to_base64(),
        caps.attr("ver").unwrap(),
        "the advertised ver is the hash of the disco#info"
    );
    let wrong_node = alice
        .iq("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info' node='urn:unknown'/></iq>")
        .await;
    assert_eq!(error_condition(&wrong_node), "item-not-found");

    let info = alice.iq("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let query = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap();
    let identity = query
        .get_child("identity", "http://jabber.org/protocol/disco#info")
        .unwrap();
    assert_eq!(
        (identity.attr("category"), identity.attr("type")),
        (Some("server"), Some("im"))
    );
    let features: Vec<&str> = query.children().filter_map(|f| f.attr("var")).collect();
    for expected in [
        "urn:xmpp:ping",
        "jabber:iq:version",
        "urn:xmpp:time",
        "jabber:iq:last",
        "vcard-temp",
        "jabber:iq:private",
        "urn:xmpp:blocking",
        "urn:xmpp:carbons:2",
        "urn:xmpp:csi:0",
        "urn:xmpp:sm:3",
        "http://jabber.org/protocol/disco#items",
    ] {
        assert!(
            features.contains(&expected),
            "{expected} missing from {features:?}"
        );
    }
    let items = alice.iq("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>").await;
    assert_eq!(items.attr("type"), Some("result"));
    let account = alice.iq("<iq type='get' to='alice@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let identity = account
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .next()
        .unwrap()
        .clone();
    assert_eq!(
        (identity.attr("category"), identity.attr("type")),
        (Some("account"), Some("registered"))
    );

    let version = alice
        .iq("<iq type='get' to='localhost'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let name = version
        .get_child("query", "jabber:iq:version")
        .unwrap()
        .get_child("name", "jabber:iq:version")
        .unwrap()
        .text();
    assert_eq!(name, "Rookery");
    // XEP-0202: the server's clock, in UTC.
    let time = alice
        .iq("<iq type='get' to='localhost'><time xmlns='urn:xmpp:time'/></iq>")
        .await;
    let time = xmpp_parsers::time::TimeResult::try_from(
        time.get_child("time", "urn:xmpp:time")
            .expect("a time answer")
            .clone(),
    )
    .expect("a valid entity time");
    assert_eq!(time.tz_offset.local_minus_utc(), 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((time.utc.timestamp() - now).abs() < 60, "{}", time.utc);
    let ping = alice
        .iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(ping.attr("type"), Some("result"));
    let uptime = alice
        .iq("<iq type='get' to='localhost'><query xmlns='jabber:iq:last'/></iq>")
        .await;
    assert!(
        uptime
            .get_child("query", "jabber:iq:last")
            .unwrap()
            .attr("seconds")
            .is_some()
    );
    let session = alice
        .iq("<iq type='set'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        .await;
    assert_eq!(session.attr("type"), Some("result"));
}

#[tokio::test]
async fn last_activity_of_contacts() {
    let server = server_with(&["alice", "bob", "eve"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    let online = alice
        .iq("<iq type='get' to='bob@localhost'><query xmlns='jabber:iq:last'/></iq>")
        .await;
    assert_eq!(
        online
            .get_child("query", "jabber:iq:last")
            .unwrap()
            .attr("seconds"),
        Some("0")
    );
    bob.send("<presence type='unavailable'><status>gone fishing</status></presence>")
        .await;
    bob.close().await;
    alice
        .expect(|e| e.attr("type") == Some("unavailable"))
        .await;
    let last = alice
        .iq("<iq type='get' to='bob@localhost'><query xmlns='jabber:iq:last'/></iq>")
        .await;
    let query = last.get_child("query", "jabber:iq:last").unwrap();
    assert!(query.attr("seconds").unwrap().parse::<u64>().unwrap() < 5);
    let mut eve = TestClient::online(server.starttls(), "eve", "secret", "pc").await;
    let denied = eve
        .iq("<iq type='get' to='bob@localhost'><query xmlns='jabber:iq:last'/></iq>")
        .await;
    assert_eq!(
        error_condition(&denied),
        "forbidden",
        "only subscribers may know"
    );
}

#[tokio::test]
async fn vcards_and_private_storage() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let empty = alice
        .iq("<iq type='get'><vCard xmlns='vcard-temp'/></iq>")
        .await;
    assert!(empty.get_child("vCard", "vcard-temp").is_some());
    let set = alice.iq("<iq type='set'><vCard xmlns='vcard-temp'><FN>Alice A.</FN><NICKNAME>ally</NICKNAME></vCard></iq>").await;
    assert_eq!(set.attr("type"), Some("result"));
    let read = bob
        .iq("<iq type='get' to='alice@localhost'><vCard xmlns='vcard-temp'/></iq>")
        .await;
    assert_eq!(
        read.get_child("vCard", "vcard-temp")
            .unwrap()
            .get_child("FN", "vcard-temp")
            .unwrap()
            .text(),
        "Alice A."
    );
    let forbidden = bob.iq("<iq type='set' to='alice@localhost'><vCard xmlns='vcard-temp'><FN>Mallory</FN></vCard></iq>").await;
    assert_eq!(error_condition(&forbidden), "forbidden");

    let stored = alice.iq("<iq type='set'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'><theme>dark</theme></prefs></query></iq>").await;
    assert_eq!(stored.attr("type"), Some("result"));
    let got = alice.iq("<iq type='get'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>").await;
    let prefs = got
        .get_child("query", "jabber:iq:private")
        .unwrap()
        .get_child("prefs", "urn:example:prefs")
        .unwrap()
        .clone();
    assert_eq!(
        prefs
            .get_child("theme", "urn:example:prefs")
            .unwrap()
            .text(),
        "dark"
    );
    let missing = alice.iq("<iq type='get'><query xmlns='jabber:iq:private'><other xmlns='urn:example:other'/></query></iq>").await;
    assert!(
        missing
            .get_child("query", "jabber:iq:private")
            .unwrap()
            .has_child("other", "urn:example:other"),
        "an empty element when nothing is stored"
    );
    let foreign = bob.iq("<iq type='get' to='alice@localhost'><query xmlns='jabber:iq:private'><prefs xmlns='urn:example:prefs'/></query></iq>").await;
    assert_eq!(error_condition(&foreign), "forbidden");
    let reserved = alice.iq("<iq type='set'><query xmlns='jabber:iq:private'><x xmlns='jabber:client'/></query></iq>").await;
    assert_eq!(error_condition(&reserved), "not-acceptable");
}

#[tokio::test]
async fn message_carbons_copy_to_the_other_resources() {
    let server = server_with(&["alice", "bob"]).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut phone = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let mut old = TestClient::online(server.starttls(), "alice", "secret", "old").await;
    for client in [&mut phone, &mut laptop] {
        let enabled = client
            .iq("<iq type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
            .await;
        assert_eq!(enabled.attr("type"), Some("result"));
    }
    // Sent carbons.
    phone
        .send("<message to='bob@localhost' type='chat'><body>sent from phone</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "sent from phone");
    let copy = laptop
        .expect(|e| e.has_child("sent", "urn:xmpp:carbons:2"))
        .await;
    assert_eq!(copy.attr("from"), Some("alice@localhost"));
    let inner = copy
        .get_child("sent", "urn:xmpp:carbons:2")
        .and_then(|s| s.get_child("forwarded", "urn:xmpp:forward:0"))
        .and_then(|f| f.get_child("message", CLIENT))
        .expect("forwarded message");
    assert_eq!(
        (body(inner).as_str(), inner.attr("from")),
        ("sent from phone", Some("alice@localhost/phone"))
    );
    old.assert_none(SHORT, |e| e.name() == "message").await;
    // Received carbons.
    bob.send("<message to='alice@localhost/phone' type='chat'><body>to phone</body></message>")
        .await;
    assert_eq!(body(&phone.expect_message().await), "to phone");
    let copy = laptop
        .expect(|e| e.has_child("received", "urn:xmpp:carbons:2"))
        .await;
    let inner = copy
        .get_child("received", "urn:xmpp:carbons:2")
        .and_then(|s| s.get_child("forwarded", "urn:xmpp:forward:0"))
        .and_then(|f| f.get_child("message", CLIENT))
        .unwrap();
    assert_eq!(body(inner), "to phone");
    old.assert_none(SHORT, |e| e.name() == "message").await;
    // Private messages are not copied; disabling stops copies.
    phone.send("<message to='bob@localhost' type='chat'><body>secret</body><private xmlns='urn:xmpp:carbons:2'/></message>").await;
    bob.expect_message().await;
    laptop.assert_none(SHORT, |e| e.name() == "message").await;
    laptop
        .iq("<iq type='set'><disable xmlns='urn:xmpp:carbons:2'/></iq>")
        .await;
    phone
        .send("<message to='bob@localhost' type='chat'><body>again</body></message>")
        .await;
    bob.expect_message().await;
    laptop.assert_none(SHORT, |e| e.name() == "message").await;
}

#[tokio::test]
async fn blocking_command() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    laptop.expect_presence_from("bob@localhost/desk").await;
    let list = laptop
        .iq("<iq type='get'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    assert_eq!(
        list.get_child("blocklist", "urn:xmpp:blocking")
            .unwrap()
            .children()
            .count(),
        0
    );

    let blocked = alice.iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block></iq>").await;
    assert_eq!(blocked.attr("type"), Some("result"));
    // The resource that fetched the list gets the push; bob sees alice go away.
    let push = laptop
        .expect(|e| e.has_child("block", "urn:xmpp:blocking"))
        .await;
    assert_eq!(
        push.get_child("block", "urn:xmpp:blocking")
            .unwrap()
            .children()
            .next()
            .unwrap()
            .attr("jid"),
        Some("bob@localhost")
    );
    bob.expect(|e| {
        e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
    })
    .await;
    alice
        .assert_none(Duration::ZERO, |e| {
            e.has_child("block", "urn:xmpp:blocking")
        })
        .await;

    bob.send("<message to='alice@localhost' type='chat' id='b1'><body>hello?</body></message>")
        .await;
    let error = bob.expect(|e| e.attr("id") == Some("b1")).await;
    assert_eq!(error_condition(&error), "service-unavailable");
    alice.assert_none(SHORT, |e| e.name() == "message").await;
    alice
        .send("<message to='bob@localhost' type='chat' id='a1'><body>hi</body></message>")
        .await;
    let refused = alice.expect(|e| e.attr("id") == Some("a1")).await;
    assert_eq!(error_condition(&refused), "not-acceptable");
    assert!(
        refused
            .get_child("error", CLIENT)
            .unwrap()
            .has_child("blocked", "urn:xmpp:blocking:errors")
    );
    bob.send("<presence><status>changed</status></presence>")
        .await;
    alice
        .assert_none(SHORT, |e| {
            e.name() == "presence" && e.attr("from") == Some("bob@localhost/desk")
        })
        .await;

    alice.iq("<iq type='set'><unblock xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></unblock></iq>").await;
    laptop
        .expect(|e| e.has_child("unblock", "urn:xmpp:blocking"))
        .await;
    // XEP-0191 3.4: bob, subscribed, sees alice's resources again at once.
    for resource in ["alice@localhost/phone", "alice@localhost/laptop"] {
        bob.expect(|e| {
            e.name() == "presence" && e.attr("type").is_none() && e.attr("from") == Some(resource)
        })
        .await;
    }
    bob.send("<message to='alice@localhost/phone' type='chat'><body>back</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "back");
    let bad = alice
        .iq("<iq type='set'><block xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    assert_eq!(error_condition(&bad), "bad-request");
}

#[tokio::test]
async fn blocking_someone_who_gets_no_presence_tells_them_nothing() {
    let server = server_with(&["alice", "mallory"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut mallory = TestClient::online(server.starttls(), "mallory", "secret", "x").await;
    alice.iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='mallory@localhost'/></block></iq>").await;
    // XEP-0191 3.3: no unavailable presence (and so no resource) to someone
    // who was not getting alice's presence.
    mallory.assert_none(SHORT, |e| e.name() == "presence").await;
    // Directed presence counts: unblocked, then sent presence, then blocked again.
    alice
        .iq("<iq type='set'><unblock xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    alice.send("<presence to='mallory@localhost/x'/>").await;
    mallory.expect_presence_from("alice@localhost/phone").await;
    alice.iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='mallory@localhost'/></block></iq>").await;
    mallory
        .expect(|e| {
            e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
        })
        .await;
}

#[tokio::test]
async fn a_probe_without_a_subscription_is_answered_unsubscribed() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let _bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    // RFC 6121 4.3.2: not subscribed, and no such account, both answered so.
    for contact in ["bob@localhost", "nobody@localhost"] {
        alice
            .send(&format!("<presence type='probe' to='{contact}'/>"))
            .await;
        let answer = alice
            .expect(|e| e.name() == "presence" && e.attr("from") == Some(contact))
            .await;
        assert_eq!(answer.attr("type"), Some("unsubscribed"), "{contact}");
    }
    alice
        .assert_none(SHORT, |e| {
            e.name() == "presence" && e.attr("from") == Some("bob@localhost/desk")
        })
        .await;
}

#[tokio::test]
async fn presence_to_a_domain_not_served_here_is_refused() {
    let server = server_with(&["alice"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    // A room at a service that does not exist: the client hears back.
    alice
        .send("<presence id='join' to='room@conference.elsewhere.example/alice'><x xmlns='http://jabber.org/protocol/muc'/></presence>")
        .await;
    let error = alice.expect(|e| e.attr("id") == Some("join")).await;
    assert_eq!(error.attr("type"), Some("error"));
    assert_eq!(error_condition(&error), "remote-server-not-found");
    // Leaving (unavailable) is not answered.
    alice
        .send("<presence id='leave' type='unavailable' to='room@conference.elsewhere.example/alice'/>")
        .await;
    alice
        .assert_none(SHORT, |e| e.attr("id") == Some("leave"))
        .await;
}

#[tokio::test]
async fn client_state_indication_holds_back_presence() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    // Whatever the handshake left in flight arrives before the client turns inactive.
    alice.assert_none(SHORT, |_| false).await;
    while alice.recv_timeout(Duration::ZERO).await.is_some() {}
    alice.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for status in ["one", "two", "three"] {
        bob.send(&format!("<presence><status>{status}</status></presence>"))
            .await;
    }
    alice.assert_none(SHORT, |e| e.name() == "presence").await;
    // A message is delivered at once, after the held presence (latest only).
    bob.send("<message to='alice@localhost' type='chat'><body>wake up</body></message>")
        .await;
    let first = alice.recv().await;
    assert_eq!(first.get_child("status", CLIENT).unwrap().text(), "three");
    assert_eq!(body(&alice.recv().await), "wake up");
    bob.send("<presence><status>four</status></presence>").await;
    alice.assert_none(SHORT, |e| e.name() == "presence").await;
    alice.send("<active xmlns='urn:xmpp:csi:0'/>").await;
    let flushed = alice.expect(|e| e.name() == "presence").await;
    assert_eq!(flushed.get_child("status", CLIENT).unwrap().text(), "four");
}

#[tokio::test]
async fn server_pings_idle_clients_and_answers_client_pings() {
    let server = TestServer::start_with(|c| {
        c.c2s.idle_timeout = 1;
        c.c2s.ping_timeout = 1;
    })
    .await;
    server.create_user("alice", "secret").await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let ping = alice.expect(|e| e.has_child("ping", "urn:xmpp:ping")).await;
    assert_eq!(ping.attr("from"), Some("localhost"));
    alice
        .send(&format!(
            "<iq type='result' id='{}' to='localhost'/>",
            ping.attr("id").unwrap()
        ))
        .await;
    // Silence after the next ping ends the stream.
    alice.expect(|e| e.has_child("ping", "urn:xmpp:ping")).await;
    assert_eq!(alice.expect_stream_error().await, "connection-timeout");
}

#[tokio::test]
async fn in_band_registration_when_enabled() {
    let server = TestServer::start_with(|c| c.accounts.registration = true).await;
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    let features = client.open().await;
    assert!(features.has_child("register", "http://jabber.org/features/iq-register"));
    let form = client
        .iq("<iq type='get'><query xmlns='jabber:iq:register'/></iq>")
        .await;
    assert!(
        form.get_child("query", "jabber:iq:register")
            .unwrap()
            .has_child("username", "jabber:iq:register")
    );
    let created = client
        .iq("<iq type='set'><query xmlns='jabber:iq:register'><username>newbie</username><password>s3cret</password></query></iq>")
        .await;
    assert_eq!(created.attr("type"), Some("result"));
    let taken = client
        .iq("<iq type='set'><query xmlns='jabber:iq:register'><username>newbie</username><password>x</password></query></iq>")
        .await;
    assert_eq!(error_condition(&taken), "conflict");
    client.authenticate_plain("newbie", "s3cret").await.unwrap();
    client.bind(Some("r")).await;
    // Password change in band.
    let changed = client
        .iq("<iq type='set' to='localhost'><query xmlns='jabber:iq:register'><username>newbie</username><password>n3w</password></query></iq>")
        .await;
    assert_eq!(changed.attr("type"), Some("result"));
    let mut again = TestClient::connect_tls(server.direct_tls()).await;
    again.open().await;
    assert!(again.authenticate_plain("newbie", "s3cret").await.is_err());
    assert!(again.authenticate_plain("newbie", "n3w").await.is_ok());
}

#[tokio::test]
async fn registration_is_off_by_default() {
    let server = TestServer::start().await;
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    let features = client.open().await;
    assert!(!features.has_child("register", "http://jabber.org/features/iq-register"));
    client.send("<iq type='set' id='r'><query xmlns='jabber:iq:register'><username>x</username><password>y</password></query></iq>").await;
    assert_eq!(client.expect_stream_error().await, "not-authorized");
}

#[tokio::test]
async fn data_survives_a_restart() {
    let server = server_with(&["alice", "bob"]).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    alice.close().await;
    bob.send(
        "<message to='alice@localhost' type='chat'><body>while you were away</body></message>",
    )
    .await;
    bob.assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    bob.close().await;
    let server = server.restart().await;
    let mut alice = TestClient::login(server.starttls(), "alice", "secret", "phone").await;
    let roster = alice
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let item = roster
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap()
        .clone();
    assert_eq!(item.attr("subscription"), Some("both"));
    alice.send("<presence/>").await;
    assert_eq!(body(&alice.expect_message().await), "while you were away");
}

/// A connection that ends gives its socket (and its TLS state and buffers)
/// back at once, even while the end of its session (unavailable presence,
/// last activity) waits for storage: after a mass disconnect thousands of
/// sessions queue for SQLite's one writer, and must not hold their sockets
/// meanwhile.
#[tokio::test]
async fn an_ended_connection_releases_its_socket_while_storage_is_busy() {
    use sqlx::Connection as _;
    let server = server_with(&["alice"]).await;
    let alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let client = alice.local_addr().expect("connected");
    let socket = server_socket(server.starttls(), client).expect("the server's socket");
    // Another writer holds SQLite's write lock: storing alice's last activity waits.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.data_dir().join("rookery.sqlite"));
    let mut lock = sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("open the database");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .expect("write lock");
    alice.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while socket_held(&socket) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds the socket of an ended connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.sessions(), 1, "the session is still ending");
    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("unlock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while server.sessions() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The inode of the server's end of the TCP connection from `client` to `server`.
fn server_socket(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<String> {
    let hex = |address: std::net::SocketAddr| match address {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => unreachable!("the test server listens on IPv4"),
    };
    let (local, remote) = (hex(server), hex(client));
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|fields| fields.len() > 9 && fields[1] == local && fields[2] == remote)
        .map(|fields| fields[9].clone())
}

/// Whether a file descriptor of this process (the in-process server's)
/// still holds the socket with this inode.
fn socket_held(inode: &str) -> bool {
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
        })
}
