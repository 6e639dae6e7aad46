//! One domain, any node: clients on different nodes of a cluster (NATS and
//! PostgreSQL started for the test) see no difference from a single node.

use std::time::Duration;

use minidom::Element;
use rookery_test_support::{TestClient, TestCluster};

const CLIENT: &str = "jabber:client";

fn body(message: &Element) -> String {
    message
        .get_child("body", CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
}

#[tokio::test]
async fn chat_and_presence_across_nodes() {
    let cluster = TestCluster::start(2).await;
    for user in ["alice", "bob"] {
        cluster.create_user(user, "secret").await;
    }
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    alice
        .send("<presence type='subscribe' to='bob@localhost'/>")
        .await;
    bob.expect(|e| e.attr("type") == Some("subscribe")).await;
    bob.send("<presence type='subscribed' to='alice@localhost'/>")
        .await;
    alice.expect_presence_from("bob@localhost/desk").await;
    bob.send("<message to='alice@localhost' type='chat'><body>across the cluster</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "across the cluster");
    alice
        .send("<message to='bob@localhost/desk' type='chat'><body>and back</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "and back");
    let _ = Duration::ZERO;
}
