//! Roster management (RFC 6121 section 2): get with versioning, set, remove, pushes.

use jid::{BareJid, Jid};
use minidom::Element;
use rookery_store::RosterItem;
use rookery_stream::xml::set_attr;

use crate::item_locks::retry_changed_item;
use crate::stanza::{ErrorCondition, PresenceType, error_reply, iq_result};
use crate::{IqType, Router, Session, namespaces};

/// The `<item/>` of a roster item.
pub(crate) fn item_element(item: &RosterItem) -> Element {
    let mut element = Element::bare("item", namespaces::ROSTER);
    set_attr(&mut element, "jid", item.jid.as_str());
    set_attr(&mut element, "subscription", item.subscription.as_str());
    if let Some(name) = &item.name {
        set_attr(&mut element, "name", name.as_str());
    }
    if item.ask {
        set_attr(&mut element, "ask", "subscribe");
    }
    if item.approved {
        set_attr(&mut element, "approved", "true");
    }
    for group in &item.groups {
        element.append_child(
            Element::builder("group", namespaces::ROSTER)
                .append(group.as_str())
                .build(),
        );
    }
    element
}

fn push(item: Element, version: i64) -> Element {
    let mut query = Element::builder("query", namespaces::ROSTER)
        .append(item)
        .build();
    set_attr(&mut query, "ver", version.to_string());
    let mut iq = Element::builder("iq", rookery_stream::ns::CLIENT)
        .append(query)
        .build();
    set_attr(&mut iq, "type", "set");
    set_attr(
        &mut iq,
        "id",
        format!("push-{}", rookery_stream::random_id()),
    );
    iq
}

impl Router {
    /// Pushes a changed item to every interested resource of `user` (section 2.1.6).
    pub(crate) async fn push_roster_item(&self, user: &BareJid, item: &RosterItem, version: i64) {
        self.push_roster_change(user, &push(item_element(item), version))
            .await;
    }

    async fn push_roster_removal(&self, user: &BareJid, contact: &BareJid, version: i64) {
        let mut item = Element::bare("item", namespaces::ROSTER);
        set_attr(&mut item, "jid", contact.as_str());
        set_attr(&mut item, "subscription", "remove");
        self.push_roster_change(user, &push(item, version)).await;
    }

    /// A roster get or set from the session's client, addressed to its own account.
    pub(crate) async fn handle_roster_iq(
        &self,
        session: &mut Session,
        iq: &Element,
        query: &Element,
        iq_type: IqType,
    ) -> Element {
        let user = session.user();
        match iq_type {
            IqType::Get => {
                if !session.info.interested {
                    session.info.interested = true;
                    self.publish_route_info(session).await;
                }
                let roster = match self.store.roster(&user).await {
                    Ok(roster) => roster,
                    Err(error) => {
                        tracing::error!(%user, %error, "Roster could not be read.");
                        return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
                    }
                };
                let version = roster.version.to_string();
                if query.attr("ver") == Some(version.as_str()) {
                    // Section 2.6.3: the client's copy is current.
                    return iq_result(iq, None);
                }
                let mut result = Element::bare("query", namespaces::ROSTER);
                set_attr(&mut result, "ver", version);
                for item in &roster.items {
                    result.append_child(item_element(item));
                }
                iq_result(iq, Some(result))
            }
            IqType::Set => self.handle_roster_set(session, iq, query).await,
        }
    }

