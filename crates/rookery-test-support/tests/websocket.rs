//! XMPP over WebSocket (RFC 7395) at /xmpp-websocket, talking to TCP clients.

use base64::Engine;
use futures::{SinkExt, StreamExt};
use rookery_test_support::{TestClient, TestServer};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer) -> Ws {
    let mut request = format!("ws://{}/xmpp-websocket", server.http())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "xmpp".parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket handshake");
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "xmpp"
    );
    ws
}

async fn recv(ws: &mut Ws) -> String {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a frame")
            .expect("open")
            .expect("ok");
        if let Message::Text(text) = message {
            return text.to_string();
        }
    }
}

async fn send(ws: &mut Ws, xml: &str) {
    ws.send(Message::Text(xml.into())).await.unwrap();
}

const OPEN: &str =
    "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";

#[tokio::test]
async fn a_websocket_client_chats_with_a_tcp_client() {
    let server = TestServer::start().await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut ws = connect(&server).await;
    send(&mut ws, OPEN).await;
    assert!(
        recv(&mut ws)
            .await
            .starts_with("<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'")
    );
    let features = recv(&mut ws).await;
    assert!(
        features.contains("<mechanism>PLAIN</mechanism>"),
        "loopback WebSocket counts as secure: {features}"
    );
    let auth = base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secret");
    send(
        &mut ws,
        &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"),
    )
    .await;
    assert!(recv(&mut ws).await.starts_with("<success"));
    send(&mut ws, OPEN).await;
    recv(&mut ws).await;
    assert!(
        recv(&mut ws)
            .await
            .contains("urn:ietf:params:xml:ns:xmpp-bind")
    );
    send(&mut ws, "<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>web</resource></bind></iq>").await;
    assert!(
        recv(&mut ws)
            .await
            .contains("<jid>alice@localhost/web</jid>")
    );
    send(&mut ws, "<presence xmlns='jabber:client'/>").await;
    assert!(
        recv(&mut ws)
            .await
            .starts_with("<presence xmlns='jabber:client'")
    );
    send(&mut ws, "<message xmlns='jabber:client' to='bob@localhost/desk' type='chat'><body>from the web</body></message>").await;
    let message = bob.expect_message().await;
    assert_eq!(message.attr("from"), Some("alice@localhost/web"));
    bob.send("<message to='alice@localhost/web' type='chat'><body>to the web</body></message>")
        .await;
    let frame = recv(&mut ws).await;
    assert!(
        frame.starts_with("<message xmlns='jabber:client'")
            && frame.contains("<body>to the web</body>"),
        "{frame}"
    );
    send(
        &mut ws,
        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
    )
    .await;
    assert_eq!(
        recv(&mut ws).await,
        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"
    );
}

