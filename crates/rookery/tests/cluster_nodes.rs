//! A cluster of `rookery serve` processes on a real NATS server and a fresh
//! PostgreSQL database: nodes killed without warning, stopped for a restart,
//! restarted one after another under traffic; nothing the server acknowledged
//! is lost.

use std::path::Path;
use std::time::{Duration, Instant};

use minidom::Element;
use rookery_bench::check::strip_ansi;
use rookery_bench::client::{Target, TlsMode, Transport};
use rookery_bench::reliable::{Chat, Report, Settings};
use rookery_test_support::TestClient;
use rookery_test_support::haproxy::HaProxy;
use rookery_test_support::nats::{NatsCluster, NatsServer};
use rookery_test_support::process::{NodeProcess, ProcessCluster, http_status};

const CLIENT: &str = "jabber:client";
const STREAMS: &str = "http://etherx.jabber.org/streams";
const SHORT: Duration = Duration::from_millis(500);
/// The failure timeout of the test clusters (`cluster_config`).
const FAILURE_TIMEOUT: Duration = Duration::from_secs(2);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_rookery"))
}

fn body(message: &Element) -> String {
    message
        .get_child("body", CLIENT)
        .map(|b| b.text())
        .unwrap_or_default()
}

fn unavailable_from(jid: &str) -> impl Fn(&Element) -> bool + '_ {
    move |e| {
        e.name() == "presence"
            && e.attr("type") == Some("unavailable")
            && e.attr("from") == Some(jid)
    }
}

fn names(prefix: &str, count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("{prefix}{n}")).collect()
}

fn chat_settings(cluster: &ProcessCluster, users: Vec<String>, rate: f64) -> Settings {
    Settings {
        nodes: cluster.addresses(),
        target: Target {
            address: cluster.addresses()[0],
            domain: "localhost".into(),
            tls: TlsMode::Starttls,
            transport: Transport::Tcp,
            mechanism: "SCRAM-SHA-256".into(),
            sources: Vec::new(),
            receive_buffer: None,
        },
        users,
        password: "secret".into(),
        resource: "chat".into(),
        rate,
        login_concurrency: 20,
        login_timeout: Duration::from_secs(120),
    }
}

fn assert_nothing_lost(report: &Report) {
    println!("{report}");
    assert!(report.sent > 0, "nothing was sent: {report}");
    assert_eq!(report.lost, 0, "acknowledged messages were lost: {report}");
    assert_eq!(
        report.unconfirmed, 0,
        "messages were never confirmed: {report}"
    );
    assert_eq!(report.misdelivered, 0, "{report}");
    assert_eq!(report.bounced, 0, "{report}");
    assert_eq!(report.acknowledged, report.sent, "{report}");
}

#[tokio::test]
async fn a_killed_node_is_cleaned_up_and_its_sessions_stay_gone() {
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, _| {}).await;
    cluster.create_users(&["alice".into(), "bob".into(), "dave".into()], "secret");
    let (doomed, survivor) = (cluster.nodes[0].starttls, cluster.nodes[1].starttls);
    let mut bob = TestClient::online(survivor, "bob", "secret", "desk").await;
    let mut phone = TestClient::online(doomed, "alice", "secret", "phone").await;
    phone.befriend(&mut bob).await;
    let mut laptop = TestClient::online(survivor, "alice", "secret", "laptop").await;
    bob.expect_presence_from("alice@localhost/laptop").await;
    let mut dave = TestClient::online(doomed, "dave", "secret", "pc").await;
    dave.befriend(&mut bob).await;

    let killed = Instant::now();
    cluster.nodes[0].kill();
    drop((phone, dave));
    bob.expect(unavailable_from("alice@localhost/phone")).await;
    bob.expect(unavailable_from("dave@localhost/pc")).await;
    let failover = killed.elapsed();
    println!("contacts saw the killed node's users go unavailable after {failover:?}");
    assert!(
        failover < FAILURE_TIMEOUT + Duration::from_secs(3),
        "failover took {failover:?}"
    );

    // Their messages go to the user's other resource, or to offline storage.
    bob.send("<message to='alice@localhost/phone' type='chat'><body>to the phone</body></message>")
        .await;
    assert_eq!(body(&laptop.expect_message().await), "to the phone");
    bob.send("<message to='dave@localhost/pc' type='chat'><body>for dave</body></message>")
        .await;

    // The node comes back under the same name: its old sessions stay gone.
    cluster.nodes[0].restart().await;
    bob.assert_none(Duration::from_secs(1), |e| {
        e.name() == "presence" && e.attr("from") == Some("alice@localhost/phone")
    })
    .await;
    bob.send("<message to='alice@localhost/phone' type='chat'><body>still gone?</body></message>")
        .await;
    assert_eq!(body(&laptop.expect_message().await), "still gone?");
    let mut dave = TestClient::online(cluster.nodes[0].starttls, "dave", "secret", "pc").await;
    assert_eq!(body(&dave.expect_message().await), "for dave");
    let roster = laptop
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    assert!(String::from(&roster).contains("bob@localhost"));
}

