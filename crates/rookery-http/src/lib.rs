//! HTTP endpoints: XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`, and the
//! `/live` and `/ready` probes. WebSocket connections run the same session task
//! as TCP connections, with WebSocket framing.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::{Bytes, BytesMut};
use rookery_net::{C2s, Received, Transport};
use rookery_stream::{Framing, StreamConfig};
use tokio::net::TcpListener;

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    /// The client-to-server services.
    pub c2s: Arc<C2s>,
    /// Stream settings for WebSocket clients.
    pub stream: Arc<StreamConfig>,
    /// Treat WebSocket clients on loopback as secure (a TLS-terminating proxy on this host).
    pub secure_loopback: bool,
}

/// The HTTP routes.
pub fn routes(state: HttpState) -> Router {
    Router::new()
        .route("/xmpp-websocket", get(websocket))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .with_state(state)
}

/// Serves HTTP until shutdown.
pub async fn serve(listener: TcpListener, state: HttpState) -> io::Result<()> {
    use axum::serve::ListenerExt as _;
    let shutdown = state.c2s.shutdown.clone();
    // Stanzas are small writes: without TCP_NODELAY, Nagle's algorithm holds
    // one back until the client's delayed ACK (up to 40 ms), as on the TCP
    // listeners, which set it too.
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY could not be set.");
        }
    });
    axum::serve(
        listener,
        routes(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    if state.c2s.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !state.c2s.router.bus().healthy() {
        (StatusCode::SERVICE_UNAVAILABLE, "cluster unreachable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn websocket(
    upgrade: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
) -> impl IntoResponse {
    let max = state.stream.limits.max_stanza_bytes;
    upgrade
        .protocols(["xmpp"])
        .max_message_size(max + 1024)
        .on_upgrade(move |socket| async move {
            let secure = state.secure_loopback && peer.ip().is_loopback();
            let task = rookery_net::session::run(
                state.c2s.clone(),
                state.stream.clone(),
                WsTransport { socket },
                peer,
                secure,
            );
            state.c2s.tasks.spawn(task);
        })
}

/// A WebSocket as a session transport.
struct WsTransport {
    socket: WebSocket,
}

impl Transport for WsTransport {
    fn framing(&self) -> Framing {
        Framing::WebSocket
    }

    async fn recv(&mut self, _buffer: &mut BytesMut) -> io::Result<Received> {
        loop {
            return match self.socket.recv().await {
                None | Some(Ok(Message::Close(_))) => Ok(Received::Eof),
                Some(Ok(Message::Text(text))) => Ok(Received::Frame(Bytes::from(text))),
                Some(Ok(Message::Binary(data))) => Ok(Received::Frame(data)),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(error)) => Err(io::Error::other(error)),
            };
        }
    }

    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        let text = axum::extract::ws::Utf8Bytes::try_from(data).map_err(io::Error::other)?;
        self.socket
            .send(Message::Text(text))
            .await
            .map_err(io::Error::other)
    }

    async fn start_tls(&mut self, _config: &Arc<rustls::ServerConfig>) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no STARTTLS over WebSocket",
        ))
    }

    async fn shutdown(&mut self) {
        let _ = self.socket.send(Message::Close(None)).await;
    }
}
