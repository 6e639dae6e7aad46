//! Stream management (XEP-0198) over real connections: acknowledgements,
//! resumption, and what happens to unacknowledged stanzas when a session ends.

use std::time::Duration;

use minidom::Element;
use rookery_test_support::{TestClient, TestServer};

const SHORT: Duration = Duration::from_millis(300);

fn body(message: &Element) -> String {
    message
        .get_child("body", "jabber:client")
        .map(|b| b.text())
        .unwrap_or_default()
}

async fn server(resume_timeout: u64) -> TestServer {
    let server = TestServer::start_with(|c| c.c2s.resume_timeout = resume_timeout).await;
    for user in ["alice", "bob"] {
        server.create_user(user, "secret").await;
    }
    server
}

/// Logs in as alice/phone with resumable stream management and sends presence.
async fn resumable_alice(server: &TestServer) -> (TestClient, String) {
    let mut alice = TestClient::login(server.starttls(), "alice", "secret", "phone").await;
    let id = alice.enable_sm(true).await.expect("resumable");
    alice.send("<presence/>").await;
    alice.expect(|e| e.name() == "presence").await;
    (alice, id)
}

async fn resume(server: &TestServer, previd: &str, h: u32) -> (TestClient, Result<u32, String>) {
    let mut client = TestClient::connect(server.starttls()).await;
    client.open().await;
    client.starttls().await;
    client
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .unwrap();
    let result = client.resume(previd, h).await;
    (client, result)
}

#[tokio::test]
async fn acks_count_handled_stanzas_both_ways() {
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let (mut alice, _) = resumable_alice(&server).await;
    for n in 0..3 {
        alice
            .send(&format!(
                "<message to='bob@localhost/desk' id='a{n}'><body>{n}</body></message>"
            ))
            .await;
    }
    alice.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    let ack = alice.expect(|e| e.name() == "a").await;
    assert_eq!(ack.attr("h"), Some("4"), "presence and three messages");
    for n in 0..3 {
        bob.expect(|e| e.attr("id") == Some(&format!("a{n}"))).await;
    }
    // The server asks for acks of what it sends.
    bob.send("<message to='alice@localhost/phone'><body>x</body></message>")
        .await;
    alice.expect_message().await;
    alice.expect(|e| e.name() == "r").await;
}

