//! What the session task reads from and writes to: a TCP connection (which can
//! turn into TLS with STARTTLS) or, through `rookery-http`, a WebSocket.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rookery_stream::Framing;
use rustls::ServerConfig;
use tokio::io::{AsyncWriteExt, Interest};
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
    /// The peer closed the connection on purpose without closing the stream
    /// (a WebSocket close frame without `<close/>`: a browser tab closed).
    /// The session ends as if the stream were closed: nothing waits for a
    /// resumption. A connection that just drops ends in [`Received::Eof`].
    Closed,
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

/// Reads once from `tcp` without waiting, through `read`, into `room` free
/// bytes. A read that did not fill the room found the socket empty, so tokio
/// is told the socket is no longer readable, as its own `poll_read` does;
/// otherwise the next read would be one more system call that finds nothing
/// (one per message at moderate rates). Bytes that arrive after the read
/// make the socket readable again: tokio only forgets the readiness it had
/// seen before the read.
pub(crate) fn read_now(
    tcp: &TcpStream,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut done = None;
    let result = tcp.try_io(Interest::READABLE, || {
        let n = read()?;
        done = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (done, result) {
        (Some(n), _) => Ok(n),
        (None, Err(error)) => Err(error),
        (None, Ok(())) => unreachable!("the read ran and succeeded"),
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
                let room = buffer.capacity() - buffer.len();
                match read_now(tcp, room, || tcp.try_read_buf(buffer)) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;

    use super::read_now;

    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    async fn read(socket: &TcpStream, room: usize) -> Vec<u8> {
        let mut buffer = vec![0; room];
        timeout(Duration::from_secs(5), socket.readable())
            .await
            .expect("readable in time")
            .expect("readable");
        let n = read_now(socket, room, || socket.try_read(&mut buffer)).expect("read");
        buffer.truncate(n);
        buffer
    }

    /// Whether tokio still takes the socket for readable (without a system call).
    async fn still_readable(socket: &TcpStream) -> bool {
        timeout(Duration::from_millis(50), socket.readable())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_short_read_forgets_readiness_until_more_bytes_come() {
        let (mut client, server) = connected().await;
        client.write_all(b"first").await.expect("write");
        assert_eq!(read(&server, 64).await, b"first");
        assert!(!still_readable(&server).await, "the socket was drained");
        client.write_all(b"second").await.expect("write");
        assert_eq!(read(&server, 64).await, b"second");
    }

    #[tokio::test]
    async fn a_full_read_keeps_readiness_for_the_rest() {
        let (mut client, server) = connected().await;
        client.write_all(&[7; 100]).await.expect("write");
        // All 100 bytes are in the socket before the first read.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(read(&server, 64).await, [7; 64]);
        assert!(still_readable(&server).await, "36 bytes are left");
        assert_eq!(read(&server, 64).await, [7; 36]);
        drop(client);
        assert_eq!(read(&server, 64).await, b"", "the end of the stream");
    }
}
