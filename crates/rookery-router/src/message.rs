//! Message routing (RFC 6121 section 8.5) with offline storage (XEP-0160);
//! modules with [`Hooks::routed`](crate::Hooks) (message carbons, XEP-0280)
//! copy routed messages to a user's other sessions.

use std::collections::HashMap;
use std::sync::Arc;

use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_cluster::{Receipt, Route, StoredReceipt};
use rookery_store::{StoreError, StoredOffline};

use crate::rules::{self, MessageOutcome};
use crate::stanza::{ErrorCondition, MessageType, error_reply};
use crate::{Destination, Routed, Router, Session, Side};

impl Router {
    /// A message from the session's client.
    pub(crate) async fn handle_message(
        &self,
        session: &mut Session,
        message: Element,
        to: Option<Jid>,
    ) {
        // RFC 6120 section 10.3: no `to` means the sender's own bare JID.
        let to = to.unwrap_or_else(|| Jid::from(session.account.clone()));
        let message_type = MessageType::of(&message);
        let error = match self.resolve(&to) {
            Destination::Account => None,
            Destination::Service(module) => return module.handle_service(self, message).await,
            Destination::Component(domain) => {
                if let Some(error) = self.to_component(&domain, message).await {
                    session.outbox.push(error);
                }
                return;
            }
            Destination::Server => Some(ErrorCondition::SERVICE_UNAVAILABLE),
            Destination::Remote => Some(ErrorCondition::REMOTE_SERVER_NOT_FOUND),
        };
        if let Some(error) = error {
            if message_type != MessageType::Error && message_type != MessageType::Headline {
                session
                    .outbox
                    .push(error_reply(&message, error, None, None));
            }
            return;
        }
        // The sender's other sessions may get copies (sent carbons), except
        // one that receives the message itself; kept only when needed.
        let user = &session.account;
        // The sending session, and the full JID addressed if any: on the
        // stack, per message.
        let sender = &session.jid;
        let both;
        let have_it: &[&FullJid] = match to.try_as_full() {
            Ok(full) => {
                both = [sender, full];
                &both
            }
            Err(_) => std::slice::from_ref(&sender),
        };
        let copying = match self.copied(&message, message_type) {
            true => {
                let routes = self.bus.routes(user);
                self.wants_copies(&routes, |jid| !have_it.contains(&jid))
                    .then(|| (routes, message.clone()))
            }
            false => None,
        };
        self.route_message_to(message, message_type, &to, Some(session))
            .await;
        if let Some((routes, original)) = copying {
            self.send_copies(&Routed {
                side: Side::Sent,
                user,
                message: &original,
                message_type,
                routes: &routes,
                have_it,
            })
            .await;
        }
    }

    /// True when a module that copies routed messages
    /// ([`Hooks::routed`](crate::Hooks)) copies this one.
    fn copied(&self, message: &Element, message_type: MessageType) -> bool {
        self.routed_hooks
            .iter()
            .any(|(_, module)| module.copies_message(message, message_type))
    }

    /// True when a session in `routes` that `without_it` accepts (one that
    /// does not get the message itself) carries a copying module's mark.
    fn wants_copies(&self, routes: &[Arc<Route>], without_it: impl Fn(&FullJid) -> bool) -> bool {
        routes.iter().any(|route| {
            !route.info.marks.is_empty()
                && self
                    .routed_hooks
                    .iter()
                    .any(|(mark, _)| route.info.marks.contains(mark))
                && without_it(&route.jid)
        })
    }

    /// Sends the copies the modules make of a routed message.
    async fn send_copies(&self, routed: &Routed<'_>) {
        for (mark, module) in &self.routed_hooks {
            if !module.copies_message(routed.message, routed.message_type)
                || !routed
                    .routes
                    .iter()
                    .any(|route| route.info.marks.contains(mark))
            {
                continue;
            }
            for (route, copy) in module.on_routed(routed) {
                if self.send_to(&route, copy).await.is_err() {
                    tracing::debug!(jid = %route.jid, "Session went away before its copy.");
                }
            }
        }
    }

    /// Routes a message to an account of this domain and sends received carbons.
    pub(crate) async fn route_message_to(
        &self,
        message: Element,
        message_type: MessageType,
        to: &Jid,
        sender: Option<&Session>,
    ) {
        // `into_bare` truncates a copy; `to_bare` would format the parts again.
        let user = to.clone().into_bare();
        let blocklist = self.blocklist(&user).await;
        // Most users block no one: the sender's address is only parsed when it matters.
        if !blocklist.is_empty()
            && let Some(from) = crate::stanza::from(&message)
            && from.to_bare() != user
            && crate::is_blocked(&blocklist, &from)
        {
            // XEP-0191 section 3.5: the blocked sender learns nothing more.
            if message_type != MessageType::Error {
                let error = error_reply(&message, ErrorCondition::SERVICE_UNAVAILABLE, None, None);
                Box::pin(self.reply(sender, error)).await;
            }
            return;
        }
        let routes = self.bus.routes(&user);
        let exists = match routes.is_empty() {
            true => Box::pin(self.account_exists(&user)).await,
            false => Some(true),
        };
        let outcome = if exists == Some(false) {
            rules::message_to_nobody(message_type)
        } else if exists.is_none() {
            // Storage is unreachable: the sender learns it, nothing is dropped silently.
            MessageOutcome::Bounce(ErrorCondition::INTERNAL_SERVER_ERROR_WAIT)
        } else {
            match to.try_as_full() {
                Ok(full) => rules::message_to_full(
                    message_type,
                    routes.iter().find(|r| r.jid == *full),
                    &routes,
                ),
                Err(_) => rules::message_to_bare(message_type, &routes),
            }
        };
        self.apply_message_outcome(message, message_type, &user, outcome, &routes, sender)
            .await;
    }