/// The address of a `see-other-host` stream error, once the stream ended with it.
async fn expect_redirect(client: &mut TestClient) -> String {
    let error = client.expect(|e| e.is("error", STREAMS)).await;
    let condition = error
        .get_child("see-other-host", "urn:ietf:params:xml:ns:xmpp-streams")
        .unwrap_or_else(|| panic!("not a redirect: {}", String::from(&error)));
    client.expect_closed().await;
    condition.text()
}

#[tokio::test]
async fn sigterm_redirects_clients_and_hands_over_what_they_did_not_acknowledge() {
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, _| {}).await;
    cluster.nodes[0].import_users("alice secret\nbob secret\ndave secret\n");
    let (stopping, staying) = (cluster.nodes[0].starttls, cluster.nodes[1].starttls);
    let mut bob = TestClient::online(staying, "bob", "secret", "desk").await;
    let mut laptop = TestClient::online(staying, "alice", "secret", "laptop").await;
    // The phone and dave take messages under stream management and never acknowledge them.
    let mut phone = TestClient::online(stopping, "alice", "secret", "phone").await;
    let phone_id = phone.enable_sm(true).await.expect("resumable");
    let mut dave = TestClient::online(stopping, "dave", "secret", "pc").await;
    dave.enable_sm(true).await;
    for n in 0..10 {
        bob.send(&format!(
            "<message to='alice@localhost/phone' type='chat'><body>phone {n}</body></message>"
        ))
        .await;
        bob.send(&format!(
            "<message to='dave@localhost/pc' type='chat'><body>dave {n}</body></message>"
        ))
        .await;
    }
    for n in 0..10 {
        let message = phone.expect_message().await;
        assert_eq!(body(&message), format!("phone {n}"));
        assert_eq!(body(&dave.expect_message().await), format!("dave {n}"));
    }

    cluster.nodes[0].terminate();
    let target = staying.to_string();
    assert_eq!(expect_redirect(&mut phone).await, target);
    assert_eq!(expect_redirect(&mut dave).await, target);
    let status = cluster.nodes[0]
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the node stops");
    assert!(status.success(), "exit status {status}");

    // The phone's unacknowledged messages went to alice's other resource...
    for n in 0..10 {
        assert_eq!(body(&laptop.expect_message().await), format!("phone {n}"));
    }
    // ... and dave's to offline storage, his on the node he was sent to.
    let mut dave = TestClient::login(staying, "dave", "secret", "pc").await;
    dave.send("<presence/>").await;
    for n in 0..10 {
        assert_eq!(body(&dave.expect_message().await), format!("dave {n}"));
    }
    dave.assert_none(SHORT, |e| e.name() == "message").await;
    // The session ended with its node: resuming it fails cleanly, binding works.
    let mut phone = TestClient::connect(staying).await;
    phone.open().await;
    phone.starttls().await;
    phone
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .expect("login");
    assert_eq!(
        phone.resume(&phone_id, 0).await,
        Err("item-not-found".to_owned())
    );
    phone.bind(Some("phone")).await;
    laptop.assert_none(SHORT, |e| e.name() == "message").await;
}

