//! Routing of stanzas between the sessions of one domain: RFC 6120 section 10
//! and RFC 6121 (rosters, subscriptions, presence, delivery rules), plus the
//! routing parts of blocking (XEP-0191) and offline storage (XEP-0160). XEP
//! modules (rookery-ext) act through [`Extension`]: its iq table and hooks
//! (message carbons copy routed messages, client state indication holds
//! deliveries).
//!
//! The router never names a socket, SQL or NATS: it talks to storage through
//! `rookery_store::Store` and to other sessions through `rookery_cluster::Bus`.
//! Iqs addressed to the server or an account go to the [`Extension`] registry.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_cluster::{Bus, Durability, Inbox, Mailbox, Route, SessionId, SessionSnapshot};
use rookery_store::{LastActivity, OfflineMessage, Quota, Store, StoreError};
use rookery_stream::ns;
use rookery_stream::xml::{remove_attr, set_attr};

mod address;
mod blocking;
mod component;
mod deferred;
mod delivery;
mod extension;
mod iq;
mod item_locks;
mod message;
mod presence;
mod roster;
pub mod rules;
mod session;
pub mod stanza;
pub mod subscription;

pub use address::Destination;
pub use blocking::is_blocked;
pub use component::{COMPONENT_RESOURCE, ComponentSession, MAX_COMPONENT_DIRECTED};
pub use delivery::is_server_push;
pub use extension::{Extension, Hooks, IqContext, IqTarget, IqType, Routed, SessionEvent, Side};
pub use session::Session;
use stanza::{ErrorCondition, Kind, error_reply};

/// Namespaces the router itself implements.
pub mod namespaces {
    /// RFC 6121 rosters.
    pub const ROSTER: &str = "jabber:iq:roster";
    /// XEP-0280 message carbons.
    pub const CARBONS: &str = "urn:xmpp:carbons:2";
    /// XEP-0297 stanza forwarding.
    pub const FORWARD: &str = "urn:xmpp:forward:0";
    /// XEP-0334 processing hints.
    pub const HINTS: &str = "urn:xmpp:hints";
    /// XEP-0203 delayed delivery.
    pub const DELAY: &str = "urn:xmpp:delay";
    /// XEP-0191 blocking command.
    pub const BLOCKING: &str = "urn:xmpp:blocking";
    /// XEP-0191 blocked error condition.
    pub const BLOCKING_ERRORS: &str = "urn:xmpp:blocking:errors";
    /// XEP-0352 client state indication.
    pub const CSI: &str = "urn:xmpp:csi:0";
    /// RFC 6121 roster versioning stream feature.
    pub const ROSTER_VERSIONING: &str = "urn:xmpp:features:rosterver";
    /// RFC 6121 subscription pre-approval stream feature.
    pub const PRE_APPROVAL: &str = "urn:xmpp:features:pre-approval";
}

/// Settings of the router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The domain served.
    pub domain: String,
    /// What offline storage keeps per account (messages and bytes).
    pub offline_quota: Quota,
    /// Most roster items per account.
    pub max_roster_items: usize,
    /// Bytes of stanzas a session's inbox holds before it overflows (the
    /// session then ends: its client does not keep up).
    pub inbox_bytes: usize,
    /// Domains of the external components (XEP-0114) that may connect.
    pub components: Vec<String>,
}

impl RouterConfig {
    /// Defaults for `domain`.
    pub fn new(domain: impl Into<String>) -> Self {
        RouterConfig {
            domain: domain.into(),
            offline_quota: Quota {
                items: 1000,
                bytes: 8 * 1024 * 1024,
            },
            max_roster_items: 2000,
            inbox_bytes: rookery_cluster::DEFAULT_INBOX_BYTES,
            components: Vec::new(),
        }
    }
}

/// Offline messages go to a client a page at a time: the next page only
/// once the client took the last one (see [`Router::next_offline_page`]).
pub const OFFLINE_PAGE: Quota = Quota {
    items: 50,
    bytes: 128 * 1024,
};

/// Most entities one session may send directed presence to (RFC 6121
/// section 4.6: each gets unavailable presence when the session ends).
pub const MAX_DIRECTED_PRESENCE: usize = 1000;

