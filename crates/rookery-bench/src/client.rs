//! A lean XMPP client for load: STARTTLS, direct TLS or plain TCP; SCRAM or
//! PLAIN; binding, presence and roster. It speaks to any server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use minidom::Element;
use rookery_stream::sasl::ScramHash;
use rookery_stream::xml::{Limits, StreamReader, XmlEvent};

use crate::scram::ScramClient;
use futures::SinkExt as _;
use futures::stream::{SplitSink, SplitStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::either::Either;

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server address.
    pub address: SocketAddr,
    /// XMPP domain.
    pub domain: String,
    /// Transport security.
    pub tls: TlsMode,
    /// XML stream over TCP or WebSocket.
    pub transport: Transport,
    /// SASL mechanism.
    pub mechanism: String,
    /// Local addresses to spread connections over (127.0.0.x), to get past the
    /// ephemeral port limit of one source address.
    pub sources: Vec<IpAddr>,
    /// A small socket receive buffer (SO_RCVBUF), for a client that reads
    /// slowly; `None` for the system's.
    pub receive_buffer: Option<u32>,
}

/// Transport security of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum TlsMode {
    /// Plain TCP, STARTTLS negotiated.
    Starttls,
    /// TLS from the first byte (XEP-0368).
    Direct,
    /// No TLS at all (the server must allow it).
    None,
}

type Io = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type WebSocket = tokio_tungstenite::WebSocketStream<Io>;

/// How stanzas travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// An XML stream over TCP (RFC 6120).
    Tcp,
    /// One element per WebSocket text frame (RFC 7395), at this HTTP path;
    /// `ws://` with TLS `none`, `wss://` with TLS `direct`.
    WebSocket {
        /// The path of the endpoint, e.g. `/xmpp-websocket`.
        path: String,
    },
}

/// A logged-in connection.
pub struct Connection {
    receiver: Receiver,
    sender: Sender,
    /// The bound JID.
    pub jid: String,
    /// The features of the latest stream (re)start.
    pub features: Option<Element>,
    /// Messages [`until`](Self::until) passed over, once [`keep_messages`](Self::keep_messages) is on.
    kept: Option<Vec<Element>>,
}

/// The server ended the stream with an error (RFC 6120, 4.9).
#[derive(Debug, Clone, thiserror::Error)]
#[error("stream error {condition}{}", text.as_deref().map(|t| format!(": {t}")).unwrap_or_default())]
pub struct StreamError {
    /// The defined condition (`see-other-host`, `conflict`, ...).
    pub condition: String,
    /// The server's explanation.
    pub text: Option<String>,
    /// The content of the condition element: the new address for `see-other-host`.
    pub content: String,
}

impl StreamError {
    /// Reads a `<stream:error/>`; `None` for anything else.
    pub fn from_element(element: &Element) -> Option<StreamError> {
        const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
        if !element.is("error", "http://etherx.jabber.org/streams") {
            return None;
        }
        let condition = element
            .children()
            .find(|c| c.has_ns(STREAMS) && c.name() != "text")?;
        Some(StreamError {
            condition: condition.name().to_owned(),
            text: element.get_child("text", STREAMS).map(Element::text),
            content: condition.text().trim().to_owned(),
        })
    }

    /// The address to reconnect to, for `see-other-host`.
    pub fn other_host(&self) -> Option<&str> {
        (self.condition == "see-other-host" && !self.content.is_empty())
            .then_some(self.content.as_str())
    }
}

/// Accepts any certificate and handshake signature: the bench measures
/// servers on loopback, often self-signed, and authenticates none of them.
/// Checking a signature of a certificate it accepts anyway would only add
/// the bench's own CPU (an ECDSA verification per login) to what it measures.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

async fn tls(tcp: TcpStream, domain: &str) -> anyhow::Result<Io> {
    let name = rustls::pki_types::ServerName::try_from(domain.to_owned())?;
    Ok(Either::Right(tls_connector().connect(name, tcp).await?))
}

const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";

impl Connection {
    /// Connects, authenticates `user` and binds `resource`.
    pub async fn login(
        target: &Target,
        index: usize,
        user: &str,
        password: &str,
        resource: &str,
    ) -> anyhow::Result<Connection> {
        let mut connection = Connection::authenticate(target, index, user, password).await?;
        connection.bind(resource).await?;
        Ok(connection)
    }

