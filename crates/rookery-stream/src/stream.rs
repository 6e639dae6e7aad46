//! The server side of one client-to-server stream, as a sans-IO state machine.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use jid::{BareJid, FullJid};
use minidom::Element;

use crate::sasl::{self, SaslError, SaslStep, ScramHash, ScramKeys, ScramServer};
use crate::sm::SmState;
use crate::xml::{self, Limits, StreamReader, StreamWriter, XmlEvent, escape_attr};
use crate::{Condition, StreamError, ns};

/// Whether a listener offers, requires or lacks STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No STARTTLS (direct TLS listeners, WebSocket, or no certificate).
    Unavailable,
    /// STARTTLS offered; authentication allowed without it only if plaintext auth is allowed.
    Optional,
    /// STARTTLS must be negotiated before anything else.
    Required,
}

/// How elements are framed on the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One XML document per connection (`<stream:stream>`), RFC 6120.
    Tcp,
    /// One element per WebSocket message, `<open/>` and `<close/>`, RFC 7395.
    WebSocket,
}

/// The stream's clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From connection to a bound (or resumed) session.
    pub negotiation: Duration,
    /// A top-level element that has started must finish within this time.
    pub stanza: Duration,
    /// Inbound silence after which the server pings the client (XEP-0199).
    pub idle: Duration,
    /// Time the client has to show life after a ping.
    pub ping: Duration,
    /// Outbound silence after which the server sends a whitespace keep-alive.
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            negotiation: Duration::from_secs(60),
            stanza: Duration::from_secs(60),
            idle: Duration::from_secs(300),
            ping: Duration::from_secs(60),
            keepalive: Duration::from_secs(120),
        }
    }
}

/// Settings shared by every stream of a listener.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The domain served.
    pub domain: String,
    /// STARTTLS policy of the listener.
    pub tls: TlsPolicy,
    /// Allow SASL on a stream that is not encrypted (PLAIN included). Off by default.
    pub allow_plaintext_auth: bool,
    /// Offer XEP-0077 in-band registration.
    pub registration: bool,
    /// Offer stream resumption with this `max` (seconds); `None` disables resumption.
    pub resume_timeout: Option<u32>,
    /// Most unacknowledged stanzas kept for a client before the stream is closed.
    pub max_unacked: usize,
    /// Most bytes of unacknowledged stanzas kept for a client before the stream is closed.
    pub max_unacked_bytes: usize,
    /// Failed SASL attempts allowed on one stream before it is closed.
    pub max_auth_failures: u32,
    /// Input limits.
    pub limits: Limits,
    /// Timers.
    pub timeouts: Timeouts,
    /// Extra stream features offered after authentication (CSI, roster versioning, caps, ...).
    pub session_features: Vec<Element>,
    /// Stand-in credentials for unknown users (same iterations, stable salt, same work).
    pub decoy: sasl::Decoy,
}

impl StreamConfig {
    /// Defaults for `domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        StreamConfig {
            domain: domain.into(),
            tls: TlsPolicy::Required,
            allow_plaintext_auth: false,
            registration: false,
            resume_timeout: Some(300),
            max_unacked: 5000,
            max_unacked_bytes: 2 * 1024 * 1024,
            max_auth_failures: 3,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            session_features: Vec::new(),
            decoy: sasl::Decoy::random(),
        }
    }
}

/// Which mechanism asks for keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// SCRAM with this hash: the keys of that hash are needed.
    Scram(ScramHash),
    /// PLAIN: any stored keys verify the password.
    Plain,
}

/// The caller's answer to [`StreamEvent::NeedKeys`].
#[derive(Debug, Clone)]
pub enum KeysAnswer {
    /// The stored keys of the user, `None` if there is no such user.
    Keys(Option<ScramKeys>),
    /// Refuse for now (rate limit): `temporary-auth-failure`.
    TemporaryFailure,
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the stream cleanly.
    PeerClosed,
    /// The client sent a stream error.
    PeerError(String),
    /// We closed it, with this error if any.
    Local(Option<StreamError>),
    /// The transport ended without a stream close.
    Eof,
}

/// Something the session task must act on.
#[derive(Debug)]
pub enum StreamEvent {
    /// `<proceed/>` is queued: flush it, run the TLS handshake, then call `handle_tls_established`.
    StartTls,
    /// Look up keys for this user and call `handle_keys`.
    NeedKeys {
        /// The account.
        jid: BareJid,
        /// The mechanism in use.
        mechanism: AuthMechanism,
    },
    /// SASL succeeded.
    Authenticated {
        /// The authenticated account.
        jid: BareJid,
    },
    /// A SASL attempt failed (for rate limiting and logs).
    AuthFailed {
        /// The user name given, if it could be parsed.
        username: Option<String>,
        /// The SASL condition sent.
        condition: &'static str,
    },
    /// The client asks to bind a resource; answer with `handle_bound` or `handle_bind_error`.
    Bind {
        /// The full JID asked for, `None` for a server-made resource.
        requested: Option<FullJid>,
    },
    /// The client asks to resume a session; answer with `handle_resumed` or `handle_resume_failed`.
    Resume {
        /// The resumption id.
        previd: String,
        /// The client's count of stanzas it handled.
        h: u32,
    },
    /// Stream management got enabled; with an id the session can be resumed.
    SmEnabled {
        /// The resumption id, if resumable.
        id: Option<String>,
    },
    /// An `<iq/>` before authentication (in-band registration).
    PreAuthIq(Element),
    /// A stanza from the bound client, with `from` stamped.
    Stanza(Element),
    /// XEP-0352 client state indication: the client became active or inactive.
    ClientState {
        /// True for `<inactive/>`.
        inactive: bool,
    },
    /// The stream is over; flush output and close the transport.
    Closed(CloseReason),
}

