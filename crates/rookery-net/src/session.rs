//! The session task: one per connection. It owns the transport, the stream
//! state machine and, once bound, the router session and its inbox.
//!
//! Its loop waits on a closed set of wake-ups (input, mail, the stream's timer,
//! throttling, shutdown). When the connection drops with stream management
//! resumable, the task stays alive without a transport ("hibernates"),
//! queueing what arrives, until the client resumes or the timeout passes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::FutureExt as _;
use minidom::Element;
use std::collections::VecDeque;

use rookery_cluster::{Inbox, InboxEvent, Mail, Mailbox, Receipt, SessionSnapshot};
use rookery_router::Session;
use rookery_stream::{
    AuthMechanism, CloseReason, Condition, KeysAnswer, ScramHash, ServerStream, SmState,
    StreamConfig, StreamError, StreamEvent,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::C2s;
use crate::limit::{ByteRate, ConnectionPermit};
use crate::transport::{Received, Transport};

/// How long one write may take before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Stanzas of one read a session handles before it lets other tasks run.
const STANZAS_PER_TURN: usize = 8;
/// How long closing the transport may take once the stream is over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Input or mail closer together than this is a burst: the session keeps its
/// read buffer, output buffer and XML writer until a gap this long, rather
/// than freeing and making them again for every stanza.
const BURST_GAP: Duration = Duration::from_millis(100);

/// Runs one client connection to its end. `permit` is the connection's
/// place under the per-address limit; without one, the stream is refused
/// with `policy-violation`.
pub async fn run<T: Transport>(
    c2s: Arc<C2s>,
    config: Arc<StreamConfig>,
    transport: T,
    peer: SocketAddr,
    secure: bool,
    permit: Option<Arc<ConnectionPermit>>,
) {
    let span = tracing::info_span!("c2s", %peer, jid = tracing::field::Empty);
    let connection = Box::new(Connection::new(
        c2s, config, transport, peer, secure, permit,
    ));
    // A bug in one session must not take the node down: the panic is contained
    // here and reported; its routing entry is skipped once its inbox is gone.
    let outcome = std::panic::AssertUnwindSafe(connection.run().instrument(span.clone()))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        span.in_scope(|| tracing::error!(panic = %message, "Session task panicked; the connection is dropped."));
    }
}

/// A bound session, its inbox, and the receipts of durable deliveries that
/// are not safe yet.
struct Bound {
    session: Session,
    inbox: Inbox,
    receipts: Receipts,
}

/// Receipts of durable deliveries (cluster mode), acknowledged once the stanza
/// is safe: the client acknowledged it (XEP-0198), it was written out (no
/// stream management), or the router rerouted it when the session ended.
#[derive(Debug, Default)]
struct Receipts {
    /// Sent under stream management, with the stanza count at which each was sent.
    tracked: VecDeque<(u32, Receipt)>,
    /// Written without stream management: safe once flushed.
    written: Vec<Receipt>,
    /// Their stanzas go back to the router when the session ends.
    rerouted: Vec<Receipt>,
}

impl Receipts {
    /// Takes the receipts of stanzas the client acknowledged up to `acked`.
    fn take_acked(&mut self, acked: u32) -> Vec<Receipt> {
        let mut safe = Vec::new();
        // Counts wrap at 2^32: "sent at or before acked" within half the range.
        while let Some((sent, _)) = self.tracked.front() {
            if acked.wrapping_sub(*sent) >= 1 << 31 {
                break;
            }
            safe.push(self.tracked.pop_front().expect("checked").1);
        }
        safe
    }

    /// Everything: the session is over and its stanzas were rerouted.
    fn take_all(&mut self) -> Vec<Receipt> {
        let mut all: Vec<Receipt> = self.tracked.drain(..).map(|(_, receipt)| receipt).collect();
        all.append(&mut self.written);
        all.append(&mut self.rerouted);
        all
    }
}

/// What woke the connected loop.
enum Wake {
    Input(std::io::Result<Received>),
    Mail(Option<Mail>),
    Overflow,
    Timer,
    Throttle,
    Shutdown,
}