    /// Connects and authenticates `user`; the stream is restarted and its
    /// features (in [`features`](Self::features)) offer binding or resumption.
    pub async fn authenticate(
        target: &Target,
        index: usize,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Connection> {
        let mut connection = Connection::negotiate(target, index).await?;
        connection.sasl(&target.mechanism, user, password).await?;
        connection.open(&target.domain).await?;
        Ok(connection)
    }

    /// Connects and opens the stream, with TLS as the target says; the
    /// features (in [`features`](Self::features)) offer authentication.
    pub async fn negotiate(target: &Target, index: usize) -> anyhow::Result<Connection> {
        let tcp = connect(target, index).await?;
        let io = match target.tls {
            TlsMode::Direct => tls(tcp, &target.domain).await?,
            _ => Either::Left(tcp),
        };
        let mut connection = match &target.transport {
            Transport::Tcp => Connection::over_stream(io),
            Transport::WebSocket { path } => {
                if target.tls == TlsMode::Starttls {
                    bail!("WebSocket has no STARTTLS: use TLS direct (wss://) or none (ws://)");
                }
                Connection::over_websocket(io, target, path).await?
            }
        };
        connection.open(&target.domain).await?;
        if target.tls == TlsMode::Starttls {
            connection
                .send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .await?;
            let proceed = connection.next().await?;
            if proceed.name() != "proceed" {
                bail!("STARTTLS refused");
            }
            let (Source::Stream(read), Sink::Stream(write)) =
                (connection.receiver.source, connection.sender.sink)
            else {
                bail!("STARTTLS on a WebSocket")
            };
            let Either::Left(tcp) = read.unsplit(write) else {
                bail!("STARTTLS on a TLS stream")
            };
            connection = Connection::over_stream(tls(tcp, &target.domain).await?);
            connection.open(&target.domain).await?;
        }
        Ok(connection)
    }

    /// Creates the account by in-band registration (XEP-0077). `Ok(false)`
    /// when it exists already.
    pub async fn register(
        target: &Target,
        index: usize,
        user: &str,
        password: &str,
    ) -> anyhow::Result<bool> {
        let mut connection = Connection::negotiate(target, index).await?;
        connection
            .send(&format!(
                "<iq type='set' id='reg'><query xmlns='jabber:iq:register'><username>{user}</username><password>{password}</password></query></iq>"
            ))
            .await?;
        let answer = connection.until(|e| e.attr("id") == Some("reg")).await?;
        let created = match answer.attr("type") {
            Some("result") => true,
            _ if answer
                .get_child("error", "jabber:client")
                .is_some_and(|e| e.children().any(|c| c.name() == "conflict")) =>
            {
                false
            }
            _ => bail!("registration refused: {}", String::from(&answer)),
        };
        connection.close().await;
        Ok(created)
    }

    /// Ends the stream and the connection.
    pub async fn close(mut self) {
        let _ = self.sender.close().await;
    }

    fn over_stream(io: Io) -> Connection {
        let (read, write) = tokio::io::split(io);
        Connection::new(Source::Stream(read), Sink::Stream(write))
    }

    async fn over_websocket(io: Io, target: &Target, path: &str) -> anyhow::Result<Connection> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let scheme = if target.tls == TlsMode::Direct {
            "wss"
        } else {
            "ws"
        };
        let mut request = format!("{scheme}://{}{path}", target.address).into_client_request()?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "xmpp".parse()?);
        let (websocket, response) = tokio_tungstenite::client_async(request, io)
            .await
            .context("WebSocket handshake")?;
        if response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .is_none_or(|protocol| protocol != "xmpp")
        {
            bail!("the server did not accept the WebSocket sub-protocol xmpp");
        }
        let (sink, source) = futures::StreamExt::split(websocket);
        Ok(Connection::new(
            Source::WebSocket(source),
            Sink::WebSocket(sink),
        ))
    }

    fn new(source: Source, sink: Sink) -> Connection {
        Connection {
            receiver: Receiver {
                source,
                reader: new_reader(),
                buffer: BytesMut::new(),
            },
            sender: Sender { sink },
            jid: String::new(),
            features: None,
            kept: None,
        }
    }

    /// Binds `resource` (RFC 6120, 7); the bound JID goes to [`jid`](Self::jid).
    pub async fn bind(&mut self, resource: &str) -> anyhow::Result<()> {
        self.send(&format!("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"))
            .await?;
        let bound = self.until(|e| e.attr("id") == Some("bind")).await?;
        self.jid = bound
            .get_child("bind", "urn:ietf:params:xml:ns:xmpp-bind")
            .and_then(|b| b.get_child("jid", "urn:ietf:params:xml:ns:xmpp-bind"))
            .map(Element::text)
            .context("bind failed")?;
        Ok(())
    }

    /// Fetches the roster and sends initial presence, as a client going online does.
    pub async fn go_online(&mut self) -> anyhow::Result<()> {
        self.sender
            .send_all(&[
                "<iq type='get' id='roster'><query xmlns='jabber:iq:roster'/></iq>",
                "<presence/>",
            ])
            .await?;
        self.until(|e| e.attr("id") == Some("roster")).await?;
        Ok(())
    }

    /// Opens (or restarts) the stream and reads its features.
    async fn open(&mut self, domain: &str) -> anyhow::Result<()> {
        self.receiver.restart();
        let header = match self.sender.sink {
            Sink::Stream(_) => format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>"
            ),
            Sink::WebSocket(_) => format!("<open xmlns='{FRAMING}' to='{domain}' version='1.0'/>"),
        };
        self.send(&header).await?;
        self.features = Some(self.until(|e| e.name() == "features").await?);
        Ok(())
    }

    async fn sasl(&mut self, mechanism: &str, user: &str, password: &str) -> anyhow::Result<()> {
        const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
        let mut scram = match mechanism {
            "SCRAM-SHA-256" => Some(ScramClient::new(ScramHash::Sha256, user, password)),
            "SCRAM-SHA-1" => Some(ScramClient::new(ScramHash::Sha1, user, password)),
            "PLAIN" => None,
            other => bail!("unsupported mechanism {other}"),
        };
        let initial = match &scram {
            Some(scram) => scram.initial(),
            None => format!("\0{user}\0{password}").into_bytes(),
        };
        self.send(&format!(
            "<auth xmlns='{SASL}' mechanism='{mechanism}'>{}</auth>",
            BASE64.encode(initial)
        ))
        .await?;
        loop {
            let answer = self.until(|e| e.has_ns(SASL)).await?;
            let data = BASE64.decode(answer.text().trim())?;
            match (answer.name(), &mut scram) {
                ("challenge", Some(scram)) => {
                    let response = scram.respond(&data)?;
                    self.send(&format!(
                        "<response xmlns='{SASL}'>{}</response>",
                        BASE64.encode(response)
                    ))
                    .await?;
                }
                ("success", scram) => {
                    if let Some(scram) = scram {
                        scram.verify(&data)?;
                    }
                    return Ok(());
                }
                _ => bail!(
                    "authentication failed for {user}: {}",
                    String::from(&answer)
                ),
            }
        }
    }

    /// Sends one element (or a stream header) as raw XML.
    pub async fn send(&mut self, xml: &str) -> anyhow::Result<()> {
        self.sender.send(xml).await
    }

    /// The next element.
    pub async fn next(&mut self) -> anyhow::Result<Element> {
        self.receiver.read().await
    }

    /// The first element matching `matches`, dropping others (but see
    /// [`keep_messages`](Self::keep_messages)).
    pub async fn until(&mut self, matches: impl Fn(&Element) -> bool) -> anyhow::Result<Element> {
        loop {
            let element = self.next().await?;
            if let Some(error) = StreamError::from_element(&element) {
                return Err(error.into());
            }
            if matches(&element) {
                return Ok(element);
            }
            if let Some(kept) = &mut self.kept
                && element.name() == "message"
            {
                kept.push(element);
            }
        }
    }

    /// From now on [`until`](Self::until) keeps the messages it passes over:
    /// once bound, a session may be sent messages before the client's next
    /// request is answered (stream management enabled, say).
    pub fn keep_messages(&mut self) {
        self.kept.get_or_insert_with(Vec::new);
    }

    /// The messages [`until`](Self::until) kept, oldest first.
    pub fn take_kept(&mut self) -> Vec<Element> {
        self.kept.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Splits into a reading and a writing half.
    pub fn split(self) -> (Receiver, Sender) {
        (self.receiver, self.sender)
    }
}