#[tokio::test]
async fn a_rolling_restart_under_traffic_loses_nothing() {
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 3, |_, _| {}).await;
    let users = names("roll", 60);
    cluster.create_users(&users, "secret");
    let chat = Chat::start(chat_settings(&cluster, users, 60.0))
        .await
        .expect("everyone logs in");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in &mut cluster.nodes {
        node.terminate();
        let status = node.wait_exit(Duration::from_secs(30)).await;
        assert!(status.is_some_and(|s| s.success()), "{status:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        node.restart().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let report = chat.finish(Duration::from_secs(60)).await;
    assert_nothing_lost(&report);
    assert!(report.redirected > 0, "no client was redirected: {report}");
}

#[tokio::test]
async fn no_acknowledged_message_is_lost_when_a_node_is_killed() {
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 3, |_, _| {}).await;
    let users = names("user", 300);
    cluster.create_users(&users, "secret");
    let chat = Chat::start(chat_settings(&cluster, users, 150.0))
        .await
        .expect("everyone logs in");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = chat.ledger().sent();
    cluster.nodes[1].kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(chat.ledger().sent() > before, "sending stopped");
    let report = chat.finish(Duration::from_secs(90)).await;
    println!(
        "no-loss: sent {} acknowledged {} delivered {} duplicated {} lost {}",
        report.sent, report.acknowledged, report.delivered, report.duplicated, report.lost
    );
    assert_nothing_lost(&report);
    assert!(
        report.reconnects >= 100,
        "the killed node's clients did not reconnect: {report}"
    );
}

#[tokio::test]
async fn losing_one_of_three_nats_servers_does_not_interrupt_service() {
    let mut nats = NatsCluster::start(3);
    let cluster = on_three_nats_servers(&nats, 2).await;
    let users = names("user", 40);
    cluster.create_users(&users, "secret");
    cluster.nodes[0].import_users("alice secret\nbob secret\n");
    let chat = Chat::start(chat_settings(&cluster, users, 40.0))
        .await
        .expect("everyone logs in");
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.servers[0].kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // New clients still log in on every node and reach each other.
    let mut alice = TestClient::online(cluster.nodes[0].starttls, "alice", "secret", "a").await;
    let mut bob = TestClient::online(cluster.nodes[1].starttls, "bob", "secret", "b").await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>still here</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "still here");
    let report = chat.finish(Duration::from_secs(60)).await;
    assert_nothing_lost(&report);
    assert_eq!(report.reconnects, 0, "clients were disconnected: {report}");
}

/// `size` nodes on a three-server NATS cluster, with three replicas.
async fn on_three_nats_servers(nats: &NatsCluster, size: usize) -> ProcessCluster {
    ProcessCluster::start(binary(), nats.urls(), size, |_, config| {
        if let Some(cluster) = &mut config.cluster {
            cluster.nats_replicas = 3;
        }
    })
    .await
}

