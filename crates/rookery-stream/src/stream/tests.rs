//! The stream state machine driven with bytes and fake time: no sockets, no sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use jid::FullJid;

use super::*;

const OPEN: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

struct Harness {
    stream: ServerStream,
    now: Instant,
    keys: ScramKeys,
    keys_sha1: ScramKeys,
}

impl Harness {
    fn new(configure: impl FnOnce(&mut StreamConfig), secure: bool) -> Self {
        let mut config = StreamConfig::new("localhost");
        config.tls = if secure {
            TlsPolicy::Unavailable
        } else {
            TlsPolicy::Required
        };
        configure(&mut config);
        let now = Instant::now();
        Harness {
            stream: ServerStream::new(Arc::new(config), Framing::Tcp, secure, now),
            now,
            keys: ScramKeys::generate(ScramHash::Sha256, "secret", 4096).unwrap(),
            keys_sha1: ScramKeys::generate(ScramHash::Sha1, "secret", 4096).unwrap(),
        }
    }

    fn secure() -> Self {
        Self::new(|_| {}, true)
    }

    fn send(&mut self, xml: &str) -> Vec<StreamEvent> {
        self.send_bytes(xml.as_bytes())
    }

    fn send_bytes(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        self.stream.handle_input(self.now, bytes);
        self.events()
    }

    fn events(&mut self) -> Vec<StreamEvent> {
        std::iter::from_fn(|| self.stream.poll_event()).collect()
    }

    fn output(&mut self) -> String {
        let mut out = Vec::new();
        while let Some(bytes) = self.stream.poll_transmit() {
            out.extend_from_slice(&bytes);
        }
        String::from_utf8(out).unwrap()
    }

    fn advance(&mut self, by: Duration) -> Vec<StreamEvent> {
        self.now += by;
        self.stream.handle_timeout(self.now);
        self.events()
    }

    /// Opens the stream, authenticates with PLAIN as alice and binds `resource`.
    fn bind(&mut self, resource: &str) -> FullJid {
        self.send(OPEN);
        self.auth_and_bind(resource)
    }

    /// Authenticates with PLAIN as alice and binds `resource` on an opened stream.
    fn auth_and_bind(&mut self, resource: &str) -> FullJid {
        let auth = BASE64.encode(b"\0alice\0secret");
        let events = self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ));
        assert!(
            matches!(
                &events[..],
                [StreamEvent::NeedKeys {
                    mechanism: AuthMechanism::Plain,
                    ..
                }]
            ),
            "{events:?}"
        );
        self.stream
            .handle_keys(self.now, KeysAnswer::Keys(Some(self.keys.clone())));
        let events = self.events();
        assert!(
            matches!(&events[..], [StreamEvent::Authenticated { .. }]),
            "{events:?}"
        );
        self.send(OPEN);
        let events = self.send(&format!(
            "<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ));
        let [
            StreamEvent::Bind {
                requested: Some(requested),
            },
        ] = &events[..]
        else {
            panic!("{events:?}")
        };
        let requested = requested.clone();
        self.stream.handle_bound(self.now, requested.clone());
        self.output();
        requested
    }
}

fn closed_with(events: &[StreamEvent]) -> Option<Condition> {
    events.iter().find_map(|event| match event {
        StreamEvent::Closed(CloseReason::Local(Some(error))) => Some(error.condition),
        _ => None,
    })
}

#[test]
fn negotiates_plain_auth_and_binding_on_a_secure_stream() {
    let mut h = Harness::secure();
    h.send(OPEN);
    let out = h.output();
    assert!(
        out.starts_with("<?xml version='1.0'?><stream:stream xmlns='jabber:client'"),
        "{out}"
    );
    assert!(
        out.contains("from='localhost'") && out.contains("version='1.0'"),
        "{out}"
    );
    assert!(out.contains("<mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism>"), "{out}");
    assert!(!out.contains("starttls"), "{out}");
    let jid = h.auth_and_bind("phone");
    assert_eq!(jid, FullJid::new("alice@localhost/phone").unwrap());
    assert!(h.stream.is_bound());
}

#[test]
fn features_after_auth_offer_bind_session_sm_and_extras() {
    let mut h = Harness::new(
        |c| c.session_features = vec![Element::bare("csi", "urn:xmpp:csi:0")],
        true,
    );
    h.send(OPEN);
    let auth = BASE64.encode(b"\0alice\0secret");
    h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
    ));
    h.stream
        .handle_keys(h.now, KeysAnswer::Keys(Some(h.keys.clone())));
    h.events();
    assert!(
        h.output()
            .contains("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'")
    );
    h.send(OPEN);
    let out = h.output();
    for feature in [
        "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'",
        "<sm xmlns='urn:xmpp:sm:3'",
        "<csi xmlns='urn:xmpp:csi:0'",
        "<optional/>",
    ] {
        assert!(out.contains(feature), "{feature} missing in {out}");
    }
    assert!(!out.contains("mechanisms"), "{out}");
}

