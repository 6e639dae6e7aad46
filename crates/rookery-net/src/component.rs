//! The external component task (XEP-0114): one per component connection.
//! It drives a [`ComponentStream`], registers the component with the
//! router once the handshake is done (refusing a second connection of the
//! same domain with `conflict`), hands what the component sends to
//! [`Router::handle_component_stanza`](rookery_router::Router) and writes
//! what reaches it from any node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use minidom::Element;
use rookery_cluster::{InboxEvent, Mail, Mailbox, Receipt};
use rookery_router::ComponentSession;
use rookery_stream::{
    CloseReason, ComponentConfig, ComponentEvent, ComponentStream, Condition, StreamError,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::Instrument;

use crate::C2s;
use crate::transport::{Received, TcpTransport, Transport};

/// How long one write may take before the component counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing the transport may take once the stream is over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves component connections until shutdown.
pub async fn serve(listener: TcpListener, c2s: Arc<C2s>, config: Arc<ComponentConfig>) {
    crate::accept_loop(listener, c2s, move |c2s, stream, peer, permit| {
        let config = config.clone();
        async move {
            if permit.is_none() {
                return;
            }
            let span = tracing::info_span!("component", %peer, domain = tracing::field::Empty);
            run(c2s, config, stream, peer).instrument(span).await
        }
    })
    .await
}

/// The registered component: its router session and inbox.
struct Registered {
    session: ComponentSession,
    inbox: rookery_cluster::Inbox,
}

async fn run(c2s: Arc<C2s>, config: Arc<ComponentConfig>, socket: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "Component connection accepted.");
    let router = &c2s.router;
    let mut transport = TcpTransport::plain(socket);
    let mut stream = ComponentStream::new(config, Instant::now().into_std());
    let mut buffer = BytesMut::new();
    let mut registered: Option<Registered> = None;
    // Durable deliveries written out, with a copy of their stanza: safe
    // once flushed (a component has no stream management); when the flush
    // fails, the copies go back to the router.
    let mut written: Vec<(Element, Receipt)> = Vec::new();
    // Stanzas the stream could not take (it closed), and their receipts:
    // the router has them at the end.
    let mut undelivered: Vec<Element> = Vec::new();
    let mut rerouted: Vec<Receipt> = Vec::new();
    let mut shutdown_seen = false;
    loop {
        while let Some(event) = stream.poll_event() {
            let now = Instant::now().into_std();
            match event {
                ComponentEvent::Authenticated { domain } => {
                    tracing::Span::current().record("domain", tracing::field::display(&domain));
                    if router.component_connected(&domain) {
                        tracing::info!("A component of this domain is connected already.");
                        stream.close(Some(StreamError::new(
                            Condition::Conflict,
                            "A component of this domain is connected already.",
                        )));
                        continue;
                    }
                    let (mailbox, inbox) = Mailbox::bounded(router.config().inbox_bytes);
                    match router.bind_component(&domain, mailbox).await {
                        Ok(session) => {
                            tracing::info!("Component connected.");
                            registered = Some(Registered { session, inbox });
                            stream.handle_ready(now);
                        }
                        Err(_) => stream.close(Some(StreamError::new(
                            Condition::ResourceConstraint,
                            "This node lost its cluster; try again shortly.",
                        ))),
                    }
                }
                ComponentEvent::Stanza(stanza) => {
                    let Some(registered) = &mut registered else {
                        continue;
                    };
                    router
                        .handle_component_stanza(&mut registered.session, stanza)
                        .await;
                    for reply in registered.session.session.take_outbox() {
                        let _ = stream.send_stanza(reply);
                    }
                }
                ComponentEvent::Closed(reason) => {
                    if let CloseReason::Local(Some(error)) = &reason {
                        tracing::info!(condition = %error.condition, "Component stream closed.");
                    } else {
                        tracing::info!(?reason, "Component stream closed.");
                    }
                }
            }
        }
        if flush(&mut transport, &mut stream).await.is_err() {
            stream.handle_eof(Instant::now().into_std());
            for (stanza, receipt) in written.drain(..) {
                undelivered.push(stanza);
                rerouted.push(receipt);
            }
        } else if !written.is_empty() {
            let safe = written.drain(..).map(|(_, receipt)| receipt).collect();
            router.acknowledge(safe).await;
        }
        if stream.is_closed() {
            break;
        }
        let timer = stream.poll_timeout().map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            Instant::from_std,
        );
        let listening = registered.is_some();
        let inbox = registered.as_mut().map(|registered| &mut registered.inbox);
        tokio::select! {
            received = transport.recv(&mut buffer) => {
                let now = Instant::now().into_std();
                match received {
                    Ok(Received::Bytes) => {
                        stream.handle_input(now, &buffer);
                        buffer.clear();
                    }
                    Ok(_) | Err(_) => stream.handle_eof(now),
                }
            }
            event = async { inbox.expect("guarded").recv_watching(true).await }, if listening => {
                match event {
                    InboxEvent::Mail(Mail::Stanza { stanza, receipt }) => {
                        // Only a durable delivery (a message in a cluster)
                        // costs the copy.
                        let copy = receipt.as_ref().map(|_| Element::clone(&stanza));
                        match stream.send_stanza(*stanza) {
                            Ok(()) => written.extend(copy.zip(receipt)),
                            Err(stanza) => {
                                undelivered.push(stanza);
                                rerouted.extend(receipt);
                            }
                        }
                    }
                    InboxEvent::Mail(Mail::Close(error)) => stream.close(Some(error)),
                    InboxEvent::Mail(Mail::Takeover(_)) => {}
                    InboxEvent::Closed => stream.close(None),
                    InboxEvent::Overflowed => stream.close(Some(StreamError::new(
                        Condition::ResourceConstraint,
                        "The component does not keep up with what is sent to it.",
                    ))),
                }
            }
            _ = tokio::time::sleep_until(timer) => stream.handle_timeout(Instant::now().into_std()),
            _ = c2s.shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                stream.close(Some(c2s.shutdown_error()));
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, transport.shutdown()).await;
    if let Some(Registered { session, mut inbox }) = registered {
        inbox.close();
        while let Some(mail) = inbox.try_recv() {
            if let Mail::Stanza { stanza, receipt } = mail {
                undelivered.push(*stanza);
                rerouted.extend(receipt);
            }
        }
        tracing::info!(undelivered = undelivered.len(), "Component disconnected.");
        router.end_component(session, undelivered).await;
        router.acknowledge(rerouted).await;
    }
}

/// Writes what the stream has to send.
async fn flush(transport: &mut TcpTransport, stream: &mut ComponentStream) -> std::io::Result<()> {
    while let Some(data) = stream.poll_transmit() {
        match tokio::time::timeout(WRITE_TIMEOUT, transport.send(data)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "write timed out",
                ));
            }
        }
    }
    Ok(())
}
