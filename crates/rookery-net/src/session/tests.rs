//! Every idle session holds its task's future: keep it small.

use std::sync::Arc;

use rookery_cluster::LocalBus;
use rookery_router::{Router, RouterConfig};
use rookery_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::limit::AddressLimiter;
use crate::transport::TcpTransport;

/// The future of an idle connection is the connected loop (boxed) plus its caller.
const BUDGET_BYTES: usize = 2048;

#[tokio::test]
async fn session_futures_stay_small() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        rookery_store_sqlite::SqliteStore::open(&dir.path().join("s.sqlite"))
            .await
            .unwrap(),
    );
    let router = Arc::new(Router::new(
        RouterConfig::new("localhost"),
        store,
        Arc::new(LocalBus::new()),
        Vec::new(),
    ));
    let c2s = Arc::new(C2s {
        router,
        tls: None,
        auth_limiter: AddressLimiter::new(5, 5),
        register_limiter: AddressLimiter::new(5, 5),
        connections: Arc::new(crate::limit::ConnectionLimiter::new(0, Vec::new())),
        byte_rate: None,
        resume_timeout: Duration::from_secs(1),
        max_unacked_bytes: 1 << 20,
        max_unacked: 1000,
        max_sessions: 0,
        redirect: std::sync::Mutex::new(None),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (client, accepted) =
        tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
    let _client = client.unwrap();
    let (stream, peer) = accepted.unwrap();
    let config = Arc::new(StreamConfig::new("localhost"));
    let mut connection = Box::new(Connection::new(
        c2s,
        config,
        TcpTransport::plain(stream),
        peer,
        false,
        None,
    ));
    let connected = connection.connected();
    let size = std::mem::size_of_val(&connected);
    assert!(
        size <= BUDGET_BYTES,
        "the connected loop's future is {size} bytes"
    );
    drop(connected);
    let size = std::mem::size_of::<Connection<TcpTransport>>();
    assert!(size <= BUDGET_BYTES, "the connection state is {size} bytes");
    let run = connection.run();
    let size = std::mem::size_of_val(&run);
    assert!(size <= BUDGET_BYTES, "the session future is {size} bytes");
}
