//! Resource limits: what one connection, one session and one account can make
//! the server hold (docs/limits.md). Each test tries to go past one bound, the
//! way an outside probe did, and checks that the server refuses in the
//! documented way, loses nothing it accepted, and keeps serving everyone else.

use std::collections::BTreeSet;
use std::time::Duration;

use jid::BareJid;
use minidom::Element;
use rookery_store::Quota;
use rookery_test_support::client::OPEN;
use rookery_test_support::{TestClient, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SHORT: Duration = Duration::from_millis(300);

fn bare(jid: &str) -> BareJid {
    BareJid::new(jid).unwrap()
}

async fn server_with(configure: impl FnOnce(&mut rookery_app::Config)) -> TestServer {
    let server = TestServer::start_with(configure).await;
    for user in ["alice", "bob", "carol", "mallory"] {
        server.create_user(user, "secret").await;
    }
    server
}

/// Alice and carol can still chat.
async fn bystanders_chat(server: &TestServer, n: u32) {
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    let mut carol = TestClient::online(server.starttls(), "carol", "secret", "x").await;
    alice
        .send(&format!(
            "<message to='carol@localhost/x' id='ok{n}'><body>fine</body></message>"
        ))
        .await;
    carol
        .expect(|e| e.attr("id") == Some(&format!("ok{n}")))
        .await;
}

/// Waits until `condition` holds, for less than the 30 s a blocked write
/// may take: a session ended by a limit ends sooner than by that timeout.
async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads from `tcp` until the peer closes; `Err` if it stays open past `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buffer = [0; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return Ok(received),
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return Err(received),
        }
    }
}

#[tokio::test]
async fn an_endless_stream_header_before_tls_is_refused_within_its_budget() {
    let server = server_with(|_| {}).await;
    let mut tcp = TcpStream::connect(server.starttls()).await.unwrap();
    tcp.write_all(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'").await.unwrap();
    let mut sent = 0;
    // 200 attributes of 200 bytes at a time, as the probe sent, until
    // refused: up to 41 MB, ten times what loopback socket buffers can
    // take in while a busy server has not read yet.
    for round in 0..1000 {
        let chunk: String = (0..200)
            .map(|n| format!(" a{round}x{n}='{}'", "v".repeat(200)))
            .collect();
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let answer = closed_within(&mut tcp, Duration::from_secs(10))
        .await
        .expect("the server closes the connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("<policy-violation"), "{answer}");
    // The socket buffers take some of what was sent after the refusal.
    assert!(
        sent < 1000 * 41_000,
        "refused before the end: {sent} bytes sent"
    );
    bystanders_chat(&server, 1).await;
}

#[tokio::test]
async fn an_endless_opening_tag_after_login_is_refused() {
    let server = server_with(|c| c.c2s.max_stanza_size = 20_000).await;
    let mut mallory = TestClient::online(server.starttls(), "mallory", "secret", "x").await;
    mallory.send("<message to='bob@localhost'").await;
    for round in 0..20 {
        let chunk: String = (0..200)
            .map(|n| format!(" b{round}x{n}='{}'", "v".repeat(200)))
            .collect();
        mallory.send(&chunk).await;
    }
    assert_eq!(mallory.expect_stream_error().await, "policy-violation");
    bystanders_chat(&server, 2).await;
}

/// A session whose client logs in with a tiny receive buffer and then reads nothing.
async fn slow_reader(server: &TestServer, user: &str, stream_management: bool) -> TestClient {
    let mut client = TestClient::connect_with_receive_buffer(server.starttls(), 4096).await;
    client.open().await;
    client.starttls().await;
    client
        .authenticate_plain(user, "secret")
        .await
        .expect("login");
    client.bind(Some("slow")).await;
    if stream_management {
        client.enable_sm(false).await;
    }
    client.send("<presence/>").await;
    client
}

async fn offline_ids(server: &TestServer, user: &str) -> BTreeSet<String> {
    let messages = server
        .router()
        .store()
        .read_offline(&bare(user), 0, Quota::UNLIMITED)
        .await
        .unwrap();
    messages
        .iter()
        .map(|m| m.message.stanza.parse::<Element>().unwrap())
        .filter_map(|m| m.attr("id").map(str::to_owned))
        .collect()
}

/// Reads everything the client still gets until its connection ends; the ids of its messages.
async fn drain_ids(client: &mut TestClient) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    while let Some(element) = client.recv_timeout(Duration::from_secs(10)).await {
        if element.name() == "message"
            && let Some(id) = element.attr("id")
        {
            ids.insert(id.to_owned());
        }
    }
    ids
}

/// Alice, online, sends 400 messages of 10 kB (4 MB, more than the socket
/// buffers on the way hold) to bob's slow session as fast as she can.
async fn flood_slow_bob(server: &TestServer) -> TestClient {
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    eventually("both bound", async || server.sessions() == 2).await;
    let body = "m".repeat(10_000);
    for n in 0..400 {
        alice
            .send(&format!(
                "<message to='bob@localhost/slow' id='s{n}'><body>{body}</body></message>"
            ))
            .await;
    }
    alice
}

fn slow_reader_limits(c: &mut rookery_app::Config) {
    c.c2s.max_stanza_size = 20_000;
    c.limits.c2s_rate = 0;
    c.limits.session_queue_bytes = 300_000;
}

#[tokio::test]
async fn a_recipient_that_does_not_read_is_ended_and_later_mail_goes_offline() {
    let server = server_with(slow_reader_limits).await;
    let _bob = slow_reader(&server, "bob", false).await;
    let mut alice = flood_slow_bob(&server).await;
    // Bob's inbox overflowed: his session ended while alice was sending.
    eventually("bob's session ended", async || server.sessions() == 1).await;
    handled(&mut alice).await;
    let stored = offline_ids(&server, "bob@localhost").await;
    assert!(
        stored.contains("s399"),
        "what came after went to offline storage ({} stored)",
        stored.len()
    );
    // The sender was never disconnected nor told off: her messages were kept.
    alice
        .assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    bystanders_chat(&server, 3).await;
}

#[tokio::test]
async fn unacknowledged_bytes_are_bounded_and_nothing_is_lost() {
    let server = server_with(slow_reader_limits).await;
    let mut bob = slow_reader(&server, "bob", true).await;
    let mut alice = flood_slow_bob(&server).await;
    eventually("bob's session ended", async || server.sessions() == 1).await;
    handled(&mut alice).await;
    // Every message is with bob or in offline storage: what bob had not
    // acknowledged went back there (the copies bob got anyway are the
    // duplicates stream management allows).
    let received = drain_ids(&mut bob).await;
    let stored = offline_ids(&server, "bob@localhost").await;
    let missing: Vec<_> = (0..400)
        .map(|n| format!("s{n}"))
        .filter(|id| !received.contains(id) && !stored.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {missing:?} (received {}, stored {})",
        received.len(),
        stored.len()
    );
    assert!(
        stored.len() > 300,
        "most waited in storage: {}",
        stored.len()
    );
}

/// Waits until the server handled everything `client` sent before (stanzas
/// of one session are handled in order).
async fn handled(client: &mut TestClient) {
    let pong = client
        .iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(pong.attr("type"), Some("result"));
}

#[tokio::test]
async fn offline_storage_is_limited_in_bytes_and_given_out_in_pages() {
    let server = server_with(|c| {
        c.c2s.max_stanza_size = 20_000;
        c.limits.c2s_rate = 0;
        c.limits.offline_bytes = 1_500_000;
    })
    .await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    let body = "m".repeat(15_000);
    for n in 0..100 {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='o{n}'><body>{body}</body></message>"
            ))
            .await;
    }
    handled(&mut alice).await;
    // About 15.2 kB each with the delay stamp: 98 or so fit in 1.5 MB, the
    // last ones bounce with an error, and nothing else does.
    let bob_jid = bare("bob@localhost");
    let store = server.router().store();
    let stored = store.count_offline(&bob_jid).await.unwrap();
    assert!((90..100).contains(&stored), "{stored} stored");
    for n in stored..100 {
        let error = alice.expect(|e| e.attr("type") == Some("error")).await;
        assert_eq!(error.attr("id"), Some(format!("o{n}").as_str()));
        assert!(String::from(&error).contains("service-unavailable"));
    }
    alice
        .assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;

    // Bob comes online with stream management and acknowledges nothing: pages
    // (128 kB each) go out until half of what may wait unacknowledged (2 MiB)
    // is out; the rest waits until he takes what he got. Nothing leaves
    // storage before he acknowledges it.
    let mut bob = slow_reader(&server, "bob", true).await;
    let mut ids = Vec::new();
    let mut handled_count = 0;
    let mut acknowledging = false;
    while ids.len() < stored {
        let element = if acknowledging {
            bob.recv().await
        } else {
            match bob.recv_timeout(SHORT).await {
                Some(element) => element,
                None => {
                    assert!(
                        !ids.is_empty() && ids.len() < stored,
                        "not everything at once: {} of {stored} before any acknowledgement",
                        ids.len()
                    );
                    assert_eq!(store.count_offline(&bob_jid).await.unwrap(), stored);
                    // Reading and acknowledging, he gets them all, in order.
                    acknowledging = true;
                    bob.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled_count}'/>"))
                        .await;
                    continue;
                }
            }
        };
        match element.name() {
            "r" if acknowledging => {
                bob.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled_count}'/>"))
                    .await
            }
            "message" | "presence" | "iq" => {
                handled_count += 1;
                if element.name() == "message" {
                    assert!(element.get_child("delay", "urn:xmpp:delay").is_some());
                    ids.push(element.attr("id").unwrap().to_owned());
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        ids,
        (0..stored).map(|n| format!("o{n}")).collect::<Vec<_>>()
    );
    // Removed as he acknowledges them: the last ones with his last answer.
    bob.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled_count}'/>"))
        .await;
    eventually("all removed", async || {
        store.count_offline(&bob_jid).await.unwrap() == 0
    })
    .await;
}

#[tokio::test]
async fn private_storage_is_limited_per_account() {
    let server = server_with(|c| {
        c.c2s.max_stanza_size = 30_000;
        c.limits.private_storage_bytes = 50_000;
    })
    .await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    let store = |n: u32| {
        format!(
            "<iq type='set'><query xmlns='jabber:iq:private'><data xmlns='urn:example:{n}'>{}</data></query></iq>",
            "d".repeat(20_000)
        )
    };
    assert_eq!(alice.iq(&store(1)).await.attr("type"), Some("result"));
    assert_eq!(alice.iq(&store(2)).await.attr("type"), Some("result"));
    let refused = alice.iq(&store(3)).await;
    assert_eq!(refused.attr("type"), Some("error"));
    assert!(String::from(&refused).contains("resource-constraint"));
    // Replacing a stored namespace with as much is fine.
    assert_eq!(alice.iq(&store(2)).await.attr("type"), Some("result"));
}

#[tokio::test]
async fn pre_approvals_count_against_the_roster_limit() {
    let server = server_with(|c| c.limits.roster_items = 3).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    for n in 0..3 {
        alice
            .send(&format!(
                "<presence type='subscribed' to='contact{n}@localhost'/>"
            ))
            .await;
    }
    alice
        .send("<presence type='subscribed' to='contact3@localhost' id='full'/>")
        .await;
    let error = alice.expect(|e| e.attr("id") == Some("full")).await;
    assert_eq!(error.attr("type"), Some("error"));
    assert!(String::from(&error).contains("resource-constraint"));
    let roster = alice
        .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let items = roster
        .get_child("query", "jabber:iq:roster")
        .unwrap()
        .children()
        .count();
    assert_eq!(items, 3);
}

#[tokio::test]
async fn directed_presence_is_remembered_for_a_bounded_number_of_entities() {
    let server = server_with(|c| c.limits.c2s_rate = 0).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    let many: String = (0..rookery_router::MAX_DIRECTED_PRESENCE)
        .map(|n| format!("<presence to='nobody{n}@localhost'/>"))
        .collect();
    alice.send(&many).await;
    alice
        .send("<presence to='onemore@localhost' id='over'/>")
        .await;
    let error = alice.expect(|e| e.attr("id") == Some("over")).await;
    assert!(String::from(&error).contains("resource-constraint"));
    // One already remembered still goes through.
    alice
        .send("<presence to='nobody7@localhost' id='again'/>")
        .await;
    alice
        .assert_none(SHORT, |e| e.attr("id") == Some("again"))
        .await;
}

/// The `s=` and `i=` a SCRAM-SHA-256 login of `user` is challenged with.
async fn scram_parameters(server: &TestServer, user: &str) -> (String, String) {
    use base64::Engine;
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut client = TestClient::connect(server.starttls()).await;
    client.open().await;
    client.starttls().await;
    let first = base64.encode(format!("n,,n={user},r=0123456789"));
    client
        .send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{first}</auth>"
        ))
        .await;
    let challenge = client.expect(|e| e.name() == "challenge").await;
    let challenge = String::from_utf8(base64.decode(challenge.text().trim()).unwrap()).unwrap();
    let field = |prefix: &str| {
        challenge
            .split(',')
            .find(|p| p.starts_with(prefix))
            .unwrap()
            .to_owned()
    };
    (field("s="), field("i="))
}

#[tokio::test]
async fn unknown_users_look_like_real_ones_across_restarts() {
    let server = server_with(|c| c.accounts.scram_iterations = 5000).await;
    let (_, real_iterations) = scram_parameters(&server, "alice").await;
    let ghost = scram_parameters(&server, "ghost").await;
    assert_eq!(real_iterations, "i=5000");
    assert_eq!(ghost.1, real_iterations, "the same iteration count");
    assert_eq!(scram_parameters(&server, "ghost").await, ghost, "stable");
    let server = server.restart().await;
    assert_eq!(
        scram_parameters(&server, "ghost").await.0,
        ghost.0,
        "the same salt after a restart"
    );
}

#[tokio::test]
async fn connections_per_address_are_limited_except_from_the_allowlist() {
    let server = server_with(|c| {
        c.limits.connections_per_address = 3;
        c.limits.connection_allowlist = Vec::new();
        c.limits.new_connections_per_minute = 0;
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut client = TestClient::connect(server.starttls()).await;
        client.open().await;
        open.push(client);
    }
    let mut refused = TestClient::connect(server.starttls()).await;
    refused.send(OPEN).await;
    assert_eq!(refused.expect_stream_error().await, "policy-violation");
    // The other listeners count the same connections; they close at once.
    let mut tls = TcpStream::connect(server.direct_tls()).await.unwrap();
    let _ = tls.write_all(b"\x16\x03\x01\x00\x05hello").await;
    assert!(
        closed_within(&mut tls, Duration::from_secs(5))
            .await
            .is_ok()
    );
    let mut http = TcpStream::connect(server.http()).await.unwrap();
    let _ = http
        .write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let answer = closed_within(&mut http, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(answer.is_empty(), "no answer when refused");
    // A connection that ends gives its place back.
    open.pop().unwrap().close().await;
    eventually("a place is free again", async || {
        let mut client = TestClient::connect(server.starttls()).await;
        client.send(OPEN).await;
        let first = client.recv().await;
        first.name() == "features"
    })
    .await;

    // An allowed network (a load balancer) is not counted.
    let server = server_with(|c| {
        c.limits.connections_per_address = 1;
        c.limits.new_connections_burst = 1;
        c.limits.connection_allowlist = vec!["127.0.0.0/8".into()];
    })
    .await;
    for _ in 0..3 {
        let mut client = TestClient::connect(server.starttls()).await;
        client.open().await;
        open.push(client);
    }
}

#[tokio::test]
async fn an_address_that_reconnects_in_a_loop_is_slowed_down() {
    let server = server_with(|c| {
        c.limits.connection_allowlist = Vec::new();
        c.limits.new_connections_burst = 5;
        c.limits.new_connections_per_minute = 60;
    })
    .await;
    for _ in 0..5 {
        let mut client = TestClient::connect(server.starttls()).await;
        client.open().await;
        client.close().await;
    }
    let mut refused = TestClient::connect(server.starttls()).await;
    refused.send(OPEN).await;
    assert_eq!(refused.expect_stream_error().await, "policy-violation");
    // One a second after the burst.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut client = TestClient::connect(server.starttls()).await;
    client.open().await;
}

#[tokio::test]
async fn http_requests_must_arrive_in_time_and_idle_connections_close() {
    let server = server_with(|c| c.http.request_timeout = 1).await;
    // Half a request, never finished.
    let mut half = TcpStream::connect(server.http()).await.unwrap();
    half.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    closed_within(&mut half, Duration::from_secs(5))
        .await
        .expect("an unfinished request is dropped");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A finished request, then nothing more on the keep-alive connection.
    let mut idle = TcpStream::connect(server.http()).await.unwrap();
    idle.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection is closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_folder_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    let mut config = rookery_test_support::server::test_config(&data);
    config.tls.cert = None;
    config.tls.key = None;
    let server = TestServer::start_config(config).await;
    server.create_user("alice", "secret").await;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("tls")), 0o700);
    assert_eq!(mode(&data.join("tls/key.pem")), 0o600);
    for file in ["rookery.sqlite", "rookery.sqlite-wal", "rookery.sqlite-shm"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    drop(server);

    // A folder and database left open to others by an older version are narrowed.
    let old = dir.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(old.join("rookery.sqlite"), b"").unwrap();
    std::fs::set_permissions(
        old.join("rookery.sqlite"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let _server = TestServer::start_config(rookery_test_support::server::test_config(&old)).await;
    assert_eq!(mode(&old), 0o700);
    assert_eq!(mode(&old.join("rookery.sqlite")), 0o600);
}

#[tokio::test]
async fn presence_held_for_an_inactive_client_is_bounded_in_bytes() {
    let server = server_with(|c| c.c2s.max_stanza_size = 200_000).await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "x").await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "a0").await;
    alice.befriend(&mut bob).await;
    bob.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    // Three of alice's resources each change presence with a 100 kB status:
    // only the latest presence of each sender is held, but held presence is
    // also bounded in bytes (256 KiB), so the third sends it all.
    let status = "s".repeat(100_000);
    let mut resources = Vec::new();
    for n in 1..=3 {
        let mut resource =
            TestClient::login(server.starttls(), "alice", "secret", &format!("a{n}")).await;
        resource
            .send(&format!("<presence><status>{status}</status></presence>"))
            .await;
        resources.push(resource);
        if n < 3 {
            bob.assert_none(SHORT, |e| {
                e.name() == "presence" && e.get_child("status", "jabber:client").is_some()
            })
            .await;
        }
    }
    for n in 1..=3 {
        bob.expect_presence_from(&format!("alice@localhost/a{n}"))
            .await;
    }
}

#[tokio::test]
async fn offline_pages_go_on_after_the_session_is_resumed() {
    let server = server_with(|c| {
        c.c2s.max_stanza_size = 20_000;
        c.limits.c2s_rate = 0;
        // Pages stop at 150 kB unacknowledged: about ten messages.
        c.limits.session_queue_bytes = 300_000;
    })
    .await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    let body = "m".repeat(15_000);
    for n in 0..60 {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='r{n}'><body>{body}</body></message>"
            ))
            .await;
    }
    handled(&mut alice).await;
    // Bob comes online resumable, reads the first message of the first page
    // and loses his connection.
    let mut bob = TestClient::connect(server.starttls()).await;
    bob.open().await;
    bob.starttls().await;
    bob.authenticate_plain("bob", "secret").await.unwrap();
    bob.bind(Some("phone")).await;
    let previd = bob.enable_sm(true).await.expect("resumable");
    bob.send("<presence/>").await;
    bob.expect(|e| e.attr("id") == Some("r0")).await;
    bob.kill();
    // He resumes and gets everything, the rest of the pages included (no
    // new initial presence is sent), at once: not only when the server's
    // periodic redelivery would find the messages left over.
    let mut bob = TestClient::connect(server.starttls()).await;
    bob.open().await;
    bob.starttls().await;
    bob.authenticate_plain("bob", "secret").await.unwrap();
    bob.resume(&previd, 0).await.expect("resumed");
    let mut ids = BTreeSet::new();
    let mut handled_count = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while ids.len() < 60 {
        let Some(element) = bob
            .recv_timeout(deadline - tokio::time::Instant::now())
            .await
        else {
            panic!("only {} of 60 arrived within 4 s", ids.len());
        };
        match element.name() {
            "r" => {
                bob.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled_count}'/>"))
                    .await
            }
            "message" | "presence" | "iq" => {
                handled_count += 1;
                if let Some(id) = element.attr("id") {
                    ids.insert(id.to_owned());
                }
            }
            _ => {}
        }
    }
    bob.send(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled_count}'/>"))
        .await;
    let store = server.router().store();
    eventually("all removed", async || {
        store.count_offline(&bare("bob@localhost")).await.unwrap() == 0
    })
    .await;
}

#[tokio::test]
async fn stored_messages_a_session_did_not_deliver_stay_stored_in_their_place() {
    let server = server_with(|c| c.limits.offline_messages = 30).await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "x").await;
    for n in 0..30 {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='k{n}'><body>k{n}</body></message>"
            ))
            .await;
    }
    handled(&mut alice).await;
    let bob_jid = bare("bob@localhost");
    let store = server.router().store();
    assert_eq!(store.count_offline(&bob_jid).await.unwrap(), 30);
    // Bob gets them with stream management, acknowledges none, and ends his
    // stream: they stay stored as they were. Stored again, they would not
    // fit (the storage is full until they are removed) and would bounce.
    let mut bob = TestClient::login(server.starttls(), "bob", "secret", "phone").await;
    bob.enable_sm(false).await;
    bob.send("<presence/>").await;
    for n in 0..30 {
        let message = bob.expect_message().await;
        assert_eq!(message.attr("id"), Some(format!("k{n}").as_str()));
    }
    bob.close().await;
    eventually("bob's session ended", async || server.sessions() == 1).await;
    alice
        .assert_none(SHORT, |e| e.attr("type") == Some("error"))
        .await;
    assert_eq!(store.count_offline(&bob_jid).await.unwrap(), 30);
    // His next session gets them, in their order, and they are gone once
    // written to it (no stream management).
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "laptop").await;
    for n in 0..30 {
        let message = bob.expect_message().await;
        assert_eq!(message.attr("id"), Some(format!("k{n}").as_str()));
    }
    eventually("all removed", async || {
        store.count_offline(&bob_jid).await.unwrap() == 0
    })
    .await;
}
