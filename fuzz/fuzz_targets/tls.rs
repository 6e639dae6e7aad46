//! The server's TLS driver (rookery-net's `ServerTls`, over rustls'
//! unbuffered API) on any bytes, cut into reads of varying size: it never
//! panics, keeps at most its bound of unfinished input, and once it refuses
//! the input has an alert or nothing to send.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rookery_net::ServerTls;

fn config() -> Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let generated =
                rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
            let key =
                rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der())
                    .expect("key");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![generated.cert.der().clone()], key)
                .expect("config");
            Arc::new(config)
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let mut tls = ServerTls::new(config()).expect("session");
    let mut plain = BytesMut::new();
    for chunk in input.chunks(usize::from(cut).max(1) * 7) {
        let mut read = chunk.to_vec();
        let result = tls.receive(&mut read, &mut plain);
        let pending = tls.outgoing().len();
        tls.written(pending);
        if result.is_err() {
            tls.queue_alert();
            break;
        }
    }
    // Before the handshake nothing decrypts.
    if tls.is_handshaking() {
        assert!(plain.is_empty());
    }
});