enum Sasl {
    Scram(Box<ScramServer>),
    /// PLAIN, holding the credentials once the client sent them.
    Plain(Option<sasl::PlainCredentials>),
}

enum State {
    /// Waiting for the stream header (or `<open/>`).
    Header,
    /// Header exchanged, features sent; negotiating.
    Negotiating,
    /// `<proceed/>` sent, waiting for the TLS handshake.
    AwaitTls,
    /// A SASL exchange is running for `jid` (once known); `awaiting_keys` while the caller looks keys up.
    Sasl {
        mechanism: Sasl,
        jid: Option<BareJid>,
        awaiting_keys: bool,
    },
    /// Waiting for the caller to bind; holds the iq id.
    AwaitBind(String),
    /// Waiting for the caller to resume.
    AwaitResume(String),
    /// A resource is bound; stanzas flow.
    Bound,
    /// The stream is over.
    Closed,
}

/// The server side of one client stream.
pub struct ServerStream {
    config: std::sync::Arc<StreamConfig>,
    framing: Framing,
    secure: bool,
    state: State,
    reader: StreamReader,
    /// The caller expects more traffic soon: drained buffers and the
    /// parser's scratch memory are kept until [`release_buffers`](Self::release_buffers).
    holding: bool,
    /// Unparsed input.
    input: BytesMut,
    /// Output not yet taken by `poll_transmit`.
    out: BytesMut,
    /// WebSocket messages ready to send.
    frames: VecDeque<Bytes>,
    events: VecDeque<StreamEvent>,
    header_sent: bool,
    stream_id: String,
    lang: String,
    authenticated: Option<BareJid>,
    auth_failures: u32,
    bound: Option<FullJid>,
    sm: Option<SmState>,
    ack_requested: bool,
    now: Instant,
    opened_at: Instant,
    last_rx: Instant,
    last_tx: Instant,
    element_started: Option<Instant>,
    ping: Option<(String, Instant)>,
    close_reported: bool,
}

impl ServerStream {
    /// A stream for a new connection; `secure` when the transport is already encrypted.
    pub fn new(
        config: std::sync::Arc<StreamConfig>,
        framing: Framing,
        secure: bool,
        now: Instant,
    ) -> Self {
        ServerStream {
            reader: StreamReader::new(config.limits.unauthenticated()),
            config,
            framing,
            secure,
            state: State::Header,
            holding: false,
            input: BytesMut::new(),
            out: BytesMut::new(),
            frames: VecDeque::new(),
            events: VecDeque::new(),
            header_sent: false,
            stream_id: String::new(),
            lang: "en".into(),
            authenticated: None,
            auth_failures: 0,
            bound: None,
            sm: None,
            ack_requested: false,
            now,
            opened_at: now,
            last_rx: now,
            last_tx: now,
            element_started: None,
            ping: None,
            close_reported: false,
        }
    }

    /// The bound full JID, once bound.
    pub fn jid(&self) -> Option<&FullJid> {
        self.bound.as_ref()
    }

    /// The authenticated account, once authenticated.
    pub fn authenticated(&self) -> Option<&BareJid> {
        self.authenticated.as_ref()
    }

    /// True when the transport is encrypted (or considered secure).
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// True once the stream is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True when stanzas can be sent to the client.
    pub fn is_bound(&self) -> bool {
        matches!(self.state, State::Bound)
    }

    /// Stream management state, if enabled.
    pub fn sm(&self) -> Option<&SmState> {
        self.sm.as_ref()
    }

    /// Takes the stream management state out (when the session ends or hibernates).
    pub fn take_sm(&mut self) -> Option<SmState> {
        self.sm.take()
    }

    /// Bytes of output not yet taken.
    pub fn pending_output(&self) -> usize {
        self.out.len() + self.frames.iter().map(Bytes::len).sum::<usize>()
    }

    // ---- inputs -------------------------------------------------------------------------

    /// Feeds bytes received on a TCP stream.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        self.now = now;
        self.last_rx = now;
        if !self.is_closed() {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Feeds one WebSocket message.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        self.now = now;
        self.last_rx = now;
        if self.is_closed() {
            return;
        }
        match xml::parse_frame(frame, &self.limits()) {
            Ok(element) => self.handle_ws_element(element),
            Err(condition) => self.fail(condition.into()),
        }
    }

    /// The transport reached end of file.
    pub fn handle_eof(&mut self, now: Instant) {
        self.now = now;
        if !self.is_closed() {
            self.state = State::Closed;
            self.events.push_back(StreamEvent::Closed(CloseReason::Eof));
            self.close_reported = true;
        }
    }

    /// The transport was closed on purpose without the stream being closed
    /// (a WebSocket close frame): ends the stream as a clean close does.
    pub fn handle_close(&mut self, now: Instant) {
        self.now = now;
        self.handle_peer_close();
    }