    async fn apply_message_outcome(
        &self,
        message: Element,
        message_type: MessageType,
        user: &BareJid,
        outcome: MessageOutcome,
        routes: &[Arc<Route>],
        sender: Option<&Session>,
    ) {
        match outcome {
            MessageOutcome::Deliver(targets) => {
                let sender = sender.map(|s| &s.jid);
                if let Err(message) = self
                    .deliver_to_targets(message, message_type, user, &targets, routes, sender)
                    .await
                {
                    // Every target went away in the meantime: try again without them.
                    let excluded: Vec<_> = targets.iter().map(|t| t.jid.clone()).collect();
                    self.route_to_user_excluding(message, message_type, user, &excluded)
                        .await;
                }
            }
            MessageOutcome::Offline => Box::pin(self.deliver_offline(user, message, sender)).await,
            MessageOutcome::Bounce(condition) => {
                let error = error_reply(&message, condition, None, None);
                Box::pin(self.reply(sender, error)).await;
            }
            MessageOutcome::Drop => {}
        }
    }

    /// Delivers a message to the chosen sessions of `user`, with the copies
    /// modules make for its other sessions (received carbons); gives it back
    /// when no target took it (they all went away meanwhile).
    pub(crate) async fn deliver_to_targets(
        &self,
        message: Element,
        message_type: MessageType,
        user: &BareJid,
        targets: &[Arc<Route>],
        routes: &[Arc<Route>],
        sender: Option<&FullJid>,
    ) -> Result<(), Element> {
        // The marks first: most users have no marked session, and then the
        // message itself is not looked at.
        let wants_copies = self.wants_copies(routes, |jid| {
            sender != Some(jid) && !targets.iter().any(|target| target.jid == *jid)
        }) && self.copied(&message, message_type);
        let mut delivered: Vec<&FullJid> = Vec::with_capacity(targets.len());
        let mut last_failed = None;
        // The last target gets the message itself, unless carbons still need it.
        let mut message = Some(message);
        for (index, target) in targets.iter().enumerate() {
            let copy = if index + 1 == targets.len() && !wants_copies {
                message.take().expect("taken once, last")
            } else {
                message.clone().expect("kept until the last target")
            };
            match self.send_to(target, copy).await {
                Ok(()) => delivered.push(&target.jid),
                Err(returned) => last_failed = Some(returned),
            }
        }
        if delivered.is_empty() {
            return last_failed.map_or(Ok(()), Err);
        }
        if let (true, Some(message)) = (wants_copies, message) {
            delivered.extend(sender);
            self.send_copies(&Routed {
                side: Side::Received,
                user,
                message: &message,
                message_type,
                routes,
                have_it: &delivered,
            })
            .await;
        }
        Ok(())
    }

    /// Routes a message to `user` as if addressed to the bare JID, skipping `except`.
    pub(crate) async fn route_to_user_except(
        &self,
        message: Element,
        user: &BareJid,
        except: Option<&FullJid>,
    ) {
        let excluded: Vec<FullJid> = except.into_iter().cloned().collect();
        let message_type = MessageType::of(&message);
        self.route_to_user_excluding(message, message_type, user, &excluded)
            .await;
    }

    async fn route_to_user_excluding(
        &self,
        message: Element,
        message_type: MessageType,
        user: &BareJid,
        excluded: &[FullJid],
    ) {
        // While this node stops, its own sessions are closing: only the others count.
        let stopping = self.is_shutting_down();
        let node = self.bus.node();
        let routes: Vec<_> = self
            .bus
            .routes(user)
            .into_iter()
            .filter(|r| !(excluded.contains(&r.jid) || (stopping && r.node == node)))
            .collect();
        let outcome = rules::message_to_bare(message_type, &routes);
        // Boxed: a failed delivery may come back here once more.
        Box::pin(self.apply_message_outcome(message, message_type, user, outcome, &routes, None))
            .await;
    }