    async fn handle_roster_set(
        &self,
        session: &mut Session,
        iq: &Element,
        query: &Element,
    ) -> Element {
        let user = session.user();
        let mut items = query
            .children()
            .filter(|child| child.is("item", namespaces::ROSTER));
        let (Some(item), None) = (items.next(), items.next()) else {
            return error_reply(
                iq,
                ErrorCondition::BAD_REQUEST,
                Some("A roster set holds exactly one item."),
                None,
            );
        };
        let Some(contact) = item.attr("jid").and_then(|jid| Jid::new(jid).ok()) else {
            return error_reply(
                iq,
                ErrorCondition::BAD_REQUEST,
                Some("The item needs a valid 'jid'."),
                None,
            );
        };
        if contact.resource().is_some() {
            return error_reply(
                iq,
                ErrorCondition::BAD_REQUEST,
                Some("Roster items are bare JIDs."),
                None,
            );
        }
        let contact = contact.to_bare();
        if item.attr("subscription") == Some("remove") {
            return self.remove_contact(session, iq, &contact).await;
        }
        let mut groups: Vec<String> = Vec::new();
        for group in item
            .children()
            .filter(|child| child.is("group", namespaces::ROSTER))
        {
            let name = group.text();
            if name.is_empty() {
                return error_reply(
                    iq,
                    ErrorCondition::NOT_ACCEPTABLE,
                    Some("Group names cannot be empty."),
                    None,
                );
            }
            if groups.contains(&name) {
                return error_reply(
                    iq,
                    ErrorCondition::BAD_REQUEST,
                    Some("Duplicate group."),
                    None,
                );
            }
            groups.push(name);
        }
        let _guard = self.item_locks.lock(&user, &contact).await;
        let mut attempts = 0;
        loop {
            let existing = match self.store.roster_item(&user, &contact).await {
                Ok(existing) => existing,
                Err(error) => {
                    tracing::error!(%user, %error, "Roster item could not be read.");
                    return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
                }
            };
            if existing.is_none() && self.roster_is_full(&user).await {
                return error_reply(
                    iq,
                    ErrorCondition::NOT_ALLOWED,
                    Some("Your roster is full."),
                    None,
                );
            }
            // The client sets name and groups; subscription state belongs to the server.
            let mut updated = existing
                .clone()
                .unwrap_or_else(|| RosterItem::new(contact.clone()));
            updated.name = item
                .attr("name")
                .filter(|n| !n.is_empty())
                .map(str::to_owned);
            updated.groups = groups.clone();
            match self
                .store
                .replace_roster_item(&user, existing.as_ref(), &updated)
                .await
            {
                Ok(Some(version)) => {
                    self.push_roster_item(&user, &updated, version).await;
                    return iq_result(iq, None);
                }
                Ok(None) if retry_changed_item(&mut attempts, &user, &contact) => {}
                Ok(None) => {
                    return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
                }
                Err(error) => {
                    tracing::error!(%user, %error, "Roster item could not be stored.");
                    return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
                }
            }
        }
    }

    /// Whether `user`'s roster holds as many items as it may (a new one is refused).
    pub(crate) async fn roster_is_full(&self, user: &BareJid) -> bool {
        let count = self
            .store
            .roster(user)
            .await
            .map(|r| r.items.len())
            .unwrap_or(0);
        count >= self.config.max_roster_items
    }

    /// Section 2.5: removing a contact cancels subscriptions both ways first.
    async fn remove_contact(
        &self,
        session: &mut Session,
        iq: &Element,
        contact: &BareJid,
    ) -> Element {
        let user = session.user();
        let existing = match self.store.roster_item(&user, contact).await {
            Ok(Some(existing)) => existing,
            Ok(None) => return error_reply(iq, ErrorCondition::ITEM_NOT_FOUND, None, None),
            Err(error) => {
                tracing::error!(%user, %error, "Roster item could not be read.");
                return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
            }
        };
        let from = user.to_string();
        if existing.subscription.has_to() || existing.ask {
            let presence = crate::stanza::stanza("presence", &from, contact.as_str());
            let mut presence = presence;
            set_attr(&mut presence, "type", "unsubscribe");
            self.subscription_inbound(presence, contact, &user, PresenceType::Unsubscribe)
                .await;
        }
        if existing.subscription.has_from() {
            let mut presence = crate::stanza::stanza("presence", &from, contact.as_str());
            set_attr(&mut presence, "type", "unsubscribed");
            self.subscription_inbound(presence, contact, &user, PresenceType::Unsubscribed)
                .await;
            self.send_unavailable_presence(&user, contact).await;
        }
        let _guard = self.item_locks.lock(&user, contact).await;
        let _ = self.store.remove_subscription_request(&user, contact).await;
        match self.store.remove_roster_item(&user, contact).await {
            Ok(Some(version)) => self.push_roster_removal(&user, contact, version).await,
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%user, %error, "Roster item could not be removed.");
                return error_reply(iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None);
            }
        }
        iq_result(iq, None)
    }
}