    /// Advances the clock: negotiation, stanza and idle timeouts, pings and keep-alives.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.is_closed() {
            return;
        }
        let t = self.config.timeouts;
        let negotiating = (!self.is_bound()).then_some(self.opened_at);
        if let Some(error) = expired(now, &t, negotiating, self.element_started) {
            return self.fail(error);
        }
        if self.is_bound() {
            let to = || {
                self.bound
                    .as_ref()
                    .map(|j| j.to_string())
                    .unwrap_or_default()
            };
            let from = &self.config.domain;
            match liveness(now, &t, self.last_rx, &mut self.ping, from, to) {
                Err(error) => return self.fail(error),
                Ok(Some(ping)) => self.write_element(&ping),
                Ok(None) => {}
            }
            if self.framing == Framing::Tcp && now >= self.last_tx + t.keepalive {
                self.out.extend_from_slice(b" ");
                self.last_tx = now;
            }
        }
    }

    /// The TLS handshake after `<proceed/>` completed; the client restarts the stream.
    pub fn handle_tls_established(&mut self, now: Instant) {
        self.now = now;
        if let State::AwaitTls = self.state {
            self.secure = true;
            // Plaintext the client pipelined after <starttls/> must not leak into the TLS layer.
            self.input.clear();
            self.restart();
        }
    }

    /// Answers [`StreamEvent::NeedKeys`].
    pub fn handle_keys(&mut self, now: Instant, answer: KeysAnswer) {
        self.now = now;
        let State::Sasl {
            mechanism,
            jid: Some(jid),
            awaiting_keys,
        } = &mut self.state
        else {
            return;
        };
        if !std::mem::take(awaiting_keys) {
            return;
        }
        let jid = jid.clone();
        let keys = match answer {
            KeysAnswer::TemporaryFailure => {
                return self
                    .sasl_failure("temporary-auth-failure", jid.node().map(|n| n.to_string()));
            }
            KeysAnswer::Keys(keys) => keys,
        };
        let step = match mechanism {
            Sasl::Scram(scram) => scram.handle_keys(keys),
            Sasl::Plain(Some(credentials)) => {
                // An unknown user costs the same work as a wrong password.
                let known = keys.is_some();
                let keys = keys.unwrap_or_else(|| {
                    self.config
                        .decoy
                        .keys(ScramHash::Sha256, &credentials.username)
                });
                if keys.verify_password(&credentials.password) && known {
                    Ok(SaslStep::Success(Vec::new()))
                } else {
                    Err(SaslError::NotAuthorized)
                }
            }
            Sasl::Plain(None) => Err(SaslError::Malformed),
        };
        self.after_sasl_step(step, jid);
    }

    /// Answers [`StreamEvent::Bind`] with the bound JID.
    pub fn handle_bound(&mut self, now: Instant, jid: FullJid) {
        self.now = now;
        let State::AwaitBind(id) = std::mem::replace(&mut self.state, State::Bound) else {
            return;
        };
        let result = Element::builder("iq", ns::CLIENT)
            .attr(name("type"), "result")
            .attr(name("id"), id)
            .append(
                Element::builder("bind", ns::BIND)
                    .append(Element::builder("jid", ns::BIND).append(jid.to_string())),
            )
            .build();
        self.write_element(&result);
        self.bound = Some(jid);
    }

    /// Answers [`StreamEvent::Bind`] with a stanza error (`type`, `condition`).
    pub fn handle_bind_error(&mut self, now: Instant, error_type: &str, condition: &str) {
        self.now = now;
        let State::AwaitBind(id) = std::mem::replace(&mut self.state, State::Negotiating) else {
            return;
        };
        let error = iq_error(&id, error_type, condition);
        self.write_element(&error);
    }

    /// Answers [`StreamEvent::Resume`]: the session's previous state is taken over.
    pub fn handle_resumed(&mut self, now: Instant, jid: FullJid, mut sm: SmState, h: u32) {
        self.now = now;
        let State::AwaitResume(previd) = std::mem::replace(&mut self.state, State::Bound) else {
            return;
        };
        if let Err(too_high) = sm.handle_ack(h) {
            self.sm = Some(sm);
            self.bound = Some(jid);
            return self.fail_handled_count(too_high.h, too_high.sent);
        }
        let resumed = Element::builder("resumed", ns::SM)
            .attr(name("previd"), previd)
            .attr(name("h"), sm.inbound.to_string())
            .build();
        self.write_element(&resumed);
        for stanza in sm.unacked() {
            self.write_element(stanza);
        }
        self.ack_requested = false;
        self.sm = Some(sm);
        self.bound = Some(jid);
    }

    /// Answers [`StreamEvent::Resume`]: nothing to resume.
    pub fn handle_resume_failed(&mut self, now: Instant) {
        self.now = now;
        if let State::AwaitResume(_) = std::mem::replace(&mut self.state, State::Negotiating) {
            let failed = Element::builder("failed", ns::SM)
                .append(Element::bare("item-not-found", ns::STANZAS))
                .build();
            self.write_element(&failed);
        }
    }

    /// Sends a stanza to the bound client. Gives it back if the stream cannot carry it.
    pub fn send_stanza(&mut self, stanza: Element) -> Result<(), Element> {
        if !self.is_bound() {
            return Err(stanza);
        }
        self.write_element(&stanza);
        if let Some(sm) = &mut self.sm {
            sm.sent(stanza);
            if sm.unacked().len() > self.config.max_unacked
                || sm.unacked_bytes() > self.config.max_unacked_bytes
            {
                self.fail(StreamError::new(
                    Condition::ResourceConstraint,
                    "Too many unacknowledged stanzas.",
                ));
            }
        }
        Ok(())
    }

    /// Sends an element outside stanza accounting (pre-auth iq replies).
    pub fn send_element(&mut self, element: &Element) {
        if !self.is_closed() {
            self.write_element(element);
        }
    }

    /// Closes the stream, with a stream error if given; under stream management
    /// an `<a/>` first acknowledges everything received.
    pub fn close(&mut self, error: Option<StreamError>) {
        if self.is_closed() {
            return;
        }
        // Everything received was handled: say so, so that the client does not
        // send it again elsewhere (XEP-0198 lets either side ack at any time).
        if let Some(sm) = &self.sm {
            let a = Element::builder("a", ns::SM)
                .attr(name("h"), sm.inbound.to_string())
                .build();
            self.write_element(&a);
        }
        match error {
            Some(error) => self.fail(error),
            None => {
                self.write_footer();
                self.state = State::Closed;
                self.report_closed(CloseReason::Local(None));
            }
        }
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next event, parsing buffered input as needed.
    pub fn poll_event(&mut self) -> Option<StreamEvent> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if !self.holding {
                self.release_events();
            }
            if self.awaiting_caller() || self.is_closed() {
                return None;
            }
            if self.framing == Framing::WebSocket {
                return None;
            }
            match self.reader.read_buffered(&mut self.input) {
                Ok(Some(event)) => {
                    self.element_started = None;
                    self.handle_xml(event);
                }
                Ok(None) => {
                    if self.reader.in_element() {
                        self.element_started.get_or_insert(self.now);
                    } else {
                        self.element_started = None;
                    }
                    if !self.holding {
                        self.release_input();
                    }
                    return None;
                }
                Err(condition) => self.fail(condition.into()),
            }
        }
    }

    /// Bytes (TCP) or one message (WebSocket) to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.is_bound()
            && !self.ack_requested
            && let Some(sm) = &self.sm
            && !sm.unacked().is_empty()
        {
            self.ack_requested = true;
            self.write_element(&Element::bare("r", ns::SM));
        }
        match self.framing {
            Framing::WebSocket => {
                let frame = self.frames.pop_front();
                if frame.is_none() && !self.holding {
                    self.release_output();
                }
                frame
            }
            Framing::Tcp if self.out.is_empty() => {
                if !self.holding {
                    self.release_output();
                }
                None
            }
            Framing::Tcp => Some(self.out.split().freeze()),
        }
    }

    /// Keeps drained buffers and the parser's scratch memory
    /// for the next input or output, instead of freeing them each time: for
    /// a session in the middle of a burst of traffic, where making them again
    /// for every stanza costs more than holding them for a moment.
    pub fn hold_buffers(&mut self) {
        self.holding = true;
    }

    /// Frees what [`hold_buffers`](Self::hold_buffers) kept and is empty: an
    /// idle session holds only its state, not its buffers.
    pub fn release_buffers(&mut self) {
        self.holding = false;
        self.release_events();
        self.release_input();
        self.release_output();
    }

    /// Drained: an idle session keeps no event queue (about 0.5 KiB).
    fn release_events(&mut self) {
        if self.events.is_empty() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
    }

    /// All input parsed: no input buffer, no parser scratch memory.
    fn release_input(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
            self.reader.release_memory();
        }
    }

    /// All output taken: no output buffer.
    fn release_output(&mut self) {
        if self.framing == Framing::Tcp && self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
    }

    /// When `handle_timeout` should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let t = self.config.timeouts;
        let mut deadlines = Vec::with_capacity(4);
        if !self.is_bound() {
            deadlines.push(self.opened_at + t.negotiation);
        }
        if let Some(started) = self.element_started {
            deadlines.push(started + t.stanza);
        }
        if self.is_bound() {
            match &self.ping {
                Some((_, sent)) => deadlines.push(*sent + t.ping),
                None => deadlines.push(self.last_rx + t.idle),
            }
            if self.framing == Framing::Tcp {
                deadlines.push(self.last_tx + t.keepalive);
            }
        }
        deadlines.into_iter().min()
    }

    // ---- internals ----------------------------------------------------------------------

    fn awaiting_caller(&self) -> bool {
        match &self.state {
            State::AwaitTls | State::AwaitBind(_) | State::AwaitResume(_) => true,
            State::Sasl { awaiting_keys, .. } => *awaiting_keys,
            _ => false,
        }
    }

    /// The input limits now: smaller stanzas before authentication.
    fn limits(&self) -> Limits {
        match self.authenticated {
            Some(_) => self.config.limits,
            None => self.config.limits.unauthenticated(),
        }
    }

    fn restart(&mut self) {
        self.reader = StreamReader::new(self.limits());
        self.header_sent = false;
        self.state = State::Header;
    }

    fn handle_xml(&mut self, event: XmlEvent) {
        match event {
            XmlEvent::StreamOpen { name, attrs } => {
                if !matches!(self.state, State::Header) {
                    return self.fail(Condition::NotWellFormed.into());
                }
                if let Err(error) = check_root(&name) {
                    return self.fail(error);
                }
                self.handle_header(&attrs);
            }
            XmlEvent::Element(element) => self.handle_element(element),
            XmlEvent::Whitespace => {}
            XmlEvent::StreamClose => self.handle_peer_close(),
        }
    }

    fn handle_ws_element(&mut self, element: Element) {
        if element.is("open", ns::FRAMING) {
            if !matches!(self.state, State::Header) {
                return self.fail(Condition::NotWellFormed.into());
            }
            return self.handle_header(element.attrs());
        }
        if element.is("close", ns::FRAMING) {
            return self.handle_peer_close();
        }
        if matches!(self.state, State::Header) {
            return self.fail(StreamError::new(
                Condition::NotAuthorized,
                "The stream must be opened first.",
            ));
        }
        self.handle_element(element);
    }

    fn handle_header(&mut self, attrs: &rxml::AttrMap) {
        let attr = |local: &str| attrs.get(&rxml::Namespace::NONE, local).map(String::as_str);
        if let Some(lang) = attrs.get(&rxml::Namespace::from(ns::XML), "lang")
            && !lang.is_empty()
            && lang.len() <= 35
        {
            self.lang = lang.clone();
        }
        self.stream_id = random_id();
        let version_ok = attr("version")
            .and_then(|v| v.split_once('.'))
            .is_some_and(|(major, _)| major == "1");
        let to_ok = match attr("to") {
            None => true,
            Some(to) => jid::BareJid::new(to)
                .is_ok_and(|to| to.node().is_none() && to.domain().as_str() == self.config.domain),
        };
        self.write_header();
        if !to_ok {
            return self.fail(StreamError::new(
                Condition::HostUnknown,
                "This server does not serve that domain.",
            ));
        }
        if !version_ok {
            return self.fail(StreamError::new(
                Condition::UnsupportedVersion,
                "Only XMPP 1.0 streams are supported.",
            ));
        }
        self.state = State::Negotiating;
        self.write_features();
    }

    fn handle_peer_close(&mut self) {
        if self.is_closed() {
            return;
        }
        self.write_footer();
        self.state = State::Closed;
        self.report_closed(CloseReason::PeerClosed);
    }

    fn tls_pending(&self) -> bool {
        !self.secure && self.config.tls == TlsPolicy::Required
    }

    fn auth_allowed(&self) -> bool {
        self.secure || self.config.allow_plaintext_auth
    }

    fn handle_element(&mut self, element: Element) {
        if let Some(condition) = peer_error(&element) {
            self.state = State::Closed;
            self.write_footer();
            return self.report_closed(CloseReason::PeerError(condition));
        }
        match &self.state {
            State::Bound => self.handle_bound_element(element),
            State::Negotiating => self.handle_negotiation_element(element),
            State::Sasl { .. } => self.handle_sasl_element(element),
            _ => self.fail(Condition::NotWellFormed.into()),
        }
    }

    fn handle_negotiation_element(&mut self, element: Element) {
        if element.is("starttls", ns::TLS) {
            if self.secure
                || self.config.tls == TlsPolicy::Unavailable
                || self.framing == Framing::WebSocket
            {
                self.write_element(&Element::bare("failure", ns::TLS));
                self.write_footer();
                self.state = State::Closed;
                return self.report_closed(CloseReason::Local(None));
            }
            self.write_element(&Element::bare("proceed", ns::TLS));
            self.state = State::AwaitTls;
            return self.events.push_back(StreamEvent::StartTls);
        }
        if self.tls_pending() {
            if element.is("auth", ns::SASL) {
                return self.sasl_failure("encryption-required", None);
            }
            return self.fail(StreamError::new(
                Condition::PolicyViolation,
                "STARTTLS is required.",
            ));
        }
        if self.authenticated.is_none() {
            if element.is("auth", ns::SASL) {
                return self.handle_auth(&element);
            }
            if element.is("iq", ns::CLIENT) && self.config.registration && self.auth_allowed() {
                return self.events.push_back(StreamEvent::PreAuthIq(element));
            }
            return self.reject_unexpected(&element, "Authenticate first.");
        }
        if element.is("iq", ns::CLIENT)
            && let Some(bind) = element.get_child("bind", ns::BIND)
        {
            return self.handle_bind_request(&element, bind);
        }
        if element.is("resume", ns::SM) {
            let previd = element.attr("previd").unwrap_or_default().to_owned();
            let Some(h) = element.attr("h").and_then(|h| h.parse().ok()) else {
                let failed = Element::builder("failed", ns::SM)
                    .append(Element::bare("bad-request", ns::STANZAS))
                    .build();
                return self.write_element(&failed);
            };
            self.state = State::AwaitResume(previd.clone());
            return self.events.push_back(StreamEvent::Resume { previd, h });
        }
        if element.is("enable", ns::SM) {
            let failed = Element::builder("failed", ns::SM)
                .append(Element::bare("unexpected-request", ns::STANZAS))
                .build();
            return self.write_element(&failed);
        }
        self.reject_unexpected(&element, "Bind a resource first.")
    }

    fn reject_unexpected(&mut self, element: &Element, text: &str) {
        if is_stanza(element) || element.has_ns(ns::SM) || element.has_ns(ns::SASL) {
            self.fail(StreamError::new(Condition::NotAuthorized, text))
        } else {
            self.reject_unknown(element)
        }
    }

    fn reject_unknown(&mut self, element: &Element) {
        if matches!(element.name(), "message" | "presence" | "iq") {
            self.fail(Condition::InvalidNamespace.into())
        } else {
            self.fail(Condition::UnsupportedStanzaType.into())
        }
    }

    fn handle_bind_request(&mut self, iq: &Element, bind: &Element) {
        let id = iq.attr("id").unwrap_or_default().to_owned();
        if iq.attr("type") != Some("set") {
            return self.write_element(&iq_error(&id, "modify", "bad-request"));
        }
        let jid = self
            .authenticated
            .clone()
            .expect("bind after authentication");
        let requested = match bind.get_child("resource", ns::BIND).map(|r| r.text()) {
            None => None,
            Some(resource) if resource.trim().is_empty() => None,
            Some(resource) => match jid::ResourcePart::new(&resource) {
                Ok(resource) => Some(jid.with_resource(&resource)),
                Err(_) => return self.write_element(&iq_error(&id, "modify", "bad-request")),
            },
        };
        self.state = State::AwaitBind(id);
        self.events.push_back(StreamEvent::Bind { requested });
    }

    fn handle_auth(&mut self, auth: &Element) {
        let mechanism = match auth.attr("mechanism").unwrap_or_default() {
            "SCRAM-SHA-256" => Sasl::Scram(Box::new(ScramServer::new(
                ScramHash::Sha256,
                self.config.decoy,
            ))),
            "SCRAM-SHA-1" => Sasl::Scram(Box::new(ScramServer::new(
                ScramHash::Sha1,
                self.config.decoy,
            ))),
            "PLAIN" if self.secure => Sasl::Plain(None),
            "PLAIN" => return self.sasl_failure("encryption-required", None),
            _ => return self.sasl_failure("invalid-mechanism", None),
        };
        self.state = State::Sasl {
            mechanism,
            jid: None,
            awaiting_keys: false,
        };
        match decode_sasl_payload(&auth.text()) {
            Err(()) => self.sasl_failure("incorrect-encoding", None),
            // No initial response: an empty challenge asks for it.
            Ok(None) => self.write_element(&Element::bare("challenge", ns::SASL)),
            Ok(Some(payload)) => self.handle_sasl_payload(&payload),
        }
    }

    fn handle_sasl_element(&mut self, element: Element) {
        if element.is("abort", ns::SASL) {
            return self.sasl_failure("aborted", None);
        }
        if !element.is("response", ns::SASL) {
            return self.reject_unexpected(&element, "Finish authentication first.");
        }
        match decode_sasl_payload(&element.text()) {
            Err(()) => self.sasl_failure("incorrect-encoding", None),
            Ok(payload) => self.handle_sasl_payload(&payload.unwrap_or_default()),
        }
    }

    fn handle_sasl_payload(&mut self, payload: &[u8]) {
        let State::Sasl { mechanism, jid, .. } = &mut self.state else {
            return;
        };
        if let Some(jid) = jid.clone() {
            // Only SCRAM has a second client message.
            let step = match mechanism {
                Sasl::Scram(scram) => scram.handle_response(payload),
                Sasl::Plain(_) => Err(SaslError::Malformed),
            };
            return self.after_sasl_step(step, jid);
        }
        let first = match mechanism {
            Sasl::Scram(scram) => scram
                .handle_initial(payload)
                .map(|step| (step, AuthMechanism::Scram(scram.hash()))),
            Sasl::Plain(credentials) => sasl::parse_plain(payload).map(|parsed| {
                let step = SaslStep::NeedKeys {
                    username: parsed.username.clone(),
                    authzid: parsed.authzid.clone(),
                };
                *credentials = Some(parsed);
                (step, AuthMechanism::Plain)
            }),
        };
        let (username, authzid, mechanism) = match first {
            Ok((SaslStep::NeedKeys { username, authzid }, mechanism)) => {
                (username, authzid, mechanism)
            }
            Ok(_) => return self.sasl_failure("malformed-request", None),
            Err(error) => return self.sasl_failure(error.condition(), None),
        };
        let Ok(account) = BareJid::new(&format!("{username}@{}", self.config.domain)) else {
            return self.sasl_failure("not-authorized", Some(username));
        };
        if let Some(authzid) = authzid
            && BareJid::new(&authzid).ok().as_ref() != Some(&account)
        {
            return self.sasl_failure("invalid-authzid", Some(username));
        }
        if let State::Sasl {
            jid, awaiting_keys, ..
        } = &mut self.state
        {
            *jid = Some(account.clone());
            *awaiting_keys = true;
        }
        self.events.push_back(StreamEvent::NeedKeys {
            jid: account,
            mechanism,
        });
    }

    fn after_sasl_step(&mut self, step: Result<SaslStep, SaslError>, jid: BareJid) {
        match step {
            Ok(SaslStep::Challenge(data)) => {
                let challenge = Element::builder("challenge", ns::SASL)
                    .append(BASE64.encode(data))
                    .build();
                self.write_element(&challenge);
            }
            Ok(SaslStep::Success(data)) => {
                let mut success = Element::bare("success", ns::SASL);
                if !data.is_empty() {
                    success.append_text(BASE64.encode(data));
                }
                self.write_element(&success);
                self.authenticated = Some(jid.clone());
                self.events.push_back(StreamEvent::Authenticated { jid });
                self.restart();
            }
            Ok(SaslStep::NeedKeys { .. }) => self.sasl_failure("malformed-request", None),
            Err(error) => self.sasl_failure(error.condition(), jid.node().map(|n| n.to_string())),
        }
    }

    fn sasl_failure(&mut self, condition: &'static str, username: Option<String>) {
        let failure = Element::builder("failure", ns::SASL)
            .append(Element::bare(condition, ns::SASL))
            .build();
        self.write_element(&failure);
        self.state = State::Negotiating;
        self.events.push_back(StreamEvent::AuthFailed {
            username,
            condition,
        });
        if !matches!(condition, "aborted" | "temporary-auth-failure") {
            self.auth_failures += 1;
            if self.auth_failures >= self.config.max_auth_failures {
                self.fail(StreamError::new(
                    Condition::PolicyViolation,
                    "Too many failed authentication attempts.",
                ));
            }
        }
    }

    fn handle_bound_element(&mut self, mut element: Element) {
        if element.has_ns(ns::SM) {
            return self.handle_sm(&element);
        }
        if element.has_ns(ns::CSI) && matches!(element.name(), "active" | "inactive") {
            let inactive = element.name() == "inactive";
            return self.events.push_back(StreamEvent::ClientState { inactive });
        }
        if !is_stanza(&element) {
            return self.reject_unknown(&element);
        }
        let jid = self.bound.as_ref().expect("bound");
        if let Some(from) = element.attr("from") {
            let ok = match jid::Jid::new(from) {
                Ok(from) => match from.try_as_full() {
                    Ok(full) => full == jid,
                    Err(bare) => *bare == jid.to_bare(),
                },
                Err(_) => false,
            };
            if !ok {
                return self.fail(StreamError::new(
                    Condition::InvalidFrom,
                    "You can only send from your own address.",
                ));
            }
        }
        xml::set_attr(&mut element, "from", jid.as_str());
        if let Some(sm) = &mut self.sm {
            sm.handled_inbound();
        }
        if element.name() == "iq"
            && let (Some((ping_id, _)), Some(id)) = (&self.ping, element.attr("id"))
            && ping_id == id
            && matches!(element.attr("type"), Some("result" | "error"))
        {
            self.ping = None;
            return;
        }
        self.events.push_back(StreamEvent::Stanza(element));
    }

    fn handle_sm(&mut self, element: &Element) {
        match element.name() {
            "r" => {
                if let Some(sm) = &self.sm {
                    let a = Element::builder("a", ns::SM)
                        .attr(name("h"), sm.inbound.to_string())
                        .build();
                    self.write_element(&a);
                }
            }
            "a" => {
                let Some(h) = element.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
                    return self.fail(StreamError::new(
                        Condition::BadFormat,
                        "Invalid 'h' in <a/>.",
                    ));
                };
                let Some(sm) = &mut self.sm else { return };
                self.ack_requested = false;
                if let Err(too_high) = sm.handle_ack(h) {
                    self.fail_handled_count(too_high.h, too_high.sent);
                }
            }
            "enable" => {
                if self.sm.is_some() {
                    let failed = Element::builder("failed", ns::SM)
                        .append(Element::bare("unexpected-request", ns::STANZAS))
                        .build();
                    return self.write_element(&failed);
                }
                let resume = matches!(element.attr("resume"), Some("true" | "1"));
                let id = match (resume, self.config.resume_timeout) {
                    (true, Some(_)) => Some(random_id()),
                    _ => None,
                };
                let mut enabled = Element::builder("enabled", ns::SM);
                if let (Some(id), Some(max)) = (&id, self.config.resume_timeout) {
                    let max = element
                        .attr("max")
                        .and_then(|m| m.parse::<u32>().ok())
                        .map_or(max, |m| m.min(max));
                    enabled = enabled
                        .attr(name("id"), id.as_str())
                        .attr(name("resume"), "true")
                        .attr(name("max"), max.to_string());
                }
                self.write_element(&enabled.build());
                self.sm = Some(SmState::new(id.clone()));
                self.events.push_back(StreamEvent::SmEnabled { id });
            }
            "resume" => {
                let failed = Element::builder("failed", ns::SM)
                    .append(Element::bare("unexpected-request", ns::STANZAS))
                    .build();
                self.write_element(&failed);
            }
            _ => self.fail(Condition::UnsupportedStanzaType.into()),
        }
    }

    fn fail_handled_count(&mut self, h: u32, sent: u32) {
        let text = format!("You acknowledged {h} stanzas but only {sent} were sent.");
        self.fail(StreamError::new(Condition::UndefinedCondition, text));
    }

    /// Ends the stream with an error, sending our header first if it was not sent yet.
    fn fail(&mut self, error: StreamError) {
        if self.is_closed() {
            return;
        }
        if !self.header_sent {
            self.write_header();
        }
        let xml = stream_error_xml(&error, self.framing == Framing::WebSocket);
        self.out.extend_from_slice(xml.as_bytes());
        self.finish_unit();
        self.write_footer();
        self.state = State::Closed;
        self.report_closed(CloseReason::Local(Some(error)));
    }

    fn report_closed(&mut self, reason: CloseReason) {
        if !self.close_reported {
            self.close_reported = true;
            self.events.push_back(StreamEvent::Closed(reason));
        }
    }

    fn write_header(&mut self) {
        let mut xml = String::with_capacity(256);
        let domain = escape_attr(&self.config.domain);
        let lang = escape_attr(&self.lang);
        match self.framing {
            Framing::Tcp => {
                let _ = write!(
                    xml,
                    "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{}' from='{domain}' version='1.0' xml:lang='{lang}'>",
                    ns::CLIENT,
                    ns::STREAM,
                    self.stream_id,
                );
            }
            Framing::WebSocket => {
                let _ = write!(
                    xml,
                    "<open xmlns='{}' id='{}' from='{domain}' version='1.0' xml:lang='{lang}'/>",
                    ns::FRAMING,
                    self.stream_id,
                );
            }
        }
        self.out.extend_from_slice(xml.as_bytes());
        self.header_sent = true;
        self.finish_unit();
    }

    fn write_footer(&mut self) {
        if !self.header_sent {
            return;
        }
        match self.framing {
            Framing::Tcp => self.out.extend_from_slice(b"</stream:stream>"),
            Framing::WebSocket => {
                self.out
                    .extend_from_slice(format!("<close xmlns='{}'/>", ns::FRAMING).as_bytes());
            }
        }
        self.finish_unit();
    }

    fn write_features(&mut self) {
        let mut features = Vec::new();
        if self.authenticated.is_none() {
            let tls_offered = !self.secure
                && self.config.tls != TlsPolicy::Unavailable
                && self.framing == Framing::Tcp;
            if tls_offered {
                let mut starttls = Element::bare("starttls", ns::TLS);
                if self.config.tls == TlsPolicy::Required {
                    starttls.append_child(Element::bare("required", ns::TLS));
                }
                features.push(starttls);
            }
            if !self.tls_pending() && self.auth_allowed() {
                let mut mechanisms = Element::bare("mechanisms", ns::SASL);
                let mut offered = vec!["SCRAM-SHA-256", "SCRAM-SHA-1"];
                if self.secure {
                    offered.push("PLAIN");
                }
                for mechanism in offered {
                    mechanisms.append_child(
                        Element::builder("mechanism", ns::SASL)
                            .append(mechanism)
                            .build(),
                    );
                }
                features.push(mechanisms);
                if self.config.registration {
                    features.push(Element::bare("register", ns::REGISTER_FEATURE));
                }
            }
        } else {
            features.push(Element::bare("bind", ns::BIND));
            features.push(
                Element::builder("session", ns::SESSION)
                    .append(Element::bare("optional", ns::SESSION))
                    .build(),
            );
            features.push(Element::bare("sm", ns::SM));
            features.extend(self.config.session_features.iter().cloned());
        }
        match self.framing {
            Framing::Tcp => self.out.extend_from_slice(b"<stream:features>"),
            Framing::WebSocket => {
                self.out.extend_from_slice(
                    format!("<stream:features xmlns:stream='{}'>", ns::STREAM).as_bytes(),
                );
            }
        }
        let writer = self.writer();
        for feature in &features {
            writer.write(feature, &mut self.out);
        }
        self.out.extend_from_slice(b"</stream:features>");
        self.finish_unit();
    }

    fn writer(&self) -> StreamWriter {
        match self.framing {
            Framing::Tcp => StreamWriter::new(),
            Framing::WebSocket => StreamWriter::standalone(),
        }
    }

    fn write_element(&mut self, element: &Element) {
        self.writer().write(element, &mut self.out);
        self.last_tx = self.now;
        self.finish_unit();
    }

    /// In WebSocket framing, everything written since the last unit becomes one message.
    fn finish_unit(&mut self) {
        if self.framing == Framing::WebSocket && !self.out.is_empty() {
            let frame = self.out.split().freeze();
            self.frames.push_back(frame);
        }
    }
}

