//! The component stream driven with bytes and fake time.

use super::*;

const OPEN: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='echo.localhost'>";

struct Harness {
    stream: ComponentStream,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        let config = ComponentConfig {
            server: "localhost".into(),
            secrets: HashMap::from([("echo.localhost".to_owned(), "s3cret".to_owned())]),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        };
        let now = Instant::now();
        Harness {
            stream: ComponentStream::new(Arc::new(config), now),
            now,
        }
    }

    fn send(&mut self, xml: &str) -> Vec<ComponentEvent> {
        self.stream.handle_input(self.now, xml.as_bytes());
        std::iter::from_fn(|| self.stream.poll_event()).collect()
    }

    fn output(&mut self) -> String {
        let mut out = Vec::new();
        while let Some(bytes) = self.stream.poll_transmit() {
            out.extend_from_slice(&bytes);
        }
        String::from_utf8(out).unwrap()
    }

    /// Opens the stream and returns the id the server gave it.
    fn open(&mut self) -> String {
        assert!(self.send(OPEN).is_empty());
        let header = self.output();
        assert!(
            header.contains("xmlns='jabber:component:accept'")
                && header.contains("from='echo.localhost'"),
            "{header}"
        );
        let id = header.split("id='").nth(1).unwrap();
        id[..id.find('\'').unwrap()].to_owned()
    }

    /// Opens, shakes hands and is ready.
    fn ready() -> Self {
        let mut h = Harness::new();
        let id = h.open();
        let events = h.send(&format!(
            "<handshake>{}</handshake>",
            handshake_digest(&id, "s3cret")
        ));
        assert!(
            matches!(&events[..], [ComponentEvent::Authenticated { domain }] if domain.as_str() == "echo.localhost"),
            "{events:?}"
        );
        assert_eq!(h.output(), "", "nothing before the caller registered it");
        h.stream.handle_ready(h.now);
        assert_eq!(h.output(), "<handshake/>");
        h
    }

    fn closed_with(&mut self, events: &[ComponentEvent], condition: Condition) {
        assert!(
            matches!(events.last(), Some(ComponentEvent::Closed(CloseReason::Local(Some(error)))) if error.condition == condition),
            "{events:?}"
        );
        let out = self.output();
        assert!(
            out.contains(&format!("<{}", condition.as_str())) && out.ends_with("</stream:stream>"),
            "{out}"
        );
    }
}

