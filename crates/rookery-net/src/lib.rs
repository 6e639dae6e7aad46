//! Client-to-server networking: TCP listeners with STARTTLS (RFC 6120 section 5)
//! and direct TLS (XEP-0368), and the per-connection session task that drives
//! the sans-IO stream and the router. `rookery-http` runs the same session task
//! over WebSocket. External components (XEP-0114) have a listener and task
//! of their own (`component`).

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rookery_router::Router;
use rookery_stream::StreamConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod component;
pub mod limit;
pub mod session;
pub mod tls;
pub mod transport;

pub use tls::{ServerTls, TlsStream};
pub use transport::{Received, TcpTransport, Transport};

/// What every client connection shares.
pub struct C2s {
    /// The router of the domain.
    pub router: Arc<Router>,
    /// TLS for STARTTLS and direct TLS; `None` when no certificate is configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Failed logins per client address.
    pub auth_limiter: limit::AddressLimiter,
    /// In-band registrations per client address.
    pub register_limiter: limit::AddressLimiter,
    /// Connections open at once per client address, on every listener.
    pub connections: Arc<limit::ConnectionLimiter>,
    /// Input byte rate and burst per connection, if limited.
    pub byte_rate: Option<(u64, u64)>,
    /// How long a dropped session waits for the client to resume it.
    pub resume_timeout: Duration,
    /// Bytes of unacknowledged stanzas a session keeps (connected or hibernating).
    pub max_unacked_bytes: usize,
    /// Unacknowledged stanzas a session keeps (connected or hibernating).
    pub max_unacked: usize,
    /// Most sessions on this node before new clients are redirected (0: no limit).
    pub max_sessions: usize,
    /// Where clients go when this node shuts down (see-other-host), if anywhere.
    pub redirect: std::sync::Mutex<Option<String>>,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl std::fmt::Debug for C2s {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C2s")
            .field("tls", &self.tls.is_some())
            .field("resume_timeout", &self.resume_timeout)
            .finish_non_exhaustive()
    }
}

impl C2s {
    /// Whether a new connection is served here: `Err` is the stream error to
    /// end it with (a redirect to a less loaded node, or a refusal).
    pub fn admit(&self) -> Result<(), rookery_stream::StreamError> {
        use rookery_stream::{Condition, StreamError};
        let bus = self.router.bus();
        if !bus.ready() {
            return Err(StreamError::new(
                Condition::ResourceConstraint,
                "This node lost its cluster; try again shortly.",
            ));
        }
        let sessions = bus.local_sessions();
        if self.max_sessions > 0 && sessions >= self.max_sessions {
            let peer = bus
                .peers()
                .into_iter()
                .filter(|peer| peer.address.is_some() && peer.sessions < sessions)
                .min_by_key(|peer| peer.sessions);
            return Err(match peer.and_then(|peer| peer.address) {
                Some(address) => StreamError::see_other_host(address),
                None => StreamError::new(Condition::ResourceConstraint, "This node is full."),
            });
        }
        Ok(())
    }

    /// The stream error that ends sessions when the server stops.
    pub fn shutdown_error(&self) -> rookery_stream::StreamError {
        match self.redirect.lock().expect("redirect lock").clone() {
            Some(address) => rookery_stream::StreamError::see_other_host(address),
            None => rookery_stream::StreamError::new(
                rookery_stream::Condition::SystemShutdown,
                "The server is shutting down.",
            ),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: io::Error,
    },
    /// No certificate or no private key in the files.
    #[error("{0}")]
    Missing(String),
    /// rustls refused the certificate or key.
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls server configuration from PEM files, offering the
/// `xmpp-client` ALPN protocol of XEP-0368.
pub fn tls_config(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            path: path.display().to_string(),
            error,
        })
    };
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad_pem = |path: &Path, error: pem::Error| TlsError::Read {
        path: path.display().to_string(),
        error: io::Error::new(io::ErrorKind::InvalidData, error.to_string()),
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert_path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| bad_pem(cert_path, error))?;
    if certs.is_empty() {
        return Err(TlsError::Missing(format!(
            "no certificate in {}",
            cert_path.display()
        )));
    }
    let key = match PrivateKeyDer::from_pem_slice(&read(key_path)?) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::Missing(format!(
                "no private key in {}",
                key_path.display()
            )));
        }
        Err(error) => return Err(bad_pem(key_path, error)),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"xmpp-client".to_vec()];
    Ok(Arc::new(config))
}

/// Serves client connections with STARTTLS (or plain, per `config`) until shutdown.
pub async fn serve_starttls(listener: TcpListener, c2s: Arc<C2s>, config: Arc<StreamConfig>) {
    accept_loop(listener, c2s, move |c2s, stream, peer, permit| {
        let config = config.clone();
        async move {
            // A refused connection still gets its stream error: it costs no TLS.
            let permit = permit.map(Arc::new);
            session::run(
                c2s,
                config,
                TcpTransport::plain(stream),
                peer,
                false,
                permit,
            )
            .await;
        }
    })
    .await
}

/// Serves client connections that start with a TLS handshake (XEP-0368) until shutdown.
pub async fn serve_direct_tls(listener: TcpListener, c2s: Arc<C2s>, config: Arc<StreamConfig>) {
    accept_loop(listener, c2s, move |c2s, stream, peer, permit| {
        let config = config.clone();
        async move {
            // A refused connection is closed before the (costly) handshake.
            let (Some(tls), Some(permit)) = (c2s.tls.clone(), permit) else {
                return;
            };
            match tokio::time::timeout(Duration::from_secs(30), TlsStream::accept(tls, stream))
                .await
            {
                Ok(Ok(tls)) => {
                    let transport = TcpTransport::tls(tls);
                    let permit = Some(Arc::new(permit));
                    session::run(c2s, config, transport, peer, true, permit).await
                }
                Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed."),
                Err(_) => tracing::info!(%peer, "TLS handshake timed out."),
            }
        }
    })
    .await
}

/// Accepts connections until shutdown and serves each in a task of its own,
/// with its permit from the per-address limit (`None`: over the limit).
pub async fn accept_loop<F, Fut>(listener: TcpListener, c2s: Arc<C2s>, serve: F)
where
    F: Fn(Arc<C2s>, TcpStream, SocketAddr, Option<limit::ConnectionPermit>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = c2s.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let permit = c2s.connections.admit(peer.ip());
                if permit.is_none() {
                    tracing::debug!(%peer, "Too many connections from this address; refusing one.");
                }
                c2s.tasks.spawn(serve(c2s.clone(), stream, peer, permit));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "Accepting a connection failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