fn name(local: &str) -> rxml::NcName {
    rxml::NcName::try_from(local).expect("valid attribute name")
}

fn is_stanza(element: &Element) -> bool {
    element.has_ns(ns::CLIENT) && matches!(element.name(), "message" | "presence" | "iq")
}

fn iq_error(id: &str, error_type: &str, condition: &str) -> Element {
    Element::builder("iq", ns::CLIENT)
        .attr(name("type"), "error")
        .attr(name("id"), id)
        .append(
            Element::builder("error", ns::CLIENT)
                .attr(name("type"), error_type)
                .append(Element::bare(condition, ns::STANZAS))
                .build(),
        )
        .build()
}

/// Decodes SASL data: `None` for an absent payload, `Some(empty)` for `=`.
fn decode_sasl_payload(text: &str) -> Result<Option<Vec<u8>>, ()> {
    let text = text.trim();
    match text {
        "" => Ok(None),
        "=" => Ok(Some(Vec::new())),
        text => BASE64.decode(text).map(Some).map_err(|_| ()),
    }
}

/// The stream error a timer ends the stream with: negotiation that began
/// at `negotiating` (while it goes on) took too long, or an element begun
/// at `element_started` did not finish in time.
pub(crate) fn expired(
    now: Instant,
    timeouts: &Timeouts,
    negotiating: Option<Instant>,
    element_started: Option<Instant>,
) -> Option<StreamError> {
    if negotiating.is_some_and(|opened| now >= opened + timeouts.negotiation) {
        return Some(StreamError::new(
            Condition::ConnectionTimeout,
            "Stream negotiation took too long.",
        ));
    }
    if element_started.is_some_and(|started| now >= started + timeouts.stanza) {
        return Some(StreamError::new(
            Condition::ConnectionTimeout,
            "Element not completed in time.",
        ));
    }
    None
}

