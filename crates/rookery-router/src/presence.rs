//! Presence (RFC 6121 section 4) and subscriptions (section 3).

use std::sync::Arc;

use jid::{BareJid, Jid};
use minidom::Element;
use rookery_store::RosterItem;
use rookery_stream::ns;
use rookery_stream::xml::set_attr;

use crate::item_locks::retry_changed_item;
use crate::rules::{self, PresenceFallback};
use crate::stanza::{self, ErrorCondition, PresenceType, error_reply};
use crate::subscription::{self, SubState};
use crate::{Destination, Router, Session, strip_to};

/// Parses `<priority/>` (RFC 6121 section 4.7.2.3); absent or invalid is 0.
fn priority(presence: &Element) -> i8 {
    presence
        .get_child("priority", ns::CLIENT)
        .and_then(|p| p.text().trim().parse().ok())
        .unwrap_or(0)
}

/// The copy of a session's presence kept for probes and new resources: its
/// content without attributes (`from` and `to` are set on every copy sent), so
/// an idle session keeps no attribute map (over 0.5 KiB each).
fn kept_presence(presence: &Element) -> Element {
    let mut kept = Element::bare("presence", ns::CLIENT);
    for child in presence.children() {
        kept.append_child(child.clone());
    }
    kept
}

/// An unavailable presence from `from`.
fn unavailable_from(from: &str) -> Element {
    let mut presence = Element::bare("presence", ns::CLIENT);
    set_attr(&mut presence, "type", "unavailable");
    set_attr(&mut presence, "from", from);
    presence
}

impl Router {
    /// A presence from the session's client.
    pub(crate) async fn handle_presence(
        &self,
        session: &mut Session,
        presence: Element,
        to: Option<Jid>,
    ) {
        let Some(kind) = PresenceType::of(&presence) else {
            session.outbox.push(error_reply(
                &presence,
                ErrorCondition::BAD_REQUEST,
                Some("Unknown presence type."),
                None,
            ));
            return;
        };
        if let Some(to) = &to {
            match self.resolve(to) {
                Destination::Remote => {
                    // No server-to-server yet: like messages and iqs (RFC 6120
                    // 10.4.3), so that a client joining a room elsewhere hears back.
                    if !matches!(kind, PresenceType::Unavailable | PresenceType::Error) {
                        session.outbox.push(error_reply(
                            &presence,
                            ErrorCondition::REMOTE_SERVER_NOT_FOUND,
                            None,
                            None,
                        ));
                    }
                    return;
                }
                // Available and unavailable are directed presence, remembered
                // below and delivered through `deliver_presence`.
                Destination::Service(module)
                    if !matches!(kind, PresenceType::Available | PresenceType::Unavailable) =>
                {
                    return module.handle_service(self, presence).await;
                }
                // A component answers its probes itself; subscriptions go
                // through the user's roster below and reach it in
                // `subscription_inbound`.
                Destination::Component(domain) if kind == PresenceType::Probe => {
                    let _ = self.send_to_component(&domain, presence).await;
                    return;
                }
                _ => {}
            }
        }
        match (to, kind) {
            (None, PresenceType::Available | PresenceType::Unavailable) => {
                self.handle_broadcast_presence(session, presence).await
            }
            (None, PresenceType::Error | PresenceType::Probe) => {}
            (None, _) => {
                let text = Some("Subscription requests need a 'to' address.");
                session.outbox.push(error_reply(
                    &presence,
                    ErrorCondition::BAD_REQUEST,
                    text,
                    None,
                ));
            }
            (Some(to), PresenceType::Available | PresenceType::Unavailable) => {
                if kind == PresenceType::Available {
                    if !session.directed.contains(&to)
                        && session.directed.len() >= crate::MAX_DIRECTED_PRESENCE
                    {
                        let text = Some("Too many entities got directed presence from you.");
                        return session.outbox.push(error_reply(
                            &presence,
                            ErrorCondition::RESOURCE_CONSTRAINT,
                            text,
                            None,
                        ));
                    }
                    session.directed.insert(to.clone());
                } else {
                    session.directed.remove(&to);
                }
                self.deliver_presence(presence, &to).await;
            }
            (Some(to), PresenceType::Probe) => self.answer_probe(session, &to.to_bare()).await,
            (Some(to), PresenceType::Error) => self.deliver_presence(presence, &to).await,
            (Some(to), kind) => {
                self.subscription_outbound(session, presence, &to.to_bare(), kind)
                    .await
            }
        }
    }