#[tokio::test]
async fn a_dropped_session_resumes_with_what_arrived_meanwhile() {
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    bob.iq(
        "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='alice@localhost'/></query></iq>",
    )
    .await;
    let (mut alice, id) = resumable_alice(&server).await;
    bob.send("<message to='alice@localhost' type='chat'><body>before</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "before");
    alice.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..3 {
        bob.send(&format!(
            "<message to='alice@localhost' type='chat'><body>meanwhile {n}</body></message>"
        ))
        .await;
    }
    bob.assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(server.sessions(), 2, "the session waits for the client");
    // alice had handled her presence echo and "before" (h=2).
    let (mut alice, resumed) = resume(&server, &id, 2).await;
    assert_eq!(resumed, Ok(1), "the server handled alice's presence");
    for n in 0..3 {
        assert_eq!(
            body(&alice.expect_message().await),
            format!("meanwhile {n}")
        );
    }
    alice.assert_none(SHORT, |e| body(e) == "before").await;
    // The session goes on as before.
    alice
        .send("<message to='bob@localhost/desk' type='chat'><body>back</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "back");
    assert_eq!(server.sessions(), 2);
}

#[tokio::test]
async fn resuming_from_a_new_connection_takes_over_a_half_dead_one() {
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let (mut old, id) = resumable_alice(&server).await;
    bob.send("<message to='alice@localhost/phone'><body>unacked</body></message>")
        .await;
    assert_eq!(body(&old.expect_message().await), "unacked");
    // The old connection is still open when the client resumes elsewhere.
    let (mut alice, resumed) = resume(&server, &id, 1).await;
    assert!(resumed.is_ok());
    assert_eq!(
        body(&alice.expect_message().await),
        "unacked",
        "retransmitted, since it was not acknowledged"
    );
    assert_eq!(old.expect_stream_error().await, "conflict");
}

#[tokio::test]
async fn unknown_resumption_ids_fail_and_the_client_can_bind() {
    let server = server(60).await;
    let (alice, id) = resumable_alice(&server).await;
    let (mut other, result) = resume(&server, "no-such-id", 0).await;
    assert_eq!(result, Err("item-not-found".into()));
    other.bind(Some("fresh")).await;
    drop(alice);
    let _ = id;
}

#[tokio::test]
async fn an_expired_session_sends_its_unacked_messages_to_offline_storage() {
    let server = server(1).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    bob.iq(
        "<iq type='set'><query xmlns='jabber:iq:roster'><item jid='alice@localhost'/></query></iq>",
    )
    .await;
    let (mut alice, _) = resumable_alice(&server).await;
    bob.send("<message to='alice@localhost' type='chat'><body>never acked</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "never acked");
    alice.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    bob.send("<message to='alice@localhost' type='chat'><body>while hibernating</body></message>")
        .await;
    // After the resumption timeout the session ends.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(server.sessions(), 1);
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let mut bodies = vec![
        body(&alice.expect_message().await),
        body(&alice.expect_message().await),
    ];
    bodies.sort();
    assert_eq!(bodies, ["never acked", "while hibernating"]);
}

#[tokio::test]
async fn unacked_stanzas_of_a_closed_session_go_to_the_other_resources() {
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let (mut phone, _) = resumable_alice(&server).await;
    bob.send(
        "<message to='alice@localhost/phone' type='chat'><body>for the phone</body></message>",
    )
    .await;
    assert_eq!(body(&phone.expect_message().await), "for the phone");
    // A clean close ends the session; the phone never acknowledged the message.
    phone.close().await;
    let rerouted = laptop.expect_message().await;
    assert_eq!(body(&rerouted), "for the phone");
}

#[tokio::test]
async fn without_stream_management_queued_mail_is_not_lost_on_close() {
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let mut phone = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    phone.send("</stream:stream>").await;
    // Sent while the phone's session is closing: it ends up on the laptop, not nowhere.
    for n in 0..20 {
        bob.send(&format!(
            "<message to='alice@localhost/phone' type='chat' id='c{n}'><body>{n}</body></message>"
        ))
        .await;
    }
    let mut received = 0;
    while let Some(message) = phone.recv_timeout(SHORT).await {
        if message.name() == "message" {
            received += 1;
        }
    }
    while let Some(message) = laptop.recv_timeout(Duration::from_secs(1)).await {
        if message.name() == "message" {
            received += 1;
        }
    }
    assert_eq!(
        received, 20,
        "every message reached one of alice's resources"
    );
}

#[tokio::test]
async fn a_resumed_session_keeps_what_its_client_asked_for() {
    // XEP-0191: a client that fetched its block list gets the pushes; resumed
    // (XEP-0198), the session is the same one and still gets them.
    let server = server(60).await;
    let (mut alice, id) = resumable_alice(&server).await;
    alice
        .iq("<iq type='get'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    alice.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // alice had handled her presence echo and the block list (h=2).
    let (mut alice, resumed) = resume(&server, &id, 2).await;
    assert!(resumed.is_ok(), "{resumed:?}");
    let mut laptop = TestClient::online(server.starttls(), "alice", "secret", "laptop").await;
    let blocked = laptop
        .iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block></iq>")
        .await;
    assert_eq!(blocked.attr("type"), Some("result"));
    alice
        .expect(|e| e.has_child("block", "urn:xmpp:blocking"))
        .await;
}

#[tokio::test]
async fn a_resumed_session_is_still_inactive() {
    // XEP-0352 state is the csi module's per-session state: it moves with
    // the session to the resuming connection.
    let server = server(60).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let (mut alice, id) = resumable_alice(&server).await;
    alice.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    alice.send("<r xmlns='urn:xmpp:sm:3'/>").await;
    alice.expect(|e| e.name() == "a").await;
    alice.kill();
    let (mut alice, resumed) = resume(&server, &id, 1).await;
    resumed.expect("resumed");
    for status in ["one", "two"] {
        bob.send(&format!(
            "<presence to='alice@localhost/phone'><status>{status}</status></presence>"
        ))
        .await;
    }
    alice.assert_none(SHORT, |e| e.name() == "presence").await;
    alice.send("<active xmlns='urn:xmpp:csi:0'/>").await;
    let held = alice.expect(|e| e.name() == "presence").await;
    assert_eq!(
        held.get_child("status", "jabber:client").map(|s| s.text()),
        Some("two".into()),
        "the latest, held until the client was active again"
    );
}