/// How the connected phase ended.
enum Ending {
    /// The session (if any) ends now.
    End,
    /// The connection dropped; the session waits for the client to resume.
    Hibernate(SmState),
    /// Another connection resumed the session.
    HandedOver,
}

struct Connection<T> {
    c2s: Arc<C2s>,
    transport: T,
    stream: ServerStream,
    peer: SocketAddr,
    buffer: BytesMut,
    bound: Option<Bound>,
    /// Stanzas the stream could not take (it closed): rerouted at the end.
    undelivered: Vec<Element>,
    byte_rate: Option<ByteRate>,
    throttled_until: Option<Instant>,
    shutdown_seen: bool,
    /// The last input or mail.
    last_active: Option<Instant>,
    /// While traffic comes in bursts, buffers are kept until this moment.
    release_at: Option<Instant>,
    /// The connection's place under the per-address limit, released with the socket.
    permit: Option<Arc<ConnectionPermit>>,
    /// The session's client did not keep up with what was sent to it: the
    /// session ends, without waiting for resumption.
    overflowed: bool,
}

impl<T: Transport> Connection<T> {
    fn new(
        c2s: Arc<C2s>,
        config: Arc<StreamConfig>,
        transport: T,
        peer: SocketAddr,
        secure: bool,
        permit: Option<Arc<ConnectionPermit>>,
    ) -> Self {
        let now = Instant::now().into_std();
        Connection {
            stream: ServerStream::new(config, transport.framing(), secure, now),
            byte_rate: c2s
                .byte_rate
                .map(|(rate, burst)| ByteRate::new(rate, burst, now)),
            c2s,
            transport,
            peer,
            buffer: BytesMut::new(),
            bound: None,
            undelivered: Vec::new(),
            throttled_until: None,
            shutdown_seen: false,
            last_active: None,
            release_at: None,
            permit,
            overflowed: false,
        }
    }

    async fn run(mut self: Box<Self>) {
        tracing::debug!("Connection accepted.");
        let admitted = match &self.permit {
            Some(_) => self.c2s.admit(),
            None => Err(StreamError::new(
                Condition::PolicyViolation,
                "Too many connections from your address.",
            )),
        };
        if let Err(error) = admitted {
            tracing::info!(condition = %error.condition, "Connection not admitted.");
            self.stream.close(Some(error));
            let _ = self.flush().await;
            self.close_transport().await;
            return;
        }
        // The connected phase runs boxed: what follows (hibernation, the end of the
        // session) must not add its state to the future every idle session holds.
        let ending = Box::pin(self.connected()).await;
        self.close_transport().await;
        // The socket, TLS state, stream and buffers go now: ending the session
        // may wait for storage, and after a mass disconnect thousands of
        // sessions wait at once; they must not hold their sockets and buffers
        // meanwhile.
        let (c2s, bound) = (self.c2s.clone(), self.bound.take());
        let undelivered = std::mem::take(&mut self.undelivered);
        drop(self);
        match ending {
            Ending::HandedOver => tracing::info!("Session handed over to a resuming connection."),
            Ending::End => {
                if let Some(bound) = bound {
                    Box::pin(finish(&c2s, bound, undelivered)).await;
                }
            }
            Ending::Hibernate(sm) => {
                let bound = bound.expect("only bound sessions hibernate");
                Box::pin(hibernate(c2s, bound, sm, undelivered)).await;
            }
        }
    }

