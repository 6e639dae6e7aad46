//! One domain, any node: clients on different nodes of a cluster (a real NATS
//! server and a fresh PostgreSQL database, started for each test) see no
//! difference from a single node.

use std::time::Duration;

use futures::StreamExt as _;
use minidom::Element;
use rookery_test_support::proxy::TcpProxy;
use rookery_test_support::ring::ask_each_other_in_a_ring;
use rookery_test_support::{TestClient, TestCluster};

const CLIENT: &str = "jabber:client";
const ROSTER: &str = "jabber:iq:roster";
const SHORT: Duration = Duration::from_millis(400);

fn body(message: &Element) -> String {
    message
        .get_child("body", CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
}

async fn cluster(nodes: usize, users: &[&str]) -> TestCluster {
    let cluster = TestCluster::start(nodes).await;
    for user in users {
        cluster.create_user(user, "secret").await;
    }
    cluster
}

/// Neighbours in a ring on alternating nodes ask each other for
/// subscriptions at once: each roster item is changed by both users' nodes at
/// the same moment, and no change is lost (the write is conditional, the
/// per-node item locks alone did not order the two nodes' writes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_on_two_nodes_asking_each_other_at_once_end_subscribed_both_ways() {
    const USERS: usize = 30;
    let cluster = TestCluster::start(2).await;
    for n in 0..USERS {
        cluster.create_user(&format!("ring{n}"), "secret").await;
    }
    let wrong =
        ask_each_other_in_a_ring("ring", USERS, 4, |n| cluster.node(n % 2).starttls()).await;
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn subscriptions_presence_and_chat_across_nodes() {
    let cluster = cluster(3, &["alice", "bob"]).await;
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;
    // Roster pushes reach every interested resource, on any node.
    let mut laptop =
        TestClient::online(cluster.node(2).starttls(), "alice", "secret", "laptop").await;
    laptop.expect_presence_from("bob@localhost/desk").await;
    laptop.expect_presence_from("alice@localhost/phone").await;
    alice.expect_presence_from("alice@localhost/laptop").await;
    bob.expect_presence_from("alice@localhost/laptop").await;
    alice.iq("<iq type='set'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' name='Bobby'/></query></iq>").await;
    let push = laptop
        .expect(|e| e.has_child("query", ROSTER) && e.attr("type") == Some("set"))
        .await;
    let item = push
        .get_child("query", ROSTER)
        .unwrap()
        .get_child("item", ROSTER)
        .unwrap()
        .clone();
    assert_eq!(
        (item.attr("name"), item.attr("subscription")),
        (Some("Bobby"), Some("both"))
    );
    // Messages both ways, to bare and full JIDs.
    bob.send(
        "<message to='alice@localhost/laptop' type='chat'><body>to the laptop</body></message>",
    )
    .await;
    assert_eq!(body(&laptop.expect_message().await), "to the laptop");
    alice
        .send("<message to='bob@localhost' type='chat'><body>to bob</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "to bob");
    // An unclean disconnect on one node is seen on the others.
    laptop.kill();
    bob.expect(|e| {
        e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/laptop")
    })
    .await;
    alice
        .expect(|e| {
            e.attr("type") == Some("unavailable")
                && e.attr("from") == Some("alice@localhost/laptop")
        })
        .await;
}

#[tokio::test]
async fn priorities_decide_across_nodes() {
    let cluster = cluster(3, &["alice", "bob"]).await;
    let mut bob = TestClient::online(cluster.node(0).starttls(), "bob", "secret", "desk").await;
    let mut high = TestClient::login(cluster.node(1).starttls(), "alice", "secret", "high").await;
    high.send("<presence><priority>10</priority></presence>")
        .await;
    let mut low = TestClient::login(cluster.node(2).starttls(), "alice", "secret", "low").await;
    low.send("<presence><priority>1</priority></presence>")
        .await;
    high.expect(|e| e.name() == "presence" && e.attr("from") == Some("alice@localhost/low"))
        .await;
    for (resource, priority) in [("high", 10), ("low", 1)] {
        cluster
            .wait_until_every_node_sees(&format!("alice@localhost/{resource}"), |info| {
                info.available() && info.priority == priority
            })
            .await;
    }
    bob.send("<message to='alice@localhost' type='chat'><body>most available</body></message>")
        .await;
    assert_eq!(body(&high.expect_message().await), "most available");
    low.assert_none(SHORT, |e| e.name() == "message").await;
    // An iq between resources on different nodes, and its answer.
    bob.send(
        "<iq type='get' id='v' to='alice@localhost/low'><query xmlns='jabber:iq:version'/></iq>",
    )
    .await;
    let request = low.expect(|e| e.attr("id") == Some("v")).await;
    assert_eq!(request.attr("from"), Some("bob@localhost/desk"));
    low.send("<iq type='result' id='v' to='bob@localhost/desk'/>")
        .await;
    let answer = bob.expect(|e| e.attr("id") == Some("v")).await;
    assert_eq!(answer.attr("type"), Some("result"));
    let missing = bob
        .iq("<iq type='get' to='alice@localhost/none'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    assert_eq!(missing.attr("type"), Some("error"));
}

#[tokio::test]
async fn carbons_blocking_and_offline_across_nodes() {
    let cluster = cluster(3, &["alice", "bob"]).await;
    let mut bob = TestClient::online(cluster.node(0).starttls(), "bob", "secret", "desk").await;
    let mut phone =
        TestClient::online(cluster.node(1).starttls(), "alice", "secret", "phone").await;
    let mut laptop =
        TestClient::online(cluster.node(2).starttls(), "alice", "secret", "laptop").await;
    laptop
        .iq("<iq type='set'><enable xmlns='urn:xmpp:carbons:2'/></iq>")
        .await;
    cluster
        .wait_until_every_node_sees("alice@localhost/laptop", |info| {
            info.marks.contains("carbons")
        })
        .await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>carbon me</body></message>")
        .await;
    assert_eq!(body(&phone.expect_message().await), "carbon me");
    laptop
        .expect(|e| e.has_child("received", "urn:xmpp:carbons:2"))
        .await;
    phone
        .send("<message to='bob@localhost' type='chat'><body>sent from phone</body></message>")
        .await;
    bob.expect_message().await;
    laptop
        .expect(|e| e.has_child("sent", "urn:xmpp:carbons:2"))
        .await;
    // Blocking set on one node holds on every node.
    laptop
        .iq("<iq type='get'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    phone.iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block></iq>").await;
    laptop
        .expect(|e| e.has_child("block", "urn:xmpp:blocking"))
        .await;
    bob.send("<message to='alice@localhost/laptop' type='chat' id='blocked'><body>hello?</body></message>").await;
    let error = bob.expect(|e| e.attr("id") == Some("blocked")).await;
    assert_eq!(error.attr("type"), Some("error"));
    laptop.assert_none(SHORT, |e| body(e) == "hello?").await;
    phone
        .iq("<iq type='set'><unblock xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    // Offline: stored from one node, delivered on another.
    phone.close().await;
    laptop.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob.send("<message to='alice@localhost' type='chat'><body>kept for later</body></message>")
        .await;
    bob.assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    let mut later =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "later").await;
    let message = later.expect_message().await;
    assert_eq!(body(&message), "kept for later");
    assert!(message.has_child("delay", "urn:xmpp:delay"));
}

#[tokio::test]
async fn the_newer_login_wins_whatever_the_nodes() {
    let cluster = cluster(2, &["alice", "bob"]).await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    let mut first =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut second =
        TestClient::online(cluster.node(1).starttls(), "alice", "secret", "phone").await;
    assert_eq!(first.expect_stream_error().await, "conflict");
    bob.send("<message to='alice@localhost/phone' type='chat'><body>who gets it?</body></message>")
        .await;
    assert_eq!(body(&second.expect_message().await), "who gets it?");
    tokio::time::sleep(SHORT).await;
    assert_eq!(cluster.node(0).sessions(), 0);
    assert_eq!(cluster.node(1).sessions(), 2);
}

#[tokio::test]
async fn stream_management_resumes_on_another_node() {
    let cluster = cluster(2, &["alice", "bob"]).await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    let mut alice = TestClient::login(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let id = alice.enable_sm(true).await.unwrap();
    alice.send("<presence/>").await;
    alice.expect(|e| e.name() == "presence").await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>before</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "before");
    // The client fetched its block list: it gets block list pushes (XEP-0191).
    alice
        .iq("<iq type='get'><blocklist xmlns='urn:xmpp:blocking'/></iq>")
        .await;
    alice.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..3 {
        bob.send(&format!(
            "<message to='alice@localhost/phone' type='chat'><body>meanwhile {n}</body></message>"
        ))
        .await;
    }
    bob.assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    // The client comes back through the other node.
    let mut resumed = TestClient::connect(cluster.node(1).starttls()).await;
    resumed.open().await;
    resumed.starttls().await;
    resumed
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .unwrap();
    assert_eq!(resumed.resume(&id, 3).await, Ok(2));
    for n in 0..3 {
        assert_eq!(
            body(&resumed.expect_message().await),
            format!("meanwhile {n}")
        );
    }
    // It is now served by node 1: new messages go there.
    bob.send("<message to='alice@localhost/phone' type='chat'><body>after</body></message>")
        .await;
    assert_eq!(body(&resumed.expect_message().await), "after");
    tokio::time::sleep(SHORT).await;
    assert_eq!(
        (cluster.node(0).sessions(), cluster.node(1).sessions()),
        (0, 2)
    );
    bob.assert_none(Duration::ZERO, |e| e.attr("type") == Some("unavailable"))
        .await;
    // What the client asked for came along: it still gets block list pushes.
    let mut laptop =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "laptop").await;
    laptop
        .iq("<iq type='set'><block xmlns='urn:xmpp:blocking'><item jid='eve@localhost'/></block></iq>")
        .await;
    resumed
        .expect(|e| e.has_child("block", "urn:xmpp:blocking"))
        .await;
}

#[tokio::test]
async fn a_full_node_sends_new_clients_to_the_least_loaded_one() {
    let cluster = TestCluster::start_with(2, |index, config| {
        if index == 0 {
            config.cluster.as_mut().unwrap().max_sessions = 1;
        }
    })
    .await;
    cluster.create_user("alice", "secret").await;
    let _first = TestClient::online(cluster.node(0).starttls(), "alice", "secret", "one").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = TestClient::connect(cluster.node(0).starttls()).await;
    second.send(rookery_test_support::client::OPEN).await;
    let error = second.expect(|e| e.name() == "error").await;
    let redirect = error
        .get_child("see-other-host", "urn:ietf:params:xml:ns:xmpp-streams")
        .expect("see-other-host");
    assert_eq!(redirect.text(), cluster.node(1).starttls().to_string());
}

#[tokio::test]
async fn directed_presence_across_nodes() {
    let cluster = cluster(2, &["alice", "carol"]).await;
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut carol = TestClient::online(cluster.node(1).starttls(), "carol", "secret", "pc").await;
    // No subscription: presence goes only where alice sends it.
    alice
        .send("<presence to='carol@localhost/pc'><show>chat</show></presence>")
        .await;
    let directed = carol.expect_presence_from("alice@localhost/phone").await;
    assert!(directed.attr("type").is_none());
    // Her unavailable presence follows the directed one (RFC 6121 4.6.3).
    alice.kill();
    carol
        .expect(|e| {
            e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
        })
        .await;
}

#[tokio::test]
async fn a_node_that_joins_later_knows_every_session() {
    let mut cluster = cluster(1, &["alice", "bob"]).await;
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let late = cluster.add_node(|_, _| {}).await;
    let mut bob = TestClient::online(cluster.node(late).starttls(), "bob", "secret", "desk").await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>found you</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "found you");
    bob.send(
        "<iq type='get' id='p1' to='alice@localhost/phone'><ping xmlns='urn:xmpp:ping'/></iq>",
    )
    .await;
    let request = alice.expect(|e| e.attr("id") == Some("p1")).await;
    assert_eq!(request.attr("from"), Some("bob@localhost/desk"));
    alice
        .send("<iq type='result' id='p1' to='bob@localhost/desk'/>")
        .await;
    let answer = bob.expect(|e| e.attr("id") == Some("p1")).await;
    assert_eq!(answer.attr("type"), Some("result"));
}

#[tokio::test]
async fn losing_postgresql_keeps_online_chat_and_fails_the_rest_clearly() {
    // The nodes reach PostgreSQL through a proxy the test can cut.
    let admin = rookery_store_postgres::testing::admin_url();
    let server = admin
        .split_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("host:port in the PostgreSQL URL")
        .to_owned();
    let target = tokio::net::lookup_host(&server)
        .await
        .ok()
        .and_then(|mut addresses| addresses.next())
        .expect("the PostgreSQL address");
    let proxy = TcpProxy::start(target).await.expect("a proxy");
    let via = proxy.address.to_string();
    let cluster = TestCluster::start_with(2, |_, config| {
        let url = config.storage.postgres_url.take().expect("a database URL");
        config.storage.postgres_url = Some(url.replacen(&server, &via, 1));
    })
    .await;
    for user in ["alice", "bob", "carol", "dave"] {
        cluster.create_user(user, "secret").await;
    }
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.befriend(&mut bob).await;

    proxy.cut();
    // Online users keep talking, across nodes: no storage on that path.
    alice
        .send("<message to='bob@localhost' type='chat'><body>no database needed</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "no database needed");
    // What needs storage fails with a temporary error, never silently.
    alice
        .send("<message to='dave@localhost' type='chat' id='off'><body>later</body></message>")
        .await;
    let bounce = alice.expect(|e| e.attr("id") == Some("off")).await;
    let error = bounce.get_child("error", CLIENT).expect("an error");
    assert_eq!(
        error.attr("type"),
        Some("wait"),
        "{}",
        String::from(&bounce)
    );
    assert!(error.has_child(
        "internal-server-error",
        "urn:ietf:params:xml:ns:xmpp-stanzas"
    ));
    let mut carol = TestClient::connect(cluster.node(1).starttls()).await;
    carol.open().await;
    carol.starttls().await;
    assert_eq!(
        carol
            .authenticate_scram("carol", "secret", rookery_stream::ScramHash::Sha256)
            .await,
        Err("temporary-auth-failure".to_owned())
    );

    proxy.restore();
    // Back to normal without a restart.
    TestClient::online(cluster.node(1).starttls(), "carol", "secret", "pc").await;
    alice
        .send(
            "<message to='dave@localhost' type='chat' id='off2'><body>stored now</body></message>",
        )
        .await;
    alice
        .assert_none(SHORT, |e| e.attr("id") == Some("off2"))
        .await;
    let mut dave = TestClient::online(cluster.node(0).starttls(), "dave", "secret", "pc").await;
    assert_eq!(body(&dave.expect_message().await), "stored now");
}

#[tokio::test]
async fn a_node_cut_off_alone_is_cleaned_up_and_its_clients_come_back() {
    // Node 0 reaches NATS through a proxy the test cuts; node 1 does not.
    let nats = rookery_test_support::nats::NatsServer::start();
    let target = format!("127.0.0.1:{}", nats.port).parse().unwrap();
    let proxy = TcpProxy::start(target).await.expect("a proxy");
    let via = format!("nats://{}", proxy.address);
    let direct = nats.url();
    let cluster = TestCluster::start_with(2, |index, config| {
        let cluster = config.cluster.as_mut().unwrap();
        cluster.nats = vec![if index == 0 {
            via.clone()
        } else {
            direct.clone()
        }];
    })
    .await;
    for user in ["alice", "bob"] {
        cluster.create_user(user, "secret").await;
    }
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(cluster.node(1).starttls(), "bob", "secret", "desk").await;
    alice.befriend(&mut bob).await;

    proxy.cut();
    // The rest of the cluster takes node 0 for dead.
    bob.expect(|e| {
        e.attr("type") == Some("unavailable") && e.attr("from") == Some("alice@localhost/phone")
    })
    .await;
    bob.send("<message to='alice@localhost' type='chat'><body>while apart</body></message>")
        .await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>from the island</body></message>")
        .await;

    proxy.restore();
    // Back on NATS, node 0 finds its session removed and ends it.
    assert_eq!(alice.expect_stream_error().await, "internal-server-error");
    assert_eq!(body(&bob.expect_message().await), "from the island");
    let mut alice =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    assert_eq!(body(&alice.expect_message().await), "while apart");
    bob.expect_presence_from("alice@localhost/phone").await;
}

/// A presence change to many contacts spread over the nodes is one delivery
/// per other node, not one per contact session (issue 22), counted on NATS
/// itself: every delivery between nodes is published on a node's delivery
/// subject. The contacts are real sessions in the real registry, bound
/// through each node's router (no client connection each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_to_many_contacts_is_one_delivery_per_node() {
    const CONTACTS: usize = 200;
    let cluster = cluster(3, &["alice"]).await;
    let alice: jid::BareJid = "alice@localhost".parse().unwrap();
    let store = cluster.node(0).router().store();
    let mut contacts = Vec::new();
    for n in 0..CONTACTS {
        let contact: jid::BareJid = format!("contact{n}@localhost").parse().unwrap();
        let mut item = rookery_store::RosterItem::new(contact.clone());
        item.subscription = rookery_store::Subscription::Both;
        store.put_roster_item(&alice, &item).await.unwrap();
        let router = cluster.node(n % 3).router();
        let (mailbox, inbox) = rookery_cluster::Mailbox::new();
        let full = contact.with_resource_str("r").unwrap();
        let mut session = router.bind(&contact, Some(full), mailbox).await.unwrap();
        session.info.presence = Some(std::sync::Arc::new(
            format!("<presence xmlns='jabber:client' from='{}'/>", session.jid)
                .parse()
                .unwrap(),
        ));
        router.publish_route_info(&session).await;
        contacts.push((contact, session, inbox));
    }
    // Node 0 (alice's) sees every contact available.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !contacts.iter().all(|(contact, _, _)| {
        cluster
            .node(0)
            .router()
            .bus()
            .routes(contact)
            .iter()
            .any(|route| route.info.available())
    }) {
        assert!(tokio::time::Instant::now() < deadline, "registry not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut alice_client =
        TestClient::online(cluster.node(0).starttls(), "alice", "secret", "phone").await;
    for (_, _, inbox) in &mut contacts {
        expect_presence(inbox, None).await;
    }

    // A contact on node 1 whose session task is gone: skipped there, the
    // others of its batch get theirs.
    let (_, _, gone) = contacts.remove(1);
    drop(gone);

    // Counted from here: every delivery published to a node.
    let nats = async_nats::connect(cluster.nats.url()).await.unwrap();
    let mut published = nats.subscribe("rookery.deliver.>").await.unwrap();
    nats.flush().await.unwrap();
    alice_client
        .send("<presence><show>away</show></presence>")
        .await;
    for (_, _, inbox) in &mut contacts {
        expect_presence(inbox, Some("away")).await;
    }
    tokio::time::sleep(SHORT).await;
    let mut subjects = std::collections::BTreeMap::<String, usize>::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(50), published.next()).await
    {
        *subjects.entry(message.subject.to_string()).or_default() += 1;
    }
    // Nodes 1 and 2 hold two thirds of the contacts: one delivery each;
    // node 0's own contacts are handed over in process.
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(subjects.values().all(|count| *count == 1), "{subjects:?}");
}

/// Waits (at most 10 s) for a presence of alice in a contact's inbox, with
/// `show` (`None`: plain available).
async fn expect_presence(inbox: &mut rookery_cluster::Inbox, show: Option<&str>) {
    let deadline = Duration::from_secs(10);
    loop {
        let mail = tokio::time::timeout(deadline, inbox.recv())
            .await
            .expect("alice's presence within 10 s")
            .expect("an open inbox");
        let rookery_cluster::Mail::Stanza { stanza, .. } = mail else {
            continue;
        };
        if stanza.name() == "presence"
            && stanza.attr("from") == Some("alice@localhost/phone")
            && stanza.attr("to").is_some_and(|to| to.ends_with("/r"))
            && stanza
                .get_child("show", CLIENT)
                .map(|show| show.text())
                .as_deref()
                == show
        {
            return;
        }
    }
}
