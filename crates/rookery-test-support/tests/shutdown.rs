//! Clean shutdown: streams end with `system-shutdown`, nothing unacknowledged is lost.

use std::time::Duration;

use rookery_test_support::{TestClient, TestServer};

#[tokio::test]
async fn shutdown_closes_streams_and_keeps_unacked_messages_offline() {
    let mut server = TestServer::start().await;
    for user in ["alice", "bob"] {
        server.create_user(user, "secret").await;
    }
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut alice = TestClient::login(server.starttls(), "alice", "secret", "phone").await;
    alice.enable_sm(true).await;
    alice.send("<presence/>").await;
    alice.expect(|e| e.name() == "presence").await;
    for n in 0..5 {
        bob.send(&format!(
            "<message to='alice@localhost' type='chat' id='s{n}'><body>{n}</body></message>"
        ))
        .await;
    }
    for _ in 0..5 {
        alice.expect_message().await;
    }
    // Alice never acknowledges; the server stops.
    server.stop().await;
    assert_eq!(alice.expect_stream_error().await, "system-shutdown");
    assert_eq!(bob.expect_stream_error().await, "system-shutdown");
    let server = server.restart().await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(alice.expect_message().await.attr("id").unwrap().to_owned());
    }
    ids.sort();
    assert_eq!(ids, ["s0", "s1", "s2", "s3", "s4"]);
    alice
        .assert_none(Duration::from_millis(300), |e| e.name() == "message")
        .await;
}