#[test]
fn scram_sha1_and_sha256_authenticate_through_the_stream() {
    for hash in [ScramHash::Sha1, ScramHash::Sha256] {
        let mut h = Harness::secure();
        h.send(OPEN);
        h.output();
        let mut client: Box<dyn ::sasl::client::Mechanism> = match hash {
            ScramHash::Sha1 => Box::new(
                ::sasl::client::mechanisms::Scram::<::sasl::common::scram::Sha1>::new(
                    "alice",
                    "secret",
                    ::sasl::common::ChannelBinding::None,
                )
                .unwrap(),
            ),
            ScramHash::Sha256 => Box::new(
                ::sasl::client::mechanisms::Scram::<::sasl::common::scram::Sha256>::new(
                    "alice",
                    "secret",
                    ::sasl::common::ChannelBinding::None,
                )
                .unwrap(),
            ),
        };
        let initial = BASE64.encode(client.initial());
        let events = h.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{}'>{initial}</auth>",
            hash.mechanism()
        ));
        let [
            StreamEvent::NeedKeys {
                jid,
                mechanism: AuthMechanism::Scram(asked),
            },
        ] = &events[..]
        else {
            panic!("{events:?}")
        };
        assert_eq!((jid.as_str(), *asked), ("alice@localhost", hash));
        let keys = if hash == ScramHash::Sha1 {
            h.keys_sha1.clone()
        } else {
            h.keys.clone()
        };
        h.stream.handle_keys(h.now, KeysAnswer::Keys(Some(keys)));
        let out = h.output();
        let challenge = out
            .split("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap();
        let response = client.response(&BASE64.decode(challenge).unwrap()).unwrap();
        let events = h.send(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            BASE64.encode(response)
        ));
        assert!(
            matches!(&events[..], [StreamEvent::Authenticated { .. }]),
            "{events:?}"
        );
        let out = h.output();
        let verifier = out
            .split("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>")
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap();
        client
            .success(&BASE64.decode(verifier).unwrap())
            .expect("server signature verifies");
    }
}

#[test]
fn wrong_passwords_fail_and_too_many_failures_close_the_stream() {
    let mut h = Harness::secure();
    h.send(OPEN);
    for attempt in 1..=3 {
        let auth = BASE64.encode(b"\0alice\0wrong");
        h.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ));
        h.stream
            .handle_keys(h.now, KeysAnswer::Keys(Some(h.keys.clone())));
        let events = h.events();
        assert!(
            events.iter().any(|e| matches!(
                e,
                StreamEvent::AuthFailed {
                    condition: "not-authorized",
                    ..
                }
            )),
            "{events:?}"
        );
        let out = h.output();
        assert!(out.contains("<not-authorized/></failure>"), "{out}");
        if attempt == 3 {
            assert_eq!(closed_with(&events), Some(Condition::PolicyViolation));
        } else {
            assert!(closed_with(&events).is_none());
        }
    }
}

#[test]
fn plain_costs_an_unknown_user_the_same_work_as_a_wrong_password() {
    // Enough iterations that the key derivation dominates everything else.
    const ITERATIONS: u32 = 100_000;
    let mut h = Harness::new(|c| c.decoy.iterations = ITERATIONS, true);
    let started = Instant::now();
    ScramKeys::generate(ScramHash::Sha256, "x", ITERATIONS).unwrap();
    let derivation = started.elapsed();
    h.send(OPEN);
    let mut attempt = |user: &str, keys: Option<ScramKeys>| {
        let auth = BASE64.encode(format!("\0{user}\0wrong"));
        h.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ));
        let started = Instant::now();
        h.stream.handle_keys(h.now, KeysAnswer::Keys(keys));
        let took = started.elapsed();
        assert!(h.output().contains("<not-authorized/>"));
        took
    };
    let unknown = attempt("ghost", None);
    let known = attempt(
        "alice",
        Some(ScramKeys::generate(ScramHash::Sha256, "secret", ITERATIONS).unwrap()),
    );
    // Both derive the key once: neither takes much less than one derivation.
    assert!(
        unknown * 2 >= derivation && known * 2 >= derivation,
        "derivation {derivation:?}, unknown user {unknown:?}, wrong password {known:?}"
    );
}

#[test]
fn rate_limited_logins_get_a_temporary_failure_that_does_not_count() {
    let mut h = Harness::secure();
    h.send(OPEN);
    for _ in 0..5 {
        let auth = BASE64.encode(b"\0alice\0secret");
        h.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ));
        h.stream.handle_keys(h.now, KeysAnswer::TemporaryFailure);
        assert!(closed_with(&h.events()).is_none());
        assert!(h.output().contains("<temporary-auth-failure/>"));
    }
}

