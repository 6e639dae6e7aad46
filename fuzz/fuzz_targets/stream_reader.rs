//! The XML stream reader on any bytes: it never panics, and cutting the input
//! anywhere gives the same events and the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rookery_stream::xml::StreamReader;

#[path = "common.rs"]
mod common;

/// Feeds `input` in pieces of `piece` bytes; the events, then the error if any.
fn read(input: &[u8], piece: usize) -> Vec<String> {
    let mut reader = StreamReader::new(common::small_limits());
    let mut seen = Vec::new();
    for chunk in input.chunks(piece) {
        let mut rest = chunk;
        loop {
            match reader.read(&mut rest) {
                Ok(Some(event)) => seen.push(common::describe(&event)),
                Ok(None) => break,
                Err(condition) => {
                    seen.push(format!("error {condition}"));
                    return seen;
                }
            }
        }
    }
    seen
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let whole = read(input, input.len().max(1));
    let pieces = read(input, usize::from(cut).max(1));
    assert_eq!(whole, pieces, "cut every {cut} bytes");
});