#[test]
fn the_handshake_digest_is_the_one_other_implementations_compute() {
    let ours = handshake_digest("3BF96D32", "s3cret");
    let theirs = xmpp_parsers::component::Handshake::from_stream_id_and_password(
        "3BF96D32".into(),
        "s3cret",
    );
    let theirs: String = theirs
        .data
        .unwrap()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn stanzas_flow_after_the_handshake_in_the_client_namespace() {
    let mut h = Harness::ready();
    let events = h.send(
        "<message from='bot@echo.localhost/x' to='alice@localhost' type='chat'><body>hi</body></message>",
    );
    let [ComponentEvent::Stanza(message)] = &events[..] else {
        panic!("{events:?}")
    };
    assert!(message.is("message", ns::CLIENT));
    assert_eq!(
        message.get_child("body", ns::CLIENT).map(Element::text),
        Some("hi".into())
    );
    // Out again, the client namespace is the stream's default: the
    // component reads it as its own.
    let reply: Element =
        "<message xmlns='jabber:client' from='alice@localhost/a' to='echo.localhost'><body>yo</body></message>"
            .parse()
            .unwrap();
    h.stream.send_stanza(reply).unwrap();
    assert_eq!(
        h.output(),
        "<message from='alice@localhost/a' to='echo.localhost'><body>yo</body></message>"
    );
}

#[test]
fn a_handshake_upper_case_is_accepted() {
    let mut h = Harness::new();
    let id = h.open();
    let digest = handshake_digest(&id, "s3cret").to_ascii_uppercase();
    let events = h.send(&format!("<handshake>{digest}</handshake>"));
    assert!(matches!(
        &events[..],
        [ComponentEvent::Authenticated { .. }]
    ));
}

#[test]
fn a_wrong_secret_is_not_authorized() {
    let mut h = Harness::new();
    let id = h.open();
    let events = h.send(&format!(
        "<handshake>{}</handshake>",
        handshake_digest(&id, "guess")
    ));
    h.closed_with(&events, Condition::NotAuthorized);
}

#[test]
fn an_unknown_domain_is_host_unknown_and_a_header_without_one_improper() {
    let mut h = Harness::new();
    let events = h.send(&OPEN.replace("echo.localhost", "other.localhost"));
    h.closed_with(&events, Condition::HostUnknown);
    let mut h = Harness::new();
    let events = h.send(&OPEN.replace(" to='echo.localhost'", ""));
    h.closed_with(&events, Condition::ImproperAddressing);
}

#[test]
fn a_stanza_before_the_handshake_is_not_authorized() {
    let mut h = Harness::new();
    h.open();
    let events = h.send("<message from='echo.localhost' to='alice@localhost'/>");
    h.closed_with(&events, Condition::NotAuthorized);
    assert!(h.stream.is_closed());
}

#[test]
fn a_stanza_from_another_domain_is_invalid_from() {
    let mut h = Harness::ready();
    let events = h.send("<message from='mallory@localhost' to='alice@localhost'/>");
    h.closed_with(&events, Condition::InvalidFrom);
}

#[test]
fn look_alike_domains_are_invalid_from() {
    for from in [
        "bot@echo.localhost.evil",
        "evil.localhost",
        "bot@a.echo.localhost",
        "echo.localhostx",
    ] {
        let mut h = Harness::ready();
        let events = h.send(&format!("<message from='{from}' to='alice@localhost'/>"));
        h.closed_with(&events, Condition::InvalidFrom);
    }
    let mut h = Harness::ready();
    let events = h.send("<message from='Bot@ECHO.localhost/Res' to='alice@localhost'/>");
    assert!(
        matches!(&events[..], [ComponentEvent::Stanza(_)]),
        "{events:?}"
    );
}

#[test]
fn a_silent_component_is_pinged_and_ended_when_it_does_not_answer() {
    let t = Timeouts::default();
    let mut h = Harness::ready();
    let idle = h.now + t.idle;
    assert_eq!(h.stream.poll_timeout(), Some(h.now + t.keepalive));
    h.stream.handle_timeout(idle);
    let ping = h.output();
    assert!(
        ping.contains("<ping xmlns='urn:xmpp:ping'/>") && ping.contains("to='echo.localhost'"),
        "{ping}"
    );
    let id = ping.split("id='").nth(1).unwrap();
    let id = &id[..id.find('\'').unwrap()];
    // The answer (an error will do) is taken by the stream, not handed on.
    h.now = idle;
    let events = h.send(&format!(
        "<iq type='error' id='{id}' from='echo.localhost' to='localhost'/>"
    ));
    assert!(events.is_empty(), "{events:?}");
    h.stream.handle_timeout(idle + t.ping);
    assert!(!h.stream.is_closed());

    let mut h = Harness::ready();
    h.stream.handle_timeout(h.now + t.idle);
    h.stream.handle_timeout(h.now + t.idle + t.ping);
    let events: Vec<_> = std::iter::from_fn(|| h.stream.poll_event()).collect();
    h.closed_with(&events, Condition::ConnectionTimeout);
}

#[test]
fn a_stanza_without_to_or_from_is_improper_addressing() {
    let mut h = Harness::ready();
    let events = h.send("<message from='echo.localhost'/>");
    h.closed_with(&events, Condition::ImproperAddressing);
    let mut h = Harness::ready();
    let events = h.send("<iq to='localhost' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>");
    h.closed_with(&events, Condition::ImproperAddressing);
}

#[test]
fn an_unknown_element_is_unsupported() {
    let mut h = Harness::ready();
    let events = h.send("<bogus from='echo.localhost' to='localhost'/>");
    h.closed_with(&events, Condition::UnsupportedStanzaType);
}

#[test]
fn a_silent_component_times_out_before_the_handshake_only() {
    let mut h = Harness::new();
    h.open();
    let deadline = h.stream.poll_timeout().unwrap();
    assert_eq!(deadline, h.now + Timeouts::default().negotiation);
    h.stream.handle_timeout(deadline);
    let events: Vec<_> = std::iter::from_fn(|| h.stream.poll_event()).collect();
    h.closed_with(&events, Condition::ConnectionTimeout);

    let mut h = Harness::ready();
    let later = h.now + Timeouts::default().keepalive;
    h.stream.handle_timeout(later);
    assert!(!h.stream.is_closed());
    assert_eq!(h.output(), " ", "a keep-alive after the idle interval");
}

#[test]
fn the_component_closing_closes_the_stream() {
    let mut h = Harness::ready();
    let events = h.send("</stream:stream>");
    assert!(matches!(
        &events[..],
        [ComponentEvent::Closed(CloseReason::PeerClosed)]
    ));
    assert_eq!(h.output(), "</stream:stream>");
}

#[test]
fn before_the_handshake_elements_are_held_to_the_unauthenticated_size() {
    let limits = Limits::default();
    let big = "a".repeat(limits.max_unauthenticated_stanza_bytes + 1);
    let mut h = Harness::new();
    h.open();
    let events = h.send(&format!("<handshake>{big}</handshake>"));
    h.closed_with(&events, Condition::PolicyViolation);

    let mut h = Harness::ready();
    let events = h.send(&format!(
        "<message from='echo.localhost' to='alice@localhost'><body>{big}</body></message>"
    ));
    assert!(
        matches!(&events[..], [ComponentEvent::Stanza(_)]),
        "{events:?}"
    );
}
