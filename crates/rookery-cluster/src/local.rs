//! [`LocalBus`]: the registry and delivery of a single node, in memory.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;

use crate::{Bus, BusError, Durability, Receipt, Route, RouteInfo, SessionId, SessionSnapshot};
use rookery_stream::StreamError;

/// The in-process bus of a single node.
#[derive(Debug, Default)]
pub struct LocalBus {
    /// Sessions by account; a handful of resources each. Looked up for every
    /// stanza, so hashed with foldhash (randomly seeded per process) rather
    /// than SipHash; its keys are accounts that have authenticated.
    users: RwLock<foldhash::HashMap<BareJid, Vec<Arc<Route>>>>,
    /// Resumption ids and the session they resume.
    resumable: RwLock<HashMap<String, (FullJid, SessionId)>>,
}

impl LocalBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn node(&self) -> crate::NodeId {
        0
    }

    async fn bind(&self, route: Route) -> Result<Option<Route>, BusError> {
        let mut users = self.users.write().expect("bus lock");
        let routes = users.entry(route.jid.to_bare()).or_default();
        let replaced = routes
            .iter()
            .position(|existing| existing.jid == route.jid)
            .map(|index| routes.swap_remove(index));
        routes.push(Arc::new(route));
        Ok(replaced.map(Arc::unwrap_or_clone))
    }

    async fn update(
        &self,
        jid: &FullJid,
        session: SessionId,
        info: RouteInfo,
    ) -> Result<(), BusError> {
        let mut users = self.users.write().expect("bus lock");
        if let Some(routes) = users.get_mut(&jid.to_bare())
            && let Some(route) = routes
                .iter_mut()
                .find(|route| route.jid == *jid && route.session == session)
        {
            let mut updated = Route::clone(route);
            updated.info = info;
            *route = Arc::new(updated);
        }
        Ok(())
    }

    async fn unbind(&self, jid: &FullJid, session: SessionId) -> Result<(), BusError> {
        let bare = jid.to_bare();
        let mut users = self.users.write().expect("bus lock");
        if let Some(routes) = users.get_mut(&bare) {
            routes.retain(|route| !(route.jid == *jid && route.session == session));
            if routes.is_empty() {
                users.remove(&bare);
            }
        }
        Ok(())
    }

    fn routes(&self, user: &BareJid) -> Vec<Arc<Route>> {
        let users = self.users.read().expect("bus lock");
        let Some(routes) = users.get(user) else {
            return Vec::new();
        };
        // A session whose inbox is gone (its task ended abnormally) is no target.
        routes
            .iter()
            .filter(|route| {
                route
                    .mailbox
                    .as_ref()
                    .is_some_and(|mailbox| !mailbox.is_closed())
            })
            .cloned()
            .collect()
    }

    fn route(&self, jid: &FullJid) -> Option<Arc<Route>> {
        let users = self.users.read().expect("bus lock");
        users
            .get(&jid.to_bare())?
            .iter()
            .find(|route| route.jid == *jid)
            .cloned()
    }

    async fn deliver(
        &self,
        route: &Route,
        stanza: Element,
        _durability: Durability,
    ) -> Result<(), Element> {
        // One process: a delivery is as durable as the process itself.
        match &route.mailbox {
            Some(mailbox) => mailbox.send_stanza(stanza),
            None => Err(stanza),
        }
    }

    async fn close(&self, route: &Route, error: StreamError) {
        if let Some(mailbox) = &route.mailbox {
            let _ = mailbox.send(crate::Mail::Close(error));
        }
    }

    async fn take_over(&self, route: &Route) -> Option<SessionSnapshot> {
        crate::take_over_local(route.mailbox.as_ref()?).await
    }

    async fn acknowledge(&self, _receipt: Receipt) {}

    async fn register_resumable(
        &self,
        id: &str,
        jid: &FullJid,
        session: SessionId,
    ) -> Result<(), BusError> {
        self.resumable
            .write()
            .expect("bus lock")
            .insert(id.to_owned(), (jid.clone(), session));
        Ok(())
    }

    async fn unregister_resumable(&self, id: &str) -> Result<(), BusError> {
        self.resumable.write().expect("bus lock").remove(id);
        Ok(())
    }

    async fn resumable(&self, id: &str) -> Option<Arc<Route>> {
        let (jid, session) = self.resumable.read().expect("bus lock").get(id).cloned()?;
        self.route(&jid).filter(|route| route.session == session)
    }

    fn local_sessions(&self) -> usize {
        self.users
            .read()
            .expect("bus lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    fn local_routes(&self) -> Vec<Arc<Route>> {
        self.users
            .read()
            .expect("bus lock")
            .values()
            .flatten()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests;
