//! Test harness for Rookery: the test PKI, an in-process [`TestServer`], a
//! scriptable [`TestClient`], and a connector for the tokio-xmpp client library.
//! The integration tests of the whole server live in this crate's `tests/`.

pub mod certs;
pub mod client;
pub mod cluster;
pub mod haproxy;
pub mod nats;
pub mod process;
pub mod proxy;
pub mod ring;
pub mod server;
pub mod xmpp_rs;

pub use client::TestClient;
pub use cluster::TestCluster;
pub use rookery_app::Config;
pub use server::TestServer;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("address")
        .port()
}