/// Where a connection's bytes or frames come from.
enum Source {
    Stream(ReadHalf<Io>),
    WebSocket(SplitStream<WebSocket>),
}

/// Where a connection's bytes or frames go.
enum Sink {
    Stream(WriteHalf<Io>),
    WebSocket(SplitSink<WebSocket, Message>),
}

/// The reading half of a connection.
pub struct Receiver {
    source: Source,
    reader: StreamReader,
    buffer: BytesMut,
}

impl Receiver {
    /// The next element, `None` when the connection ends.
    pub async fn next(&mut self) -> Option<Element> {
        self.read().await.ok()
    }

    /// Starts reading a new stream (after the stream header or `<open/>` is sent).
    fn restart(&mut self) {
        self.reader = new_reader();
        self.buffer.clear();
        if let Source::WebSocket(_) = self.source {
            // Every frame is one element (RFC 7395): the reader sees them as
            // the children of a stream, whose header is made up here.
            self.buffer.extend_from_slice(
                b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
            );
        }
    }

    async fn read(&mut self) -> anyhow::Result<Element> {
        loop {
            let mut input = &self.buffer[..];
            let before = input.len();
            let event = self
                .reader
                .read(&mut input)
                .map_err(|c| anyhow::anyhow!("server sent bad XML: {c}"))?;
            let consumed = before - input.len();
            let _ = self.buffer.split_to(consumed);
            match event {
                Some(XmlEvent::Element(element)) if element.is("close", FRAMING) => {
                    bail!("stream closed by the server")
                }
                Some(XmlEvent::Element(element)) => return Ok(element),
                Some(XmlEvent::StreamClose) => bail!("stream closed by the server"),
                Some(_) => continue,
                None => self.fill().await?,
            }
        }
    }