    /// Initial, updated or unavailable presence: broadcast to subscribers and own resources.
    pub(crate) async fn handle_broadcast_presence(
        &self,
        session: &mut Session,
        mut presence: Element,
    ) {
        strip_to(&mut presence);
        let user = session.user();
        let available = presence.attr("type").is_none();
        let initial = available && !session.info.available();
        if !available && session.info.available() {
            // XEP-0012: the user was last seen now, unless another resource stays available.
            let others = self
                .bus
                .routes(&user)
                .iter()
                .any(|r| r.jid != session.jid && r.info.available());
            if !others {
                let status = presence.get_child("status", ns::CLIENT).map(Element::text);
                self.record_last_activity(&user, status).await;
            }
        }
        if available {
            session.info.priority = priority(&presence);
            session.info.presence = Some(Arc::new(kept_presence(&presence)));
        } else {
            session.info.presence = None;
        }
        self.publish_route_info(session).await;

        // The whole roster for the probes of initial presence; otherwise
        // only the subscribers, kept by the session between roster pushes.
        let roster = if initial || session.subscribers.is_none() {
            match self.store.roster(&user).await {
                Ok(roster) => {
                    session.subscribers = Some(
                        roster
                            .items
                            .iter()
                            .filter(|item| item.subscription.has_from() && item.jid != user)
                            .map(|item| item.jid.clone())
                            .collect(),
                    );
                    roster
                }
                Err(error) => {
                    tracing::warn!(%user, %error, "Roster could not be read for a presence broadcast.");
                    Default::default()
                }
            }
        } else {
            Default::default()
        };
        let subscribers = session.subscribers.clone().unwrap_or_default();
        // The subscribers' sessions get it in one go: a node's share in one
        // delivery, however many contacts are there.
        let mut targets = Vec::new();
        for contact in subscribers.iter() {
            let to = Jid::from(contact.clone());
            if !matches!(self.resolve(&to), Destination::Account) {
                self.deliver_presence(presence.clone(), &to).await;
            } else if !self.presence_blocked(&presence, contact).await {
                targets.extend(rules::presence_to_bare(&self.bus.routes(contact)));
            }
        }
        self.send_each(&targets, &presence).await;
        let own: Vec<_> = self
            .bus
            .routes(&user)
            .into_iter()
            .filter(|route| route.info.available())
            .collect();
        self.send_each(&own, &presence).await;
        if !available {
            for jid in std::mem::take(&mut session.directed) {
                let subscribed = subscribers.contains(&jid.to_bare());
                if !subscribed && jid.to_bare() != user {
                    self.deliver_presence(presence.clone(), &jid).await;
                }
            }
            if !own.iter().any(|route| route.jid == session.jid) {
                // The client that went unavailable also sees its own unavailable presence.
                let mut echo = presence.clone();
                set_attr(&mut echo, "to", session.jid.to_string());
                self.accept_delivery(session, echo);
            }
        }
        if initial {
            // The user's other available resources (section 4.2.2).
            for route in &own {
                if route.jid != session.jid
                    && let Some(presence) = &route.info.presence
                {
                    let mut presence = Element::clone(presence);
                    set_attr(&mut presence, "from", route.jid.to_string());
                    set_attr(&mut presence, "to", session.jid.to_string());
                    self.accept_delivery(session, presence);
                }
            }
            // Probes (section 4.3), answered from the registry for local contacts.
            for item in roster
                .items
                .iter()
                .filter(|item| item.subscription.has_to())
            {
                self.answer_probe_for(session, &item.jid).await;
            }
            // Subscription requests that waited for the user (section 3.1.3).
            match self.store.subscription_requests(&user).await {
                Ok(requests) => {
                    for (_, stanza) in requests {
                        if let Ok(mut request) = stanza.parse::<Element>() {
                            set_attr(&mut request, "to", user.to_string());
                            self.accept_delivery(session, request);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%user, %error, "Subscription requests could not be read.")
                }
            }
            if session.info.priority >= 0 {
                self.flush_offline(session);
            }
        }
    }

    /// Sends the current presence of `contact`'s available sessions to the session.
    async fn answer_probe_for(&self, session: &mut Session, contact: &BareJid) {
        if self
            .blocks(&session.user(), &Jid::from(contact.clone()))
            .await
        {
            return;
        }
        if let Destination::Component(domain) = self.resolve(&Jid::from(contact.clone())) {
            // A component knows its own presence: it is asked (section 4.3.1).
            let mut probe = stanza::stanza("presence", session.account.as_str(), contact.as_str());
            set_attr(&mut probe, "type", "probe");
            let _ = self.send_to_component(&domain, probe).await;
            return;
        }
        if !self.is_local(&Jid::from(contact.clone())) {
            return;
        }
        for route in self.bus.routes(contact) {
            if let Some(presence) = &route.info.presence {
                let mut presence = Element::clone(presence);
                set_attr(&mut presence, "from", route.jid.to_string());
                set_attr(&mut presence, "to", session.jid.to_string());
                self.accept_delivery(session, presence);
            }
        }
    }

    /// A client's explicit probe: answered if the user is subscribed to the
    /// contact; else (no subscription, or no such account) with
    /// `unsubscribed`, as RFC 6121 4.3.2 recommends.
    async fn answer_probe(&self, session: &mut Session, contact: &BareJid) {
        let subscribed = *contact == session.user()
            || matches!(self.store.roster_item(&session.user(), contact).await, Ok(Some(item)) if item.subscription.has_to());
        if subscribed {
            self.answer_probe_for(session, contact).await;
        } else if !self
            .blocks(&session.user(), &Jid::from(contact.clone()))
            .await
        {
            let mut answer =
                self.subscription_presence(contact, &session.user(), PresenceType::Unsubscribed);
            set_attr(&mut answer, "to", session.jid.to_string());
            self.accept_delivery(session, answer);
        }
    }

    /// True when `user` blocks the sender of `presence` (XEP-0191).
    async fn presence_blocked(&self, presence: &Element, user: &BareJid) -> bool {
        match stanza::from(presence) {
            Some(from) => from.to_bare() != *user && self.blocks(user, &from).await,
            None => false,
        }
    }

    /// Delivers a presence to an address of this domain, following section 8.5.
    pub(crate) async fn deliver_presence(&self, mut presence: Element, to: &Jid) {
        match self.resolve(to) {
            Destination::Account => {}
            Destination::Service(module) => {
                set_attr(&mut presence, "to", to.to_string());
                return module.handle_service(self, presence).await;
            }
            Destination::Component(domain) => {
                set_attr(&mut presence, "to", to.to_string());
                let _ = self.send_to_component(&domain, presence).await;
                return;
            }
            Destination::Server | Destination::Remote => return,
        }
        let user = to.to_bare();
        if self.presence_blocked(&presence, &user).await {
            return;
        }
        let routes = self.bus.routes(&user);
        match to.try_as_full() {
            Ok(full) => {
                if let Some(route) = routes.iter().find(|route| route.jid == *full) {
                    set_attr(&mut presence, "to", full.to_string());
                    let _ = self.send_to(route, presence).await;
                    return;
                }
                let kind = PresenceType::of(&presence).unwrap_or(PresenceType::Available);
                if rules::presence_to_missing_full(kind) == PresenceFallback::Drop {
                    return;
                }
                self.send_each(&rules::presence_to_bare(&routes), &presence)
                    .await;
            }
            Err(_) => {
                self.send_each(&rules::presence_to_bare(&routes), &presence)
                    .await
            }
        }
    }

    /// The subscription state of `user` towards `contact`.
    async fn sub_state(&self, user: &BareJid, contact: &BareJid) -> (Option<RosterItem>, SubState) {
        let item = self
            .store
            .roster_item(user, contact)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%user, %error, "Roster item could not be read.");
                None
            });
        let pending_in = match self.store.subscription_requests(user).await {
            Ok(requests) => requests.iter().any(|(jid, _)| jid == contact),
            Err(_) => false,
        };
        let state = SubState {
            subscription: item.as_ref().map(|i| i.subscription).unwrap_or_default(),
            ask: item.as_ref().is_some_and(|i| i.ask),
            pending_in,
            approved: item.as_ref().is_some_and(|i| i.approved),
        };
        (item, state)
    }

    /// Stores a new subscription state and pushes the roster item if it
    /// changed. Returns false, having stored nothing, if the item changed
    /// since `item` was read (another node's change): read it again and redo
    /// the transition.
    async fn save_sub_state(
        &self,
        user: &BareJid,
        contact: &BareJid,
        item: Option<RosterItem>,
        before: SubState,
        after: SubState,
    ) -> bool {
        let item_changed = (before.subscription, before.ask, before.approved)
            != (after.subscription, after.ask, after.approved);
        if item_changed
            && (item.is_some()
                || after
                    != SubState {
                        pending_in: after.pending_in,
                        ..SubState::default()
                    })
        {
            let mut changed = item
                .clone()
                .unwrap_or_else(|| RosterItem::new(contact.clone()));
            changed.subscription = after.subscription;
            changed.ask = after.ask;
            changed.approved = after.approved;
            match self
                .store
                .replace_roster_item(user, item.as_ref(), &changed)
                .await
            {
                Ok(Some(version)) => self.push_roster_item(user, &changed, version).await,
                Ok(None) => return false,
                Err(error) => {
                    tracing::error!(%user, %contact, %error, "Roster item could not be stored.")
                }
            }
        }
        if before.pending_in
            && !after.pending_in
            && let Err(error) = self.store.remove_subscription_request(user, contact).await
        {
            tracing::warn!(%user, %error, "Subscription request could not be removed.");
        }
        true
    }

    /// The user sends a subscription stanza (section 3, the user's server).
    async fn subscription_outbound(
        &self,
        session: &mut Session,
        presence: Element,
        contact: &BareJid,
        kind: PresenceType,
    ) {
        let user = session.user();
        if *contact == user {
            return;
        }
        let guard = self.item_locks.lock(&user, contact).await;
        let mut attempts = 0;
        let outcome = loop {
            let (item, before) = self.sub_state(&user, contact).await;
            // A subscribe, a pre-approval or an approval may each make a new item.
            let adds_item = item.is_none()
                && matches!(kind, PresenceType::Subscribe | PresenceType::Subscribed);
            if adds_item && self.roster_is_full(&user).await {
                session.outbox.push(error_reply(
                    &presence,
                    ErrorCondition::RESOURCE_CONSTRAINT,
                    Some("Your roster is full."),
                    None,
                ));
                return;
            }
            let outcome = subscription::outbound(before, kind);
            if self
                .save_sub_state(&user, contact, item, before, outcome.next)
                .await
                || !retry_changed_item(&mut attempts, &user, contact)
            {
                break outcome;
            }
        };
        drop(guard);
        if !outcome.forward {
            return;
        }
        // Section 3.1.2: stamped with both bare JIDs.
        let mut forwarded = presence;
        set_attr(&mut forwarded, "from", user.to_string());
        set_attr(&mut forwarded, "to", contact.to_string());
        self.subscription_inbound(forwarded, contact, &user, kind)
            .await;
        match kind {
            PresenceType::Subscribed => self.send_current_presence(&user, contact).await,
            PresenceType::Unsubscribed => self.send_unavailable_presence(&user, contact).await,
            _ => {}
        }
    }

    /// A subscription stanza from `sender` reaches `recipient` (section 3, the contact's server).
    pub(crate) async fn subscription_inbound(
        &self,
        presence: Element,
        recipient: &BareJid,
        sender: &BareJid,
        kind: PresenceType,
    ) {
        match self.resolve(&Jid::from(recipient.clone())) {
            Destination::Account => {}
            Destination::Component(domain) => {
                let _ = self.send_to_component(&domain, presence).await;
                return;
            }
            _ => return,
        }
        let exists = self.account_exists(recipient).await;
        if exists.is_none() {
            // Storage is unreachable: better no answer than a wrong "unsubscribed".
            return;
        }
        if exists == Some(false) {
            if kind == PresenceType::Subscribe {
                // Section 3.1.3: an unknown contact answers with unsubscribed.
                let reply =
                    self.subscription_presence(recipient, sender, PresenceType::Unsubscribed);
                Box::pin(self.subscription_inbound(
                    reply,
                    sender,
                    recipient,
                    PresenceType::Unsubscribed,
                ))
                .await;
            }
            return;
        }
        if self.blocks(recipient, &Jid::from(sender.clone())).await {
            return;
        }
        let guard = self.item_locks.lock(recipient, sender).await;
        let mut attempts = 0;
        let outcome = loop {
            let (item, before) = self.sub_state(recipient, sender).await;
            let outcome = subscription::inbound(before, kind);
            if self
                .save_sub_state(recipient, sender, item, before, outcome.next)
                .await
                || !retry_changed_item(&mut attempts, recipient, sender)
            {
                break outcome;
            }
        };
        if kind == PresenceType::Subscribe
            && outcome.next.pending_in
            && let Err(error) = self
                .store
                .put_subscription_request(recipient, sender, &String::from(&presence))
                .await
        {
            tracing::error!(%recipient, %error, "Subscription request could not be stored.");
        }
        drop(guard);
        if outcome.deliver {
            let routes = rules::presence_to_bare(&self.bus.routes(recipient));
            if routes.is_empty() && kind == PresenceType::Subscribe && outcome.next.pending_in {
                // Kept for the next login; checked again once the registry is current.
                self.deferred.stored_request(recipient);
            }
            self.send_each(&routes, &presence).await;
        }
        if let Some(reply_kind) = outcome.auto_reply {
            let reply = self.subscription_presence(recipient, sender, reply_kind);
            Box::pin(self.subscription_inbound(reply, sender, recipient, reply_kind)).await;
            if reply_kind == PresenceType::Subscribed {
                self.send_current_presence(recipient, sender).await;
            }
        }
        if kind == PresenceType::Unsubscribe && outcome.deliver {
            // Section 3.3.3: the contact no longer sees the recipient.
            self.send_unavailable_presence(recipient, sender).await;
        }
    }

    fn subscription_presence(&self, from: &BareJid, to: &BareJid, kind: PresenceType) -> Element {
        let mut presence = stanza::stanza("presence", from.as_str(), to.as_str());
        if let Some(value) = kind.as_attr() {
            set_attr(&mut presence, "type", value);
        }
        presence
    }

    /// Sends the presence of every available session of `user` to `contact`.
    pub(crate) async fn send_current_presence(&self, user: &BareJid, contact: &BareJid) {
        for route in self.bus.routes(user) {
            if let Some(presence) = &route.info.presence {
                let mut presence = Element::clone(presence);
                set_attr(&mut presence, "from", route.jid.to_string());
                self.deliver_presence(presence, &Jid::from(contact.clone()))
                    .await;
            }
        }
    }

    /// Sends unavailable presence from every available session of `user` to `contact`.
    pub(crate) async fn send_unavailable_presence(&self, user: &BareJid, contact: &BareJid) {
        for route in self.bus.routes(user) {
            if route.info.available() {
                self.deliver_presence(
                    unavailable_from(route.jid.as_str()),
                    &Jid::from(contact.clone()),
                )
                .await;
            }
        }
    }

    /// True if `contact` receives `user`'s presence by subscription.
    pub(crate) async fn sees_presence(&self, user: &BareJid, contact: &Jid) -> bool {
        matches!(
            self.store.roster_item(user, &contact.to_bare()).await,
            Ok(Some(item)) if item.subscription.has_from()
        )
    }

    /// Makes `contact`, just blocked, see `user` as gone (XEP-0191 3.3): only
    /// if it was getting the user's presence, by subscription or (`directed`)
    /// directed presence; anyone else learns nothing, not even a resource.
    pub async fn hide_presence(&self, user: &BareJid, contact: &Jid, directed: bool) {
        if !directed && !self.sees_presence(user, contact).await {
            return;
        }
        for route in self.bus.routes(user) {
            if route.info.available() {
                let mut presence = unavailable_from(route.jid.as_str());
                set_attr(&mut presence, "to", contact.to_string());
                // Delivered without the blocking check: it is the last thing the contact sees.
                let contact_routes = self.bus.routes(&contact.to_bare());
                self.send_each(&rules::presence_to_bare(&contact_routes), &presence)
                    .await;
            }
        }
    }

    /// Gives `contact`, just unblocked, `user`'s current presence if it is
    /// subscribed to it (XEP-0191 3.4).
    pub async fn show_presence(&self, user: &BareJid, contact: &Jid) {
        if self.sees_presence(user, contact).await {
            self.send_current_presence(user, &contact.to_bare()).await;
        }
    }
}
