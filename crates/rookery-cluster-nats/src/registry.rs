//! The session registry: the KV bucket of bound sessions, this node's view
//! of it (`View`, read for every stanza), the watch that keeps the view in
//! step, its checks and catch-up, and putting this node's sessions back
//! after NATS lost its store.

use super::*;

/// What this node knows of the registry.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Read for every stanza: foldhash, as [`rookery_cluster::LocalBus`]'s registry.
    pub(crate) users: foldhash::HashMap<BareJid, Vec<Arc<Route>>>,
    pub(crate) revisions: HashMap<FullJid, u64>,
}

impl View {
    pub(crate) fn get(&self, jid: &FullJid) -> Option<&Arc<Route>> {
        self.users
            .get(&jid.to_bare())?
            .iter()
            .find(|route| route.jid == *jid)
    }

    pub(crate) fn upsert(&mut self, route: Route, revision: u64) {
        let jid = route.jid.clone();
        let routes = self.users.entry(jid.to_bare()).or_default();
        routes.retain(|existing| existing.jid != jid);
        routes.push(Arc::new(route));
        self.revisions.insert(jid, revision);
    }

    /// Forgets the routes of JIDs the registry lacks (`registered`: those
    /// it holds), except this node's live sessions (`local`): a registry
    /// made again by a peer after NATS lost its store lacks them until this
    /// node registers them anew, from this view (`restore_state`).
    pub(crate) fn forget_unregistered(
        &mut self,
        registered: &HashSet<FullJid>,
        node: NodeId,
        local: &Local,
    ) {
        let stale: Vec<FullJid> = self
            .users
            .values()
            .flatten()
            .filter(|route| !registered.contains(&route.jid) && !is_live_here(route, node, local))
            .map(|route| route.jid.clone())
            .collect();
        for jid in stale {
            self.remove(&jid);
        }
    }

    pub(crate) fn remove(&mut self, jid: &FullJid) {
        let bare = jid.to_bare();
        if let Some(routes) = self.users.get_mut(&bare) {
            routes.retain(|route| route.jid != *jid);
            if routes.is_empty() {
                self.users.remove(&bare);
            }
        }
        self.revisions.remove(jid);
    }
}

/// This node's sessions: session instance and inbox by full JID.
pub(crate) type Local = foldhash::HashMap<FullJid, (SessionId, Mailbox)>;

/// True when `route` is a live session of this node (`node`): `local` holds
/// that very session instance.
pub(crate) fn is_live_here(route: &Route, node: NodeId, local: &Local) -> bool {
    route.node == node
        && local
            .get(&route.jid)
            .is_some_and(|(own, _)| *own == route.session)
}