    /// Reads more of the stream into the buffer.
    async fn fill(&mut self) -> anyhow::Result<()> {
        match &mut self.source {
            Source::Stream(io) => {
                self.buffer.reserve(8192);
                if io.read_buf(&mut self.buffer).await? == 0 {
                    bail!("connection closed by the server");
                }
            }
            Source::WebSocket(frames) => loop {
                match futures::StreamExt::next(frames).await {
                    Some(Ok(Message::Text(text))) => {
                        self.buffer.extend_from_slice(text.as_bytes());
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        bail!("connection closed by the server")
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Err(error.into()),
                }
            },
        }
        Ok(())
    }
}

/// The writing half of a connection.
pub struct Sender {
    sink: Sink,
}

impl Sender {
    /// Sends one element (or a stream header) as raw XML.
    pub async fn send(&mut self, xml: &str) -> anyhow::Result<()> {
        self.send_all(&[xml]).await
    }

    /// Sends elements together: in one write on a stream, one frame each on
    /// a WebSocket.
    pub async fn send_all(&mut self, elements: &[&str]) -> anyhow::Result<()> {
        match &mut self.sink {
            Sink::Stream(io) => {
                match elements {
                    [one] => io.write_all(one.as_bytes()).await?,
                    many => io.write_all(many.concat().as_bytes()).await?,
                }
                io.flush().await?;
            }
            Sink::WebSocket(frames) => {
                for element in elements {
                    frames.feed(Message::text(framed(element))).await?;
                }
                frames.flush().await?;
            }
        }
        Ok(())
    }

    /// Ends the stream (`</stream:stream>` or `<close/>`) and the connection.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        match &mut self.sink {
            Sink::Stream(io) => {
                io.write_all(b"</stream:stream>").await?;
                io.shutdown().await?;
            }
            Sink::WebSocket(frames) => {
                frames
                    .send(Message::text(format!("<close xmlns='{FRAMING}'/>")))
                    .await?;
                frames.close().await?;
            }
        }
        Ok(())
    }
}

/// A stanza as a WebSocket frame: with the `jabber:client` namespace that a
/// TCP stream's header declares once, since every frame stands alone
/// (RFC 7395, 3.3.3). Other elements name their namespace already.
fn framed(element: &str) -> String {
    let name_end = element
        .find(|c: char| c.is_whitespace() || c == '/' || c == '>')
        .unwrap_or(element.len());
    let start_tag = &element[..element.find('>').unwrap_or(element.len())];
    if matches!(&element[..name_end], "<message" | "<presence" | "<iq")
        && !start_tag.contains("xmlns=")
    {
        format!(
            "{} xmlns='jabber:client'{}",
            &element[..name_end],
            &element[name_end..]
        )
    } else {
        element.to_owned()
    }
}

fn new_reader() -> StreamReader {
    // The bench reads servers it measures: only bounds that catch a runaway stream.
    StreamReader::new(Limits {
        max_stanza_bytes: 10 * 1024 * 1024,
        max_unauthenticated_stanza_bytes: 10 * 1024 * 1024,
        max_header_bytes: 1024 * 1024,
        max_depth: 1000,
        max_attributes: 100_000,
    })
}

async fn connect(target: &Target, index: usize) -> anyhow::Result<TcpStream> {
    let socket = if target.address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(bytes) = target.receive_buffer {
        socket.set_recv_buffer_size(bytes)?;
    }
    if !target.sources.is_empty() {
        socket.bind(SocketAddr::new(
            target.sources[index % target.sources.len()],
            0,
        ))?;
    }
    let stream = socket
        .connect(target.address)
        .await
        .with_context(|| format!("connect to {}", target.address))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::framed;

    #[test]
    fn frames_carry_the_client_namespace() {
        assert_eq!(framed("<presence/>"), "<presence xmlns='jabber:client'/>");
        assert_eq!(
            framed("<message to='a@b'><body xmlns='x'>hi</body></message>"),
            "<message xmlns='jabber:client' to='a@b'><body xmlns='x'>hi</body></message>"
        );
        assert_eq!(
            framed("<iq xmlns='jabber:client' id='1'/>"),
            "<iq xmlns='jabber:client' id='1'/>"
        );
        let auth = "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>";
        assert_eq!(framed(auth), auth);
    }
}