    async fn deliver_offline(&self, user: &BareJid, message: Element, sender: Option<&Session>) {
        let error = match self.store_offline(user, message.clone()).await {
            Ok(()) => {
                // Checked again once the registry is known to be current.
                self.deferred.stored_message(user);
                return;
            }
            Err(StoreError::QuotaExceeded) => ErrorCondition::SERVICE_UNAVAILABLE,
            Err(error) => {
                tracing::error!(%user, %error, "Offline message could not be stored.");
                ErrorCondition::INTERNAL_SERVER_ERROR_WAIT
            }
        };
        if MessageType::of(&message) != MessageType::Error {
            let text = (error == ErrorCondition::SERVICE_UNAVAILABLE)
                .then_some("The recipient's offline storage is full.");
            self.reply(sender, error_reply(&message, error, text, None))
                .await;
        }
    }

    /// Sends a reply to the originator of a stanza: to the session's outbox when
    /// it is the sender, else by routing.
    pub(crate) async fn reply(&self, sender: Option<&Session>, reply: Element) {
        match sender {
            Some(session) if reply.attr("to") == Some(session.jid.as_str()) => {
                // The sender is handling its own stanza right now; its mailbox takes the reply.
                let _ = session.mailbox.send_stanza(reply);
            }
            _ => Box::pin(self.route(reply)).await,
        }
    }

    /// Whether `user` has an account; `None` when storage cannot tell now.
    pub(crate) async fn account_exists(&self, user: &BareJid) -> Option<bool> {
        match self.store.account_exists(user).await {
            Ok(exists) => Some(exists),
            Err(error) => {
                tracing::warn!(%user, %error, "Account lookup failed.");
                None
            }
        }
    }

    /// Starts giving stored offline messages to a session that became
    /// available: the session task takes the pages through
    /// [`next_offline_page`](Router::next_offline_page).
    pub(crate) fn flush_offline(&self, session: &mut Session) {
        session.offline_pending = true;
        session.offline_after = 0;
    }

    /// Reads the next page of the user's offline messages for the session,
    /// each with the receipt that removes it from storage once safe (see
    /// [`acknowledge`](Router::acknowledge)): until then a node dying loses
    /// nothing. The session task calls it while
    /// [`Session::offline_pending`] and once its client has taken what was
    /// sent before (written out, and mostly acknowledged with stream
    /// management), so a backlog of any size reaches a client at the pace
    /// it reads, never all in memory at once.
    pub async fn next_offline_page(&self, session: &mut Session) -> Vec<(Element, Receipt)> {
        let user = session.user();
        let stored = match self
            .store
            .read_offline(&user, session.offline_after, crate::OFFLINE_PAGE)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                session.offline_pending = false;
                tracing::warn!(%user, %error, "Offline messages could not be read.");
                return Vec::new();
            }
        };
        if stored.is_empty() {
            session.offline_pending = false;
        }
        self.deferred.paged(&user, stored.is_empty());
        if let Some(last) = stored.last() {
            session.offline_after = last.id;
        }
        self.parse_stored(&user, stored)
            .await
            .into_iter()
            .map(|(id, stanza)| {
                let receipt = Receipt::Stored(StoredReceipt {
                    user: user.to_string(),
                    id,
                    digest: rookery_cluster::stanza_digest(&stanza),
                });
                (stanza, receipt)
            })
            .collect()
    }

    /// The stored messages that parse, with their ids; those that do not
    /// (they never will) are removed from storage.
    pub(crate) async fn parse_stored(
        &self,
        user: &BareJid,
        stored: Vec<StoredOffline>,
    ) -> Vec<(i64, Element)> {
        let mut parsed = Vec::with_capacity(stored.len());
        let mut broken = Vec::new();
        for StoredOffline { id, message } in stored {
            match message.stanza.parse::<Element>() {
                Ok(stanza) => parsed.push((id, stanza)),
                Err(error) => {
                    tracing::error!(%user, %error, "Stored offline message is not valid XML; removed.");
                    broken.push(id);
                }
            }
        }
        self.remove_stored(user, &broken).await;
        parsed
    }

    /// Removes messages from the user's offline storage (they reached the
    /// client, or went elsewhere). On failure they stay and are delivered again.
    pub(crate) async fn remove_stored(&self, user: &BareJid, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        if let Err(error) = self.store.remove_offline(user, ids).await {
            tracing::warn!(%user, %error, count = ids.len(), "Delivered offline messages could not be removed; they will be delivered again.");
        }
    }

    /// Settles receipts of deliveries that became safe: the bus's are
    /// acknowledged through it, stored messages are removed from storage
    /// (one statement per user).
    pub async fn acknowledge(&self, receipts: Vec<Receipt>) {
        let mut stored: HashMap<String, Vec<i64>> = HashMap::new();
        for receipt in receipts {
            match receipt {
                Receipt::Stored(StoredReceipt { user, id, .. }) => {
                    stored.entry(user).or_default().push(id)
                }
                delivery @ Receipt::Delivery(_) => self.bus.acknowledge(delivery).await,
            }
        }
        for (user, ids) in stored {
            match BareJid::new(&user) {
                Ok(user) => self.remove_stored(&user, &ids).await,
                Err(error) => tracing::error!(%user, %error, "A stored receipt names no user."),
            }
        }
    }
}
