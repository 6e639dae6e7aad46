//! What the fuzz targets share: small limits (so that generated input reaches
//! them), a caller for the stream state machine that answers every event the
//! way the session task does, and the invariants it checks.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rookery_stream::sasl::{Decoy, ScramKeys};
use rookery_stream::xml::XmlEvent;
use rookery_stream::{
    CloseReason, Framing, KeysAnswer, Limits, ScramHash, ServerStream, StreamConfig, StreamEvent,
    TlsPolicy,
};

/// Limits small enough that generated input crosses them.
pub fn small_limits() -> Limits {
    Limits {
        max_stanza_bytes: 4096,
        max_unauthenticated_stanza_bytes: 1024,
        max_header_bytes: 512,
        max_depth: 8,
        max_attributes: 8,
    }
}

/// The stored keys of every user: password "secret" (the fewest iterations allowed).
pub fn keys() -> &'static ScramKeys {
    static KEYS: OnceLock<ScramKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        ScramKeys::derive(ScramHash::Sha256, "secret", b"fuzzing salt", 4096).expect("keys")
    })
}

/// A stand-in for unknown users with a fixed secret.
pub fn decoy() -> Decoy {
    Decoy {
        secret: [7; 32],
        iterations: 4096,
    }
}

/// A stream as a secure listener serves it: plaintext auth allowed (PLAIN
/// reaches the bound state from a seed), registration on, small limits.
pub fn stream(framing: Framing) -> ServerStream {
    let mut config = StreamConfig::new("localhost");
    config.tls = TlsPolicy::Unavailable;
    config.allow_plaintext_auth = true;
    config.registration = true;
    config.limits = small_limits();
    config.max_unacked = 16;
    config.max_unacked_bytes = 8192;
    config.decoy = decoy();
    ServerStream::new(Arc::new(config), framing, true, Instant::now())
}

/// Acts on every event the way the session task does, checking the stream's
/// promises: a stanza leaves only once bound, from the bound JID; nothing
/// follows the end of the stream.
pub fn answer_events(stream: &mut ServerStream, now: Instant, closed: &mut bool) {
    while let Some(event) = stream.poll_event() {
        assert!(!*closed, "an event after the stream closed: {event:?}");
        match event {
            StreamEvent::NeedKeys { .. } => {
                stream.handle_keys(now, KeysAnswer::Keys(Some(keys().clone())))
            }
            StreamEvent::Bind { requested } => {
                let jid = requested
                    .unwrap_or_else(|| jid::FullJid::new("alice@localhost/fuzz").expect("valid"));
                stream.handle_bound(now, jid);
            }
            StreamEvent::Resume { .. } => stream.handle_resume_failed(now),
            StreamEvent::PreAuthIq(iq) => {
                assert!(stream.jid().is_none());
                stream.send_element(&iq);
            }
            StreamEvent::Stanza(stanza) => {
                let bound = stream.jid().expect("stanzas only once bound");
                assert_eq!(stanza.attr("from"), Some(bound.as_str()));
                // Echo it, as a delivery would: stream management counts it.
                let _ = stream.send_stanza(stanza);
            }
            StreamEvent::Closed(reason) => {
                *closed = true;
                if let CloseReason::Local(Some(error)) = reason {
                    assert!(!error.condition.as_str().is_empty());
                }
            }
            StreamEvent::StartTls
            | StreamEvent::Authenticated { .. }
            | StreamEvent::AuthFailed { .. }
            | StreamEvent::SmEnabled { .. }
            | StreamEvent::ClientState { .. } => {}
        }
    }
    while stream.poll_transmit().is_some() {}
    stream.handle_timeout(now);
}

/// A clock that moves a second per step, so timers fire.
pub fn clock(start: Instant, step: usize) -> Instant {
    start + Duration::from_secs(step as u64)
}

/// A reader event as text, to compare runs.
pub fn describe(event: &XmlEvent) -> String {
    match event {
        XmlEvent::StreamOpen { name, attrs } => format!("open {} {}", name.1, attrs.len()),
        XmlEvent::Element(element) => String::from(element),
        XmlEvent::Whitespace => "whitespace".into(),
        XmlEvent::StreamClose => "close".into(),
    }
}
