//! The whole client-to-server stream (TCP framing) on any bytes: header,
//! SASL, binding, stream management, stanzas, timers. It never panics and
//! keeps the promises `common::answer_events` checks.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use rookery_stream::Framing;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut stream = common::stream(Framing::Tcp);
    let mut closed = false;
    // Pieces end at each '>' (one element or tag at a time), like real reads.
    for (step, piece) in data.split_inclusive(|&b| b == b'>').enumerate() {
        let now = common::clock(start, step);
        stream.handle_input(now, piece);
        common::answer_events(&mut stream, now, &mut closed);
        if closed {
            break;
        }
    }
});
