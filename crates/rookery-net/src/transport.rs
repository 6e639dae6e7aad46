//! What the session task reads from and writes to: a TCP connection (which can
//! turn into TLS with STARTTLS) or, through `rookery-http`, a WebSocket.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use rookery_stream::Framing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

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
    fn start_tls(&mut self, acceptor: &TlsAcceptor) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes the connection.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// A TCP connection, in the clear or in TLS.
pub struct TcpTransport {
    /// The TLS state (over a kilobyte) is boxed so plaintext connections stay small.
    conn: Option<Either<TcpStream, Box<TlsStream<TcpStream>>>>,
    /// The last TLS read filled the buffer: rustls may hold more plaintext, so
    /// read again before waiting for the socket.
    tls_pending: bool,
}

impl TcpTransport {
    /// A plain connection (STARTTLS may follow).
    pub fn plain(stream: TcpStream) -> Self {
        TcpTransport {
            conn: Some(Either::Left(stream)),
            tls_pending: false,
        }
    }

    /// A connection that completed a TLS handshake (direct TLS, XEP-0368).
    pub fn tls(stream: TlsStream<TcpStream>) -> Self {
        TcpTransport {
            conn: Some(Either::Right(Box::new(stream))),
            // The handshake may have read application data already.
            tls_pending: true,
        }
    }

    fn conn(&mut self) -> io::Result<&mut Either<TcpStream, Box<TlsStream<TcpStream>>>> {
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
        let tls_pending = self.tls_pending;
        let read = match self.conn()? {
            Either::Left(tcp) => loop {
                tcp.readable().await?;
                buffer.reserve(READ_SIZE);
                match tcp.try_read_buf(buffer) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break result?,
                }
            },
            Either::Right(tls) => {
                if !tls_pending {
                    tls.get_ref().0.readable().await?;
                }
                buffer.reserve(READ_SIZE);
                let spare = buffer.capacity() - buffer.len();
                let read = tls.read_buf(buffer).await?;
                self.tls_pending = read == spare;
                read
            }
        };
        Ok(if read == 0 {
            Received::Eof
        } else {
            Received::Bytes
        })
    }

    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        let conn = self.conn()?;
        conn.write_all(&data).await?;
        conn.flush().await
    }

    async fn start_tls(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        match self.conn.take() {
            Some(Either::Left(tcp)) => {
                let tls = acceptor.accept(tcp).await?;
                self.conn = Some(Either::Right(Box::new(tls)));
                // The handshake may have read application data already.
                self.tls_pending = true;
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
        if let Ok(conn) = self.conn() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.shutdown()).await;
        }
    }
}