/// A session rebuilt from a snapshot.
#[derive(Debug)]
pub struct Restored {
    /// The router session.
    pub session: Session,
    /// The inbox, when it moved with the session.
    pub inbox: Option<rookery_cluster::Inbox>,
    /// Stream management state to resume with.
    pub sm: rookery_stream::SmState,
    /// Receipts of the unacknowledged stanzas.
    pub receipts: Vec<(u32, rookery_cluster::Receipt)>,
}

/// Why binding a resource failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The bus refused (cluster backend unreachable).
    #[error("bus unavailable")]
    Unavailable,
}

/// Routes stanzas for one domain.
pub struct Router {
    config: RouterConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    extensions: Vec<Arc<dyn Extension>>,
    /// Which module answers an iq payload: namespace, then element name.
    iq_table: HashMap<&'static str, HashMap<&'static str, Arc<dyn Extension>>>,
    /// The services modules host, by domain (`conference.<domain>`).
    services: HashMap<String, Arc<dyn Extension>>,
    /// The external components' domains, by domain.
    components: HashMap<String, BareJid>,
    /// The modules with [`Hooks::stanza`].
    stanza_hooks: Vec<Arc<dyn Extension>>,
    /// The modules with [`Hooks::delivery`].
    delivery_hooks: Vec<Arc<dyn Extension>>,
    /// The modules with [`Hooks::session`].
    session_hooks: Vec<Arc<dyn Extension>>,
    /// The modules with [`Hooks::routed`], with their marks.
    routed_hooks: Vec<(&'static str, Arc<dyn Extension>)>,
    started: Instant,
    shutting_down: AtomicBool,
    /// XEP-0191 block lists of the accounts with sessions on this node.
    blocklists: blocking::BlocklistCache,
    /// Users who got messages or subscription requests stored for later;
    /// see [`redeliver_deferred`](Router::redeliver_deferred).
    deferred: deferred::Deferred,
    /// Serialises changes to one roster item on this node.
    item_locks: item_locks::ItemLocks,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("domain", &self.config.domain)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// XEP-0082 date-time for unix milliseconds.
pub fn xmpp_datetime(millis: i64) -> String {
    chrono::DateTime::from_timestamp_millis(millis)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Router {
    /// A router over a store and a bus, with XEP modules.
    ///
    /// # Panics
    /// When two modules claim the same iq payload.
    pub fn new(
        config: RouterConfig,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        extensions: Vec<Arc<dyn Extension>>,
    ) -> Self {
        let mut iq_table: HashMap<&'static str, HashMap<&'static str, Arc<dyn Extension>>> =
            HashMap::new();
        for extension in &extensions {
            for &(namespace, name) in extension.iq_payloads() {
                let claimed = iq_table
                    .entry(namespace)
                    .or_default()
                    .insert(name, extension.clone());
                assert!(
                    claimed.is_none(),
                    "two modules answer <{name} xmlns='{namespace}'/>"
                );
            }
        }
        let services = extensions
            .iter()
            .filter_map(|extension| {
                let label = extension.service()?;
                Some((format!("{label}.{}", config.domain), extension.clone()))
            })
            .collect();
        let components = config
            .components
            .iter()
            .filter_map(|domain| Some((domain.clone(), BareJid::new(domain).ok()?)))
            .collect();
        let with = |hook: fn(Hooks) -> bool| -> Vec<Arc<dyn Extension>> {
            extensions
                .iter()
                .filter(|extension| hook(extension.hooks()))
                .cloned()
                .collect()
        };
        Router {
            config,
            store,
            bus,
            stanza_hooks: with(|hooks| hooks.stanza),
            delivery_hooks: with(|hooks| hooks.delivery),
            session_hooks: with(|hooks| hooks.session),
            routed_hooks: extensions
                .iter()
                .filter_map(|extension| Some((extension.hooks().routed?, extension.clone())))
                .collect(),
            iq_table,
            services,
            components,
            extensions,
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            blocklists: blocking::BlocklistCache::default(),
            deferred: deferred::Deferred::default(),
            item_locks: item_locks::ItemLocks::default(),
        }
    }

    /// The domain served.
    pub fn domain(&self) -> &str {
        &self.config.domain
    }

    /// The store.
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// The bus.
    pub fn bus(&self) -> &dyn Bus {
        &*self.bus
    }

    /// Settings.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// When the router started (XEP-0012 server uptime).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Disco features of the server: the router's own and every module's.
    pub fn server_features(&self) -> Vec<&'static str> {
        let mut features = vec![
            namespaces::ROSTER,
            namespaces::CARBONS,
            namespaces::BLOCKING,
            "msgoffline",
            "jabber:iq:roster",
            "urn:xmpp:sm:3",
        ];
        for extension in &self.extensions {
            features.extend_from_slice(extension.server_features());
        }
        features.sort_unstable();
        features.dedup();
        features
    }

    /// Disco features of accounts.
    pub fn account_features(&self) -> Vec<&'static str> {
        let mut features = Vec::new();
        for extension in &self.extensions {
            features.extend_from_slice(extension.account_features());
        }
        features.sort_unstable();
        features.dedup();
        features
    }

    /// Stream features offered after authentication: the router's own and
    /// every module's.
    pub fn stream_features(&self) -> Vec<Element> {
        let mut features = vec![
            Element::bare("ver", namespaces::ROSTER_VERSIONING),
            Element::bare("sub", namespaces::PRE_APPROVAL),
        ];
        for extension in &self.extensions {
            features.extend(extension.stream_features());
        }
        features
    }

    /// True if `jid` is an account of this domain (syntactically).
    pub fn is_local(&self, jid: &Jid) -> bool {
        jid.domain().as_str() == self.config.domain
    }

    /// Marks the server as stopping: undeliverable stanzas go straight to offline storage.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    // ---- session lifecycle ------------------------------------------------------------

    /// Binds a session for `user`, at `requested` or at a server-made resource.
    ///
    /// A session already bound at the same full JID is told to end with `conflict`.
    pub async fn bind(
        &self,
        user: &BareJid,
        requested: Option<FullJid>,
        mailbox: Mailbox,
    ) -> Result<Session, BindError> {
        let jid = match requested {
            Some(jid) => jid,
            None => loop {
                let resource = format!("rookery-{}", rookery_stream::random_id());
                let jid = user
                    .with_resource_str(&resource)
                    .expect("generated resources are valid");
                if self.bus.route(&jid).is_none() {
                    break jid;
                }
            },
        };
        self.load_blocklist(user).await;
        let session = Session::new(jid, SessionId::next(), mailbox);
        let route = self.route_of(&session);
        let replaced = self
            .bus
            .bind(route)
            .await
            .map_err(|_| BindError::Unavailable)?;
        if let Some(replaced) = replaced {
            tracing::info!(jid = %session.jid, "Replacing an older session with the same resource.");
            self.bus
                .close(&replaced, rookery_stream::Condition::Conflict.into())
                .await;
        }
        let mut session = session;
        self.session_event(&mut session, SessionEvent::Bound).await;
        Ok(session)
    }

    /// The bus entry of a session on this node.
    fn route_of(&self, session: &Session) -> Route {
        Route {
            jid: session.jid.clone(),
            session: session.id,
            node: self.bus.node(),
            info: session.info.clone(),
            mailbox: Some(session.mailbox.clone()),
        }
    }

    /// Tells the modules with [`Hooks::session`] that the session reached `event`.
    async fn session_event(&self, session: &mut Session, event: SessionEvent) {
        for module in &self.session_hooks {
            module.on_session(self, session, event).await;
        }
    }

    /// Rebuilds a session from a snapshot, without touching the bus.
    pub fn session_from_snapshot(&self, snapshot: SessionSnapshot, mailbox: Mailbox) -> Restored {
        let SessionSnapshot {
            jid,
            session: id,
            info,
            sm,
            receipts,
            directed,
            offline_after,
            modules,
            inbox,
        } = snapshot;
        let mut session = Session::new(jid, id, mailbox);
        session.info = info;
        session.directed = directed.into_iter().collect();
        session.offline_after = offline_after;
        session.modules = modules;
        // Offline messages may still wait (the paging stopped with the
        // connection): one look at storage finds out, an empty page ends it.
        session.offline_pending = session.info.available() && session.info.priority >= 0;
        Restored {
            session,
            inbox,
            sm,
            receipts,
        }
    }

    /// Takes over the session at `previous` for a resuming connection on this
    /// node: moves its inbox when it was on this node, else registers it here.
    pub async fn restore(
        &self,
        snapshot: SessionSnapshot,
        previous: &Route,
    ) -> Result<(Restored, Inbox), BindError> {
        self.load_blocklist(&snapshot.jid.to_bare()).await;
        match (snapshot.inbox.is_some(), &previous.mailbox) {
            (true, Some(mailbox)) => {
                let mut restored = self.session_from_snapshot(snapshot, mailbox.clone());
                let inbox = restored.inbox.take().expect("checked above");
                self.session_event(&mut restored.session, SessionEvent::Resumed)
                    .await;
                Ok((restored, inbox))
            }
            _ => {
                let (mailbox, inbox) = Mailbox::bounded(self.config.inbox_bytes);
                let mut restored = self.session_from_snapshot(snapshot, mailbox);
                let route = self.route_of(&restored.session);
                // The previous holder handed the session over: nothing to close there.
                self.bus
                    .bind(route)
                    .await
                    .map_err(|_| BindError::Unavailable)?;
                self.session_event(&mut restored.session, SessionEvent::Resumed)
                    .await;
                Ok((restored, inbox))
            }
        }
    }

    /// Makes the session resumable under `id` (XEP-0198).
    pub async fn register_resumable(&self, session: &Session, id: &str) {
        if let Err(error) = self
            .bus
            .register_resumable(id, &session.jid, session.id)
            .await
        {
            tracing::warn!(jid = %session.jid, %error, "Session could not be made resumable.");
        }
    }

    /// The session resumable under `id`, if any.
    pub async fn resumable(&self, id: &str) -> Option<Arc<Route>> {
        self.bus.resumable(id).await
    }

    /// Forgets a resumption id.
    pub async fn unregister_resumable(&self, id: &str) {
        let _ = self.bus.unregister_resumable(id).await;
    }

    /// Ends a session: unavailable presence to whoever saw it (which records the
    /// last activity), the bus entry removed, and every stanza the client did not
    /// acknowledge rerouted (other resources, offline storage, or an error to
    /// the sender) so that nothing is silently dropped.
    pub async fn end_session(&self, mut session: Session, undelivered: Vec<Element>) {
        if session.info.available() && !session.replaced {
            let mut unavailable = Element::bare("presence", ns::CLIENT);
            set_attr(&mut unavailable, "type", "unavailable");
            set_attr(&mut unavailable, "from", session.jid.to_string());
            self.handle_broadcast_presence(&mut session, unavailable)
                .await;
        }
        if let Err(error) = self.bus.unbind(&session.jid, session.id).await {
            tracing::warn!(jid = %session.jid, %error, "Session could not be unbound.");
        }
        if self.bus.routes(&session.user()).is_empty() {
            self.blocklists.forget(&session.user());
        }
        self.session_event(&mut session, SessionEvent::Ended).await;
        for stanza in undelivered {
            self.reroute_undelivered(&session, stanza).await;
        }
    }

    /// Records when `user` was last seen (XEP-0012).
    pub(crate) async fn record_last_activity(&self, user: &BareJid, status: Option<String>) {
        let last = LastActivity {
            at: unix_millis() / 1000,
            status,
        };
        if let Err(error) = self.store.set_last_activity(user, &last).await {
            tracing::warn!(%user, %error, "Last activity could not be stored.");
        }
    }

    /// Handles a stanza the session could not get to its client.
    async fn reroute_undelivered(&self, session: &Session, stanza: Element) {
        self.reroute_stranded(&session.jid, stanza).await;
    }

    /// Handles a stanza that could not reach the session `to`: messages go to
    /// the user's other resources or offline storage, requests get an error.
    async fn reroute_stranded(&self, to: &FullJid, stanza: Element) {
        if let Destination::Component(domain) = self.resolve(&Jid::from(to.clone())) {
            // A component that went away: it may be connected again elsewhere.
            if let Some(error) = self.to_component(&domain, stanza).await {
                self.route(error).await;
            }
            return;
        }
        match Kind::of(&stanza) {
            Some(Kind::Message) => {
                if self
                    .routed_hooks
                    .iter()
                    .any(|(_, module)| module.is_copy(&stanza))
                {
                    // The original went to another resource of the same account.
                    tracing::debug!(jid = %to, "Dropping an undelivered copy (carbons); its original was delivered elsewhere.");
                    return;
                }
                if stanza::MessageType::of(&stanza) == stanza::MessageType::Error {
                    tracing::debug!(jid = %to, "Dropping an undelivered error message.");
                    return;
                }
                self.route_to_user_except(stanza, &to.to_bare(), Some(to))
                    .await;
            }
            Some(Kind::Iq) if !stanza::is_error_or_result(&stanza) => {
                let error = error_reply(&stanza, ErrorCondition::RECIPIENT_UNAVAILABLE, None, None);
                self.route(error).await;
            }
            _ => {
                tracing::debug!(jid = %to, name = stanza.name(), "Dropping undelivered presence or iq response.")
            }
        }
    }

    /// Stores a message for later delivery, adding a XEP-0203 delay stamp.
    async fn store_offline(&self, user: &BareJid, mut message: Element) -> Result<(), StoreError> {
        let stored_at = unix_millis();
        if message.get_child("delay", namespaces::DELAY).is_none() {
            let mut delay = Element::builder("delay", namespaces::DELAY)
                .append("Offline Storage")
                .build();
            set_attr(&mut delay, "from", self.config.domain.as_str());
            set_attr(&mut delay, "stamp", xmpp_datetime(stored_at));
            message.append_child(delay);
        }
        let stanza = String::from(&message);
        self.store
            .push_offline(
                user,
                &OfflineMessage { stored_at, stanza },
                self.config.offline_quota,
            )
            .await
    }

    // ---- stanzas from a client ----------------------------------------------------------

    /// Handles a stanza the session's client sent (`from` already stamped).
    pub async fn handle_stanza(&self, session: &mut Session, mut stanza: Element) {
        for module in &self.stanza_hooks {
            match module.on_stanza(self, session, stanza).await {
                Some(passed) => stanza = passed,
                None => return,
            }
        }
        let to = match stanza::to(&stanza) {
            Ok(to) => to,
            Err(_) => {
                if !stanza::is_error_or_result(&stanza) {
                    session.outbox.push(error_reply(
                        &stanza,
                        ErrorCondition::JID_MALFORMED,
                        None,
                        None,
                    ));
                }
                return;
            }
        };
        if let Some(to) = &to
            && !self.is_own(session, to)
            && self.blocks(&session.account, to).await
        {
            return self.refuse_to_blocked(session, &stanza);
        }
        // Presence and iq handling are deep (rosters, storage, modules); boxing them keeps
        // the future every idle session holds small. Messages, the hot path, stay inline.
        match Kind::of(&stanza) {
            Some(Kind::Message) => self.handle_message(session, stanza, to).await,
            Some(Kind::Presence) => Box::pin(self.handle_presence(session, stanza, to)).await,
            Some(Kind::Iq) => Box::pin(self.handle_iq(session, stanza, to)).await,
            None => {}
        }
    }

    fn is_own(&self, session: &Session, jid: &Jid) -> bool {
        (jid.node().is_some()
            && jid.node() == session.account.node()
            && jid.domain() == session.account.domain())
            || (jid.node().is_none() && self.is_local(jid))
    }

    /// XEP-0191 section 3.5: the user may not talk to whom they block.
    fn refuse_to_blocked(&self, session: &mut Session, stanza: &Element) {
        if stanza.name() == "presence" || stanza::is_error_or_result(stanza) {
            return;
        }
        let blocked = Element::bare("blocked", namespaces::BLOCKING_ERRORS);
        session.outbox.push(error_reply(
            stanza,
            ErrorCondition::NOT_ACCEPTABLE,
            None,
            Some(blocked),
        ));
    }

    /// Routes a stanza that does not come from a session's own processing
    /// (errors, server-generated stanzas): by its `to`.
    pub async fn route(&self, stanza: Element) {
        let Ok(Some(to)) = stanza::to(&stanza) else {
            return;
        };
        match self.resolve(&to) {
            Destination::Account => {}
            Destination::Service(module) => return module.handle_service(self, stanza).await,
            Destination::Component(domain) => {
                if let Some(error) = self.to_component(&domain, stanza).await {
                    Box::pin(self.route(error)).await;
                }
                return;
            }
            Destination::Server | Destination::Remote => return,
        }
        match Kind::of(&stanza) {
            Some(Kind::Message) => {
                let message_type = stanza::MessageType::of(&stanza);
                self.route_message_to(stanza, message_type, &to, None).await
            }
            Some(Kind::Presence) => self.deliver_presence(stanza, &to).await,
            Some(Kind::Iq) => {
                if let Ok(full) = to.try_as_full()
                    && let Some(route) = self.bus.route(full)
                {
                    let _ = self.send_to(&route, stanza).await;
                }
            }
            None => {}
        }
    }

    /// Sends a stanza to one session; on failure the stanza is handed back.
    /// Messages are delivered durably (they survive a node failure once this
    /// returns); presence and iq are sent on their way.
    async fn send_to(&self, route: &Route, stanza: Element) -> Result<(), Element> {
        let durability = if stanza.name() == "message" {
            Durability::Durable
        } else {
            Durability::BestEffort
        };
        self.bus.deliver(route, stanza, durability).await
    }

    /// Sends a copy of `stanza` to each route with `to` set to the route's
    /// JID: messages one by one (durably), presence and iqs best effort, the
    /// routes of one node in one delivery ([`Bus::deliver_each`]).
    async fn send_each(&self, routes: &[Arc<Route>], stanza: &Element) {
        if stanza.name() != "message" {
            return self.bus.deliver_each(routes, stanza).await;
        }
        for route in routes {
            let mut copy = stanza.clone();
            set_attr(&mut copy, "to", route.jid.to_string());
            if self.send_to(route, copy).await.is_err() {
                tracing::debug!(jid = %route.jid, "Session went away before delivery.");
            }
        }
    }

    /// Pushes a roster change (an iq set) to every session of `user`: each
    /// drops its cached subscribers, and passes the push on to its client if
    /// the client fetched the roster (RFC 6121 2.1.6, "interested resources").
    pub async fn push_roster_change(&self, user: &BareJid, stanza: &Element) {
        self.send_each(&self.bus.routes(user), stanza).await;
    }

    /// Sends `stanza` to every session of `user`.
    pub async fn send_to_all_sessions(&self, user: &BareJid, stanza: &Element) {
        self.send_each(&self.bus.routes(user), stanza).await;
    }

    /// Updates the session's routing state in the bus.
    pub async fn publish_route_info(&self, session: &Session) {
        if let Err(error) = self
            .bus
            .update(&session.jid, session.id, session.info.clone())
            .await
        {
            tracing::warn!(jid = %session.jid, %error, "Routing state could not be published.");
        }
    }

    /// Tells every session of `user` to end with `condition`.
    pub async fn close_sessions(&self, user: &BareJid, condition: rookery_stream::Condition) {
        for route in self.bus.routes(user) {
            self.bus.close(&route, condition.into()).await;
        }
    }

    /// Answers an iq sent before authentication (in-band registration).
    pub async fn handle_unauthenticated_iq(&self, iq: &Element) -> Element {
        for extension in &self.extensions {
            if let Some(reply) = extension.handle_unauthenticated_iq(self, iq).await {
                return reply;
            }
        }
        error_reply(iq, ErrorCondition::SERVICE_UNAVAILABLE, None, None)
    }
}

#[async_trait::async_trait]
impl rookery_cluster::Recovery for Router {
    async fn reroute(&self, to: FullJid, stanza: Element) {
        // The full JID may be bound again by now (a resumption elsewhere, or a
        // new login after its node died): that session gets it. A route of this
        // node without a live inbox is the stranded session itself.
        let live = |route: &Route| {
            route.node != self.bus.node()
                || route
                    .mailbox
                    .as_ref()
                    .is_some_and(|mailbox| !mailbox.is_closed())
        };
        if let Some(route) = self.bus.route(&to)
            && live(&route)
        {
            match self.send_to(&route, stanza).await {
                Ok(()) => return,
                Err(stanza) => return self.reroute_stranded(&to, stanza).await,
            }
        }
        self.reroute_stranded(&to, stanza).await
    }

    async fn session_lost(&self, route: Route) {
        let (mailbox, _inbox) = Mailbox::new();
        let mut session = Session::new(route.jid.clone(), route.session, mailbox);
        session.info = route.info.clone();
        if session.info.available() {
            let mut unavailable = Element::bare("presence", ns::CLIENT);
            set_attr(&mut unavailable, "type", "unavailable");
            set_attr(&mut unavailable, "from", session.jid.to_string());
            self.handle_broadcast_presence(&mut session, unavailable)
                .await;
        }
        tracing::info!(jid = %route.jid, "Session lost with its node.");
    }

    fn registered_anew(&self) {
        let users = self.defer_local_users();
        tracing::info!(
            users,
            "Sessions registered anew; looking for what was stored for their users meanwhile."
        );
    }
}

/// Removes addressing a client must not set on a stanza we keep or forward.
pub(crate) fn strip_to(stanza: &mut Element) {
    remove_attr(stanza, "to");
}

#[cfg(test)]
mod tests;
