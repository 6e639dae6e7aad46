//! Deliveries: publishing to a node's subject on the delivery stream, the
//! consumer that hands this node's deliveries to its sessions, and the
//! receipts sessions hold until their stanzas are safe.

use super::*;

/// Whom a delivery is for.
pub(crate) enum Recipients {
    /// One session; the stanza has its `to`.
    One(FullJid),
    /// A batch ([`HEADER_TO_EACH`]): best effort, the stanza without `to`.
    Each(Vec<FullJid>),
}

/// Reads a delivery: recipients, stanza, durability.
pub(crate) fn decode_delivery(message: &jetstream::Message) -> Option<(Recipients, Element, bool)> {
    let headers = message.headers.as_ref()?;
    let to = match headers.get(HEADER_TO) {
        Some(to) => Recipients::One(FullJid::new(to.as_str()).ok()?),
        None => Recipients::Each(
            serde_json::from_str::<Vec<String>>(headers.get(HEADER_TO_EACH)?.as_str())
                .ok()?
                .iter()
                .map(|jid| FullJid::new(jid).ok())
                .collect::<Option<_>>()?,
        ),
    };
    let durable = headers
        .get(HEADER_DURABLE)
        .is_some_and(|value| value.as_str() == "1");
    let stanza = std::str::from_utf8(&message.payload)
        .ok()?
        .parse::<Element>()
        .ok()?;
    Some((to, stanza, durable))
}

/// A delivery's stanzas, each with its recipient: a single delivery's as
/// is (it has its `to`), a batch's one copy each with its `to` set.
pub(crate) fn each_copy(recipients: Recipients, stanza: Element) -> Vec<(FullJid, Element)> {
    match recipients {
        Recipients::One(to) => vec![(to, stanza)],
        Recipients::Each(all) => all
            .into_iter()
            .map(|to| {
                let mut copy = stanza.clone();
                rookery_stream::xml::set_attr(&mut copy, "to", to.as_str());
                (to, copy)
            })
            .collect(),
    }
}

/// Hands deliveries for this node to local sessions; reroutes the others.
pub(crate) async fn consume_deliveries(bus: Arc<NatsBus>) {
    loop {
        let name = subjects::deliver_consumer(bus.node);
        let consumer = bus
            .deliveries
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::deliver(bus.node),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    // Receipts are acknowledged when clients acknowledge,
                    // and signalled in progress until then (`keep_held`).
                    ack_wait: ACK_WAIT,
                    max_ack_pending: 1_000_000,
                    ..Default::default()
                },
            )
            .await;
        let messages = match consumer {
            Ok(consumer) => consumer.messages().await,
            Err(error) => {
                bus.failing(&bus.deliveries_down);
                if error.to_string().contains("10100") {
                    // "Filtered consumer not unique": a peer that took this
                    // node for dead drains its deliveries. It stops once it
                    // hears this node again, but a peer that died while
                    // draining leaves its consumer behind: this node is
                    // alive, so the drain ends here (what the peer had not
                    // acknowledged comes to this node's consumer).
                    bus.forget_cleanup().await;
                    let _ = bus
                        .deliveries
                        .delete_consumer(&subjects::recover_consumer(bus.node))
                        .await;
                }
                tracing::warn!(%error, "The delivery consumer cannot be created; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "Deliveries cannot be read; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *bus.deliveries_down.lock().expect("readiness lock") = None;
        // A peer that took this node for dead (a partition, not a crash)
        // deletes this consumer when it replays the deliveries, and the pull
        // stream may not notice for long: deliveries to this node's new
        // sessions would wait in the stream meanwhile. So the consumer is
        // looked up now and then, and made again when it is gone.
        let mut check = tokio::time::interval(CONSUMER_CHECK);
        check.tick().await;
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = check.tick() => {
                    match bus.deliveries.consumer_info(&name).await {
                        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                            tracing::warn!("A peer removed this node's delivery consumer; making it again.");
                            bus.forget_cleanup().await;
                            break;
                        }
                        Err(error) if error.kind() == ConsumerInfoErrorKind::StreamNotFound => {
                            tracing::warn!("The delivery stream is gone (NATS lost its store); waiting for it.");
                            break;
                        }
                        _ => continue,
                    }
                }
            };
            let Some(Ok(message)) = message else { break };
            let Some((recipients, stanza, durable)) = decode_delivery(&message) else {
                tracing::error!("A delivery could not be decoded; dropping it.");
                let _ = message.ack().await;
                continue;
            };
            // A batch is best effort: no copy of it holds the message.
            let durable = durable && matches!(recipients, Recipients::One(_));
            let mut held = false;
            for (to, stanza) in each_copy(recipients, stanza) {
                let receipt = message
                    .reply
                    .as_ref()
                    .filter(|_| durable)
                    .map(|reply| Receipt::Delivery(reply.to_string()));
                held |= hand_over(&bus, to, stanza, receipt).await;
            }
            if !held {
                let _ = message.ack().await;
            }
        }
        bus.failing(&bus.deliveries_down);
        tracing::warn!("The delivery stream ended; reconnecting it.");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Hands a delivery to its local session, with `receipt` when durable, or
