//! [`TestClient`]: a scriptable XMPP client for tests, able to send anything
//! (including garbage) and to wait for what the server answers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use jid::FullJid;
use minidom::Element;
use rookery_stream::xml::{Limits, StreamReader, XmlEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::certs::client_config;

/// How long `recv` waits before failing the test.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const STREAMS: &str = "http://etherx.jabber.org/streams";
const SM: &str = "urn:xmpp:sm:3";

/// The stream header a client sends.
pub const OPEN: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Gone,
}

/// What the server sent that is not an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// `</stream:stream>` arrived.
    StreamEnd,
    /// The connection ended.
    Eof,
}

/// A test client connection.
pub struct TestClient {
    io: Io,
    reader: StreamReader,
    pending: VecDeque<Element>,
    closed: Option<Closed>,
    /// The bound JID, once bound.
    pub jid: Option<FullJid>,
    /// The stream features of the latest stream (re)start.
    pub features: Option<Element>,
    /// The id of the server's latest stream header.
    pub stream_id: Option<String>,
    counter: u64,
}

impl std::fmt::Debug for TestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestClient")
            .field("jid", &self.jid)
            .finish_non_exhaustive()
    }
}

fn limits() -> Limits {
    // The client trusts the server: only bounds that catch a runaway stream.
    Limits {
        max_stanza_bytes: 16 * 1024 * 1024,
        max_unauthenticated_stanza_bytes: 16 * 1024 * 1024,
        max_header_bytes: 1024 * 1024,
        max_depth: 1000,
        max_attributes: 100_000,
    }
}

impl TestClient {
    /// Opens a TCP connection (STARTTLS listener).
    pub async fn connect(address: SocketAddr) -> TestClient {
        let tcp = TcpStream::connect(address).await.expect("connect");
        TestClient::new(Io::Plain(tcp))
    }

