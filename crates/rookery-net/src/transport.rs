//! What the session task reads from and writes to: a TCP connection (which can
//! turn into TLS with STARTTLS) or, through `rookery-http`, a WebSocket.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rookery_stream::Framing;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::tls::TlsStream;

/// Bytes read at a time.
const READ_SIZE: usize = 4096;

/// What a read produced.
#[derive(Debug)]
pub enum Received {
    /// Bytes were appended to the buffer.
    Bytes,
    /// One WebSocket message.
    Frame(Bytes),
    /// The peer closed the connection.
    Eof,
}

/// A connection the session task drives.
pub trait Transport: Send + 'static {
    /// How elements are framed on this transport.
    fn framing(&self) -> Framing;
    /// Waits for input. Must be cancel-safe: it runs inside `select!`.
    fn recv(&mut self, buffer: &mut BytesMut) -> impl Future<Output = io::Result<Received>> + Send;
    /// Writes data (bytes, or one message for WebSocket) and flushes.
    fn send(&mut self, data: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Runs the server side of a TLS handshake (STARTTLS).
    fn start_tls(
        &mut self,
        config: &Arc<ServerConfig>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the connection.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// A TCP connection, in the clear or in TLS.
pub struct TcpTransport {
    /// The TLS state (over a kilobyte) is boxed so plaintext connections stay small.
    conn: Option<Either<TcpStream, Box<TlsStream>>>,
}

impl TcpTransport {
    /// A plain connection (STARTTLS may follow).
    pub fn plain(stream: TcpStream) -> Self {
        TcpTransport {
            conn: Some(Either::Left(stream)),
        }
    }

    /// A connection that completed a TLS handshake (direct TLS, XEP-0368).
    pub fn tls(stream: TlsStream) -> Self {
        TcpTransport {
            conn: Some(Either::Right(Box::new(stream))),
        }
    }

    fn conn(&mut self) -> io::Result<&mut Either<TcpStream, Box<TlsStream>>> {
        self.conn.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "connection lost during TLS handshake",
            )
        })
    }
}

impl Transport for TcpTransport {
    fn framing(&self) -> Framing {
        Framing::Tcp
    }

    async fn recv(&mut self, buffer: &mut BytesMut) -> io::Result<Received> {
        // The buffer is only allocated once data is there: an idle connection holds none.
        let read = match self.conn()? {
            Either::Left(tcp) => loop {
                tcp.readable().await?;
                buffer.reserve(READ_SIZE);
                match tcp.try_read_buf(buffer) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break result?,
                }
            },
            Either::Right(tls) => tls.read(buffer).await?,
        };
        Ok(if read == 0 {
            Received::Eof
        } else {
            Received::Bytes
        })
    }

    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        match self.conn()? {
            Either::Left(tcp) => tcp.write_all(&data).await,
            Either::Right(tls) => tls.write_all(&data).await,
        }
    }

    async fn start_tls(&mut self, config: &Arc<ServerConfig>) -> io::Result<()> {
        match self.conn.take() {
            Some(Either::Left(tcp)) => {
                let tls = TlsStream::accept(config.clone(), tcp).await?;
                self.conn = Some(Either::Right(Box::new(tls)));
                Ok(())
            }
            other => {
                self.conn = other;
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS is already established",
                ))
            }
        }
    }

    async fn shutdown(&mut self) {
        let timeout = std::time::Duration::from_secs(2);
        match self.conn() {
            Ok(Either::Left(tcp)) => {
                let _ = tokio::time::timeout(timeout, tcp.shutdown()).await;
            }
            Ok(Either::Right(tls)) => {
                let _ = tokio::time::timeout(timeout, tls.shutdown()).await;
            }
            Err(_) => {}
        }
    }
}
