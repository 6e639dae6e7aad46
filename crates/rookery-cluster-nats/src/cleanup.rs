//! After a node died: one live node (the holder of a KV lock) removes its
//! sessions, tells their contacts, and replays its unacknowledged
//! deliveries through the router; each dead incarnation once.

use super::*;
use crate::delivery::{decode_delivery, each_copy};

/// The cleanup lock's value once the cleanup is done.
pub(crate) const CLEANUP_DONE: &[u8] = b"done";

/// What became of a cleanup lock held by another.
pub(crate) enum Lock {
    /// This node holds it now.
    Taken,
    /// The cleanup it guards is done.
    Done,
    /// A live node holds it.
    Held,
}

/// Why a node's process is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// It said it leaves (a clean stop).
    Left,
    /// A new process took its name (a restart).
    Replaced,
    /// Silent for the failure timeout.
    Silent,
}

/// Where this node is with the cleanup after a dead incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cleanup {
    /// Under way here: this attempt's number (a node that comes back and
    /// dies again gets a new attempt, and the old one must not finish).
    Running(u64),
    /// Done (here or by a peer): its deliveries were replayed.
    Done,
}

impl NatsBus {
    /// Cleans up after the dead incarnation `dead`: once, however many signs
    /// of its death reach this node (a silent heartbeat, a new process of the
    /// same name, its sessions still in the registry), and once in the
    /// cluster (the KV lock). Sessions of it that linger in the registry are
    /// removed again whenever they show up; its deliveries are replayed once.
    pub(crate) async fn clean_up(&self, dead: NodeId, gone: Gone) {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed);
        let state = {
            let mut cleanups = self.cleanups.lock().expect("cleanups lock");
            let state = cleanups.get(&dead).copied();
            if state.is_none() {
                cleanups.insert(dead, Cleanup::Running(attempt));
            }
            state
        };
        match state {
            Some(Cleanup::Running(_)) => return,
            Some(Cleanup::Done) => {
                // Already cleaned up; sessions of it seen since (a registry
                // entry that could not be removed then) go now.
                self.remove_lingering(dead).await;
                return;
            }
            None => {}
        }
        let done = self.clean_up_once(dead, attempt, gone).await;
        let mut cleanups = self.cleanups.lock().expect("cleanups lock");
        if cleanups.get(&dead) != Some(&Cleanup::Running(attempt)) {
            return; // It came back meanwhile; a later death has its own attempt.
        }
        if done {
            cleanups.insert(dead, Cleanup::Done);
        } else {
            // Alive after all, or left to a peer: looked at again if it stays silent.
            cleanups.remove(&dead);
        }
    }

    /// True while `attempt` is the cleanup under way for `dead`: false once
    /// the node spoke again (peers' heartbeats end the attempt).
    pub(crate) fn still_dead(&self, dead: NodeId, attempt: u64) -> bool {
        self.cleanups.lock().expect("cleanups lock").get(&dead) == Some(&Cleanup::Running(attempt))
            && !self.is_member(dead)
    }

    /// The cleanup proper; false when it was not done (the node spoke again,
    /// this node lost NATS meanwhile, or a live peer holds the lock).
    pub(crate) async fn clean_up_once(&self, dead: NodeId, attempt: u64, gone: Gone) -> bool {
        // One node cleans up: the one that creates the lock. While NATS is
        // unreachable, keep trying, unless the node turns out to be alive.
        let key = subjects::cleanup_key(dead);
        loop {
            while !self.heard_long_enough() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if !self.still_dead(dead, attempt) {
                return false; // It spoke again.
            }
            let lock = self
                .cleanup
                .create(&key, Bytes::from(self.node.to_string()));
            match tokio::time::timeout(PUBLISH_TIMEOUT, lock).await {
                Ok(Ok(_)) => break,
                Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    match self.take_over_cleanup(&key).await {
                        Lock::Taken => break,
                        Lock::Done => {
                            // Done by a peer; its removals reach the view
                            // through the watch, and lingering ones go here.
                            self.remove_lingering(dead).await;
                            return true;
                        }
                        Lock::Held => return false,
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "Cleanup after a dead node waits for NATS.")
                }
                Err(_) => tracing::warn!("Cleanup after a dead node waits for NATS."),
            }
        }
        if !self.heard_long_enough() || !self.still_dead(dead, attempt) {
            // Our connection dropped meanwhile, or the node spoke again: not dead after all.
            let _ = self.cleanup.delete(&key).await;
            return false;
        }
        let Some(recovery) = self.recovery() else {
            return false;
        };
        let dead_hex = format!("{dead:016x}");
        match gone {
            Gone::Left => tracing::info!(
                dead = dead_hex,
                "A node left the cluster; cleaning up what it left behind."
            ),
            Gone::Replaced => tracing::warn!(
                dead = dead_hex,
                "A node restarted; cleaning up after its previous process."
            ),
            Gone::Silent => tracing::warn!(
                dead = dead_hex,
                "A node stopped answering; cleaning up after it."
            ),
        }
        let started = Instant::now();
        let removed = self.remove_sessions(dead).await;
        for route in &removed {
            recovery.session_lost(route.clone()).await;
        }
        let replayed = self.replay(dead, attempt, &*recovery).await;
        if !self.still_dead(dead, attempt) {
            // It was frozen or cut off, not dead, and spoke again while its
            // sessions went: it ends them itself, and is alive from now on.
            let _ = self.cleanup.delete(&key).await;
            tracing::warn!(
                dead = format!("{dead:016x}"),
                sessions = removed.len(),
                replayed,
                "A node taken for dead spoke again; its cleanup stopped."
            );
            return false;
        }
        let _ = self
            .cleanup
            .put(&key, Bytes::from_static(CLEANUP_DONE))
            .await;
        tracing::warn!(
            dead = format!("{dead:016x}"),
            sessions = removed.len(),
            replayed,
            took = ?started.elapsed(),
            "Cleaned up after a dead node."
        );
        true
    }

    /// True when the live node `node` reads batched deliveries.
    pub(crate) fn batches_to(&self, node: NodeId) -> bool {
        self.members
            .read()
            .expect("members lock")
            .get(&node)
            .is_some_and(|member| member.heartbeat.batches)
    }

    pub(crate) fn is_member(&self, node: NodeId) -> bool {
        self.members
            .read()
            .expect("members lock")
            .contains_key(&node)
    }

    /// Removes sessions of an incarnation cleaned up already that showed up
    /// since, and tells their contacts.
    pub(crate) async fn remove_lingering(&self, dead: NodeId) {
        let removed = self.remove_sessions(dead).await;
        if removed.is_empty() {
            return;
        }
        tracing::info!(
            dead = format!("{dead:016x}"),
            sessions = removed.len(),
            "Sessions of a node cleaned up already were removed."
        );
        if let Some(recovery) = self.recovery() {
            for route in removed {
                recovery.session_lost(route).await;
            }
        }
    }

    /// Removes the sessions of `dead` from the registry and from the view;
    /// returns those that were still its (a JID bound again meanwhile keeps
    /// its new session, and its contacts are not told it went away).
    pub(crate) async fn remove_sessions(&self, dead: NodeId) -> Vec<Route> {
        let lost: Vec<Arc<Route>> = {
            let view = self.view.read().expect("view lock");
            view.users
                .values()
                .flatten()
                .filter(|route| route.node == dead)
                .cloned()
                .collect()
        };
        let mut removed = Vec::with_capacity(lost.len());
        for route in lost {
            let key = subjects::session_key(&route.jid);
            // The registry's entry now, not the view's revision: after NATS
            // lost its store, revisions the view knew mean nothing.
            let rebound = match self.sessions.entry(&key).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<SessionRecord>(&entry.value) {
                        Ok(record) if record.node != dead => true,
                        _ => {
                            if let Err(error) = self
                                .sessions
                                .delete_expect_revision(&key, Some(entry.revision))
                                .await
                            {
                                tracing::debug!(jid = %route.jid, %error, "Session of a dead node not removed.");
                            }
                            false
                        }
                    }
                }
                Ok(_) => false,
                Err(error) => {
                    tracing::debug!(jid = %route.jid, %error, "Session of a dead node not read.");
                    false
                }
            };
            // Gone from the view whatever the registry said: nothing may be
            // routed to a dead node again (a replay would go round in
            // circles). A registry entry that could not be removed shows up
            // again and goes then (`remove_lingering`).
            {
                let mut view = self.view.write().expect("view lock");
                if view
                    .get(&route.jid)
                    .is_some_and(|now| now.node == dead && now.session == route.session)
                {
                    view.remove(&route.jid);
                }
            }
            // (The watch may have applied the removal first.)
            if !rebound {
                removed.push(Route::clone(&route));
            }
        }
        removed
    }

    /// Peers took this node for dead and cleaned up after it (it was frozen
    /// or cut off): the lock of that cleanup goes, so that a real death later
    /// is cleaned up again.
    pub(crate) async fn forget_cleanup(&self) {
        let key = subjects::cleanup_key(self.node);
        let _ = tokio::time::timeout(PUBLISH_TIMEOUT, self.cleanup.delete(&key)).await;
    }

    /// True once this node knows `node` is dead (cleaned up or being cleaned up).
    pub(crate) fn known_dead(&self, node: NodeId) -> bool {
        self.cleanups
            .lock()
            .expect("cleanups lock")
            .contains_key(&node)
    }

    /// Takes the cleanup lock `key` from a cleaner that is dead itself.
    pub(crate) async fn take_over_cleanup(&self, key: &str) -> Lock {
        let Ok(Some(entry)) = self.cleanup.entry(key).await else {
            return Lock::Held;
        };
        if entry.value.as_ref() == CLEANUP_DONE {
            return Lock::Done;
        }
        let holder = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|value| value.parse::<NodeId>().ok());
        if holder == Some(self.node) {
            return Lock::Taken; // Ours, from an attempt that left work undone.
        }
        if holder.is_some_and(|holder| self.is_member(holder)) {
            return Lock::Held;
        }
        match self
            .cleanup
            .update(key, Bytes::from(self.node.to_string()), entry.revision)
            .await
        {
            Ok(_) => Lock::Taken,
            Err(_) => Lock::Held,
        }
    }

    /// Routes again every delivery a dead node did not acknowledge.
    pub(crate) async fn replay(
        &self,
        dead: NodeId,
        attempt: u64,
        recovery: &dyn Recovery,
    ) -> usize {
        let _ = self
            .deliveries
            .delete_consumer(&subjects::deliver_consumer(dead))
            .await;
        let name = subjects::recover_consumer(dead);
        let consumer = match self
            .deliveries
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::deliver(dead),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::error!(%error, "The dead node's deliveries could not be read.");
                return 0;
            }
        };
        // Peers that learn of the death later than this node may still
        // publish to it for a moment: the stream is drained for a whole
        // failure timeout, so that nothing stays behind with no reader.
        let until = Instant::now() + self.config.failure_timeout;
        let mut replayed = 0;
        loop {
            let batch = consumer
                .fetch()
                .max_messages(256)
                .expires(Duration::from_millis(500))
                .messages()
                .await;
            let Ok(mut batch) = batch else { break };
            let mut count = 0;
            while let Some(Ok(message)) = batch.next().await {
                count += 1;
                if let Some((recipients, stanza, _)) = decode_delivery(&message) {
                    for (to, stanza) in each_copy(recipients, stanza) {
                        recovery.reroute(to, stanza).await;
                    }
                    replayed += 1;
                }
                let _ = message.ack().await;
            }
            if (count == 0 && Instant::now() >= until) || !self.still_dead(dead, attempt) {
                // Drained; or the node was alive after all and reads its
                // deliveries itself again (they are its new sessions').
                break;
            }
        }
        let _ = self.deliveries.delete_consumer(&name).await;
        replayed
    }
}