/// A WebSocket session of `user`, bound at `resource`, with initial presence sent.
async fn ws_online(server: &TestServer, user: &str, resource: &str) -> Ws {
    let mut ws = connect(server).await;
    send(&mut ws, OPEN).await;
    recv(&mut ws).await;
    recv(&mut ws).await;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0secret"));
    send(
        &mut ws,
        &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"),
    )
    .await;
    assert!(recv(&mut ws).await.starts_with("<success"));
    send(&mut ws, OPEN).await;
    recv(&mut ws).await;
    recv(&mut ws).await;
    send(&mut ws, &format!("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
    assert!(recv(&mut ws).await.contains("<jid>"));
    ws
}

/// The input rate limit applies to WebSocket as to TCP: a flood of frames is
/// slowed to `c2s_rate`, and nothing of it is lost.
#[tokio::test]
async fn websocket_floods_are_throttled_like_tcp() {
    let server = TestServer::start_with(|c| {
        c.limits.c2s_rate = 50_000;
        c.limits.c2s_burst = 131_072;
    })
    .await;
    server.create_user("alice", "secret").await;
    server.create_user("bob", "secret").await;
    let mut bob = TestClient::online(server.starttls(), "bob", "secret", "desk").await;
    let mut ws = ws_online(&server, "alice", "web").await;
    let padding = "p".repeat(1000);
    let started = tokio::time::Instant::now();
    for n in 0..300 {
        ws.feed(Message::Text(
            format!("<message xmlns='jabber:client' to='bob@localhost/desk' id='f{n}'><body>{padding}</body></message>").into(),
        ))
        .await
        .unwrap();
    }
    ws.flush().await.unwrap();
    for n in 0..300 {
        bob.expect(|e| e.attr("id") == Some(&format!("f{n}"))).await;
    }
    // ~330 kB at 50 kB/s after a 128 kB burst: about 4 s (unthrottled: well under 1 s).
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "the sender was throttled ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn websocket_stream_errors_are_framed() {
    let server = TestServer::start().await;
    let mut ws = connect(&server).await;
    send(
        &mut ws,
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='elsewhere.example' version='1.0'/>",
    )
    .await;
    recv(&mut ws).await;
    let error = recv(&mut ws).await;
    assert!(
        error.starts_with(
            "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><host-unknown"
        ),
        "{error}"
    );
    assert_eq!(
        recv(&mut ws).await,
        "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"
    );
    let mut ws = connect(&server).await;
    send(
        &mut ws,
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
    )
    .await;
    recv(&mut ws).await;
    recv(&mut ws).await;
    send(
        &mut ws,
        "<message xmlns='jabber:client'><unclosed></message>",
    )
    .await;
    assert!(recv(&mut ws).await.contains("<not-well-formed"));
}

#[tokio::test]
async fn probes_answer() {
    let server = TestServer::start().await;
    let live = tokio::net::TcpStream::connect(server.http()).await;
    assert!(live.is_ok());
    let response = http_get(server.http(), "/live").await;
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("live\n"),
        "{response}"
    );
    let response = http_get(server.http(), "/ready").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// A WebSocket frame larger than a stanza may be is refused before it is
/// read whole (tungstenite would otherwise take frames of 16 MiB).
#[tokio::test]
async fn websocket_frames_larger_than_a_stanza_end_the_connection() {
    let server = TestServer::start_with(|c| c.c2s.max_stanza_size = 20_000).await;
    let mut ws = connect(&server).await;
    let big = format!(
        "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0' x='{}'/>",
        "x".repeat(100_000)
    );
    let _ = ws.send(Message::Text(big.into())).await;
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not ended");
    // The server goes on serving WebSocket clients.
    let mut ws = connect(&server).await;
    send(&mut ws, OPEN).await;
    assert!(recv(&mut ws).await.starts_with("<open"));
}

/// A browser that closes its WebSocket (a tab closed, a page left) without
/// `<close/>` ends its session at once: nothing waits the five minutes of
/// stream management for a resumption that will not come, so its contacts
/// do not see it online meanwhile. (A connection that drops without a
/// close frame stays resumable.)
#[tokio::test]
async fn a_websocket_closed_by_the_browser_ends_the_session_at_once() {
    let server = TestServer::start().await;
    server.create_user("alice", "secret").await;
    let mut ws = ws_online(&server, "alice", "web").await;
    send(&mut ws, "<enable xmlns='urn:xmpp:sm:3' resume='true'/>").await;
    let enabled: minidom::Element = recv(&mut ws).await.parse().expect("an element");
    assert_eq!(enabled.name(), "enabled");
    let previd = enabled.attr("id").expect("resumable").to_owned();
    ws.close(None).await.expect("a close frame");
    while let Ok(Some(_)) = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await
    {
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let mut again = TestClient::connect(server.starttls()).await;
    again.open().await;
    again.starttls().await;
    again
        .authenticate_scram("alice", "secret", rookery_stream::ScramHash::Sha256)
        .await
        .expect("authenticated");
    assert_eq!(
        again.resume(&previd, 0).await,
        Err("item-not-found".to_owned())
    );
}