/// Waits until `GET /ready` on `node` answers `status`.
async fn wait_ready_status(node: &NodeProcess, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while http_status(node.http, "/ready").await != Some(status) {
        assert!(
            Instant::now() < deadline,
            "{} did not answer {status} on /ready",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_node_cut_off_from_nats_serves_locally_stores_the_rest_and_recovers() {
    let mut nats = NatsServer::start();
    let cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, _| {}).await;
    cluster.nodes[0].import_users("alice secret\nbob secret\ncarol secret\ndave secret\n");
    let (cut, other) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut alice = TestClient::online(cut.starttls, "alice", "secret", "a").await;
    alice.enable_sm(true).await;
    let mut bob = TestClient::online(cut.starttls, "bob", "secret", "b").await;
    let mut carol = TestClient::online(other.starttls, "carol", "secret", "c").await;

    nats.kill();
    wait_ready_status(cut, 503, Duration::from_secs(10)).await;
    // No new sessions while the node cannot reach its cluster.
    let mut newcomer = TestClient::connect(cut.starttls).await;
    assert_eq!(newcomer.expect_stream_error().await, "resource-constraint");
    // Sessions on the node still talk to each other.
    alice
        .send("<message to='bob@localhost' type='chat'><body>local</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "local");
    // What cannot be routed is kept, and acknowledged.
    alice
        .send("<message to='carol@localhost' type='chat'><body>while cut off</body></message><r xmlns='urn:xmpp:sm:3'/>")
        .await;
    let ack = alice
        .expect(|e| e.name() == "a" && e.has_ns("urn:xmpp:sm:3"))
        .await;
    assert_eq!(ack.attr("h"), Some("2"), "both messages acknowledged");

    // Longer than the failure timeout: the nodes lose sight of each other,
    // and must not clean each other up when NATS is back.
    tokio::time::sleep(FAILURE_TIMEOUT + Duration::from_secs(1)).await;
    nats.restart();
    wait_ready_status(cut, 200, Duration::from_secs(30)).await;
    assert_eq!(body(&carol.expect_message().await), "while cut off");
    // Everything works again: new logins, routing both ways.
    let mut dave = TestClient::online(cut.starttls, "dave", "secret", "d").await;
    carol
        .send("<message to='dave@localhost' type='chat'><body>welcome back</body></message>")
        .await;
    assert_eq!(body(&dave.expect_message().await), "welcome back");
    carol
        .send("<message to='alice@localhost' type='chat'><body>and you</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "and you");
}

#[tokio::test]
async fn nats_back_with_an_empty_store_heals_every_node_without_a_restart() {
    let mut nats = NatsServer::start();
    let cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, _| {}).await;
    cluster.create_users(&names("empty", 4), "secret");
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut alice = TestClient::online(first.starttls, "empty1", "secret", "a").await;
    let mut bob = TestClient::online(second.starttls, "empty2", "secret", "b").await;

    nats.restart_empty();
    // Until the cluster's state is back, a node that cannot bind sessions
    // says so; then both heal by themselves.
    for node in [first, second] {
        wait_ready_status(node, 200, Duration::from_secs(20)).await;
    }
    // Each node notices (a moment after the first) and registers its sessions anew.
    wait_state_back(&[first, second], &[0, 0], Duration::from_secs(15)).await;
    // Sessions from before the loss are registered anew: routing works both ways.
    alice
        .send("<message to='empty2@localhost/b' type='chat'><body>across</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "across");
    bob.send("<message to='empty1@localhost/a' type='chat'><body>back</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "back");
    // New logins bind on both nodes and reach each other.
    let mut carol = TestClient::online(first.starttls, "empty3", "secret", "c").await;
    let mut dave = TestClient::online(second.starttls, "empty4", "secret", "d").await;
    carol
        .send("<message to='empty4@localhost/d' type='chat'><body>new</body></message>")
        .await;
    assert_eq!(body(&dave.expect_message().await), "new");
    dave.send("<message to='empty3@localhost/c' type='chat'><body>hello</body></message>")
        .await;
    assert_eq!(body(&carol.expect_message().await), "hello");
}

/// Makes the session registry again as a peer that noticed the loss first
/// does: the bucket's stream, holding one entry that is not this test's
/// nodes' (a peer registers its own sessions there at once).
async fn registry_made_by_a_peer(urls: &[String]) {
    use async_nats::jetstream::stream;
    let servers: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|url| url.parse().expect("a NATS URL"))
        .collect();
    let client = async_nats::connect(servers).await.expect("NATS answers");
    let jetstream = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let made = jetstream
            .get_or_create_stream(stream::Config {
                name: "KV_rookery_sessions".into(),
                subjects: vec!["$KV.rookery_sessions.>".into()],
                max_messages_per_subject: 1,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                num_replicas: urls.len(),
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await;
        if made.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream did not come back: {made:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    jetstream
        .publish("$KV.rookery_sessions.a-peer-s-session", "{}".into())
        .await
        .expect("published")
        .await
        .expect("stored");
}

/// Waits (at most `within`) until every node of `nodes` logged "The
/// cluster's state is back." more than `before[i]` times; returns the counts.
async fn wait_state_back(nodes: &[&NodeProcess], before: &[usize], within: Duration) -> Vec<usize> {
    let deadline = Instant::now() + within;
    let mut counts = Vec::new();
    for (node, before) in nodes.iter().zip(before) {
        loop {
            let count = node.log_count("The cluster's state is back.");
            if count > *before {
                counts.push(count);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not notice: {}",
                node.name,
                node.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    counts
}

#[tokio::test]
async fn a_registry_made_anew_by_a_peer_keeps_this_node_s_own_sessions() {
    // Three NATS servers and three replicas: a node waits three checks
    // before it makes the state again, and its registry watch may restart
    // meanwhile on the registry a peer made first.
    let mut nats = NatsCluster::start(3);
    let cluster = on_three_nats_servers(&nats, 2).await;
    cluster.create_users(&names("anew", 2), "secret");
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut alice = TestClient::online(first.starttls, "anew1", "secret", "a").await;
    let mut bob = TestClient::online(second.starttls, "anew2", "secret", "b").await;
    let nodes = [first, second];

    // NATS loses its store; the nodes make the state again, and restart
    // their registry watches...
    for server in &mut nats.servers {
        server.kill();
    }
    for server in &mut nats.servers {
        server.restart_empty();
    }
    let counts = wait_state_back(&nodes, &[0, 0], Duration::from_secs(20)).await;
    // ... which find NATS gone again, and then a registry a peer made.
    for server in &mut nats.servers {
        server.kill();
    }
    for server in &mut nats.servers {
        server.restart_empty();
    }
    registry_made_by_a_peer(&nats.urls()).await;
    // Sent while neither node has registered its session anew: stored,
    // then handed over once bob's node has.
    alice
        .send("<message to='anew2@localhost' type='chat'><body>meanwhile</body></message>")
        .await;
    wait_state_back(&nodes, &counts, Duration::from_secs(20)).await;
    for node in nodes {
        assert_eq!(
            node.log_count("registered=0"),
            0,
            "{} forgot its own session: {}",
            node.name,
            node.log_tail(40)
        );
    }
    assert_eq!(body(&bob.expect_message().await), "meanwhile");
    alice
        .send("<message to='anew2@localhost/b' type='chat'><body>across</body></message>")
        .await;
    assert_eq!(body(&bob.expect_message().await), "across");
    bob.send("<message to='anew1@localhost/a' type='chat'><body>back</body></message>")
        .await;
    assert_eq!(body(&alice.expect_message().await), "back");
}

/// The `replayed=` counts of the cleanups a node's log reports, in order.
fn replays(node: &NodeProcess) -> Vec<u64> {
    std::fs::read_to_string(node.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("Cleaned up after a dead node."))
        .filter_map(|line| {
            // The log is coloured: ANSI sequences around `=`.
            let plain = strip_ansi(line);
            let (_, rest) = plain.split_once("replayed=")?;
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test]
async fn a_dead_node_is_cleaned_up_once_and_replays_no_more_than_was_sent() {
    // Findings of the outside probe: after NATS came back with an empty
    // store and a node was restarted, a survivor cleaned up after the old
    // incarnation every 24.5 s, "replaying" thousands of messages of 20.
    let mut nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 3, |_, c| {
        c.log.level = "rookery_cluster_nats=debug,info".into()
    })
    .await;
    cluster.create_users(&names("storm", 3), "secret");
    let mut alice = TestClient::online(cluster.nodes[0].starttls, "storm1", "secret", "a").await;
    let mut bob = TestClient::online(cluster.nodes[1].starttls, "storm2", "secret", "b").await;
    let _carol = TestClient::online(cluster.nodes[2].starttls, "storm3", "secret", "c").await;
    alice.befriend(&mut bob).await;

    nats.restart_empty();
    const SENT: u64 = 20;
    for n in 0..SENT {
        alice
            .send(&format!(
                "<message to='storm2@localhost' type='chat'><body>{n}</body></message>"
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &cluster.nodes {
        wait_ready_status(node, 200, Duration::from_secs(20)).await;
    }
    // node1 dies with bob's session on it; its deliveries are replayed.
    cluster.nodes[1].kill();
    drop(bob);
    alice.expect(unavailable_from("storm2@localhost/b")).await;
    cluster.nodes[1].restart().await;
    // Many failure timeouts later, still one cleanup of the dead incarnation.
    tokio::time::sleep(FAILURE_TIMEOUT * 8).await;
    let (first, third) = (replays(&cluster.nodes[0]), replays(&cluster.nodes[2]));
    let all: Vec<u64> = first.iter().chain(&third).copied().collect();
    assert_eq!(
        all.len(),
        1,
        "node0 cleaned up {first:?} times, node2 {third:?}:\n{}\n{}",
        cluster.nodes[0].log_tail(40),
        cluster.nodes[2].log_tail(40)
    );
    assert!(all[0] <= SENT, "replayed {all:?} of {SENT} sent");
    // bob gets what he was sent, each once, on his next login.
    let mut bob = TestClient::online(cluster.nodes[2].starttls, "storm2", "secret", "b").await;
    let mut got = Vec::new();
    while let Some(message) = bob.recv_timeout(Duration::from_secs(2)).await {
        if message.name() == "message" {
            got.push(body(&message));
        }
    }
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), got.len(), "duplicates: {got:?}");
}

#[tokio::test]
async fn sigterm_during_a_nats_outage_ends_in_time_and_what_it_stored_reaches_online_users() {
    const GRACE: Duration = Duration::from_secs(4);
    let mut nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, config| {
        config.server.shutdown_grace = GRACE.as_secs();
    })
    .await;
    cluster.create_users(&names("outage", 2), "secret");
    let mut alice = TestClient::online(cluster.nodes[0].starttls, "outage1", "secret", "a").await;
    alice.enable_sm(false).await;
    let mut carol = TestClient::online(cluster.nodes[1].starttls, "outage2", "secret", "c").await;

    nats.kill();
    wait_ready_status(&cluster.nodes[0], 503, Duration::from_secs(10)).await;
    alice
        .send("<message to='outage2@localhost' type='chat'><body>while down</body></message><r xmlns='urn:xmpp:sm:3'/>")
        .await;
    let ack = alice
        .expect(|e| e.name() == "a" && e.has_ns("urn:xmpp:sm:3"))
        .await;
    assert_eq!(ack.attr("h"), Some("1"), "the message was acknowledged");

    let stopping = Instant::now();
    cluster.nodes[0].terminate();
    let status = cluster.nodes[0].wait_exit(GRACE * 3).await;
    let took = stopping.elapsed();
    assert!(
        status.is_some_and(|status| status.success()),
        "the node did not stop by itself: {status:?} after {took:?}\n{}",
        cluster.nodes[0].log_tail(30)
    );
    assert!(
        took < GRACE + Duration::from_secs(2),
        "stopping took {took:?}"
    );
    // Its clients are not sent to a peer that cannot take them either.
    let error = alice.expect_stream_error().await;
    assert_eq!(error, "system-shutdown");

    // The bus returns: carol, online all along on the other node, gets the
    // message the stopped node stored, without logging in again.
    nats.restart();
    assert_eq!(body(&carol.expect_message().await), "while down");
}

#[tokio::test]
async fn haproxy_from_the_docs_spreads_clients_and_drains_a_stopping_node() {
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 3, |_, _| {}).await;
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cluster/haproxy.cfg");
    let proxy = HaProxy::start(&example, &cluster.nodes.iter().collect::<Vec<_>>());
    let users = names("lb", 30);
    cluster.create_users(&users, "secret");
    cluster.nodes[0].import_users("alice secret\n");
    let mut settings = chat_settings(&cluster, users, 30.0);
    settings.nodes = vec![proxy.starttls];
    let chat = Chat::start(settings).await.expect("everyone logs in");
    // Least connections: every node holds a share.
    let bound: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|node| node.log_count("Session bound."))
        .collect();
    println!("sessions per node through HAProxy: {bound:?}");
    assert!(bound.iter().all(|n| *n >= 5), "uneven spread: {bound:?}");
    // The other frontends reach the nodes too.
    let mut direct = TestClient::connect_tls(proxy.direct_tls).await;
    direct.open().await;
    direct
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .expect("login over direct TLS through HAProxy");
    direct.bind(Some("direct")).await;
    assert_eq!(http_status(proxy.websocket, "/ready").await, Some(200));

    // A node stops: its clients move to the others, new clients avoid it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[1].terminate();
    cluster.nodes[1].wait_exit(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = chat.finish(Duration::from_secs(60)).await;
    assert_nothing_lost(&report);
    assert!(report.redirected >= 5, "{report}");
    let before = cluster.nodes[1].log_count("Session bound.");
    for n in 0..6 {
        TestClient::online(proxy.starttls, "alice", "secret", &format!("late{n}")).await;
    }
    assert_eq!(cluster.nodes[1].log_count("Session bound."), before);
}

/// Alice, online at `sender`, leaves `count` numbered messages for bob, who
/// is offline; returns once her node stored them all.
async fn leave_messages_for_bob(sender: std::net::SocketAddr, count: usize) {
    let mut alice = TestClient::online(sender, "alice", "secret", "desk").await;
    for n in 0..count {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='m{n}'><body>m{n}</body></message>"
            ))
            .await;
    }
    // Her stanzas are handled in order: once the ping is answered, every
    // message before it is stored.
    let pong = alice
        .iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(pong.attr("type"), Some("result"));
}

/// Bob logs in at `address` with stream management and gets his offline
/// messages, acknowledging none; returns the bodies of the first `count`.
async fn bob_reads_without_acknowledging(
    address: std::net::SocketAddr,
    count: usize,
) -> (TestClient, Vec<String>) {
    let mut bob = TestClient::login(address, "bob", "secret", "phone").await;
    bob.enable_sm(true).await;
    bob.send("<presence/>").await;
    let mut bodies = Vec::new();
    while bodies.len() < count {
        bodies.push(body(&bob.expect_message().await));
    }
    (bob, bodies)
}

/// Every body bob gets at `address` in a fresh session, until a quiet second.
async fn bob_collects(address: std::net::SocketAddr) -> Vec<String> {
    let mut bob = TestClient::online(address, "bob", "secret", "laptop").await;
    let mut bodies = Vec::new();
    while let Some(element) = bob.recv_timeout(Duration::from_secs(2)).await {
        if element.name() == "message" {
            bodies.push(body(&element));
        }
    }
    bodies
}

fn numbered(count: usize) -> Vec<String> {
    (0..count).map(|n| format!("m{n}")).collect()
}

/// More than a page of offline messages (50): the session reads a second
/// page before the client acknowledges the first.
const STORED: usize = 80;

#[tokio::test]
async fn offline_messages_handed_to_a_session_survive_a_kill_of_its_node() {
    // A killed cluster node: bob's messages were read out of PostgreSQL for his
    // session there, and reach him on the other node.
    let nats = NatsServer::start();
    let mut cluster = ProcessCluster::start(binary(), vec![nats.url()], 2, |_, _| {}).await;
    cluster.create_users(&["alice".into(), "bob".into()], "secret");
    let (doomed, survivor) = (cluster.nodes[0].starttls, cluster.nodes[1].starttls);
    leave_messages_for_bob(survivor, STORED).await;
    let (bob, got) = bob_reads_without_acknowledging(doomed, STORED).await;
    assert_eq!(got, numbered(STORED), "every stored message, in order");
    cluster.nodes[0].kill();
    bob.kill();
    assert_eq!(
        bob_collects(survivor).await,
        numbered(STORED),
        "what the killed node handed out and bob never acknowledged is still stored"
    );

    // A killed single node on its embedded SQLite: the same after its restart.
    let mut node = NodeProcess::start_single(binary(), |_| {}).await;
    node.import_users("alice secret\nbob secret\n");
    leave_messages_for_bob(node.starttls, STORED).await;
    let (bob, got) = bob_reads_without_acknowledging(node.starttls, STORED).await;
    assert_eq!(got, numbered(STORED));
    node.kill();
    bob.kill();
    node.restart().await;
    assert_eq!(bob_collects(node.starttls).await, numbered(STORED));
    // Acknowledged by the client (written out, no stream management), they are gone.
    assert!(bob_collects(node.starttls).await.is_empty());
}
