//! WebSocket framing (RFC 7395) on any messages: each message (split at 0xFF
//! bytes) is parsed alone, and the stream takes them in order. Never a panic.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use rookery_stream::Framing;
use rookery_stream::xml::parse_frame;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let limits = common::small_limits();
    let start = Instant::now();
    let mut stream = common::stream(Framing::WebSocket);
    let mut closed = false;
    for (step, frame) in data.split(|&b| b == 0xff).enumerate() {
        if let Ok(element) = parse_frame(frame, &limits) {
            // What parses writes out and reads back as itself.
            let text = String::from(&element);
            let again = parse_frame(text.as_bytes(), &limits);
            assert!(again.is_ok_and(|again| again == element), "{text}");
        }
        let now = common::clock(start, step);
        stream.handle_frame(now, frame);
        common::answer_events(&mut stream, now, &mut closed);
        if closed {
            break;
        }
    }
});