/// The XEP-0199 liveness check both streams run on their timer: a peer
/// silent for `idle` gets a ping (returned, to write; `ping` remembers it),
/// and one still silent `ping` later is gone (`Err`). Any input after the
/// ping shows it alive.
pub(crate) fn liveness(
    now: Instant,
    timeouts: &Timeouts,
    last_rx: Instant,
    ping: &mut Option<(String, Instant)>,
    from: &str,
    to: impl FnOnce() -> String,
) -> Result<Option<Element>, StreamError> {
    if ping.as_ref().is_some_and(|(_, sent)| last_rx > *sent) {
        *ping = None;
    }
    match ping {
        Some((_, sent)) if now >= *sent + timeouts.ping => Err(StreamError::new(
            Condition::ConnectionTimeout,
            "No answer to ping.",
        )),
        None if now >= last_rx + timeouts.idle => {
            let id = format!("ping-{}", random_id());
            let request = Element::builder("iq", ns::CLIENT)
                .attr(name("type"), "get")
                .attr(name("id"), id.as_str())
                .attr(name("from"), from)
                .attr(name("to"), to())
                .append(Element::bare("ping", ns::PING))
                .build();
            *ping = Some((id, now));
            Ok(Some(request))
        }
        _ => Ok(None),
    }
}