#[test]
fn unknown_mechanisms_and_bad_base64_are_sasl_failures() {
    let mut h = Harness::secure();
    h.send(OPEN);
    h.output();
    h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>");
    assert!(h.output().contains("<invalid-mechanism/>"));
    h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!</auth>");
    assert!(h.output().contains("<incorrect-encoding/>"));
    let authzid = BASE64.encode(b"bob@localhost\0alice\0secret");
    h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{authzid}</auth>"
    ));
    assert!(h.output().contains("<invalid-authzid/>"));
}

#[test]
fn starttls_is_required_before_anything_else() {
    let mut h = Harness::new(|_| {}, false);
    h.send(OPEN);
    let out = h.output();
    assert!(
        out.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>"),
        "{out}"
    );
    assert!(!out.contains("mechanisms"), "no SASL before TLS: {out}");
    h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>");
    assert!(h.output().contains("<encryption-required/>"));
    let events = h.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><injected/>");
    assert!(matches!(&events[..], [StreamEvent::StartTls]), "{events:?}");
    assert!(
        h.output()
            .contains("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    );
    h.stream.handle_tls_established(h.now);
    assert!(h.stream.is_secure());
    // The pipelined plaintext was discarded: the restarted stream parses cleanly.
    assert!(h.send(OPEN).is_empty());
    let out = h.output();
    assert!(
        out.contains("<mechanism>PLAIN</mechanism>") && !out.contains("starttls"),
        "{out}"
    );
}

#[test]
fn stanzas_before_tls_violate_policy() {
    let mut h = Harness::new(|_| {}, false);
    h.send(OPEN);
    let events = h.send("<message to='bob@localhost'><body>hi</body></message>");
    assert_eq!(closed_with(&events), Some(Condition::PolicyViolation));
    assert!(h.output().ends_with("</stream:error></stream:stream>"));
}

#[test]
fn plaintext_auth_needs_the_operator_switch_and_never_offers_plain() {
    let mut h = Harness::new(|c| c.tls = TlsPolicy::Optional, false);
    h.send(OPEN);
    let out = h.output();
    assert!(
        out.contains("<starttls") && !out.contains("<required/>") && !out.contains("mechanisms"),
        "{out}"
    );
    let mut h = Harness::new(
        |c| {
            c.tls = TlsPolicy::Optional;
            c.allow_plaintext_auth = true
        },
        false,
    );
    h.send(OPEN);
    let out = h.output();
    assert!(
        out.contains("SCRAM-SHA-256") && !out.contains("PLAIN"),
        "{out}"
    );
    h.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>");
    assert!(h.output().contains("<encryption-required/>"));
}

#[test]
fn stream_header_errors() {
    let cases = [
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong' to='localhost' version='1.0'>",
            Condition::InvalidNamespace,
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='example.org' version='1.0'>",
            Condition::HostUnknown,
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost'>",
            Condition::UnsupportedVersion,
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='2.0'>",
            Condition::UnsupportedVersion,
        ),
        (
            "<foo:stream xmlns='jabber:client' to='localhost' version='1.0'>",
            Condition::BadNamespacePrefix,
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0' version='1.0'>",
            Condition::NotWellFormed,
        ),
        (
            "<!DOCTYPE foo [<!ENTITY x 'y'>]><stream:stream>",
            Condition::RestrictedXml,
        ),
        (
            "<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream>",
            Condition::RestrictedXml,
        ),
        (
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='local\u{0}host'>",
            Condition::NotWellFormed,
        ),
    ];
    for (header, expected) in cases {
        let mut h = Harness::secure();
        let events = h.send(header);
        assert_eq!(closed_with(&events), Some(expected), "{header}");
        let out = h.output();
        assert!(
            out.starts_with("<?xml version='1.0'?><stream:stream"),
            "our header comes first: {out}"
        );
        assert!(
            out.contains(&format!(
                "<{} xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>",
                expected.as_str()
            )),
            "{out}"
        );
        assert!(out.ends_with("</stream:stream>"), "{out}");
        assert!(h.stream.is_closed());
        assert!(
            h.send(OPEN).is_empty(),
            "nothing is processed after the close"
        );
    }
}

#[test]
fn bad_xml_inside_the_stream_gets_the_right_condition() {
    let cases: [(&[u8], Condition); 9] = [
        (
            b"<message><body>unclosed</message>",
            Condition::NotWellFormed,
        ),
        (
            b"<message><!-- comment --></message>",
            Condition::RestrictedXml,
        ),
        (b"<message><?pi x?></message>", Condition::RestrictedXml),
        (
            b"<message><body>&custom;</body></message>",
            Condition::RestrictedXml,
        ),
        (
            b"<message><body>\xff\xfe</body></message>",
            Condition::UnsupportedEncoding,
        ),
        (
            b"<message><x:body/></message>",
            Condition::BadNamespacePrefix,
        ),
        (
            b"free text between stanzas<presence/>",
            Condition::BadFormat,
        ),
        (
            b"<foo xmlns='urn:unknown'/>",
            Condition::UnsupportedStanzaType,
        ),
        (
            b"<message xmlns='jabber:server'/>",
            Condition::InvalidNamespace,
        ),
    ];
    for (bytes, expected) in cases {
        let mut h = Harness::secure();
        h.send(OPEN);
        let events = h.send_bytes(bytes);
        assert_eq!(
            closed_with(&events),
            Some(expected),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn oversized_and_deeply_nested_stanzas_are_policy_violations() {
    let mut h = Harness::new(|c| c.limits.max_stanza_bytes = 10_000, true);
    h.bind("r");
    let big = format!(
        "<message to='bob@localhost'><body>{}</body></message>",
        "a".repeat(20_000)
    );
    let events = h.send(&big[..12_000]);
    assert_eq!(
        closed_with(&events),
        Some(Condition::PolicyViolation),
        "refused before the stanza completes"
    );

    let mut h = Harness::new(|c| c.limits.max_stanza_bytes = 10_000, true);
    h.bind("r");
    let events = h.send(&format!(
        "<message to='bob@localhost' x='{}'/>",
        "a".repeat(20_000)
    ));
    assert_eq!(
        closed_with(&events),
        Some(Condition::PolicyViolation),
        "one huge attribute"
    );

    let mut h = Harness::secure();
    h.bind("r");
    let deep = format!("<message>{}", "<a xmlns='urn:x'>".repeat(100));
    assert_eq!(
        closed_with(&h.send(&deep)),
        Some(Condition::PolicyViolation)
    );
}

/// Attributes of `size` bytes each (`a0='xxx' a1='xxx' ...`), `count` of them from `from`.
fn attributes(from: usize, count: usize, size: usize) -> String {
    (from..from + count)
        .map(|n| format!(" a{n}='{}'", "x".repeat(size)))
        .collect()
}

/// Feeds attributes to an opening tag that never closes, 200 at a time, as
/// the outside probe did; returns the bytes taken until the stream closed.
fn feed_endless_tag(h: &mut Harness, start: &str, size: usize) -> (usize, Option<Condition>) {
    let mut sent = start.len();
    let mut events = h.send(start);
    for round in 0..1000 {
        if let Some(condition) = closed_with(&events) {
            return (sent, Some(condition));
        }
        let chunk = attributes(round * 200, 200, size);
        sent += chunk.len();
        events = h.send(&chunk);
    }
    (sent, closed_with(&events))
}

#[test]
fn an_endless_stream_header_is_refused_within_the_header_budget() {
    let mut h = Harness::secure();
    let header_budget = Limits::default().max_header_bytes;
    let (sent, condition) = feed_endless_tag(
        &mut h,
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'",
        200,
    );
    assert_eq!(condition, Some(Condition::PolicyViolation));
    // Refused in the first chunk that crossed the budget (one chunk is 41 KB).
    assert!(sent < header_budget + 50_000, "{sent} bytes taken");
    assert!(h.output().contains("<policy-violation"));
}

#[test]
fn an_endless_opening_tag_after_login_is_refused_by_bytes_and_by_attributes() {
    // Few long attributes: the byte budget stops it.
    let mut h = Harness::new(|c| c.limits.max_stanza_bytes = 20_000, true);
    h.bind("r");
    let mut sent = 0;
    let mut condition = None;
    h.send("<message to='bob@localhost'");
    for n in 0..100 {
        sent += 5_000;
        condition = closed_with(&h.send(&attributes(n, 1, 4_990)));
        if condition.is_some() {
            break;
        }
    }
    assert_eq!(condition, Some(Condition::PolicyViolation));
    assert!(sent <= 25_000, "{sent} bytes taken");

    // Many short attributes: refused at the 65th (`to` is the first), long
    // before the byte budget.
    let mut h = Harness::secure();
    h.bind("r");
    let mut events = h.send("<message to='bob@localhost'");
    for n in 0..63 {
        events = h.send(&attributes(n, 1, 1));
        assert!(closed_with(&events).is_none(), "attribute {n}");
    }
    events.extend(h.send(" b='1'"));
    assert_eq!(closed_with(&events), Some(Condition::PolicyViolation));
}

#[test]
fn namespace_declarations_count_as_attributes() {
    let mut h = Harness::secure();
    h.bind("r");
    let declarations: String = (0..65)
        .map(|n| format!(" xmlns:p{n}='urn:example:{n}'"))
        .collect();
    let events = h.send(&format!("<message to='bob@localhost'{declarations}/>"));
    assert_eq!(closed_with(&events), Some(Condition::PolicyViolation));

    // Sixty-four (the limit) on one element pass, and the next element starts afresh.
    let mut h = Harness::secure();
    h.bind("r");
    let declarations: String = (0..63)
        .map(|n| format!(" xmlns:p{n}='urn:example:{n}'"))
        .collect();
    let events = h.send(&format!(
        "<message to='bob@localhost'{declarations}><body a='1'>x=y</body></message>"
    ));
    assert!(
        matches!(&events[..], [StreamEvent::Stanza(_)]),
        "{events:?}"
    );
}

#[test]
fn before_authentication_stanzas_are_small() {
    let mut h = Harness::secure();
    h.send(OPEN);
    let limit = Limits::default().max_unauthenticated_stanza_bytes;
    let auth = format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}",
        "A".repeat(limit)
    );
    assert_eq!(
        closed_with(&h.send(&auth)),
        Some(Condition::PolicyViolation)
    );
    // After authentication the full size applies again.
    let mut h = Harness::secure();
    h.bind("r");
    let events = h.send(&format!(
        "<message to='bob@localhost'><body>{}</body></message>",
        "a".repeat(limit * 2)
    ));
    assert!(
        matches!(&events[..], [StreamEvent::Stanza(_)]),
        "{events:?}"
    );
}

#[test]
fn the_stanza_timer_runs_from_the_first_byte_of_a_tag() {
    let mut h = Harness::secure();
    h.bind("r");
    // An opening tag that never finishes, trickled one attribute a second.
    h.send("<message to='bob@localhost'");
    for n in 0..59 {
        h.send(&format!(" a{n}='x'"));
        assert!(closed_with(&h.advance(Duration::from_secs(1))).is_none());
    }
    assert_eq!(
        closed_with(&h.advance(Duration::from_secs(2))),
        Some(Condition::ConnectionTimeout)
    );

    // A lone '<' starts it too; whitespace between stanzas does not.
    let mut h = Harness::secure();
    h.bind("r");
    h.send(" ");
    assert_eq!(
        h.stream.poll_timeout(),
        Some(h.now + Duration::from_secs(120))
    );
    h.send("<");
    assert_eq!(
        h.stream.poll_timeout(),
        Some(h.now + Duration::from_secs(60))
    );
}

#[test]
fn stanzas_before_binding_are_not_authorized() {
    let mut h = Harness::secure();
    h.send(OPEN);
    let events = h.send("<message to='bob@localhost'><body>hi</body></message>");
    assert_eq!(closed_with(&events), Some(Condition::NotAuthorized));
}

#[test]
fn unknown_top_level_elements_after_binding() {
    let mut h = Harness::secure();
    h.bind("r");
    assert_eq!(
        closed_with(&h.send("<foo xmlns='urn:unknown'/>")),
        Some(Condition::UnsupportedStanzaType)
    );
    let mut h = Harness::secure();
    h.bind("r");
    assert_eq!(
        closed_with(&h.send("<message xmlns='jabber:server'/>")),
        Some(Condition::InvalidNamespace)
    );
}

#[test]
fn from_is_stamped_and_spoofing_is_refused() {
    let mut h = Harness::secure();
    let jid = h.bind("phone");
    for stanza in [
        "<message to='bob@localhost'><body>1</body></message>",
        "<message from='alice@localhost' to='bob@localhost'><body>2</body></message>",
        "<message from='alice@localhost/phone' to='bob@localhost'><body>3</body></message>",
    ] {
        let events = h.send(stanza);
        let [StreamEvent::Stanza(stanza)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(stanza.attr("from"), Some(jid.as_str()));
    }
    for spoof in [
        "bob@localhost",
        "alice@localhost/other",
        "localhost",
        "not a jid@@",
    ] {
        let mut h = Harness::secure();
        h.bind("phone");
        let events = h.send(&format!("<message from='{spoof}' to='bob@localhost'/>"));
        assert_eq!(
            closed_with(&events),
            Some(Condition::InvalidFrom),
            "{spoof}"
        );
    }
}

#[test]
fn bind_with_invalid_resource_is_a_bad_request_and_can_be_retried() {
    let mut h = Harness::secure();
    h.send(OPEN);
    h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        BASE64.encode(b"\0alice\0secret")
    ));
    h.stream
        .handle_keys(h.now, KeysAnswer::Keys(Some(h.keys.clone())));
    h.events();
    h.send(OPEN);
    h.output();
    let long = "r".repeat(2000);
    let events = h.send(&format!("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{long}</resource></bind></iq>"));
    assert!(events.is_empty(), "{events:?}");
    assert!(
        h.output()
            .contains("<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
    );
    let events =
        h.send("<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(
        matches!(&events[..], [StreamEvent::Bind { requested: None }]),
        "{events:?}"
    );
    h.stream.handle_bind_error(h.now, "cancel", "conflict");
    assert!(
        h.output()
            .contains("<conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
    );
}

#[test]
fn stream_management_counts_acks_and_requests() {
    let mut h = Harness::secure();
    h.bind("r");
    let events = h.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    let [StreamEvent::SmEnabled { id: Some(id) }] = &events[..] else {
        panic!("{events:?}")
    };
    let out = h.output();
    assert!(
        out.contains(&format!("id='{id}'"))
            && out.contains("resume='true'")
            && out.contains("max='300'"),
        "{out}"
    );
    h.send("<message to='bob@localhost'><body>1</body></message><message to='bob@localhost'><body>2</body></message>");
    h.send("<r xmlns='urn:xmpp:sm:3'/>");
    assert!(h.output().contains("<a xmlns='urn:xmpp:sm:3' h='2'/>"));
    for n in 0..3 {
        h.stream
            .send_stanza(
                Element::builder("message", ns::CLIENT)
                    .attr(name("id"), n.to_string())
                    .build(),
            )
            .unwrap();
    }
    let out = h.output();
    assert!(
        out.ends_with("<r xmlns='urn:xmpp:sm:3'/>"),
        "an ack is requested after a batch: {out}"
    );
    assert_eq!(h.stream.sm().unwrap().unacked().len(), 3);
    h.send("<a xmlns='urn:xmpp:sm:3' h='2'/>");
    assert_eq!(h.stream.sm().unwrap().unacked().len(), 1);
    assert_eq!(
        closed_with(&h.send("<a xmlns='urn:xmpp:sm:3' h='9'/>")),
        Some(Condition::UndefinedCondition)
    );
}

#[test]
fn an_ack_is_only_sent_after_the_previous_stanza_was_handled() {
    let mut h = Harness::secure();
    h.bind("r");
    h.send("<enable xmlns='urn:xmpp:sm:3'/>");
    h.output();
    h.stream.handle_input(
        h.now,
        b"<message to='bob@localhost'/><r xmlns='urn:xmpp:sm:3'/>",
    );
    assert!(matches!(
        h.stream.poll_event(),
        Some(StreamEvent::Stanza(_))
    ));
    assert_eq!(h.output(), "", "no ack while the stanza is being handled");
    assert!(h.stream.poll_event().is_none());
    assert_eq!(h.output(), "<a xmlns='urn:xmpp:sm:3' h='1'/>");
}

#[test]
fn a_server_side_close_acknowledges_what_was_received() {
    let mut h = Harness::secure();
    h.bind("r");
    h.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    h.send("<message to='bob@localhost'><body>1</body></message><message to='bob@localhost'><body>2</body></message>");
    h.output();
    h.stream
        .close(Some(StreamError::see_other_host("127.0.0.1:5333")));
    let out = h.output();
    let ack = out.find("<a xmlns='urn:xmpp:sm:3' h='2'/>").expect(&out);
    let error = out.find("<see-other-host").expect(&out);
    assert!(ack < error, "the ack comes before the error: {out}");
}

#[test]
fn resumption_retransmits_what_the_client_did_not_ack() {
    let mut old = Harness::secure();
    let jid = old.bind("r");
    old.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>");
    old.send("<message to='bob@localhost'/>");
    for n in 0..3 {
        old.stream
            .send_stanza(
                Element::builder("message", ns::CLIENT)
                    .attr(name("id"), format!("m{n}"))
                    .build(),
            )
            .unwrap();
    }
    old.output();
    old.stream.handle_eof(old.now);
    let sm = old.stream.take_sm().unwrap();
    let id = sm.id.clone().unwrap();

    let mut new = Harness::secure();
    new.send(OPEN);
    new.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        BASE64.encode(b"\0alice\0secret")
    ));
    new.stream
        .handle_keys(new.now, KeysAnswer::Keys(Some(new.keys.clone())));
    new.events();
    new.send(OPEN);
    new.output();
    let events = new.send(&format!(
        "<resume xmlns='urn:xmpp:sm:3' previd='{id}' h='1'/>"
    ));
    assert!(
        matches!(&events[..], [StreamEvent::Resume { h: 1, .. }]),
        "{events:?}"
    );
    new.stream.handle_resumed(new.now, jid.clone(), sm, 1);
    let out = new.output();
    assert!(
        out.starts_with("<resumed xmlns='urn:xmpp:sm:3' ")
            && out.contains(&format!("previd='{id}'"))
            && out.contains("h='1'"),
        "{out}"
    );
    assert!(
        !out.contains("m0") && out.contains("id='m1'") && out.contains("id='m2'"),
        "{out}"
    );
    assert!(new.stream.is_bound());
    assert_eq!(new.stream.jid(), Some(&jid));
}

#[test]
fn failed_resumption_lets_the_client_bind() {
    let mut h = Harness::secure();
    h.send(OPEN);
    h.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        BASE64.encode(b"\0alice\0secret")
    ));
    h.stream
        .handle_keys(h.now, KeysAnswer::Keys(Some(h.keys.clone())));
    h.events();
    h.send(OPEN);
    h.output();
    h.send("<resume xmlns='urn:xmpp:sm:3' previd='nope' h='0'/>");
    h.stream.handle_resume_failed(h.now);
    assert!(
        h.output()
            .contains("<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
    );
    let events =
        h.send("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(matches!(&events[..], [StreamEvent::Bind { .. }]));
}

#[test]
fn silent_connections_time_out_during_negotiation() {
    let mut h = Harness::secure();
    assert!(h.advance(Duration::from_secs(59)).is_empty());
    assert_eq!(
        closed_with(&h.advance(Duration::from_secs(2))),
        Some(Condition::ConnectionTimeout)
    );
    assert!(h.output().contains("<connection-timeout"));
}

#[test]
fn trickled_bytes_do_not_keep_a_connection_alive() {
    let mut h = Harness::secure();
    let header = OPEN.as_bytes();
    for byte in header.iter().take(50) {
        h.send_bytes(std::slice::from_ref(byte));
        h.advance(Duration::from_secs(1));
    }
    assert_eq!(
        closed_with(&h.advance(Duration::from_secs(11))),
        Some(Condition::ConnectionTimeout)
    );
}

#[test]
fn a_started_stanza_must_finish_in_time() {
    let mut h = Harness::secure();
    h.bind("r");
    h.send("<message to='bob@localhost'><body>slo");
    for _ in 0..59 {
        h.send("o");
        assert!(closed_with(&h.advance(Duration::from_secs(1))).is_none());
    }
    assert_eq!(
        closed_with(&h.advance(Duration::from_secs(2))),
        Some(Condition::ConnectionTimeout)
    );
}

#[test]
fn idle_clients_are_pinged_and_dropped_when_silent() {
    let mut h = Harness::secure();
    let jid = h.bind("r");
    h.advance(Duration::from_secs(121));
    assert_eq!(
        h.output(),
        " ",
        "whitespace keep-alive after two minutes of output silence"
    );
    h.advance(Duration::from_secs(180));
    let out = h.output();
    assert!(
        out.contains("<ping xmlns='urn:xmpp:ping'/>") && out.contains(&format!("to='{jid}'")),
        "{out}"
    );
    let id = out
        .split("id='")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap()
        .to_owned();
    let events = h.send(&format!("<iq type='result' id='{id}'/>"));
    assert!(
        events.is_empty(),
        "the pong is consumed by the stream: {events:?}"
    );
    h.advance(Duration::from_secs(301));
    h.output();
    assert_eq!(
        closed_with(&h.advance(Duration::from_secs(61))),
        Some(Condition::ConnectionTimeout)
    );
}

#[test]
fn whitespace_keepalives_from_the_client_are_accepted() {
    let mut h = Harness::secure();
    h.bind("r");
    assert!(h.send(" \n\t ").is_empty());
    assert!(!h.stream.is_closed());
    let events = h.send("<presence/>");
    assert!(matches!(&events[..], [StreamEvent::Stanza(_)]));
}

#[test]
fn clean_close_and_peer_stream_errors() {
    let mut h = Harness::secure();
    h.bind("r");
    let events = h.send("</stream:stream>");
    assert!(
        matches!(&events[..], [StreamEvent::Closed(CloseReason::PeerClosed)]),
        "{events:?}"
    );
    assert!(h.output().ends_with("</stream:stream>"));

    let mut h = Harness::secure();
    h.bind("r");
    let events = h.send(
        "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
    );
    assert!(
        matches!(&events[..], [StreamEvent::Closed(CloseReason::PeerError(c))] if c == "conflict"),
        "{events:?}"
    );
}

#[test]
fn local_close_with_system_shutdown() {
    let mut h = Harness::secure();
    h.bind("r");
    h.stream.close(Some(Condition::SystemShutdown.into()));
    let out = h.output();
    assert_eq!(
        out,
        "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>"
    );
    assert!(
        h.stream
            .send_stanza(Element::bare("message", ns::CLIENT))
            .is_err(),
        "a closed stream hands stanzas back"
    );
}

#[test]
fn registration_iqs_are_passed_up_before_auth_only_when_enabled() {
    let query = "<iq type='get' id='r1'><query xmlns='jabber:iq:register'/></iq>";
    let mut h = Harness::new(|c| c.registration = true, true);
    h.send(OPEN);
    assert!(
        h.output()
            .contains("<register xmlns='http://jabber.org/features/iq-register'/>")
    );
    assert!(matches!(&h.send(query)[..], [StreamEvent::PreAuthIq(_)]));
    let mut h = Harness::secure();
    h.send(OPEN);
    assert!(!h.output().contains("iq-register"));
    assert_eq!(closed_with(&h.send(query)), Some(Condition::NotAuthorized));
}

#[test]
fn websocket_framing_uses_open_and_close() {
    let mut config = StreamConfig::new("localhost");
    config.tls = TlsPolicy::Unavailable;
    let now = Instant::now();
    let mut stream = ServerStream::new(Arc::new(config), Framing::WebSocket, true, now);
    stream.handle_frame(
        now,
        b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
    );
    assert!(stream.poll_event().is_none());
    let open = stream.poll_transmit().unwrap();
    assert!(
        open.starts_with(b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing'"),
        "{open:?}"
    );
    let features = String::from_utf8(stream.poll_transmit().unwrap().to_vec()).unwrap();
    assert!(
        features.starts_with(
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><mechanisms"
        ),
        "{features}"
    );
    stream.handle_frame(
        now,
        format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
            BASE64.encode(b"\0alice\0secret")
        )
        .as_bytes(),
    );
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::NeedKeys { .. })
    ));
    stream.handle_keys(
        now,
        KeysAnswer::Keys(Some(
            ScramKeys::generate(ScramHash::Sha256, "secret", 4096).unwrap(),
        )),
    );
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::Authenticated { .. })
    ));
    assert!(stream.poll_transmit().unwrap().starts_with(b"<success"));
    stream.handle_frame(
        now,
        b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
    );
    stream.poll_transmit().unwrap();
    stream.poll_transmit().unwrap();
    stream.handle_frame(now, b"<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>");
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::Bind { requested: None })
    ));
    stream.handle_bound(now, FullJid::new("alice@localhost/ws").unwrap());
    let bound = String::from_utf8(stream.poll_transmit().unwrap().to_vec()).unwrap();
    assert!(
        bound.starts_with("<iq xmlns='jabber:client' ")
            && bound.contains("<jid>alice@localhost/ws</jid>"),
        "each message is namespace-complete: {bound}"
    );
    stream
        .send_stanza(
            Element::builder("message", ns::CLIENT)
                .append(Element::builder("body", ns::CLIENT).append("hi"))
                .build(),
        )
        .unwrap();
    assert_eq!(
        stream.poll_transmit().unwrap(),
        &b"<message xmlns='jabber:client'><body>hi</body></message>"[..]
    );
    stream.handle_frame(
        now,
        b"<message xmlns='jabber:client'><body>two</body></message><message/>",
    );
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::Closed(CloseReason::Local(Some(StreamError {
            condition: Condition::NotWellFormed,
            ..
        }))))
    ));
}

