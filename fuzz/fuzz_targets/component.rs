//! The external component stream (XEP-0114) on any bytes: header,
//! handshake, stanzas, timers. It never panics; every stanza it hands out
//! has a `from` at the component's domain and a `to`; it reports its end
//! once and nothing after it. The stream id is random, so a fuzzer cannot
//! guess a valid handshake: an input whose first byte is odd starts after
//! one (header and handshake sent for it), to reach the stanza phase.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use rookery_stream::{
    ComponentConfig, ComponentEvent, ComponentStream, Timeouts, handshake_digest,
};

#[path = "common.rs"]
mod common;

const DOMAIN: &str = "echo.localhost";
const SECRET: &str = "secret";
const OPEN: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' to='echo.localhost'>";

/// Takes the events out, checking the promises; returns true once closed.
fn drain(stream: &mut ComponentStream, now: Instant, closed: &mut bool) {
    while let Some(event) = stream.poll_event() {
        assert!(!*closed, "an event after the end: {event:?}");
        match event {
            ComponentEvent::Authenticated { domain } => {
                assert_eq!(domain.as_str(), DOMAIN);
                stream.handle_ready(now);
            }
            ComponentEvent::Stanza(stanza) => {
                let from: jid::Jid = stanza.attr("from").expect("a from").parse().expect("valid");
                assert_eq!(from.domain().as_str(), DOMAIN);
                assert!(stanza.attr("to").is_some());
                assert!(stanza.has_ns("jabber:client"));
            }
            ComponentEvent::Closed(_) => *closed = true,
        }
    }
    while stream.poll_transmit().is_some() {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let config = ComponentConfig {
        server: "localhost".into(),
        secrets: HashMap::from([(DOMAIN.to_owned(), SECRET.to_owned())]),
        limits: common::small_limits(),
        timeouts: Timeouts::default(),
    };
    let start = Instant::now();
    let mut stream = ComponentStream::new(Arc::new(config), start);
    let mut closed = false;
    if first & 1 == 1 {
        stream.handle_input(start, OPEN);
        let _ = stream.poll_event();
        let mut header = Vec::new();
        while let Some(bytes) = stream.poll_transmit() {
            header.extend_from_slice(&bytes);
        }
        let header = String::from_utf8(header).expect("UTF-8");
        let id = header.split("id='").nth(1).and_then(|rest| rest.split('\'').next());
        let digest = handshake_digest(id.expect("a stream id"), SECRET);
        stream.handle_input(start, format!("<handshake>{digest}</handshake>").as_bytes());
        drain(&mut stream, start, &mut closed);
        assert!(stream.is_ready());
    }
    for (step, piece) in data.split_inclusive(|&b| b == b'>').enumerate() {
        let now = common::clock(start, step);
        stream.handle_input(now, piece);
        stream.handle_timeout(now);
        drain(&mut stream, now, &mut closed);
        if closed {
            break;
        }
    }
});
