//! The bench's client against a Rookery server, where its behaviour decides
//! what a scenario counts.

use rookery_bench::client::{Connection, Target, TlsMode, Transport};
use rookery_test_support::{TestClient, TestServer};

/// A session can be sent messages as soon as it is bound, before its next
/// request (enabling stream management, in the reliable chat) is answered.
/// Those messages are delivered; a client that passed over them while
/// waiting would count them lost.
#[tokio::test]
async fn messages_passed_over_while_waiting_for_an_answer_are_kept() {
    let server = TestServer::start().await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let target = Target {
        address: server.starttls(),
        domain: "localhost".into(),
        tls: TlsMode::Starttls,
        transport: Transport::Tcp,
        mechanism: "SCRAM-SHA-256".into(),
        sources: Vec::new(),
        receive_buffer: None,
    };
    let mut alice = Connection::authenticate(&target, 0, "alice", "secret")
        .await
        .expect("alice logs in");
    alice.keep_messages();
    alice.bind("phone").await.expect("alice binds");
    assert!(alice.take_kept().is_empty());

    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>early</body></message>")
        .await;
    // Once bob's ping is answered, his message is on its way to alice ahead
    // of anything she asks for next.
    bob.iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;

    alice
        .send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await
        .expect("sent");
    alice
        .until(|e| e.attr("id") == Some("p1"))
        .await
        .expect("ping answered");
    let kept = alice.take_kept();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        kept[0].get_child("body", "jabber:client").map(|b| b.text()),
        Some("early".into())
    );
    assert!(alice.take_kept().is_empty(), "taken once");
}