/// Refuses a stream whose root is not `<stream:stream/>`.
pub(crate) fn check_root(name: &rxml::QName) -> Result<(), StreamError> {
    if name.0.as_str() != ns::STREAM {
        return Err(Condition::InvalidNamespace.into());
    }
    if name.1.as_str() != "stream" {
        return Err(StreamError::new(
            Condition::BadFormat,
            "The root element must be <stream/>.",
        ));
    }
    Ok(())
}

/// The condition of a stream error the peer sent, if `element` is one.
pub(crate) fn peer_error(element: &Element) -> Option<String> {
    element.is("error", ns::STREAM).then(|| {
        element
            .children()
            .find(|c| c.has_ns(ns::STREAM_ERRORS) && c.name() != "text")
            .map(|c| c.name().to_owned())
            .unwrap_or_default()
    })
}

/// The `<stream:error/>` of `error`; `standalone` declares the stream
/// prefix on the element itself (a WebSocket message).
pub(crate) fn stream_error_xml(error: &StreamError, standalone: bool) -> String {
    let mut xml = String::with_capacity(160);
    match standalone {
        false => xml.push_str("<stream:error>"),
        true => {
            let _ = write!(xml, "<stream:error xmlns:stream='{}'>", ns::STREAM);
        }
    }
    match &error.content {
        Some(content) => {
            let _ = write!(
                xml,
                "<{0} xmlns='{1}'>{2}</{0}>",
                error.condition.as_str(),
                ns::STREAM_ERRORS,
                escape_text(content)
            );
        }
        None => {
            let _ = write!(
                xml,
                "<{} xmlns='{}'/>",
                error.condition.as_str(),
                ns::STREAM_ERRORS
            );
        }
    }
    if let Some(text) = &error.text {
        let _ = write!(
            xml,
            "<text xmlns='{}' xml:lang='en'>{}</text>",
            ns::STREAM_ERRORS,
            escape_text(text)
        );
    }
    xml.push_str("</stream:error>");
    xml
}

fn escape_text(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A random identifier for streams, resumption and pings.
pub fn random_id() -> String {
    let bytes: [u8; 12] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests;
