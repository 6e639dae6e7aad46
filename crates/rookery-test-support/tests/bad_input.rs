//! Bad input from the network: each case gets the right stream or stanza error
//! and a closed connection where RFC 6120 says so, and never disturbs the
//! sessions of anyone else.

use std::time::Duration;

use rookery_test_support::client::OPEN;
use rookery_test_support::{TestClient, TestServer};

const SHORT: Duration = Duration::from_millis(300);

/// A bound session on the direct TLS port, ready for garbage.
async fn bound(server: &TestServer) -> TestClient {
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    client
        .authenticate_plain("mallory", "secret")
        .await
        .unwrap();
    client.bind(Some("bad")).await;
    client
}

async fn server() -> TestServer {
    let server = TestServer::start_with(|c| {
        c.c2s.max_stanza_size = 20_000;
        c.limits.c2s_burst = 100_000;
    })
    .await;
    for user in ["alice", "bob", "mallory"] {
        server.create_user(user, "secret").await;
    }
    server
}

/// Alice and bob keep chatting while someone misbehaves.
async fn bystanders_unaffected(alice: &mut TestClient, bob: &mut TestClient, n: u32) {
    alice.send(&format!("<message to='bob@localhost/desk' type='chat' id='ok{n}'><body>still fine {n}</body></message>")).await;
    let message = bob
        .expect(|e| e.attr("id") == Some(&format!("ok{n}")))
        .await;
    assert_eq!(
        message.get_child("body", "jabber:client").unwrap().text(),
        format!("still fine {n}")
    );
}

#[tokio::test]
async fn malformed_streams_get_the_right_stream_errors() {
    let server = server().await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"<message><body>unclosed</message>".to_vec(),
            "not-well-formed",
        ),
        (
            b"<message to='bob@localhost'><body>\xff\xfe\xfd</body></message>".to_vec(),
            "unsupported-encoding",
        ),
        (
            b"<!DOCTYPE lol [<!ENTITY lol 'lol'>]><message/>".to_vec(),
            "restricted-xml",
        ),
        (
            b"<message><body>&lol1;</body></message>".to_vec(),
            "restricted-xml",
        ),
        (
            b"<message><!-- hidden --></message>".to_vec(),
            "restricted-xml",
        ),
        (b"<?evil instruction?>".to_vec(), "restricted-xml"),
        (
            b"<message><x:y/></message>".to_vec(),
            "bad-namespace-prefix",
        ),
        (
            b"<unknown xmlns='urn:example:unknown'/>".to_vec(),
            "unsupported-stanza-type",
        ),
        (
            b"<message xmlns='jabber:server' to='bob@localhost'/>".to_vec(),
            "invalid-namespace",
        ),
        (
            b"<message from='bob@localhost/desk' to='alice@localhost'><body>spoof</body></message>"
                .to_vec(),
            "invalid-from",
        ),
        (
            format!("<message><body>{}</body></message>", "x".repeat(30_000)).into_bytes(),
            "policy-violation",
        ),
        (
            format!("<message>{}", "<a xmlns='urn:x'>".repeat(100)).into_bytes(),
            "policy-violation",
        ),
        (
            b"plain text where elements belong<presence/>".to_vec(),
            "bad-format",
        ),
    ];
    for (n, (bytes, expected)) in cases.into_iter().enumerate() {
        let mut mallory = bound(&server).await;
        mallory.send_bytes(&bytes).await;
        assert_eq!(
            mallory.expect_stream_error().await,
            expected,
            "case {n}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
        );
        bystanders_unaffected(&mut alice, &mut bob, n as u32).await;
    }
    // The spoofed message never reached alice.
    alice
        .assert_none(SHORT, |e| {
            e.get_child("body", "jabber:client")
                .is_some_and(|b| b.text() == "spoof")
        })
        .await;
}

#[tokio::test]
async fn bad_stream_headers() {
    let server = server().await;
    let cases = [
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong' to='localhost' version='1.0'>",
            "invalid-namespace",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>",
            "host-unknown",
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost'>",
            "unsupported-version",
        ),
        (
            "<stream:stream xmlns='jabber:client' to='localhost' version='1.0'>",
            "bad-namespace-prefix",
        ),
        (
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "not-well-formed",
        ),
    ];
    for (header, expected) in cases {
        let mut client = TestClient::connect(server.starttls()).await;
        client.send(header).await;
        assert_eq!(client.expect_stream_error().await, expected, "{header}");
    }
}

#[tokio::test]
async fn stanzas_before_authentication_are_refused() {
    let server = server().await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    // Before TLS on the STARTTLS port.
    let mut client = TestClient::connect(server.starttls()).await;
    client.open().await;
    client
        .send("<message to='alice@localhost/phone'><body>sneaky</body></message>")
        .await;
    assert_eq!(client.expect_stream_error().await, "policy-violation");
    // After TLS, before SASL.
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    client
        .send("<message to='alice@localhost/phone'><body>sneaky</body></message>")
        .await;
    assert_eq!(client.expect_stream_error().await, "not-authorized");
    // After SASL, before binding.
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    client
        .authenticate_plain("mallory", "secret")
        .await
        .unwrap();
    client
        .send("<message to='alice@localhost/phone'><body>sneaky</body></message>")
        .await;
    assert_eq!(client.expect_stream_error().await, "not-authorized");
    alice.assert_none(SHORT, |e| e.name() == "message").await;
}