/// Keeps the view in step with the registry; `loaded` fires once it caught up.
pub(crate) async fn watch_sessions(
    bus: Arc<NatsBus>,
    mut loaded: Option<tokio::sync::oneshot::Sender<()>>,
) {
    loop {
        // JetStream requests may go unanswered while NATS servers fail over.
        let watch = tokio::time::timeout(PUBLISH_TIMEOUT, bus.sessions.watch_with_history(">"))
            .await
            .unwrap_or_else(|_| Err(kv::WatchError::new(kv::WatchErrorKind::TimedOut)));
        match watch {
            Ok(mut watch) => {
                let mut seen: Option<HashSet<FullJid>> = Some(HashSet::new());
                let empty = tokio::time::timeout(PUBLISH_TIMEOUT, bus.registry_info()).await;
                if matches!(empty, Ok(Ok(Some(info))) if info.state.messages == 0) {
                    seen = None;
                    // Nothing registered: the view is stale.
                    // (The view's lock before the sessions', as everywhere.)
                    let mut view = bus.view.write().expect("view lock");
                    let local = bus.local.read().expect("local lock");
                    view.forget_unregistered(&HashSet::new(), bus.node, &local);
                    drop((local, view));
                    if let Some(loaded) = loaded.take() {
                        let _ = loaded.send(());
                    }
                }
                loop {
                    let entry = tokio::select! {
                        entry = watch.next() => entry,
                        _ = bus.rewatch.notified() => break,
                    };
                    let Some(Ok(entry)) = entry else { break };
                    let jid = bus.apply(&entry.key, entry.operation, &entry.value, entry.revision);
                    if let (Some(seen), Some(jid)) = (&mut seen, jid) {
                        seen.insert(jid);
                    }
                    if entry.delta == 0 {
                        if let Some(seen) = seen.take() {
                            // Caught up: what the view has that the registry lacks is stale.
                            let mut view = bus.view.write().expect("view lock");
                            let local = bus.local.read().expect("local lock");
                            view.forget_unregistered(&seen, bus.node, &local);
                        }
                        if let Some(loaded) = loaded.take() {
                            let _ = loaded.send(());
                        }
                    }
                }
                tracing::warn!("The session registry watch ended; restarting it.");
            }
            Err(error) => {
                tracing::warn!(%error, "The session registry cannot be watched; retrying.")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Restarts the registry watch when it falls behind the registry: a watch
/// whose NATS server died can stay silent for a long time before noticing.
pub(crate) async fn check_registry(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut behind = 0;
    let mut known = 0;
    // Checks in a row that found the registry gone, or made anew: a NATS
    // server that restarted and is still catching up with its cluster may
    // answer so for a moment while the state is whole on the others.
    let mut missing = 0;
    let mut replacements = 0;
    let needed = if bus.config.replicas > 1 {
        LOST_STATE_CHECKS
    } else {
        1
    };
    loop {
        ticker.tick().await;
        if !bus.healthy() {
            continue;
        }
        let asked = Instant::now();
        let info = match tokio::time::timeout(PUBLISH_TIMEOUT, bus.registry_info()).await {
            Ok(Ok(Some(info))) => info,
            Ok(Ok(None)) => {
                bus.failing(&bus.registry_failing);
                missing += 1;
                if missing >= needed {
                    missing = 0;
                    bus.restore_state().await;
                    known = 0;
                }
                continue;
            }
            Ok(Err(error)) => {
                bus.failing(&bus.registry_failing);
                tracing::debug!(%error, "The session registry cannot be checked.");
                continue;
            }
            Err(_) => {
                bus.failing(&bus.registry_failing);
                tracing::debug!("The session registry check timed out.");
                continue;
            }
        };
        let replaced = {
            let mut created = bus.registry_created.lock().expect("registry lock");
            match &*created {
                Some(known) => known.created != info.created,
                None => {
                    *created = Some(info.clone());
                    false
                }
            }
        };
        missing = 0;
        if replaced {
            // A peer made the state again before this node noticed it was gone.
            replacements += 1;
            if replacements >= needed {
                replacements = 0;
                bus.restore_state().await;
                known = 0;
            }
            continue;
        }
        replacements = 0;
        *bus.registry_failing.lock().expect("readiness lock") = None;
        bus.retry_unregistered().await;
        let state = info.state;
        tracing::trace!(
            registry = state.last_sequence,
            applied = bus.applied.load(Ordering::Relaxed),
            "Registry check."
        );
        let mut applied = bus.applied.load(Ordering::Relaxed);
        if applied < known && state.last_sequence.saturating_sub(applied) <= CATCH_UP_LIMIT {
            // The watch still lacks revisions that existed a check ago: read
            // them one at a time, with plain requests, which work while
            // consumers are being moved.
            catch_up(&bus, applied + 1, state.last_sequence).await;
            applied = bus.applied.load(Ordering::Relaxed);
        }
        known = state.last_sequence;
        if state.last_sequence > applied {
            behind += 1;
        } else {
            behind = 0;
            *bus.confirmed.lock().expect("confirmed lock") = Some(asked);
        }
        // Once is a write in flight; twice in a row is a stuck watch.
        if behind >= 2 {
            tracing::warn!(
                registry = state.last_sequence,
                applied,
                "The session registry watch fell behind; restarting it."
            );
            bus.rewatch.notify_one();
            behind = 0;
        }
    }
}

/// Applies registry revisions `from..=to` read one by one; stops at the first
/// that cannot be read (a revision replaced since is skipped: its key has a
/// later one in the range).
pub(crate) async fn catch_up(bus: &NatsBus, from: u64, to: u64) {
    for revision in from..=to {
        let read = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            bus.sessions.stream.get_raw_message(revision),
        )
        .await;
        match read {
            Ok(Ok(message)) => {
                let Some(key) = message.subject.strip_prefix(bus.sessions.prefix.as_str()) else {
                    bus.applied.fetch_max(revision, Ordering::Relaxed);
                    continue;
                };
                let operation = match message.headers.get(KV_OPERATION).map(|v| v.as_str()) {
                    Some("DEL") => kv::Operation::Delete,
                    Some("PURGE") => kv::Operation::Purge,
                    _ => kv::Operation::Put,
                };
                bus.apply(key, operation, &message.payload, revision);
            }
            Ok(Err(error)) if error.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                bus.applied.fetch_max(revision, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, revision, "A registry revision cannot be read.");
                return;
            }
            Err(_) => return,
        }
    }
}

impl NatsBus {
    pub(crate) fn local_mailbox(&self, jid: &FullJid) -> Option<Mailbox> {
        self.local
            .read()
            .expect("local lock")
            .get(jid)
            .map(|(_, mailbox)| mailbox.clone())
    }

    /// The inbox of this very session instance, if it is on this node: a
    /// newer session of the same full JID must not be closed or taken over
    /// in its place.
    pub(crate) fn session_mailbox(&self, jid: &FullJid, session: SessionId) -> Option<Mailbox> {
        self.local
            .read()
            .expect("local lock")
            .get(jid)
            .filter(|(own, _)| *own == session)
            .map(|(_, mailbox)| mailbox.clone())
    }

    /// Applies one registry change to the view; closes a local session a newer bind replaced.
    pub(crate) fn apply(
        &self,
        key: &str,
        operation: kv::Operation,
        value: &[u8],
        revision: u64,
    ) -> Option<FullJid> {
        self.applied.fetch_max(revision, Ordering::Relaxed);
        let jid = subjects::session_jid(key)?;
        tracing::debug!(%jid, ?operation, revision, "Registry change.");
        let mut view = self.view.write().expect("view lock");
        if view
            .revisions
            .get(&jid)
            .is_some_and(|known| *known >= revision)
        {
            return Some(jid);
        }
        match operation {
            kv::Operation::Put => {
                let record: SessionRecord = serde_json::from_slice(value).ok()?;
                let session = SessionId(record.session);
                let mailbox = {
                    let mut local = self.local.write().expect("local lock");
                    match local.get(&jid) {
                        Some((own, mailbox)) if record.node == self.node && *own == session => {
                            Some(mailbox.clone())
                        }
                        // While a bind of this JID is being written, a write by this
                        // node for another session is the earlier session's last
                        // update; the bind under way follows it.
                        Some(_)
                            if record.node == self.node
                                && self.binding.lock().expect("binding lock").contains(&jid) =>
                        {
                            None
                        }
                        Some((_, mailbox)) => {
                            // A newer login elsewhere (or a resumption) took this full JID.
                            let _ = mailbox.send(Mail::Close(Condition::Conflict.into()));
                            local.remove(&jid);
                            None
                        }
                        None => None,
                    }
                };
                let route = Route {
                    jid: jid.clone(),
                    session,
                    node: record.node,
                    info: record.info(),
                    mailbox,
                };
                view.upsert(route, revision);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if !self.binding.lock().expect("binding lock").contains(&jid) {
                    self.close_removed(&jid);
                }
                view.remove(&jid);
            }
        }
        Some(jid)
    }

    /// A local session left the registry without this node removing it: a
    /// peer took this node for dead (it was cut off longer than the failure
    /// timeout) and cleaned up after it. Nobody can route to the session any
    /// more, so it ends and its client reconnects, binding anew.
    pub(crate) fn close_removed(&self, jid: &FullJid) {
        let Some((_, mailbox)) = self.local.write().expect("local lock").remove(jid) else {
            return;
        };
        tracing::warn!(%jid, "A peer removed this session from the registry; ending it.");
        let _ = mailbox.send(Mail::Close(StreamError::new(
            Condition::InternalServerError,
            "This node was cut off from its cluster; please reconnect.",
        )));
    }

    /// Removes the registry entry of a session of this node that ended. When
    /// NATS cannot take it now, it is tried again once NATS is back (the
    /// registry check), so that no contact sees a session that is gone.
    pub(crate) async fn remove_registration(
        &self,
        jid: &FullJid,
        session: SessionId,
        revision: Option<u64>,
    ) {
        if !self.healthy() {
            self.unregistered
                .lock()
                .expect("unregistered lock")
                .push((jid.clone(), session));
            return;
        }
        let delete = self
            .sessions
            .delete_expect_revision(subjects::session_key(jid), revision);
        match tokio::time::timeout(PUBLISH_TIMEOUT, delete).await {
            Ok(Ok(())) => {
                // A new bind of the same JID may have landed meanwhile: only
                // this session's entry goes.
                let mut view = self.view.write().expect("view lock");
                if view
                    .get(jid)
                    .is_some_and(|route| route.session == session && route.node == self.node)
                {
                    view.remove(jid);
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%jid, %error, "Session not unregistered (replaced meanwhile?).");
            }
            Err(_) => {
                self.unregistered
                    .lock()
                    .expect("unregistered lock")
                    .push((jid.clone(), session));
            }
        }
    }

    /// Tries again the removals of ended sessions that NATS did not take.
    pub(crate) async fn retry_unregistered(&self) {
        let pending = std::mem::take(&mut *self.unregistered.lock().expect("unregistered lock"));
        for (jid, session) in pending {
            if self.local_mailbox(&jid).is_some() {
                continue; // Bound again here meanwhile.
            }
            let revision = {
                let view = self.view.read().expect("view lock");
                match view.get(&jid) {
                    Some(route) if route.session == session && route.node == self.node => {
                        view.revisions.get(&jid).copied()
                    }
                    _ => continue,
                }
            };
            self.remove_registration(&jid, session, revision).await;
        }
    }

    /// The registry stream's description, asked of JetStream now (the
    /// bucket's own is what it was when the bucket was opened); `None` when
    /// the stream does not exist (NATS lost its store).
    pub(crate) async fn registry_info(&self) -> Result<Option<stream::Info>, BusError> {
        match self
            .jetstream
            .get_stream(format!("KV_{}", subjects::SESSIONS))
            .await
        {
            Ok(stream) => Ok(Some(stream.cached_info().clone())),
            Err(error)
                if matches!(error.kind(), GetStreamErrorKind::JetStream(error)
                    if error.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Makes the cluster's JetStream state again after NATS lost it (a
    /// server restarted with an empty store) and registers this node's
    /// sessions anew; the watch starts over. Peers do the same for theirs.
    pub(crate) async fn restore_state(&self) {
        tracing::error!(
            node = %self.config.name,
            "NATS lost the cluster's state (a server restarted with an empty store?); \
             making it again and registering this node's sessions anew."
        );
        if let Err(error) = Self::jetstream_state(&self.jetstream, self.config.replicas).await {
            tracing::warn!(%error, "The cluster's state cannot be made again yet; retrying.");
            return;
        }
        let Ok(Some(info)) = self.registry_info().await else {
            return;
        };
        // Revisions of the lost store mean nothing in the new one.
        let own: Vec<Route> = {
            let mut view = self.view.write().expect("view lock");
            for revision in view.revisions.values_mut() {
                *revision = 0;
            }
            let local = self.local.read().expect("local lock");
            view.users
                .values()
                .flatten()
                .filter(|route| is_live_here(route, self.node, &local))
                .map(|route| Route::clone(route))
                .collect()
        };
        self.applied.store(0, Ordering::Relaxed);
        let mut registered = 0;
        for route in own {
            let record = SessionRecord::new(self.node, route.session, &route.info);
            let value: Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
            match self
                .sessions
                .put(subjects::session_key(&route.jid), value)
                .await
            {
                Ok(revision) => {
                    registered += 1;
                    self.view
                        .write()
                        .expect("view lock")
                        .upsert(route, revision);
                }
                Err(error) => {
                    tracing::warn!(jid = %route.jid, %error, "A session could not be registered anew.")
                }
            }
        }
        *self.registry_created.lock().expect("registry lock") = Some(info);
        self.rewatch.notify_one();
        tracing::warn!(registered, "The cluster's state is back.");
        // Until now peers could not see these sessions, and stored what they
        // had for them.
        if let Some(recovery) = self.recovery() {
            recovery.registered_anew();
        }
    }
}
