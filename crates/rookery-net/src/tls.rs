//! Server-side TLS over a TCP connection, driven through rustls' unbuffered
//! API so that an idle connection holds no buffer.
//!
//! rustls' buffered `ServerConnection` (what tokio-rustls wraps) keeps a 4 KiB
//! read buffer per connection for its whole life. Here, ciphertext is read into
//! a per-thread scratch buffer and decrypted from there; the connection keeps
//! bytes of its own only while a record is split across reads or the socket
//! did not take everything written, and releases them once they are used.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::net::TcpStream;

use crate::transport::read_now;

/// Bytes read from the socket at a time: a TLS record of the largest size
/// (16 KiB of data plus its header and tag) fits whole.
const SCRATCH_SIZE: usize = 18 * 1024;

/// The most ciphertext kept between reads. rustls joins a handshake message
/// over several records up to 64 KiB; nothing legitimate needs more.
const MAX_INCOMING: usize = 80 * 1024;

/// Room per record for its header, content type and authentication tag.
const RECORD_OVERHEAD: usize = 64;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// A TLS session on a TCP connection, server side.
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext of a record not yet complete (empty, unallocated, between records).
    incoming: Vec<u8>,
    /// TLS bytes the socket has not taken yet.
    outgoing: Vec<u8>,
    /// Plaintext decrypted outside a read (in the handshake's last flight), handed
    /// out by the next read.
    early: BytesMut,
    /// The peer sent close_notify.
    peer_closed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut tls = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            early: BytesMut::new(),
            peer_closed: false,
        };
        while tls.conn.is_handshaking() {
            tls.flush().await?;
            let mut early = std::mem::take(&mut tls.early);
            let open = tls.read_some(&mut early).await;
            tls.early = early;
            if !open? || tls.peer_closed {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                ));
            }
        }
        // The handshake's last flight and the session tickets.
        tls.flush().await?;
        Ok(tls)
    }

    /// Waits for data and appends what it decrypts to `plain`. Returns the
    /// number of bytes appended; 0 means the peer closed the connection.
    ///
    /// Cancel-safe: nothing is read from the socket before the last await.
    pub async fn read(&mut self, plain: &mut BytesMut) -> io::Result<usize> {
        if !self.early.is_empty() {
            let early = std::mem::take(&mut self.early);
            plain.extend_from_slice(&early);
            return Ok(early.len());
        }
        let before = plain.len();
        loop {
            if self.peer_closed || !self.read_some(plain).await? {
                return Ok(plain.len() - before);
            }
            // Records rustls answers by itself (a key update) go out with
            // this connection's next write if the socket cannot take them now.
            self.try_flush()?;
            if plain.len() > before {
                return Ok(plain.len() - before);
            }
        }
    }

    /// Encrypts `data` and writes it out.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let mut data = Some(data);
        // rustls must see the bytes it kept (part of a handshake message split
        // over records, which it has looked into), never an empty buffer in
        // their place: it indexes into them.
        let used = drive(
            &mut self.conn,
            &mut self.incoming,
            &mut self.early,
            &mut self.outgoing,
            &mut self.peer_closed,
            &mut data,
        )?;
        self.incoming.drain(..used);
        if data.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS session can no longer send",
            ));
        }
        self.flush().await
    }

    /// Sends close_notify and closes the sending half of the connection.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        let status = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            // Best effort: the connection closes either way.
            let _ = append(&mut self.outgoing, 64, |buffer| {
                traffic.queue_close_notify(buffer)
            });
        }
        self.flush().await?;
        use tokio::io::AsyncWriteExt;
        self.tcp.shutdown().await
    }

    /// Reads once from the socket (waiting until it is readable) and runs the
    /// bytes through rustls. Returns false at the end of the TCP stream.
    async fn read_some(&mut self, plain: &mut BytesMut) -> io::Result<bool> {
        loop {
            self.tcp.readable().await?;
            let read = SCRATCH.with_borrow_mut(|scratch| {
                let room = scratch.len();
                let n = match read_now(&self.tcp, room, || self.tcp.try_read(scratch)) {
                    Ok(0) => return Ok(Some(false)),
                    Ok(n) => n,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                    Err(error) => return Err(error),
                };
                let mut input: Option<&[u8]> = None;
                let result = if self.incoming.is_empty() {
                    drive(
                        &mut self.conn,
                        &mut scratch[..n],
                        plain,
                        &mut self.outgoing,
                        &mut self.peer_closed,
                        &mut input,
                    )
                    .map(|used| self.incoming.extend_from_slice(&scratch[used..n]))
                } else {
                    self.incoming.extend_from_slice(&scratch[..n]);
                    drive(
                        &mut self.conn,
                        &mut self.incoming,
                        plain,
                        &mut self.outgoing,
                        &mut self.peer_closed,
                        &mut input,
                    )
                    .map(|used| {
                        self.incoming.drain(..used);
                        if self.incoming.is_empty() {
                            self.incoming = Vec::new();
                        }
                    })
                };
                if result.is_ok() && self.incoming.len() > MAX_INCOMING {
                    return Err(invalid_data("an unfinished TLS message over 80 KiB"));
                }
                result.map(|()| Some(true))
            });
            match read {
                Ok(Some(open)) => return Ok(open),
                Ok(None) => continue,
                Err(error) => {
                    // What rustls refused (not a socket error) gets its alert.
                    if error.kind() == io::ErrorKind::InvalidData {
                        self.send_alert();
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Writes out every pending TLS byte, then releases the buffer.
    async fn flush(&mut self) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            self.tcp.writable().await?;
            self.try_flush()?;
        }
        Ok(())
    }

    /// Writes what the socket takes without waiting.
    fn try_flush(&mut self) -> io::Result<()> {
        while !self.outgoing.is_empty() {
            match self.tcp.try_write(&self.outgoing) {
                Ok(n) if n == self.outgoing.len() => self.outgoing = Vec::new(),
                Ok(n) => {
                    self.outgoing.drain(..n);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// After a TLS error: sends the alert rustls queued, if the socket takes it now.
    fn send_alert(&mut self) {
        // With something queued, rustls hands it out before it looks at the
        // input, so the empty buffer is not read (after an error in the middle
        // of a read, the bytes it had seen are no longer at hand).
        if !self.conn.wants_write() {
            return;
        }
        let status = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state {
            let _ = append(&mut self.outgoing, 64, |buffer| encode.encode(buffer));
        }
        let _ = self.try_flush();
    }
}

/// Runs rustls over `incoming` until it needs more input: decrypted data goes
/// to `plain`, TLS records to send to `outgoing`, and once the session can
/// send, `app` (taken) is encrypted to `outgoing`. Returns the number of bytes
/// of `incoming` used.
fn drive(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut [u8],
    plain: &mut BytesMut,
    outgoing: &mut Vec<u8>,
    peer_closed: &mut bool,
    app: &mut Option<&[u8]>,
) -> io::Result<usize> {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut incoming[used..]);
        let done = match state.map_err(invalid_data)? {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(invalid_data)?;
                    discard += record.discard;
                    plain.extend_from_slice(record.payload);
                }
                false
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                append(outgoing, 4096, |buffer| encode.encode(buffer))?;
                false
            }
            // The encoded bytes stay in `outgoing`, in order, for the caller to write.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                false
            }
            ConnectionState::PeerClosed => {
                *peer_closed = true;
                false
            }
            ConnectionState::WriteTraffic(mut traffic) => {
                if let Some(data) = app.take() {
                    let records = data.len() / 16384 + 1;
                    append(outgoing, data.len() + records * RECORD_OVERHEAD, |buffer| {
                        traffic.encrypt(data, buffer)
                    })?;
                }
                true
            }
            ConnectionState::BlockedHandshake | ConnectionState::Closed => true,
            // Early data is not enabled in the configuration.
            _ => return Err(invalid_data("unexpected TLS early data")),
        };
        used += discard;
        if done {
            return Ok(used);
        }
    }
}

/// Appends to `outgoing` what `write` (a rustls encoder) puts into a buffer
/// of `guess` bytes, or of the size rustls asks for when that is too small.
fn append<E: NeedsRoom>(
    outgoing: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> io::Result<()> {
    let start = outgoing.len();
    outgoing.resize(start + guess, 0);
    loop {
        match write(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(error) => match error.required_size() {
                Some(size) => outgoing.resize(start + size, 0),
                None => {
                    outgoing.truncate(start);
                    return Err(io::Error::other(error));
                }
            },
        }
    }
}

/// rustls' encoding errors, which say how much room was missing.
trait NeedsRoom: std::error::Error + Send + Sync + 'static {
    /// The buffer size rustls needs, when the buffer was too small.
    fn required_size(&self) -> Option<usize>;
}

impl NeedsRoom for EncodeError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(size) => Some(size.required_size),
            _ => None,
        }
    }
}

impl NeedsRoom for EncryptError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(size) => Some(size.required_size),
            _ => None,
        }
    }
}

fn invalid_data(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests;