/// reroutes it when the session is gone; true when the session holds it
/// with its receipt (acknowledged once its client has it).
async fn hand_over(bus: &NatsBus, to: FullJid, stanza: Element, receipt: Option<Receipt>) -> bool {
    tracing::debug!(%to, durable = receipt.is_some(), "Delivery received.");
    let stranded = match bus.local_mailbox(&to) {
        Some(mailbox) => {
            let handed = receipt.is_some();
            if let Some(receipt) = &receipt {
                bus.hold(receipt);
            }
            match mailbox.send(Mail::Stanza {
                stanza: Box::new(stanza),
                receipt,
            }) {
                Ok(()) => return handed,
                Err(Mail::Stanza { stanza, receipt }) => {
                    if let Some(receipt) = &receipt {
                        bus.release(receipt);
                    }
                    Some(*stanza)
                }
                Err(_) => None,
            }
        }
        None => Some(stanza),
    };
    if let (Some(stanza), Some(recovery)) = (stranded, bus.recovery()) {
        recovery.reroute(to, stanza).await;
    }
    false
}

/// Tells JetStream that the deliveries sessions hold are in progress, so
/// that they are not delivered again while their clients have not yet
/// acknowledged them.
pub(crate) async fn keep_held(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(PROGRESS_EVERY / 2);
    loop {
        ticker.tick().await;
        let due: Vec<String> = {
            let mut held = bus.held.lock().expect("held lock");
            held.retain(|_, (since, _)| since.elapsed() < HELD_AT_MOST);
            let now = Instant::now();
            held.iter_mut()
                .filter(|(_, (_, signalled))| signalled.elapsed() >= PROGRESS_EVERY)
                .map(|(reply, (_, signalled))| {
                    *signalled = now;
                    reply.clone()
                })
                .collect()
        };
        for reply in due {
            if let Err(error) = bus.client.publish(reply, Bytes::from_static(b"+WPI")).await {
                tracing::debug!(%error, "A held delivery could not be signalled in progress.");
            }
        }
    }
}

impl NatsBus {
    pub(crate) async fn publish_delivery(
        &self,
        route: &Route,
        stanza: &Element,
        durability: Durability,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HEADER_TO, route.jid.as_str());
        let durable = durability == Durability::Durable;
        headers.insert(HEADER_DURABLE, if durable { "1" } else { "0" });
        let payload = Bytes::from(String::from(stanza));
        let subject = subjects::deliver(route.node);
        if !durable {
            return self
                .client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(unavailable);
        }
        // Retried while JetStream elects a new leader (a NATS server died);
        // the message id lets JetStream drop a copy whose ack was lost.
        let id = format!(
            "{:016x}-{}",
            self.node,
            self.published.fetch_add(1, Ordering::Relaxed)
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let jetstream = &self.jetstream;
        self.retrying(
            || async {
                jetstream
                    .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                    .await?
                    .await
                    .map_err(async_nats::Error::from)
            },
            |_: &async_nats::Error| true,
        )
        .await
        .map(|_| ())
        .map_err(|error| error.map_or_else(|bus| bus, unavailable))
    }

    /// Publishes one best-effort delivery of `stanza` to the sessions `to`
    /// of node `node` (its `to` is set for each on arrival).
    pub(crate) async fn publish_batch(
        &self,
        node: NodeId,
        to: &[Arc<Route>],
        stanza: &Element,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        let to: Vec<&str> = to.iter().map(|route| route.jid.as_str()).collect();
        let to = serde_json::to_string(&to).map_err(unavailable)?;
        headers.insert(HEADER_TO_EACH, to.as_str());
        headers.insert(HEADER_DURABLE, "0");
        let mut stanza = stanza.clone();
        rookery_stream::xml::remove_attr(&mut stanza, "to");
        self.client
            .publish_with_headers(
                subjects::deliver(node),
                headers,
                Bytes::from(String::from(&stanza)),
            )
            .await
            .map_err(unavailable)
    }

    /// Notes a delivery handed to a session, to signal it in progress until
    /// it is acknowledged.
    pub(crate) fn hold(&self, receipt: &Receipt) {
        if let Receipt::Delivery(reply) = receipt {
            let now = Instant::now();
            self.held
                .lock()
                .expect("held lock")
                .insert(reply.clone(), (now, now));
        }
    }

    /// Forgets a held delivery: acknowledged, or now held by another node.
    pub(crate) fn release(&self, receipt: &Receipt) {
        if let Receipt::Delivery(reply) = receipt {
            self.held.lock().expect("held lock").remove(reply);
        }
    }
}