    async fn connected(&mut self) -> Ending {
        loop {
            if let Some(ending) = self.process_events().await {
                return ending;
            }
            if self.flush().await.is_err() {
                self.stream.handle_eof(Instant::now().into_std());
                continue;
            }
            self.settle_receipts().await;
            if self.wants_offline_page() {
                let bound = self.bound.as_mut().expect("checked");
                let page = self.c2s.router.next_offline_page(&mut bound.session).await;
                for (stanza, receipt) in page {
                    let bound = self.bound.as_mut().expect("checked");
                    self.c2s.router.accept_delivery(&mut bound.session, stanza);
                    let taken = self.drain_outbox();
                    self.keep_receipt(receipt, true, taken).await;
                }
                continue;
            }
            let timer = [
                self.stream.poll_timeout().map(Instant::from_std),
                self.release_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let throttled = self.throttled_until;
            let wake = tokio::select! {
                biased;
                _ = self.c2s.shutdown.cancelled(), if !self.shutdown_seen => Wake::Shutdown,
                wake = recv_mail(&mut self.bound, !self.overflowed), if self.bound.is_some() => wake,
                input = self.transport.recv(&mut self.buffer), if throttled.is_none() => Wake::Input(input),
                _ = sleep_until(throttled), if throttled.is_some() => Wake::Throttle,
                _ = sleep_until(timer), if timer.is_some() => Wake::Timer,
            };
            let now = Instant::now();
            if matches!(wake, Wake::Mail(Some(_)) | Wake::Input(Ok(Received::Bytes))) {
                self.note_activity(now);
            }
            match wake {
                Wake::Shutdown => {
                    self.shutdown_seen = true;
                    self.stream.close(Some(self.c2s.shutdown_error()));
                }
                Wake::Mail(Some(mail)) => {
                    if let Some(ending) = Box::pin(self.handle_mail(mail)).await {
                        return ending;
                    }
                }
                Wake::Mail(None) => {}
                Wake::Overflow => {
                    tracing::info!(
                        "The client does not keep up with what is sent to it; ending the session."
                    );
                    self.overflowed = true;
                    self.stream.close(Some(StreamError::new(
                        Condition::ResourceConstraint,
                        "You are not reading what is sent to you.",
                    )));
                }
                Wake::Input(Ok(Received::Bytes)) => {
                    self.stream.handle_input(now.into_std(), &self.buffer);
                    let read = self.buffer.len();
                    if self.release_at.is_some() {
                        self.buffer.clear();
                    } else {
                        // Released: an idle connection keeps no read buffer.
                        self.buffer = BytesMut::new();
                    }
                    self.throttle(read, now);
                }
                Wake::Input(Ok(Received::Frame(frame))) => {
                    self.stream.handle_frame(now.into_std(), &frame);
                    self.throttle(frame.len(), now);
                }
                Wake::Input(Ok(Received::Eof)) => self.stream.handle_eof(now.into_std()),
                Wake::Input(Ok(Received::Closed)) => self.stream.handle_close(now.into_std()),
                Wake::Input(Err(error)) => {
                    tracing::debug!(%error, "Read failed.");
                    self.stream.handle_eof(now.into_std());
                }
                Wake::Throttle => self.throttled_until = None,
                Wake::Timer => {
                    if self.release_at.is_some_and(|at| now >= at) {
                        self.release_at = None;
                        self.buffer = BytesMut::new();
                        self.stream.release_buffers();
                    }
                    self.stream.handle_timeout(now.into_std());
                }
            }
        }
    }

    /// Closes the transport (TLS close_notify, a WebSocket close frame, the
    /// TCP FIN), giving up after [`CLOSE_TIMEOUT`]: a client that reads
    /// nothing would otherwise keep the session, its socket and its buffers
    /// waiting for room to write the close.
    async fn close_transport(&mut self) {
        if tokio::time::timeout(CLOSE_TIMEOUT, self.transport.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("The transport did not close in time; dropping it.");
        }
    }

    /// Offline messages wait, and the client took the last page: everything
    /// written out, and under stream management less than half of what may
    /// wait unacknowledged.
    fn wants_offline_page(&self) -> bool {
        let Some(bound) = &self.bound else {
            return false;
        };
        bound.session.offline_pending
            && bound.session.outbox.is_empty()
            && self.stream.is_bound()
            && self.stream.pending_output() == 0
            && self.stream.sm().is_none_or(|sm| {
                sm.unacked_bytes() < self.c2s.max_unacked_bytes / 2
                    && sm.unacked().len() < self.c2s.max_unacked / 2
            })
    }

    /// Counts `read` bytes of input against the connection's byte rate: past
    /// it, nothing more is read (on any transport) until the rate allows.
    fn throttle(&mut self, read: usize, now: Instant) {
        if let Some(rate) = &mut self.byte_rate {
            let wait = rate.consume(read, now.into_std());
            if !wait.is_zero() {
                self.throttled_until = Some(now + wait);
            }
        }
    }

    /// Input or mail at `now`: if it follows the last within [`BURST_GAP`],
    /// a bound session is in a burst and keeps its buffers until a gap that
    /// long. (The round trips of a login are no burst: a login storm would
    /// otherwise hold the buffers of every session of its last moments.)
    fn note_activity(&mut self, now: Instant) {
        if self.bound.is_some()
            && self
                .last_active
                .is_some_and(|last| now.duration_since(last) < BURST_GAP)
        {
            self.stream.hold_buffers();
            self.release_at = Some(now + BURST_GAP);
        }
        self.last_active = Some(now);
    }

    /// Acts on every pending stream event; returns the ending once the stream is closed.
    async fn process_events(&mut self) -> Option<Ending> {
        let mut handled = 0usize;
        while let Some(event) = self.stream.poll_event() {
            let now = Instant::now().into_std();
            match event {
                StreamEvent::StartTls => {
                    if self.flush().await.is_err() {
                        self.stream.handle_eof(now);
                        continue;
                    }
                    let Some(tls) = self.c2s.tls.clone() else {
                        self.stream.handle_eof(now);
                        continue;
                    };
                    match tokio::time::timeout(
                        WRITE_TIMEOUT,
                        Box::pin(self.transport.start_tls(&tls)),
                    )
                    .await
                    {
                        Ok(Ok(())) => self
                            .stream
                            .handle_tls_established(Instant::now().into_std()),
                        Ok(Err(error)) => {
                            tracing::info!(%error, "TLS handshake failed.");
                            self.stream.handle_eof(now);
                        }
                        Err(_) => {
                            tracing::info!("TLS handshake timed out.");
                            self.stream.handle_eof(now);
                        }
                    }
                }
                StreamEvent::NeedKeys { jid, mechanism } => {
                    let answer = Box::pin(lookup_keys(&self.c2s, self.peer, &jid, mechanism)).await;
                    self.stream.handle_keys(Instant::now().into_std(), answer);
                }
                StreamEvent::AuthFailed {
                    username,
                    condition,
                } => {
                    if !matches!(condition, "aborted" | "temporary-auth-failure") {
                        self.c2s.auth_limiter.record(self.peer.ip(), now);
                    }
                    tracing::info!(
                        username = username.as_deref().unwrap_or(""),
                        condition,
                        "Authentication failed."
                    );
                }
                StreamEvent::Authenticated { jid } => tracing::info!(%jid, "Authenticated."),
                StreamEvent::Bind { requested } => Box::pin(self.bind(requested)).await,
                StreamEvent::Resume { previd, h } => Box::pin(self.resume(&previd, h)).await,
                StreamEvent::SmEnabled { id } => {
                    if let (Some(id), Some(bound)) = (id, &self.bound) {
                        Box::pin(self.c2s.router.register_resumable(&bound.session, &id)).await;
                    }
                }
                StreamEvent::PreAuthIq(iq) => {
                    let is_set = iq.attr("type") == Some("set");
                    let reply = if is_set && !self.c2s.register_limiter.allows(self.peer.ip(), now)
                    {
                        let text =
                            Some("Too many registrations from your address; try again later.");
                        rookery_router::stanza::error_reply(
                            &iq,
                            rookery_router::stanza::ErrorCondition::RESOURCE_CONSTRAINT,
                            text,
                            None,
                        )
                    } else {
                        if is_set {
                            self.c2s.register_limiter.record(self.peer.ip(), now);
                        }
                        Box::pin(self.c2s.router.handle_unauthenticated_iq(&iq)).await
                    };
                    self.stream.send_element(&reply);
                }
                StreamEvent::Stanza(stanza) => {
                    if let Some(bound) = &mut self.bound {
                        // Boxed: routing may go deep (storage, modules); idle sessions keep only a pointer's worth.
                        Box::pin(self.c2s.router.handle_stanza(&mut bound.session, stanza)).await;
                        self.drain_outbox();
                    }
                    // One read can bring dozens of stanzas (a flood, held to
                    // its byte rate, reads up to 18 KiB at once): the worker
                    // thread serves other sessions between every few.
                    handled += 1;
                    if handled.is_multiple_of(STANZAS_PER_TURN) {
                        tokio::task::yield_now().await;
                    }
                }
                StreamEvent::ClientState { inactive } => {
                    if let Some(bound) = &mut self.bound {
                        self.c2s
                            .router
                            .set_client_state(&mut bound.session, inactive)
                            .await;
                        self.drain_outbox();
                    }
                }
                StreamEvent::Closed(reason) => {
                    tracing::debug!(?reason, "Stream closed.");
                    let _ = self.flush().await;
                    return Some(self.ending(reason));
                }
            }
        }
        None
    }

    /// Decides what becomes of the session when the stream closed.
    fn ending(&mut self, reason: CloseReason) -> Ending {
        if let Some(bound) = &mut self.bound
            && matches!(
                &reason,
                CloseReason::Local(Some(StreamError {
                    condition: Condition::Conflict,
                    ..
                }))
            )
        {
            bound.session.replaced = true;
        }
        let transient = match &reason {
            CloseReason::Eof | CloseReason::PeerError(_) => true,
            CloseReason::Local(Some(error)) => error.condition == Condition::ConnectionTimeout,
            CloseReason::PeerClosed | CloseReason::Local(None) => false,
        };
        let resumable = self.stream.sm().is_some_and(|sm| sm.id.is_some());
        // The inbox may have overflowed while the task was busy, before the
        // connection dropped: such a session does not wait to be resumed.
        let overflowed = self.overflowed
            || self
                .bound
                .as_ref()
                .is_some_and(|bound| bound.inbox.is_overflowed());
        if transient
            && resumable
            && !overflowed
            && self.bound.is_some()
            && !self.c2s.shutdown.is_cancelled()
        {
            let sm = self.stream.take_sm().expect("checked above");
            return Ending::Hibernate(sm);
        }
        if let Some(mut sm) = self.stream.take_sm() {
            self.undelivered.splice(0..0, sm.take_unacked());
        }
        if let Some(bound) = &mut self.bound {
            let tracked: Vec<_> = bound
                .receipts
                .tracked
                .drain(..)
                .map(|(_, receipt)| receipt)
                .collect();
            bound.receipts.rerouted.extend(tracked);
        }
        Ending::End
    }

    async fn bind(&mut self, requested: Option<jid::FullJid>) {
        let Some(user) = self.stream.authenticated().cloned() else {
            return;
        };
        let (mailbox, inbox) = Mailbox::bounded(self.c2s.router.config().inbox_bytes);
        match self.c2s.router.bind(&user, requested, mailbox).await {
            Ok(session) => {
                tracing::Span::current().record("jid", tracing::field::display(&session.jid));
                tracing::info!("Session bound.");
                self.stream
                    .handle_bound(Instant::now().into_std(), session.jid.clone());
                self.bound = Some(Bound {
                    session,
                    inbox,
                    receipts: Receipts::default(),
                });
            }
            Err(error) => {
                tracing::error!(%error, "Resource could not be bound.");
                self.stream.handle_bind_error(
                    Instant::now().into_std(),
                    "wait",
                    "internal-server-error",
                );
            }
        }
    }

    async fn resume(&mut self, previd: &str, h: u32) {
        let user = self.stream.authenticated().cloned();
        let route = self
            .c2s
            .router
            .resumable(previd)
            .await
            .filter(|route| Some(route.jid.to_bare()) == user);
        let taken = match &route {
            Some(route) => self.c2s.router.bus().take_over(route).await,
            None => None,
        };
        let (Some(route), Some(snapshot)) = (route, taken) else {
            tracing::info!(previd, "Nothing to resume.");
            return self.stream.handle_resume_failed(Instant::now().into_std());
        };
        let (restored, inbox) = match self.c2s.router.restore(snapshot, &route).await {
            Ok(restored) => restored,
            Err(error) => {
                tracing::error!(%error, "A taken-over session could not be registered here.");
                return self.stream.handle_resume_failed(Instant::now().into_std());
            }
        };
        let rookery_router::Restored {
            session,
            sm,
            receipts,
            ..
        } = restored;
        tracing::Span::current().record("jid", tracing::field::display(&session.jid));
        tracing::info!(h, unacked = sm.unacked().len(), "Session resumed.");
        let jid = session.jid.clone();
        self.stream
            .handle_resumed(Instant::now().into_std(), jid, sm, h);
        let receipts = Receipts {
            tracked: receipts.into(),
            ..Receipts::default()
        };
        self.bound = Some(Bound {
            session,
            inbox,
            receipts,
        });
    }

    async fn handle_mail(&mut self, mail: Mail) -> Option<Ending> {
        let bound = self.bound.as_mut()?;
        match mail {
            Mail::Stanza { stanza, receipt } => {
                let message = stanza.name() == "message";
                self.c2s.router.accept_delivery(&mut bound.session, *stanza);
                let taken = self.drain_outbox();
                if let Some(receipt) = receipt {
                    self.keep_receipt(receipt, message, taken).await;
                }
                None
            }
            Mail::Close(error) => {
                self.stream.close(Some(error));
                None
            }
            Mail::Takeover(reply) => {
                let sm = self.stream.take_sm().unwrap_or_default();
                self.stream.close(Some(StreamError::new(
                    Condition::Conflict,
                    "The session was resumed on another connection.",
                )));
                let _ = self.flush().await;
                let bound = self.bound.take().expect("checked above");
                let undelivered = std::mem::take(&mut self.undelivered);
                hand_over(&self.c2s, bound, sm, undelivered, reply).await;
                Some(Ending::HandedOver)
            }
        }
    }

    /// Files the receipt of a delivery just handed to the stream.
    async fn keep_receipt(&mut self, receipt: Receipt, message: bool, taken: bool) {
        let Some(bound) = &mut self.bound else { return };
        if !message {
            // Presence and iq are not kept across failures.
            return self.c2s.router.acknowledge(vec![receipt]).await;
        }
        match (taken, self.stream.sm()) {
            (true, Some(sm)) => bound.receipts.tracked.push_back((sm.sent_count(), receipt)),
            (true, None) => bound.receipts.written.push(receipt),
            (false, _) => bound.receipts.rerouted.push(receipt),
        }
    }

    /// Acknowledges deliveries that became safe.
    async fn settle_receipts(&mut self) {
        let Some(bound) = &mut self.bound else { return };
        let mut safe = std::mem::take(&mut bound.receipts.written);
        if let Some(sm) = self.stream.sm() {
            safe.extend(bound.receipts.take_acked(sm.acked));
        }
        if !safe.is_empty() {
            self.c2s.router.acknowledge(safe).await;
        }
    }

    /// Moves what the router queued for the client into the stream; false if
    /// the stream could not take everything (it closed).
    fn drain_outbox(&mut self) -> bool {
        let Some(bound) = &mut self.bound else {
            return true;
        };
        let mut taken = true;
        for stanza in bound.session.take_outbox() {
            if let Err(stanza) = self.stream.send_stanza(stanza) {
                self.undelivered.push(stanza);
                taken = false;
            }
        }
        taken
    }

    /// Writes out what the stream has to send. A write that does not finish
    /// within [`WRITE_TIMEOUT`], or while the inbox overflows (the client
    /// reads too little of what is sent to it), loses the connection.
    async fn flush(&mut self) -> std::io::Result<()> {
        // Once the session is ending for a client that does not read, its
        // last words (the stream error) get little time.
        let limit = if self.overflowed {
            CLOSE_TIMEOUT
        } else {
            WRITE_TIMEOUT
        };
        while let Some(data) = self.stream.poll_transmit() {
            let overflowed = inbox_overflowed(&self.bound);
            let write = tokio::time::timeout(limit, self.transport.send(data));
            tokio::select! {
                written = write => match written {
                    Ok(result) => result?,
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "write timed out",
                        ));
                    }
                },
                _ = overflowed, if !self.overflowed => {
                    tracing::info!("The client does not read what is sent to it; ending the session.");
                    self.overflowed = true;
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client does not read",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Looks up the stored keys for a login, unless the address is rate limited.
async fn lookup_keys(
    c2s: &C2s,
    peer: SocketAddr,
    jid: &jid::BareJid,
    mechanism: AuthMechanism,
) -> KeysAnswer {
    if !c2s
        .auth_limiter
        .allows(peer.ip(), Instant::now().into_std())
    {
        tracing::warn!(%jid, "Too many failed logins from this address; refusing for now.");
        return KeysAnswer::TemporaryFailure;
    }
    let store = c2s.router.store();
    let keys = match mechanism {
        AuthMechanism::Scram(hash) => store.keys(jid, hash).await,
        AuthMechanism::Plain => match store.keys(jid, ScramHash::Sha256).await {
            Ok(None) => store.keys(jid, ScramHash::Sha1).await,
            other => other,
        },
    };
    match keys {
        Ok(keys) => KeysAnswer::Keys(keys),
        Err(error) => {
            tracing::error!(%jid, %error, "Credentials could not be read.");
            KeysAnswer::TemporaryFailure
        }
    }
}

async fn inbox_overflowed(bound: &Option<Bound>) {
    match bound {
        Some(bound) => bound.inbox.overflowed().await,
        None => std::future::pending().await,
    }
}

/// The next mail of a bound session; or its overflow, when `watch`.
async fn recv_mail(bound: &mut Option<Bound>, watch: bool) -> Wake {
    match bound {
        Some(bound) => match bound.inbox.recv_watching(watch).await {
            InboxEvent::Mail(mail) => Wake::Mail(Some(mail)),
            InboxEvent::Closed => Wake::Mail(None),
            InboxEvent::Overflowed => Wake::Overflow,
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Gives the session to a resuming connection; if it went away, the session ends here.
async fn hand_over(
    c2s: &C2s,
    bound: Bound,
    mut sm: SmState,
    undelivered: Vec<Element>,
    reply: oneshot::Sender<SessionSnapshot>,
) {
    for stanza in undelivered {
        sm.sent(stanza);
    }
    let Bound {
        mut session,
        inbox,
        mut receipts,
    } = bound;
    // Receipts of stanzas that were still waiting for the stream become
    // acknowledged with the last of them.
    let last = sm.sent_count();
    let mut tracked: Vec<(u32, Receipt)> = receipts.tracked.drain(..).collect();
    tracked.extend(
        receipts
            .rerouted
            .drain(..)
            .chain(receipts.written.drain(..))
            .map(|receipt| (last, receipt)),
    );
    let snapshot = SessionSnapshot {
        jid: session.jid.clone(),
        session: session.id,
        info: session.info.clone(),
        sm,
        receipts: tracked,
        directed: session.directed.drain().collect(),
        offline_after: session.offline_after,
        modules: std::mem::take(&mut session.modules),
        inbox: Some(inbox),
    };
    if let Err(snapshot) = reply.send(snapshot) {
        tracing::info!("The resuming connection went away; ending the session.");
        let restored = c2s
            .router
            .session_from_snapshot(snapshot, session.mailbox.clone());
        let rookery_router::Restored {
            session,
            inbox,
            mut sm,
            receipts,
        } = restored;
        let receipts = Receipts {
            rerouted: receipts.into_iter().map(|(_, receipt)| receipt).collect(),
            ..Receipts::default()
        };
        let inbox = inbox.expect("the snapshot was made with the inbox");
        finish(
            c2s,
            Bound {
                session,
                inbox,
                receipts,
            },
            sm.take_unacked(),
        )
        .await;
    }
}

/// Waits without a connection for the client to resume (XEP-0198), queueing deliveries.
async fn hibernate(c2s: Arc<C2s>, bound: Bound, mut sm: SmState, undelivered: Vec<Element>) {
    let Bound {
        mut session,
        mut inbox,
        mut receipts,
    } = bound;
    for stanza in undelivered {
        sm.sent(stanza);
    }
    // Whatever waited for the stream is now in the queue that resumption retransmits.
    let last = sm.sent_count();
    let waiting: Vec<Receipt> = receipts
        .rerouted
        .drain(..)
        .chain(receipts.written.drain(..))
        .collect();
    receipts
        .tracked
        .extend(waiting.into_iter().map(|receipt| (last, receipt)));
    let id = sm.id.clone().unwrap_or_default();
    tracing::info!(timeout = ?c2s.resume_timeout, unacked = sm.unacked().len(), "Connection lost; session kept for resumption.");
    let deadline = Instant::now() + c2s.resume_timeout;
    loop {
        let mail = tokio::select! {
            mail = inbox.recv() => mail,
            _ = tokio::time::sleep_until(deadline) => None,
            _ = c2s.shutdown.cancelled() => None,
        };
        match mail {
            Some(Mail::Stanza { stanza, receipt }) => {
                let message = stanza.name() == "message";
                c2s.router.accept_delivery(&mut session, *stanza);
                for stanza in session.take_outbox() {
                    sm.sent(stanza);
                }
                match receipt {
                    Some(receipt) if message => {
                        receipts.tracked.push_back((sm.sent_count(), receipt))
                    }
                    Some(receipt) => c2s.router.acknowledge(vec![receipt]).await,
                    None => {}
                }
                if sm.unacked_bytes() > c2s.max_unacked_bytes
                    || sm.unacked().len() > c2s.max_unacked
                {
                    // What waits goes to offline storage (or another resource) now.
                    tracing::info!(
                        bytes = sm.unacked_bytes(),
                        stanzas = sm.unacked().len(),
                        "Too much waits for the client to resume; ending the session."
                    );
                    break;
                }
            }
            Some(Mail::Takeover(reply)) => {
                return hand_over(
                    &c2s,
                    Bound {
                        session,
                        inbox,
                        receipts,
                    },
                    sm,
                    Vec::new(),
                    reply,
                )
                .await;
            }
            Some(Mail::Close(error)) => {
                session.replaced = error.condition == Condition::Conflict;
                break;
            }
            None => break,
        }
    }
    tracing::info!("Session not resumed; ending it.");
    c2s.router.unregister_resumable(&id).await;
    let undelivered = sm.take_unacked();
    finish(
        &c2s,
        Bound {
            session,
            inbox,
            receipts,
        },
        undelivered,
    )
    .await;
}

/// Ends a session: nothing more reaches the inbox, whatever the client did
/// not get goes back to the router, and then the deliveries are acknowledged.
async fn finish(c2s: &C2s, bound: Bound, mut undelivered: Vec<Element>) {
    let Bound {
        session,
        mut inbox,
        mut receipts,
    } = bound;
    inbox.close();
    while let Some(mail) = inbox.try_recv() {
        if let Mail::Stanza { stanza, receipt } = mail {
            undelivered.push(*stanza);
            receipts.rerouted.extend(receipt);
        }
    }
    // Stored messages handed to a stream without stream management are safe
    // once flushed; these never were: they stay stored (a client that got
    // them anyway gets them again, as stream management allows).
    let unflushed = receipts
        .written
        .extract_if(.., |receipt| matches!(receipt, Receipt::Stored(_)))
        .count();
    let mut receipts = receipts.take_all();
    let kept = unflushed + keep_stored(&mut receipts, &mut undelivered);
    tracing::info!(
        undelivered = undelivered.len(),
        kept_stored = kept,
        "Session ended."
    );
    let user = session.user();
    c2s.router.end_session(session, undelivered).await;
    if kept > 0 {
        c2s.router.kept_stored(&user);
    }
    // Rerouted or stored: the original deliveries are safe to forget.
    c2s.router.acknowledge(receipts).await;
}

/// Messages the session read from offline storage and its client did not
/// get stay where they are stored, in their place: they are taken out of
/// `undelivered` (not stored again) and their receipts out of `receipts`
/// (not removed). Returns how many. A stored message the client did get
/// has no stanza left in `undelivered`, and its receipt removes it.
fn keep_stored(receipts: &mut Vec<Receipt>, undelivered: &mut Vec<Element>) -> usize {
    if !receipts.iter().any(|r| matches!(r, Receipt::Stored(_))) {
        return 0;
    }
    let mut digests: Vec<Option<u64>> = undelivered
        .iter()
        .map(|stanza| Some(rookery_cluster::stanza_digest(stanza)))
        .collect();
    let mut kept = 0;
    receipts.retain(|receipt| {
        let Receipt::Stored(stored) = receipt else {
            return true;
        };
        match digests.iter().position(|d| *d == Some(stored.digest)) {
            Some(index) => {
                digests[index] = None;
                kept += 1;
                false
            }
            None => true,
        }
    });
    let mut index = 0;
    undelivered.retain(|_| {
        index += 1;
        digests[index - 1].is_some()
    });
    kept
}

#[cfg(test)]
mod tests;
