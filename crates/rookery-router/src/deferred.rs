//! Stanzas kept for later that may have had a recipient online after all.
//!
//! A message goes to offline storage, and a subscription request waits for
//! the contact's next login, when the recipient has no available session in
//! this node's view of the registry. In a cluster that view can be briefly
//! behind (a login on another node a moment ago) or, during a fault, behind
//! for seconds. So each such recipient is noted, and looked at again once the
//! bus confirms the registry current past that moment: if they have
//! available sessions after all, the stored messages and pending requests go
//! to them now. Normally they are offline and nothing is read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use jid::BareJid;
use minidom::Element;
use rookery_stream::xml::set_attr;

use crate::Router;
use crate::rules::{self, MessageOutcome};
use crate::stanza::MessageType;

/// What waits for a user, since when.
#[derive(Debug, Clone, Copy)]
struct Pending {
    since: Instant,
    messages: bool,
    requests: bool,
}

/// The users to look at again.
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    users: Mutex<HashMap<BareJid, Pending>>,
    /// Users whose sessions on this node are taking their offline messages
    /// page by page, with when the last page was taken. Their stored
    /// messages are left to those sessions: taken here as well, a page would
    /// reach the client after later ones.
    paging: Mutex<HashMap<BareJid, Instant>>,
}

/// A user whose session took a page this recently is still paging.
const PAGING_QUIET: std::time::Duration = std::time::Duration::from_secs(5);

impl Deferred {
    fn note(&self, user: &BareJid, messages: bool, requests: bool) {
        let mut users = self.users.lock().expect("deferred lock");
        let pending = users.entry(user.clone()).or_insert(Pending {
            since: Instant::now(),
            messages: false,
            requests: false,
        });
        pending.messages |= messages;
        pending.requests |= requests;
    }

    /// A message for `user` went to offline storage.
    pub(crate) fn stored_message(&self, user: &BareJid) {
        self.note(user, true, false);
    }

    /// A subscription request for `user` waits for their next login.
    pub(crate) fn stored_request(&self, user: &BareJid) {
        self.note(user, false, true);
    }

    /// A session of `user` took a page of offline messages; `done` once it
    /// found none left.
    pub(crate) fn paged(&self, user: &BareJid, done: bool) {
        let mut paging = self.paging.lock().expect("deferred lock");
        if done {
            paging.remove(user);
        } else {
            paging.insert(user.clone(), Instant::now());
        }
    }

    /// True while a session of `user` on this node takes its offline messages.
    fn is_paging(&self, user: &BareJid) -> bool {
        let mut paging = self.paging.lock().expect("deferred lock");
        match paging.get(user) {
            Some(at) if at.elapsed() < PAGING_QUIET => true,
            Some(_) => {
                // That session ended (or stalled) with messages left.
                paging.remove(user);
                false
            }
            None => false,
        }
    }

    /// Takes the users noted before `confirmed`.
    fn due(&self, confirmed: Instant) -> Vec<(BareJid, Pending)> {
        let mut users = self.users.lock().expect("deferred lock");
        let due: Vec<(BareJid, Pending)> = users
            .iter()
            .filter(|(_, pending)| pending.since < confirmed)
            .map(|(user, pending)| (user.clone(), *pending))
            .collect();
        for (user, _) in &due {
            users.remove(user);
        }
        due
    }
}

impl Router {
    /// Notes every user with a session on this node, to look at their
    /// stored messages once the registry is current: after an outage of the
    /// bus, other nodes may have stored messages for them that nobody is left
    /// to hand over. (Subscription requests are not sent again: their
    /// clients may have shown them already.) Returns how many users were noted.
    pub fn defer_local_users(&self) -> usize {
        let users: std::collections::HashSet<BareJid> = self
            .bus
            .local_routes()
            .iter()
            .map(|route| route.jid.to_bare())
            .collect();
        for user in &users {
            self.deferred.stored_message(user);
        }
        users.len()
    }

    /// A session of `user` ended holding stored messages its client never
    /// took (left stored in their place): another session of the user that
    /// is past its initial presence would never read them, so they are
    /// looked at again like any message stored while its user was online.
    pub fn kept_stored(&self, user: &BareJid) {
        self.deferred.stored_message(user);
    }

    /// Gives stored messages and pending subscription requests to users who
    /// turn out to have available sessions (see the module documentation).
    /// Returns how many stanzas went out.
    pub async fn redeliver_deferred(&self) -> usize {
        let Some(confirmed) = self.bus.registry_confirmed() else {
            return 0;
        };
        let mut sent = 0;
        for (user, pending) in self.deferred.due(confirmed) {
            let routes = self.bus.routes(&user);
            if pending.requests {
                sent += self.resend_requests(&user, &routes).await;
            }
            let deliverable = matches!(
                rules::message_to_bare(MessageType::Chat, &routes),
                MessageOutcome::Deliver(_)
            );
            // On one node the view is never behind: a user who comes
            // online reads their stored messages at their initial presence.
            if pending.messages && deliverable && self.bus.registry_can_lag() {
                if self.deferred.is_paging(&user) {
                    // Its session takes them; looked at again later.
                    self.deferred.stored_message(&user);
                } else {
                    sent += self.redeliver_offline(&user).await;
                }
            }
        }
        sent
    }

    async fn resend_requests(
        &self,
        user: &BareJid,
        routes: &[std::sync::Arc<rookery_cluster::Route>],
    ) -> usize {
        let targets = rules::presence_to_bare(routes);
        if targets.is_empty() {
            return 0;
        }
        let requests = match self.store.subscription_requests(user).await {
            Ok(requests) => requests,
            Err(error) => {
                tracing::warn!(%user, %error, "Subscription requests could not be read.");
                self.deferred.stored_request(user);
                return 0;
            }
        };
        let mut sent = 0;
        for (_, stanza) in requests {
            if let Ok(mut request) = stanza.parse::<Element>() {
                set_attr(&mut request, "to", user.to_string());
                self.send_each(&targets, &request).await;
                sent += 1;
            }
        }
        sent
    }

    /// Delivers the oldest page of the user's stored messages to their
    /// available sessions and only then removes what was delivered (through
    /// the bus, a delivery is durable once handed over): a node killed in
    /// between leaves them stored, to be delivered again. Stops at the first
    /// message no session took, so that the rest keeps its order.
    async fn redeliver_offline(&self, user: &BareJid) -> usize {
        if !self.bus.healthy() {
            // Without NATS a delivery would only reach an inbox in memory:
            // looked at again once it is back.
            self.deferred.stored_message(user);
            return 0;
        }
        let stored = match self.store.read_offline(user, 0, crate::OFFLINE_PAGE).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%user, %error, "Deferred messages could not be read.");
                self.deferred.stored_message(user);
                return 0;
            }
        };
        if !stored.is_empty() {
            // A page at a time: looked at again on the next round.
            self.deferred.stored_message(user);
        }
        let mut done = Vec::with_capacity(stored.len());
        for (id, message) in self.parse_stored(user, stored).await {
            let message_type = MessageType::of(&message);
            let routes = self.bus.routes(user);
            let MessageOutcome::Deliver(targets) = rules::message_to_bare(message_type, &routes)
            else {
                break;
            };
            if self
                .deliver_to_targets(message, message_type, user, &targets, &routes, None)
                .await
                .is_err()
            {
                break;
            }
            done.push(id);
        }
        let sent = done.len();
        self.remove_stored(user, &done).await;
        sent
    }
}
