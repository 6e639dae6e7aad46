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
    state: ServerTls,
    /// Plaintext decrypted outside a read (in the handshake's last flight), handed
    /// out by the next read.
    early: BytesMut,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("incoming", &self.state.incoming.len())
            .field("outgoing", &self.state.outgoing.len())
            .field("peer_closed", &self.state.peer_closed)
            .finish_non_exhaustive()
    }
}

/// The TLS side of one connection without its socket (sans-IO): bytes read
/// go in through [`receive`](Self::receive), records to send come out of
/// [`outgoing`](Self::outgoing). [`TlsStream`] drives it over TCP; the
/// fuzzer (`fuzz/`) drives it with generated input.
pub struct ServerTls {
    conn: UnbufferedServerConnection,
    /// Ciphertext of a record not yet complete (empty, unallocated, between records).
    incoming: Vec<u8>,
    /// TLS bytes not written out yet.
    outgoing: Vec<u8>,
    /// The peer sent close_notify.
    peer_closed: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// A session waiting for the client's hello.
    pub fn new(config: Arc<ServerConfig>) -> io::Result<ServerTls> {
        Ok(ServerTls {
            conn: UnbufferedServerConnection::new(config).map_err(invalid_data)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            peer_closed: false,
        })
    }

    /// True until the handshake completed.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// True once the peer sent close_notify.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Runs `bytes` just read through rustls: decrypted data is appended to
    /// `plain`, records to send to [`outgoing`](Self::outgoing). `InvalidData`
    /// when the peer broke TLS (then [`queue_alert`](Self::queue_alert)).
    pub fn receive(&mut self, bytes: &mut [u8], plain: &mut BytesMut) -> io::Result<()> {
        let mut nothing: Option<&[u8]> = None;
        if self.incoming.is_empty() {
            let used = drive(
                &mut self.conn,
                bytes,
                plain,
                &mut self.outgoing,
                &mut self.peer_closed,
                &mut nothing,
            )?;
            self.incoming.extend_from_slice(&bytes[used..]);
        } else {
            self.incoming.extend_from_slice(bytes);
            let used = drive(
                &mut self.conn,
                &mut self.incoming,
                plain,
                &mut self.outgoing,
                &mut self.peer_closed,
                &mut nothing,
            )?;
            self.incoming.drain(..used);
            if self.incoming.is_empty() {
                self.incoming = Vec::new();
            }
        }
        if self.incoming.len() > MAX_INCOMING {
            return Err(invalid_data("an unfinished TLS message over 80 KiB"));
        }
        Ok(())
    }

    /// Encrypts `data` into [`outgoing`](Self::outgoing); data rustls
    /// decrypts meanwhile goes to `plain`. `NotConnected` when the session
    /// can no longer send.
    pub fn encrypt(&mut self, data: &[u8], plain: &mut BytesMut) -> io::Result<()> {
        let mut data = Some(data);
        // rustls must see the bytes it kept (part of a handshake message split
        // over records, which it has looked into), never an empty buffer in
        // their place: it indexes into them.
        let used = drive(
            &mut self.conn,
            &mut self.incoming,
            plain,
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
        Ok(())
    }

    /// Queues close_notify, when the session can still send.
    pub fn queue_close_notify(&mut self) {
        let status = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            // Best effort: the connection closes either way.
            let _ = append(&mut self.outgoing, 64, |buffer| {
                traffic.queue_close_notify(buffer)
            });
        }
    }

    /// After an error: queues the alert rustls has for it, if any.
    pub fn queue_alert(&mut self) {
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
    }

    /// The TLS bytes to write out, oldest first.
    pub fn outgoing(&self) -> &[u8] {
        &self.outgoing
    }

    /// `n` bytes of [`outgoing`](Self::outgoing) were written out.
    pub fn written(&mut self, n: usize) {
        if n == self.outgoing.len() {
            self.outgoing = Vec::new();
        } else {
            self.outgoing.drain(..n);
        }
    }
}

impl TlsStream {
    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsStream> {
        let mut tls = TlsStream {
            tcp,
            state: ServerTls::new(config)?,
            early: BytesMut::new(),
        };
        while tls.state.is_handshaking() {
            tls.flush().await?;
            let mut early = std::mem::take(&mut tls.early);
            let open = tls.read_some(&mut early).await;
            tls.early = early;
            if !open? || tls.state.peer_closed {
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
            if self.state.peer_closed || !self.read_some(plain).await? {
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
        self.state.encrypt(data, &mut self.early)?;
        self.flush().await
    }

    /// Sends close_notify and closes the sending half of the connection.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.state.queue_close_notify();
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
                self.state
                    .receive(&mut scratch[..n], plain)
                    .map(|()| Some(true))
            });
            match read {
                Ok(Some(open)) => return Ok(open),
                Ok(None) => continue,
                Err(error) => {
                    // What rustls refused (not a socket error) gets its alert.
                    if error.kind() == io::ErrorKind::InvalidData {
                        self.state.queue_alert();
                        let _ = self.try_flush();
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Writes out every pending TLS byte, then releases the buffer.
    async fn flush(&mut self) -> io::Result<()> {
        while !self.state.outgoing.is_empty() {
            self.tcp.writable().await?;
            self.try_flush()?;
        }
        Ok(())
    }

    /// Writes what the socket takes without waiting.
    fn try_flush(&mut self) -> io::Result<()> {
        while !self.state.outgoing.is_empty() {
            match self.tcp.try_write(&self.state.outgoing) {
                Ok(n) => self.state.written(n),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        Ok(())
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
