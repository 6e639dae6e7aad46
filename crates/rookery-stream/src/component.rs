//! The server side of one external component stream (XEP-0114,
//! `jabber:component:accept`), as a sans-IO state machine beside
//! [`ServerStream`](crate::ServerStream): the header names the component's
//! domain, a handshake proves the shared secret, then stanzas flow whose
//! `from` must be at that domain.
//!
//! Stanzas come out of [`poll_event`](ComponentStream::poll_event) in
//! `jabber:client`, the namespace the router works in, and go in
//! ([`send_stanza`](ComponentStream::send_stanza)) the same way: the
//! reader and writer translate.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use jid::{BareJid, Jid};
use minidom::Element;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::stream::{check_root, expired, liveness, peer_error, random_id, stream_error_xml};
use crate::xml::{Limits, StreamReader, StreamWriter, XmlEvent, escape_attr};
use crate::{CloseReason, Condition, StreamError, Timeouts, ns};

/// Settings shared by every component stream of a listener.
#[derive(Debug, Clone)]
pub struct ComponentConfig {
    /// The server's domain (the `from` of its pings).
    pub server: String,
    /// The secret of each component domain that may connect.
    pub secrets: HashMap<String, String>,
    /// Input limits (the authenticated ones apply after the handshake).
    pub limits: Limits,
    /// Timers: `negotiation` until the handshake is done, `stanza`,
    /// `keepalive`, and `idle` and `ping`: a component silent for `idle` is
    /// pinged (XEP-0199; any answer, an error too, or any other input shows
    /// it alive), and one silent `ping` longer is gone, so that a dead link
    /// does not keep its domain taken.
    pub timeouts: Timeouts,
}

/// Something the component task must act on.
#[derive(Debug)]
pub enum ComponentEvent {
    /// The handshake proved the secret of `domain`: register the component
    /// and call [`handle_ready`](ComponentStream::handle_ready), or
    /// [`close`](ComponentStream::close) with `conflict` when it is
    /// connected already.
    Authenticated {
        /// The component's domain.
        domain: BareJid,
    },
    /// A stanza from the component, in `jabber:client`, with a `from` at its
    /// domain and a `to`.
    Stanza(Element),
    /// The stream is over; flush output and close the transport.
    Closed(CloseReason),
}

enum State {
    /// Waiting for the stream header.
    Header,
    /// Header answered, waiting for `<handshake/>`.
    Handshake,
    /// The handshake verified; waiting for the caller to register.
    AwaitReady,
    /// Stanzas flow.
    Ready,
    /// The stream is over.
    Closed,
}

/// The server side of one component stream.
pub struct ComponentStream {
    config: Arc<ComponentConfig>,
    state: State,
    reader: StreamReader,
    input: BytesMut,
    out: BytesMut,
    events: VecDeque<ComponentEvent>,
    header_sent: bool,
    stream_id: String,
    domain: Option<BareJid>,
    now: Instant,
    opened_at: Instant,
    last_rx: Instant,
    last_tx: Instant,
    element_started: Option<Instant>,
    /// The ping under way: its id and when it was sent.
    ping: Option<(String, Instant)>,
    close_reported: bool,
}

impl ComponentStream {
    /// A stream for a new connection.
    pub fn new(config: Arc<ComponentConfig>, now: Instant) -> Self {
        ComponentStream {
            reader: StreamReader::component(config.limits),
            config,
            state: State::Header,
            input: BytesMut::new(),
            out: BytesMut::new(),
            events: VecDeque::new(),
            header_sent: false,
            stream_id: random_id(),
            domain: None,
            now,
            opened_at: now,
            last_rx: now,
            last_tx: now,
            element_started: None,
            ping: None,
            close_reported: false,
        }
    }

    /// The component's domain, once the header named a known one.
    pub fn domain(&self) -> Option<&BareJid> {
        self.domain.as_ref()
    }