#[test]
fn websocket_close_is_answered() {
    let mut config = StreamConfig::new("localhost");
    config.tls = TlsPolicy::Unavailable;
    let now = Instant::now();
    let mut stream = ServerStream::new(Arc::new(config), Framing::WebSocket, true, now);
    stream.handle_frame(
        now,
        b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
    );
    while stream.poll_transmit().is_some() {}
    stream.handle_frame(now, b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>");
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::Closed(CloseReason::PeerClosed))
    ));
    assert_eq!(
        stream.poll_transmit().unwrap(),
        &b"<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"[..]
    );
}

#[test]
fn client_state_nonzas_become_events() {
    let mut h = Harness::secure();
    h.bind("r");
    assert!(matches!(
        &h.send("<inactive xmlns='urn:xmpp:csi:0'/>")[..],
        [StreamEvent::ClientState { inactive: true }]
    ));
    assert!(matches!(
        &h.send("<active xmlns='urn:xmpp:csi:0'/>")[..],
        [StreamEvent::ClientState { inactive: false }]
    ));
}

#[test]
fn see_other_host_names_the_host() {
    let mut h = Harness::secure();
    h.bind("r");
    h.stream
        .close(Some(StreamError::see_other_host("[::1]:5222")));
    assert_eq!(
        h.output(),
        "<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>[::1]:5222</see-other-host></stream:error></stream:stream>"
    );
}

#[test]
fn buffers_are_freed_when_drained_unless_held_until_released() {
    let mut h = Harness::secure();
    h.send(OPEN);
    h.output();
    h.auth_and_bind("phone");
    let message = || {
        "<message xmlns='jabber:client' type='chat' to='alice@localhost/phone' from='bob@localhost/desk'><body>hi</body></message>"
            .parse::<Element>()
            .unwrap()
    };
    // Idle by default: drained output gives its buffer back.
    h.stream.send_stanza(message()).unwrap();
    assert!(h.output().contains("<body>hi</body>"));
    assert_eq!(h.stream.out.capacity(), 0);
    // In a burst they stay for the next stanza ...
    h.stream.hold_buffers();
    h.stream.send_stanza(message()).unwrap();
    assert!(h.output().contains("<body>hi</body>"));
    assert!(h.stream.out.capacity() > 0);
    // ... until released, which frees what is empty.
    h.stream.release_buffers();
    assert_eq!(h.stream.out.capacity(), 0);
    // And the stream goes on as before.
    h.stream.send_stanza(message()).unwrap();
    assert!(h.output().contains("<body>hi</body>"));
    assert_eq!(h.stream.out.capacity(), 0);
}
