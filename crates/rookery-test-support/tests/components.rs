//! External components (XEP-0114): the handshake and its errors, stanzas
//! both ways, what happens when the component is away, and a component on
//! one node of a cluster reached from another. (slixmpp's ComponentXMPP, an
//! independent implementation, runs in `interop_slixmpp.rs`.)

use std::time::Duration;

use rookery_app::Config;
use rookery_app::config::ComponentEntry;
use rookery_test_support::{TestClient, TestCluster, TestServer};

const ECHO: &str = "echo.localhost";
const SECRET: &str = "s3cret-for-tests";

fn with_echo(config: &mut Config) {
    config.components = vec![ComponentEntry {
        domain: ECHO.into(),
        secret: SECRET.into(),
    }];
}

#[tokio::test]
async fn a_component_s_stanzas_reach_users_online_and_offline_and_its_iqs_are_answered() {
    let server = TestServer::start_with(with_echo).await;
    server.create_user("alice", "pw").await;
    server.create_user("bob", "pw").await;
    let mut echo = TestClient::component(server.component(), ECHO, SECRET)
        .await
        .expect("the handshake succeeds");
    let mut alice = TestClient::online(server.starttls(), "alice", "pw", "a").await;

    // The server's disco items list it.
    let items = alice
        .iq("<iq type='get' to='localhost'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
        .await;
    let listed: Vec<_> = items
        .get_child("query", "http://jabber.org/protocol/disco#items")
        .unwrap()
        .children()
        .filter_map(|item| item.attr("jid"))
        .collect();
    assert_eq!(listed, [ECHO]);

    // A request from a client reaches the component, and its answer the client.
    alice
        .send("<iq to='echo.localhost' type='get' id='v1'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let request = echo.expect(|e| e.name() == "iq").await;
    assert_eq!(request.attr("from"), Some("alice@localhost/a"));
    echo.send(&format!(
        "<iq from='echo.localhost' to='alice@localhost/a' type='result' id='{}'><query xmlns='jabber:iq:version'><name>Echo</name></query></iq>",
        request.attr("id").unwrap()
    ))
    .await;
    let answer = alice.expect(|e| e.name() == "iq").await;
    assert_eq!(answer.attr("type"), Some("result"));
    assert_eq!(answer.attr("from"), Some(ECHO));

    // The component asks the server and an account, as any entity may.
    echo.send("<iq from='echo.localhost' to='localhost' type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let pong = echo.expect(|e| e.attr("id") == Some("p1")).await;
    assert_eq!(pong.attr("type"), Some("result"));
    echo.send("<iq from='echo.localhost' to='alice@localhost' type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let refused = echo.expect(|e| e.attr("id") == Some("r1")).await;
    assert_eq!(
        refused.attr("type"),
        Some("error"),
        "a roster is its owner's"
    );

    // A message to someone offline is stored, and delivered at login.
    echo.send("<message from='news@echo.localhost' to='bob@localhost' type='chat'><body>while you were out</body></message>")
        .await;
    echo.send("<message from='news@echo.localhost' to='nobody@localhost' type='chat'><body>?</body></message>")
        .await;
    let bounced = echo.expect(|e| e.name() == "message").await;
    assert_eq!(bounced.attr("type"), Some("error"), "no such account");
    assert_eq!(bounced.attr("to"), Some("news@echo.localhost"));
    let mut bob = TestClient::online(server.starttls(), "bob", "pw", "b").await;
    let stored = bob.expect_message().await;
    assert_eq!(stored.attr("from"), Some("news@echo.localhost"));

    // Presence: a subscription request from the component reaches the user;
    // the user's approval reaches the component, and so does presence.
    echo.send("<presence from='echo.localhost' to='bob@localhost' type='subscribe'/>")
        .await;
    let request = bob.expect(|e| e.name() == "presence").await;
    assert_eq!(request.attr("type"), Some("subscribe"));
    assert_eq!(request.attr("from"), Some(ECHO));
    bob.send("<presence to='echo.localhost' type='subscribed'/>")
        .await;
    let approved = echo
        .expect(|e| e.name() == "presence" && e.attr("type") == Some("subscribed"))
        .await;
    assert_eq!(approved.attr("from"), Some("bob@localhost"));
    let current = echo
        .expect(|e| e.name() == "presence" && e.attr("type").is_none())
        .await;
    assert_eq!(current.attr("from"), Some("bob@localhost/b"));

    // Gone: messages and requests to it get service-unavailable.
    echo.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.router().component_connected(&ECHO.parse().unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the component leaves"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice
        .send("<message to='echo.localhost' type='chat' id='m9'><body>hello?</body></message>")
        .await;
    let error = alice.expect(|e| e.attr("id") == Some("m9")).await;
    assert_eq!(error.attr("type"), Some("error"));
    assert!(
        error
            .get_child("error", "jabber:client")
            .and_then(|e| e.get_child("service-unavailable", "urn:ietf:params:xml:ns:xmpp-stanzas"))
            .is_some(),
        "{}",
        String::from(&error)
    );
}

#[tokio::test]
async fn handshake_errors_get_their_stream_errors() {
    let server = TestServer::start_with(with_echo).await;
    let address = server.component();
    assert_eq!(
        TestClient::component(address, ECHO, "guess").await.err(),
        Some("not-authorized".into())
    );
    assert_eq!(
        TestClient::component(address, "other.localhost", SECRET)
            .await
            .err(),
        Some("host-unknown".into())
    );
    let mut first = TestClient::component(address, ECHO, SECRET).await.unwrap();
    assert_eq!(
        TestClient::component(address, ECHO, SECRET).await.err(),
        Some("conflict".into()),
        "one connection per domain"
    );
    // The first one is unharmed, and may not speak for anyone else.
    first
        .send("<iq from='echo.localhost' to='localhost' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    first.expect(|e| e.attr("id") == Some("p")).await;
    first
        .send("<message from='alice@localhost' to='bob@localhost'><body>forged</body></message>")
        .await;
    assert_eq!(first.expect_stream_error().await, "invalid-from");
    // Once it is gone, the domain may connect again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match TestClient::component(address, ECHO, SECRET).await {
            Ok(_) => break,
            Err(condition) => {
                assert_eq!(condition, "conflict");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the domain frees up"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn a_component_on_one_node_is_reached_from_another() {
    let cluster = TestCluster::start_with(2, |_, config| with_echo(config)).await;
    cluster.create_user("alice", "pw").await;
    let mut echo = TestClient::component(cluster.node(0).component(), ECHO, SECRET)
        .await
        .expect("the handshake succeeds");
    let domain: jid::BareJid = ECHO.parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cluster.node(1).router().component_connected(&domain) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 learns of the component"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second connection, on the other node, is refused too.
    assert_eq!(
        TestClient::component(cluster.node(1).component(), ECHO, SECRET)
            .await
            .err(),
        Some("conflict".into())
    );
    let mut alice = TestClient::online(cluster.node(1).starttls(), "alice", "pw", "a").await;
    for n in 0..20 {
        alice
            .send(&format!(
                "<message to='echo.localhost' type='chat'><body>m{n}</body></message>"
            ))
            .await;
    }
    for n in 0..20 {
        let message = echo.expect(|e| e.name() == "message").await;
        let body = format!("m{n}");
        assert_eq!(
            message.get_child("body", "jabber:client").map(|b| b.text()),
            Some(body.clone()),
            "in order"
        );
        echo.send(&format!(
            "<message from='echo.localhost' to='alice@localhost/a' type='chat'><body>echo {body}</body></message>"
        ))
        .await;
    }
    for n in 0..20 {
        let reply = alice.expect_message().await;
        assert_eq!(
            reply.get_child("body", "jabber:client").map(|b| b.text()),
            Some(format!("echo m{n}"))
        );
    }
}

#[tokio::test]
async fn users_see_and_block_the_component_s_addresses_one_by_one() {
    let server = TestServer::start_with(with_echo).await;
    server.create_user("alice", "pw").await;
    let mut alice = TestClient::online(server.starttls(), "alice", "pw", "a").await;
    let mut echo = TestClient::component(server.component(), ECHO, SECRET)
        .await
        .expect("the handshake succeeds");

    // Blocking one address at the component leaves the others through.
    let blocked = alice
        .iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='spammer@echo.localhost'/></block></iq>")
        .await;
    assert_eq!(blocked.attr("type"), Some("result"));
    for (from, id) in [
        ("spammer@echo.localhost/x", "s1"),
        ("friend@echo.localhost/x", "f1"),
    ] {
        echo.send(&format!(
            "<iq from='{from}' to='alice@localhost/a' type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await;
    }
    let refused = echo.expect(|e| e.attr("id") == Some("s1")).await;
    assert_eq!(refused.attr("type"), Some("error"));
    let ping = alice.expect(|e| e.name() == "iq").await;
    assert_eq!(ping.attr("id"), Some("f1"), "only the friend's iq arrives");

    // Directed presence from an address at the component: when the
    // component goes, that address is seen going.
    echo.send("<presence from='friend@echo.localhost/x' to='alice@localhost/a'/>")
        .await;
    let available = alice.expect_presence_from("friend@echo.localhost/x").await;
    assert_eq!(available.attr("type"), None);
    echo.close().await;
    let unavailable = alice.expect_presence_from("friend@echo.localhost/x").await;
    assert_eq!(unavailable.attr("type"), Some("unavailable"));
}