    /// True once the stream is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True when stanzas flow.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// Feeds bytes received.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        self.now = now;
        self.last_rx = now;
        if !self.is_closed() {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The transport reached end of file.
    pub fn handle_eof(&mut self, now: Instant) {
        self.now = now;
        if !self.is_closed() {
            self.state = State::Closed;
            self.report_closed(CloseReason::Eof);
        }
    }

    /// Advances the clock: negotiation and stanza timeouts, keep-alives.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.is_closed() {
            return;
        }
        let t = self.config.timeouts;
        let negotiating = (!self.is_ready()).then_some(self.opened_at);
        if let Some(error) = expired(now, &t, negotiating, self.element_started) {
            return self.fail(error);
        }
        if !self.is_ready() {
            return;
        }
        let to = || self.domain.as_ref().map_or("", |d| d.as_str()).to_owned();
        match liveness(
            now,
            &t,
            self.last_rx,
            &mut self.ping,
            &self.config.server,
            to,
        ) {
            Err(error) => return self.fail(error),
            Ok(Some(ping)) => self.write_element(&ping),
            Ok(None) => {}
        }
        if now >= self.last_tx + t.keepalive {
            self.out.extend_from_slice(b" ");
            self.last_tx = now;
        }
    }

    /// Answers [`ComponentEvent::Authenticated`]: the component is
    /// registered, stanzas may flow.
    pub fn handle_ready(&mut self, now: Instant) {
        self.now = now;
        if let State::AwaitReady = self.state {
            self.state = State::Ready;
            self.reader.authenticated(self.config.limits);
            self.write_element(&Element::bare("handshake", ns::CLIENT));
        }
    }

    /// Sends a stanza (in `jabber:client`) to the component. Gives it back
    /// if the stream cannot carry it.
    pub fn send_stanza(&mut self, stanza: Element) -> Result<(), Element> {
        if !self.is_ready() {
            return Err(stanza);
        }
        self.write_element(&stanza);
        Ok(())
    }

    /// Closes the stream, with a stream error if given.
    pub fn close(&mut self, error: Option<StreamError>) {
        if self.is_closed() {
            return;
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

    /// The next event, parsing buffered input as needed.
    pub fn poll_event(&mut self) -> Option<ComponentEvent> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if matches!(self.state, State::AwaitReady | State::Closed) {
                return None;
            }
            match self.reader.read_buffered(&mut self.input) {
                Ok(Some(event)) => {
                    self.element_started = None;
                    self.handle_xml(event);
                }
                Ok(None) => {
                    self.element_started = match self.reader.in_element() {
                        true => Some(self.element_started.unwrap_or(self.now)),
                        false => None,
                    };
                    return None;
                }
                Err(condition) => self.fail(condition.into()),
            }
        }
    }

    /// Bytes to send.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        let t = self.config.timeouts;
        let mut next = match (self.is_ready(), &self.ping) {
            (false, _) => self.opened_at + t.negotiation,
            (true, Some((_, sent))) => (self.last_tx + t.keepalive).min(*sent + t.ping),
            (true, None) => (self.last_tx + t.keepalive).min(self.last_rx + t.idle),
        };
        if let Some(started) = self.element_started {
            next = next.min(started + t.stanza);
        }
        Some(next)
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
                let to = attrs.get(&rxml::Namespace::NONE, "to").map(String::as_str);
                self.handle_header(to);
            }
            XmlEvent::Element(element) => self.handle_element(element),
            XmlEvent::Whitespace => {}
            XmlEvent::StreamClose => {
                if !self.is_closed() {
                    self.write_footer();
                    self.state = State::Closed;
                    self.report_closed(CloseReason::PeerClosed);
                }
            }
        }
    }

    fn handle_header(&mut self, to: Option<&str>) {
        let Some(to) = to else {
            return self.fail(StreamError::new(
                Condition::ImproperAddressing,
                "Name the component's domain in 'to'.",
            ));
        };
        match BareJid::new(to) {
            Ok(domain) if domain.node().is_none() && self.config.secrets.contains_key(to) => {
                self.domain = Some(domain);
                self.write_header();
                self.state = State::Handshake;
            }
            _ => self.fail(StreamError::new(
                Condition::HostUnknown,
                "No component of that domain is configured here.",
            )),
        }
    }

    fn handle_element(&mut self, element: Element) {
        if let Some(condition) = peer_error(&element) {
            self.write_footer();
            self.state = State::Closed;
            return self.report_closed(CloseReason::PeerError(condition));
        }
        match self.state {
            State::Handshake => self.handle_handshake(&element),
            State::Ready => self.handle_stanza(element),
            _ => self.fail(Condition::NotWellFormed.into()),
        }
    }

    fn handle_handshake(&mut self, element: &Element) {
        if !element.is("handshake", ns::CLIENT) {
            return self.fail(StreamError::new(
                Condition::NotAuthorized,
                "Send the handshake first.",
            ));
        }
        let domain = self.domain.clone().expect("known after the header");
        let secret = &self.config.secrets[domain.as_str()];
        let expected = handshake_digest(&self.stream_id, secret);
        let given = element.text().trim().to_ascii_lowercase();
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return self.fail(StreamError::new(
                Condition::NotAuthorized,
                "The handshake does not match the secret.",
            ));
        }
        self.state = State::AwaitReady;
        self.events
            .push_back(ComponentEvent::Authenticated { domain });
    }

    fn handle_stanza(&mut self, element: Element) {
        if !matches!(element.name(), "message" | "presence" | "iq") {
            return self.fail(Condition::UnsupportedStanzaType.into());
        }
        if !element.has_ns(ns::CLIENT) {
            return self.fail(Condition::InvalidNamespace.into());
        }
        let domain = self.domain.as_ref().expect("ready after the header");
        let from_ok = match element.attr("from").map(Jid::new) {
            None => {
                return self.fail(StreamError::new(
                    Condition::ImproperAddressing,
                    "A component's stanza needs a 'from'.",
                ));
            }
            Some(Ok(from)) => from.domain() == domain.domain(),
            Some(Err(_)) => false,
        };
        if !from_ok {
            return self.fail(StreamError::new(
                Condition::InvalidFrom,
                format!("A component sends from addresses at {domain} only."),
            ));
        }
        if element.attr("to").is_none() {
            return self.fail(StreamError::new(
                Condition::ImproperAddressing,
                "A component's stanza needs a 'to'.",
            ));
        }
        if element.name() == "iq"
            && matches!(element.attr("type"), Some("result" | "error"))
            && let (Some((ping, _)), Some(id)) = (&self.ping, element.attr("id"))
            && ping == id
        {
            // The answer to our ping (an error means alive too).
            self.ping = None;
            return;
        }
        self.events.push_back(ComponentEvent::Stanza(element));
    }

    fn fail(&mut self, error: StreamError) {
        if self.is_closed() {
            return;
        }
        if !self.header_sent {
            self.write_header();
        }
        self.out
            .extend_from_slice(stream_error_xml(&error, false).as_bytes());
        self.write_footer();
        self.state = State::Closed;
        self.report_closed(CloseReason::Local(Some(error)));
    }

    fn report_closed(&mut self, reason: CloseReason) {
        if !self.close_reported {
            self.close_reported = true;
            self.events.push_back(ComponentEvent::Closed(reason));
        }
    }

    fn write_header(&mut self) {
        let mut xml = String::with_capacity(200);
        let _ = write!(
            xml,
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' id='{}'",
            ns::COMPONENT,
            ns::STREAM,
            self.stream_id,
        );
        if let Some(domain) = &self.domain {
            let _ = write!(xml, " from='{}'", escape_attr(domain.as_str()));
        }
        xml.push('>');
        self.out.extend_from_slice(xml.as_bytes());
        self.header_sent = true;
    }

    fn write_footer(&mut self) {
        if self.header_sent {
            self.out.extend_from_slice(b"</stream:stream>");
        }
    }

    fn write_element(&mut self, element: &Element) {
        // `jabber:client` is written unqualified: inside this header it
        // reads as `jabber:component:accept`.
        StreamWriter::new().write(element, &mut self.out);
        self.last_tx = self.now;
    }
}

/// The handshake a component sends for `stream_id` and `secret`: the
/// SHA-1 of their concatenation in lower-case hex (XEP-0114 section 3).
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let digest = Sha1::new()
        .chain_update(stream_id.as_bytes())
        .chain_update(secret.as_bytes())
        .finalize();
    digest
        .iter()
        .fold(String::with_capacity(40), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

#[cfg(test)]
mod tests;
