//! SASL on any client messages: PLAIN's message, SCRAM's client-first and
//! client-final (split at the first 0xFF byte), against a known user and an
//! unknown one. Never a panic; never a success without the password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rookery_stream::ScramHash;
use rookery_stream::sasl::{SaslStep, ScramServer, parse_plain};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Ok(credentials) = parse_plain(data) {
        assert!(!credentials.password.is_empty());
    }
    let (first, last) = match data.iter().position(|&b| b == 0xff) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    for hash in [ScramHash::Sha1, ScramHash::Sha256] {
        for known in [true, false] {
            let mut server = ScramServer::new(hash, common::decoy());
            if !matches!(server.handle_initial(first), Ok(SaslStep::NeedKeys { .. })) {
                continue;
            }
            let keys = known.then(|| common::keys().clone());
            if let Ok(SaslStep::Challenge(_)) = server.handle_keys(keys) {
                let outcome = server.handle_response(last);
                // Generated input does not know the proof of "secret".
                assert!(!matches!(outcome, Ok(SaslStep::Success(_))));
            }
        }
    }
});
