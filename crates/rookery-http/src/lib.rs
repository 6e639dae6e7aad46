//! HTTP endpoints: XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`, and the
//! `/live` and `/ready` probes. WebSocket connections run the same session task
//! as TCP connections, with WebSocket framing.
//!
//! Connections are served by hyper's HTTP/1.1 server directly (not
//! `axum::serve`), for its header-read timeout: a client that does not send a
//! whole request head in time, or leaves a keep-alive connection idle that
//! long, is disconnected. They count against the per-address connection
//! limit like XMPP connections; a WebSocket keeps its place for its life.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use bytes::{Bytes, BytesMut};
use rookery_net::limit::ConnectionPermit;
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
    /// Time a client has to send a request head, and an idle keep-alive
    /// connection waits for the next one.
    pub request_timeout: Duration,
}

/// The HTTP routes.
pub fn routes(state: HttpState) -> Router {
    Router::new()
        .route("/xmpp-websocket", get(websocket))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .with_state(state)
}

/// What a WebSocket reads at a time.
const WEBSOCKET_READ_BUFFER: usize = 4 * 1024;

/// The most an HTTP connection buffers of a request (hyper's minimum is 8 KiB).
const MAX_REQUEST_BUFFER: usize = 16 * 1024;

/// Serves HTTP/1.1 until shutdown.
pub async fn serve(listener: TcpListener, state: HttpState) -> io::Result<()> {
    let app = routes(state.clone());
    let request_timeout = state.request_timeout;
    rookery_net::accept_loop(listener, state.c2s, move |c2s, stream, peer, permit| {
        let app = app.clone();
        async move {
            // Over the per-address limit: closed at once.
            let Some(permit) = permit else { return };
            // The route handlers see the peer, and a WebSocket takes the permit along.
            let app = app
                .layer(Extension(ConnectInfo(peer)))
                .layer(Extension(Arc::new(permit)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(request_timeout)
                // A request head (a WebSocket upgrade is about 500 bytes)
                // may not make the connection hold hyper's default 400 kB.
                .max_buf_size(MAX_REQUEST_BUFFER);
            let connection = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = c2s.shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "HTTP connection ended.");
            }
        }
    })
    .await;
    Ok(())
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    if state.c2s.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if !state.c2s.router.bus().ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "cluster unreachable\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn websocket(
    upgrade: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(permit): Extension<Arc<ConnectionPermit>>,
    State(state): State<HttpState>,
) -> impl IntoResponse {
    let max = state.stream.limits.max_stanza_bytes;
    upgrade
        .protocols(["xmpp"])
        // A frame is read whole before the stream sees it: no frame or
        // message may be larger than a stanza (tungstenite's default frame
        // is 16 MiB, read at once, past the input rate).
        .max_message_size(max + 1024)
        .max_frame_size(max + 1024)
        // tungstenite allocates its read buffer up front, 128 KiB by
        // default: every idle WebSocket session would hold it.
        .read_buffer_size(WEBSOCKET_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            let secure = state.secure_loopback && peer.ip().is_loopback();
            let task = rookery_net::session::run(
                state.c2s.clone(),
                state.stream.clone(),
                WsTransport { socket },
                peer,
                secure,
                Some(permit),
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
                None => Ok(Received::Eof),
                Some(Ok(Message::Close(_))) => Ok(Received::Closed),
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