    /// Opens a TCP connection (STARTTLS listener) whose socket takes in at
    /// most about `bytes` that the client has not read: a client that stops
    /// reading soon holds up the server's writes.
    pub async fn connect_with_receive_buffer(address: SocketAddr, bytes: u32) -> TestClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let tcp = socket.connect(address).await.expect("connect");
        TestClient::new(Io::Plain(tcp))
    }

    /// Opens a TLS connection (direct TLS listener).
    pub async fn connect_tls(address: SocketAddr) -> TestClient {
        let tcp = TcpStream::connect(address).await.expect("connect");
        let tls = tls_handshake(tcp).await;
        TestClient::new(Io::Tls(Box::new(tls)))
    }

    /// Connects to a component listener as the external component of
    /// `domain` (XEP-0114) and shakes hands with `secret`. Stanzas are read
    /// and written in `jabber:client`, as for a client. `Err` is the stream
    /// error condition the server answered with.
    pub async fn component(
        address: SocketAddr,
        domain: &str,
        secret: &str,
    ) -> Result<TestClient, String> {
        let tcp = TcpStream::connect(address).await.expect("connect");
        let mut client = TestClient::new(Io::Plain(tcp));
        client.reader = StreamReader::component(limits());
        client
            .send(&format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
                 xmlns:stream='{STREAMS}' to='{domain}'>"
            ))
            .await;
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        while client.stream_id.is_none() && client.closed.is_none() {
            if tokio::time::timeout_at(deadline, client.fill())
                .await
                .is_err()
            {
                panic!("no component stream header within {RECV_TIMEOUT:?}");
            }
        }
        if client.pending.iter().any(|e| e.is("error", STREAMS)) {
            return Err(client.expect_stream_error().await);
        }
        let id = client.stream_id.clone().expect("a header");
        let digest = rookery_stream::handshake_digest(&id, secret);
        client
            .send(&format!("<handshake>{digest}</handshake>"))
            .await;
        let answer = client
            .expect(|e| e.is("handshake", "jabber:client") || e.is("error", STREAMS))
            .await;
        if answer.is("error", STREAMS) {
            client.pending.push_front(answer);
            return Err(client.expect_stream_error().await);
        }
        Ok(client)
    }

    /// The client's end of the connection, while it is open.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.io {
            Io::Plain(tcp) => tcp.local_addr().ok(),
            Io::Tls(tls) => tls.get_ref().0.local_addr().ok(),
            Io::Gone => None,
        }
    }

    fn new(io: Io) -> TestClient {
        TestClient {
            io,
            reader: StreamReader::new(limits()),
            pending: VecDeque::new(),
            closed: None,
            jid: None,
            features: None,
            stream_id: None,
            counter: 0,
        }
    }

    /// Connects over STARTTLS, authenticates with SCRAM-SHA-256 and binds `resource`.
    pub async fn login(
        address: SocketAddr,
        user: &str,
        password: &str,
        resource: &str,
    ) -> TestClient {
        let mut client = TestClient::connect(address).await;
        client.open().await;
        client.starttls().await;
        client
            .authenticate_scram(user, password, rookery_stream::ScramHash::Sha256)
            .await
            .expect("login");
        client.bind(Some(resource)).await;
        client
    }

    /// Like [`login`](Self::login), then sends initial presence and fetches the roster.
    pub async fn online(
        address: SocketAddr,
        user: &str,
        password: &str,
        resource: &str,
    ) -> TestClient {
        let mut client = TestClient::login(address, user, password, resource).await;
        client
            .iq("<iq type='get'><query xmlns='jabber:iq:roster'/></iq>")
            .await;
        client.send("<presence/>").await;
        // Our own presence comes back.
        let own = client.jid.clone().expect("bound").to_string();
        client
            .expect(move |e| e.name() == "presence" && e.attr("from") == Some(own.as_str()))
            .await;
        client
    }

    /// Makes this client's user and `other`'s subscribed to each other (both
    /// online), and waits until each saw the other's presence.
    pub async fn befriend(&mut self, other: &mut TestClient) {
        let me = self.jid.clone().expect("bound").to_bare().to_string();
        let them = other.jid.clone().expect("bound").to_bare().to_string();
        self.send(&format!("<presence type='subscribe' to='{them}'/>"))
            .await;
        other.expect(|e| e.attr("type") == Some("subscribe")).await;
        other
            .send(&format!(
                "<presence type='subscribed' to='{me}'/><presence type='subscribe' to='{me}'/>"
            ))
            .await;
        self.expect(|e| e.attr("type") == Some("subscribe")).await;
        self.send(&format!("<presence type='subscribed' to='{them}'/>"))
            .await;
        let available_from = |bare: String| {
            move |e: &Element| {
                e.name() == "presence"
                    && e.attr("type").is_none()
                    && e.attr("from")
                        .is_some_and(|f| f.starts_with(&format!("{bare}/")))
            }
        };
        self.expect(available_from(them)).await;
        other.expect(available_from(me)).await;
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let result = match &mut self.io {
            Io::Plain(tcp) => tcp.write_all(bytes).await,
            Io::Tls(tls) => {
                let result = tls.write_all(bytes).await;
                match result {
                    Ok(()) => tls.flush().await,
                    error => error,
                }
            }
            Io::Gone => return,
        };
        // A failed write shows up as the end of the stream when reading.
        let _ = result;
    }

    /// Sends XML text.
    pub async fn send(&mut self, xml: &str) {
        self.send_bytes(xml.as_bytes()).await;
    }

    /// Sends the stream header and returns the features.
    pub async fn open(&mut self) -> Element {
        self.reader = StreamReader::new(limits());
        self.send(OPEN).await;
        let features = self.expect(|e| e.is("features", STREAMS)).await;
        self.features = Some(features.clone());
        features
    }

    /// Negotiates STARTTLS and restarts the stream.
    pub async fn starttls(&mut self) -> Element {
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        let proceed = self.recv().await;
        assert_eq!(
            proceed.name(),
            "proceed",
            "STARTTLS refused: {}",
            String::from(&proceed)
        );
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            panic!("already TLS")
        };
        self.io = Io::Tls(Box::new(tls_handshake(tcp).await));
        self.open().await
    }

    /// SASL with SCRAM; `Err` holds the failure condition.
    pub async fn authenticate_scram(
        &mut self,
        user: &str,
        password: &str,
        hash: rookery_stream::ScramHash,
    ) -> Result<(), String> {
        let binding = sasl::common::ChannelBinding::None;
        let mut mechanism: Box<dyn sasl::client::Mechanism + Send> = match hash {
            rookery_stream::ScramHash::Sha1 => Box::new(
                sasl::client::mechanisms::Scram::<sasl::common::scram::Sha1>::new(
                    user, password, binding,
                )
                .unwrap(),
            ),
            rookery_stream::ScramHash::Sha256 => Box::new(
                sasl::client::mechanisms::Scram::<sasl::common::scram::Sha256>::new(
                    user, password, binding,
                )
                .unwrap(),
            ),
        };
        let initial = BASE64.encode(mechanism.initial());
        self.send(&format!(
            "<auth xmlns='{SASL}' mechanism='{}'>{initial}</auth>",
            hash.mechanism()
        ))
        .await;
        loop {
            let answer = self.expect(|e| e.has_ns(SASL)).await;
            match answer.name() {
                "challenge" => {
                    let challenge = BASE64
                        .decode(answer.text().trim())
                        .expect("base64 challenge");
                    let response = mechanism
                        .response(&challenge)
                        .map_err(|e| format!("client: {e}"))?;
                    self.send(&format!(
                        "<response xmlns='{SASL}'>{}</response>",
                        BASE64.encode(response)
                    ))
                    .await;
                }
                "success" => {
                    let data = BASE64.decode(answer.text().trim()).expect("base64 success");
                    mechanism
                        .success(&data)
                        .map_err(|e| format!("server signature: {e}"))?;
                    self.open().await;
                    return Ok(());
                }
                _ => {
                    return Err(answer
                        .children()
                        .next()
                        .map(|c| c.name().to_owned())
                        .unwrap_or_default());
                }
            }
        }
    }

    /// SASL PLAIN; `Err` holds the failure condition.
    pub async fn authenticate_plain(&mut self, user: &str, password: &str) -> Result<(), String> {
        let payload = BASE64.encode(format!("\0{user}\0{password}"));
        self.send(&format!(
            "<auth xmlns='{SASL}' mechanism='PLAIN'>{payload}</auth>"
        ))
        .await;
        let answer = self.expect(|e| e.has_ns(SASL)).await;
        if answer.name() == "success" {
            self.open().await;
            Ok(())
        } else {
            Err(answer
                .children()
                .next()
                .map(|c| c.name().to_owned())
                .unwrap_or_default())
        }
    }

    /// Binds a resource (or lets the server choose) and returns the JID.
    pub async fn bind(&mut self, resource: Option<&str>) -> FullJid {
        let resource = resource
            .map(|r| format!("<resource>{r}</resource>"))
            .unwrap_or_default();
        let result = self.iq(&format!("<iq type='set'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>{resource}</bind></iq>")).await;
        assert_eq!(
            result.attr("type"),
            Some("result"),
            "bind failed: {}",
            String::from(&result)
        );
        let jid = result
            .get_child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .unwrap()
            .get_child("jid", "urn:ietf:params:xml:ns:xmpp-bind")
            .unwrap()
            .text();
        let jid = FullJid::new(&jid).expect("full JID");
        self.jid = Some(jid.clone());
        jid
    }

    /// Enables stream management (XEP-0198); returns the resumption id if resumable.
    pub async fn enable_sm(&mut self, resume: bool) -> Option<String> {
        self.send(&format!(
            "<enable xmlns='urn:xmpp:sm:3' resume='{resume}'/>"
        ))
        .await;
        let enabled = self
            .expect(|e| e.has_ns(SM) && matches!(e.name(), "enabled" | "failed"))
            .await;
        assert_eq!(enabled.name(), "enabled", "{}", String::from(&enabled));
        enabled.attr("id").map(str::to_owned)
    }

    /// Resumes a session after authentication; returns the server's `h`, or the failure.
    pub async fn resume(&mut self, previd: &str, h: u32) -> Result<u32, String> {
        self.send(&format!(
            "<resume xmlns='urn:xmpp:sm:3' previd='{previd}' h='{h}'/>"
        ))
        .await;
        let answer = self
            .expect(|e| e.has_ns(SM) && matches!(e.name(), "resumed" | "failed"))
            .await;
        if answer.name() == "resumed" {
            Ok(answer.attr("h").and_then(|h| h.parse().ok()).expect("h"))
        } else {
            Err(answer
                .children()
                .next()
                .map(|c| c.name().to_owned())
                .unwrap_or_default())
        }
    }

    /// A fresh id.
    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("t{}", self.counter)
    }

    /// Sends an iq (an `id` is added when missing) and returns its answer.
    pub async fn iq(&mut self, xml: &str) -> Element {
        let mut iq: Element = xml
            .replacen("<iq", "<iq xmlns='jabber:client'", 1)
            .parse()
            .expect("iq XML");
        let id = match iq.attr("id") {
            Some(id) => id.to_owned(),
            None => {
                let id = self.next_id();
                rookery_stream::xml::set_attr(&mut iq, "id", id.as_str());
                id
            }
        };
        self.send(&String::from(&iq)).await;
        self.expect(|e| {
            e.name() == "iq"
                && e.attr("id") == Some(id.as_str())
                && matches!(e.attr("type"), Some("result" | "error"))
        })
        .await
    }

    /// The next element from the server.
    pub async fn recv(&mut self) -> Element {
        match self.recv_timeout(RECV_TIMEOUT).await {
            Some(element) => element,
            None => panic!(
                "{:?}: nothing received within {RECV_TIMEOUT:?} (closed: {:?})",
                self.jid, self.closed
            ),
        }
    }

    /// The next element, or `None` after `timeout` or when the stream ended.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Option<Element> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(element) = self.pending.pop_front() {
                return Some(element);
            }
            if self.closed.is_some() {
                return None;
            }
            if tokio::time::timeout_at(deadline, self.fill())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// The first element matching `matches`, keeping the others for later.
    pub async fn expect(&mut self, matches: impl Fn(&Element) -> bool) -> Element {
        if let Some(index) = self.pending.iter().position(&matches) {
            return self.pending.remove(index).expect("found");
        }
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        loop {
            let before = self.pending.len();
            if self.closed.is_some() {
                panic!(
                    "{:?}: stream ended ({:?}) while waiting; got {:?}",
                    self.jid,
                    self.closed,
                    self.describe_pending()
                );
            }
            if tokio::time::timeout_at(deadline, self.fill())
                .await
                .is_err()
            {
                panic!(
                    "{:?}: the expected element did not arrive within {RECV_TIMEOUT:?}; got {:?}",
                    self.jid,
                    self.describe_pending()
                );
            }
            if let Some(offset) = self.pending.iter().skip(before).position(&matches) {
                return self.pending.remove(before + offset).expect("found");
            }
        }
    }

    /// Waits for a message with a body and returns the body.
    pub async fn expect_message(&mut self) -> Element {
        self.expect(|e| e.name() == "message" && e.get_child("body", "jabber:client").is_some())
            .await
    }

    /// Waits for a presence from `from` (full or bare prefix match).
    pub async fn expect_presence_from(&mut self, from: &str) -> Element {
        let from = from.to_owned();
        self.expect(move |e| {
            e.name() == "presence"
                && e.attr("from")
                    .is_some_and(|f| f == from || f.starts_with(&format!("{from}/")))
        })
        .await
    }

    /// Asserts that nothing matching `matches` arrives within `wait`.
    pub async fn assert_none(&mut self, wait: Duration, matches: impl Fn(&Element) -> bool) {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if let Some(found) = self.pending.iter().find(|e| matches(e)) {
                panic!("{:?}: unexpected {}", self.jid, String::from(found));
            }
            if self.closed.is_some()
                || tokio::time::timeout_at(deadline, self.fill())
                    .await
                    .is_err()
            {
                break;
            }
        }
        if let Some(found) = self.pending.iter().find(|e| matches(e)) {
            panic!("{:?}: unexpected {}", self.jid, String::from(found));
        }
    }

    /// Waits for a stream error and the end of the connection; returns the condition.
    pub async fn expect_stream_error(&mut self) -> String {
        let error = self.expect(|e| e.is("error", STREAMS)).await;
        let condition = error
            .children()
            .find(|c| c.has_ns("urn:ietf:params:xml:ns:xmpp-streams") && c.name() != "text")
            .map(|c| c.name().to_owned())
            .unwrap_or_default();
        self.expect_closed().await;
        condition
    }

    /// Waits until the server closes the stream and the connection.
    pub async fn expect_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        while self.closed != Some(Closed::Eof) {
            if tokio::time::timeout_at(deadline, self.fill())
                .await
                .is_err()
            {
                panic!(
                    "{:?}: the server did not close the connection (state {:?})",
                    self.jid, self.closed
                );
            }
        }
    }

    /// True once the connection ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Drops the TCP connection without closing the stream (an unclean disconnect).
    pub fn kill(mut self) {
        self.io = Io::Gone;
    }

    /// Closes the stream cleanly and waits for the server's close.
    pub async fn close(mut self) {
        self.send("</stream:stream>").await;
        let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
        while self.closed.is_none() && tokio::time::timeout_at(deadline, self.fill()).await.is_ok()
        {
        }
    }

    fn describe_pending(&self) -> Vec<String> {
        self.pending.iter().map(String::from).collect()
    }

    /// Reads once from the connection and parses what arrived.
    async fn fill(&mut self) {
        let mut buffer = BytesMut::with_capacity(16 * 1024);
        let read = match &mut self.io {
            Io::Plain(tcp) => tcp.read_buf(&mut buffer).await,
            Io::Tls(tls) => tls.read_buf(&mut buffer).await,
            Io::Gone => Ok(0),
        };
        match read {
            Ok(0) | Err(_) => {
                self.closed = Some(Closed::Eof);
                return;
            }
            Ok(_) => {}
        }
        let mut input = &buffer[..];
        loop {
            match self.reader.read(&mut input) {
                Ok(Some(XmlEvent::Element(element))) => self.pending.push_back(element),
                Ok(Some(XmlEvent::StreamClose)) => {
                    self.closed.get_or_insert(Closed::StreamEnd);
                }
                Ok(Some(XmlEvent::StreamOpen { attrs, .. })) => {
                    self.stream_id = attrs.get(&rxml::Namespace::NONE, "id").cloned();
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(condition) => panic!("the server sent bad XML: {condition}"),
            }
        }
    }
}

async fn tls_handshake(tcp: TcpStream) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(client_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the test server")
}