#[tokio::test]
async fn plain_authentication_needs_tls() {
    let server = TestServer::start_with(|c| {
        c.c2s.require_tls = false;
        c.c2s.allow_plaintext_auth = false;
    })
    .await;
    server.create_user("alice", "secret").await;
    let mut client = TestClient::connect(server.starttls()).await;
    let features = client.open().await;
    assert!(
        !features.has_child("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl"),
        "no SASL in the clear by default"
    );
    assert_eq!(
        client.authenticate_plain("alice", "secret").await,
        Err("encryption-required".into())
    );
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_address() {
    let server = TestServer::start_with(|c| {
        c.limits.login_failures_burst = 3;
        c.limits.login_failures_per_minute = 1;
    })
    .await;
    server.create_user("alice", "secret").await;
    let mut attempts = 0;
    let mut limited = false;
    for _ in 0..3 {
        let mut client = TestClient::connect_tls(server.direct_tls()).await;
        client.open().await;
        for _ in 0..2 {
            match client.authenticate_plain("alice", "wrong").await {
                Err(condition) if condition == "not-authorized" => attempts += 1,
                Err(condition) if condition == "temporary-auth-failure" => limited = true,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(attempts, 3, "three failures are allowed in a burst");
    assert!(limited);
    // Even the right password is refused while the address is limited.
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    assert_eq!(
        client.authenticate_plain("alice", "secret").await,
        Err("temporary-auth-failure".into())
    );
}

#[tokio::test]
async fn too_many_failures_on_one_stream_close_it() {
    let server = server().await;
    let mut client = TestClient::connect_tls(server.direct_tls()).await;
    client.open().await;
    for _ in 0..2 {
        assert_eq!(
            client.authenticate_plain("alice", "wrong").await,
            Err("not-authorized".into())
        );
    }
    client.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHdyb25n</auth>").await;
    assert_eq!(client.expect_stream_error().await, "policy-violation");
}

#[tokio::test]
async fn silent_and_trickling_clients_are_disconnected() {
    let server = TestServer::start_with(|c| c.c2s.negotiation_timeout = 1).await;
    server.create_user("alice", "secret").await;
    // Connects and says nothing.
    let mut silent = TestClient::connect(server.starttls()).await;
    assert_eq!(silent.expect_stream_error().await, "connection-timeout");
    // Sends a byte every 300 ms: still out after the negotiation timeout.
    let mut trickle = TestClient::connect(server.starttls()).await;
    let started = tokio::time::Instant::now();
    for byte in OPEN.as_bytes().iter().take(10) {
        trickle.send_bytes(std::slice::from_ref(byte)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(trickle.expect_stream_error().await, "connection-timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_stanza_trickled_after_binding_times_out() {
    let server = TestServer::start_with(|c| c.c2s.stanza_timeout = 1).await;
    server.create_user("alice", "secret").await;
    let mut client = TestClient::login(server.starttls(), "alice", "secret", "r").await;
    client.send("<message to='alice@localhost'><body>").await;
    for _ in 0..10 {
        client.send("x").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(client.expect_stream_error().await, "connection-timeout");
}

#[tokio::test]
async fn stanza_level_errors_keep_the_stream_open() {
    let server = server().await;
    let mut mallory = bound(&server).await;
    let bad_iq = mallory
        .iq("<iq type='fetch'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(bad_iq.attr("type"), Some("error"));
    mallory.send("<presence type='bogus'/>").await;
    let error = mallory
        .expect(|e| e.name() == "presence" && e.attr("type") == Some("error"))
        .await;
    assert!(String::from(&error).contains("bad-request"));
    mallory
        .send("<message to='a@b@c'><body>x</body></message>")
        .await;
    let error = mallory
        .expect(|e| e.name() == "message" && e.attr("type") == Some("error"))
        .await;
    assert!(String::from(&error).contains("jid-malformed"));
    let ping = mallory
        .iq("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    assert_eq!(
        ping.attr("type"),
        Some("result"),
        "the stream is still usable"
    );
}

#[tokio::test]
async fn floods_are_throttled_without_losing_stanzas() {
    let server = TestServer::start_with(|c| {
        c.limits.c2s_rate = 50_000;
        c.limits.c2s_burst = 131_072;
    })
    .await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut alice = TestClient::online(server.starttls(), "alice", "secret", "phone").await;
    let padding = "p".repeat(1000);
    let started = tokio::time::Instant::now();
    let mut flood = String::new();
    for n in 0..300 {
        flood.push_str(&format!(
            "<message to='bob@localhost/desk' id='f{n}'><body>{padding}</body></message>"
        ));
    }
    alice.send(&flood).await;
    for n in 0..300 {
        bob.expect(|e| e.attr("id") == Some(&format!("f{n}"))).await;
    }
    // ~320 kB at 50 kB/s after a 128 kB burst: about 3.5 s, less the bytes of
    // the last read (up to one TLS read, 18 KiB), which are delivered before
    // the wait they cause.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the sender was throttled ({:?})",
        started.elapsed()
    );
}
