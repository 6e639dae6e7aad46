//! Membership: heartbeats out and in, and the failure detector, which judges
//! by time alone ([`Detector`], sans I/O: the node's tasks feed it heartbeats
//! and ticks, tests feed it made-up instants).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rookery_cluster::NodeId;

use crate::cleanup::Gone;
use crate::codec::Heartbeat;
use crate::{NatsBus, subjects};

/// A live node as known from its heartbeats.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) last_seen: Instant,
    pub(crate) heartbeat: Heartbeat,
}

/// What one tick of the detector found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The tick came far later than due: this process was frozen.
    pub(crate) frozen: bool,
    /// Nodes to clean up after.
    pub(crate) dead: Vec<NodeId>,
}

/// The failure detector between ticks.
#[derive(Debug)]
pub(crate) struct Detector {
    timeout: Duration,
    started: Instant,
    last_tick: Instant,
    /// When each dead node was last declared dead.
    declared: HashMap<NodeId, Instant>,
}

impl Detector {
    pub(crate) fn new(timeout: Duration, now: Instant) -> Self {
        Detector {
            timeout,
            started: now,
            last_tick: now,
            declared: HashMap::new(),
        }
    }

    /// One tick at `now`. `listening`: this node has been connected to NATS
    /// for a whole timeout. `members`: the peers heard of (the silent ones
    /// leave it). `registered`: the nodes with sessions in the registry, and
    /// `this` node.
    ///
    /// A peer is dead once silent for longer than the timeout. A node found
    /// only in the registry (from before a restart of the whole cluster, or
    /// whose cleaner died too) is dead once this node has run for a timeout,
    /// and declared again at most every three timeouts. While this node was
    /// frozen or cannot listen, it judges nobody: its own outage silenced
    /// everyone, so every peer gets half a timeout more.
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        listening: bool,
        members: &mut HashMap<NodeId, Member>,
        registered: &HashSet<NodeId>,
        this: NodeId,
    ) -> Verdict {
        let timeout = self.timeout;
        let frozen = now.saturating_duration_since(self.last_tick) > timeout / 2;
        self.last_tick = now;
        if frozen || !listening {
            if let Some(grace) = now.checked_sub(timeout / 2) {
                for member in members.values_mut() {
                    member.last_seen = member.last_seen.max(grace);
                }
            }
            return Verdict {
                frozen,
                dead: Vec::new(),
            };
        }
        let mut dead: Vec<NodeId> = members
            .iter()
            .filter(|(_, member)| now.saturating_duration_since(member.last_seen) > timeout)
            .map(|(node, _)| *node)
            .collect();
        for node in &dead {
            members.remove(node);
        }
        if now.saturating_duration_since(self.started) > timeout {
            let unknown = registered.iter().copied().filter(|node| {
                *node != this
                    && !members.contains_key(node)
                    && !dead.contains(node)
                    && self
                        .declared
                        .get(node)
                        .is_none_or(|at| now.saturating_duration_since(*at) > timeout * 3)
            });
            let unknown: Vec<NodeId> = unknown.collect();
            dead.extend(unknown);
        }
        for node in &dead {
            self.declared.insert(*node, now);
        }
        Verdict { frozen, dead }
    }
}

/// Publishes this node's heartbeat every `heartbeat` interval.
pub(crate) async fn publish_heartbeats(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(bus.config.heartbeat);
    loop {
        ticker.tick().await;
        let heartbeat = bus.heartbeat(false);
        let payload = serde_json::to_vec(&heartbeat).unwrap_or_default();
        if let Err(error) = bus
            .client
            .publish(subjects::heartbeat(bus.node), payload.into())
            .await
        {
            tracing::debug!(%error, "Heartbeat not sent.");
        }
    }
}

/// Follows every node's heartbeats: the members, a node back that was
/// taken for dead, and the old process of a name that came back as a new one.
pub(crate) async fn follow_members(bus: Arc<NatsBus>) {
    loop {
        let mut heartbeats = match bus.client.subscribe(subjects::HEARTBEAT_ALL).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::warn!(%error, "Heartbeats cannot be received; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(message) = heartbeats.next().await {
            let Ok(heartbeat) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
                continue;
            };
            if heartbeat.node == bus.node {
                continue;
            }
            let back = {
                let mut cleanups = bus.cleanups.lock().expect("cleanups lock");
                cleanups.remove(&heartbeat.node).is_some()
            };
            if back {
                tracing::warn!(
                    node = %heartbeat.name,
                    incarnation = format!("{:016x}", heartbeat.node),
                    "A node taken for dead is back (it was frozen or cut off)."
                );
            }
            let mut dead = Vec::new();
            {
                let mut members = bus.members.write().expect("members lock");
                // A new process under the same name means the old one is gone.
                dead.extend(
                    members
                        .iter()
                        .filter(|(node, member)| {
                            **node != heartbeat.node && member.heartbeat.name == heartbeat.name
                        })
                        .map(|(node, _)| (*node, Gone::Replaced)),
                );
                if heartbeat.leaving {
                    members.remove(&heartbeat.node);
                    dead.push((heartbeat.node, Gone::Left));
                } else {
                    members.insert(
                        heartbeat.node,
                        Member {
                            last_seen: Instant::now(),
                            heartbeat,
                        },
                    );
                }
                for (node, _) in &dead {
                    members.remove(node);
                }
            }
            for (node, gone) in dead {
                let cleaner = bus.clone();
                bus.spawn(async move { cleaner.clean_up(node, gone).await });
            }
        }
    }
}

/// Declares silent nodes dead, and nodes found only in the registry (from
/// before a restart of the whole cluster) once they stayed silent as long.
pub(crate) async fn detect_failures(bus: Arc<NatsBus>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut detector = Detector::new(bus.config.failure_timeout, Instant::now());
    loop {
        ticker.tick().await;
        let registered: HashSet<NodeId> = bus
            .view
            .read()
            .expect("view lock")
            .users
            .values()
            .flatten()
            .map(|route| route.node)
            .collect();
        let verdict = detector.tick(
            Instant::now(),
            bus.heard_long_enough(),
            &mut bus.members.write().expect("members lock"),
            &registered,
            bus.node,
        );
        if verdict.frozen {
            tracing::warn!("This node was frozen; its peers get a failure timeout to speak again.");
        }
        for node in verdict.dead {
            let cleaner = bus.clone();
            bus.spawn(async move { cleaner.clean_up(node, Gone::Silent).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);
    const TICK: Duration = Duration::from_millis(500);

    fn member(node: NodeId, last_seen: Instant) -> (NodeId, Member) {
        let heartbeat = Heartbeat {
            name: format!("node{node}"),
            node,
            sessions: 0,
            address: None,
            accepting: true,
            leaving: false,
            batches: true,
        };
        (
            node,
            Member {
                last_seen,
                heartbeat,
            },
        )
    }

    /// Ticks every half second from `from` for `span`, with `members` heard
    /// as `heard` says; returns the first verdict that declared someone dead
    /// and when.
    fn run(
        detector: &mut Detector,
        members: &mut HashMap<NodeId, Member>,
        registered: &HashSet<NodeId>,
        from: Instant,
        span: Duration,
        heard: impl Fn(NodeId, Instant) -> bool,
    ) -> Option<(Duration, Vec<NodeId>)> {
        let mut now = from;
        while now < from + span {
            now += TICK;
            for (node, member) in members.iter_mut() {
                if heard(*node, now) {
                    member.last_seen = now;
                }
            }
            let verdict = detector.tick(now, true, members, registered, 0);
            if !verdict.dead.is_empty() {
                return Some((now - from, verdict.dead));
            }
        }
        None
    }

    #[test]
    fn a_silent_peer_is_dead_after_the_timeout_and_a_talking_one_never() {
        let start = Instant::now();
        let mut detector = Detector::new(TIMEOUT, start);
        let mut members: HashMap<NodeId, Member> = [member(1, start), member(2, start)].into();
        // Node 2 stops at 3 s; node 1 talks on.
        let found = run(
            &mut detector,
            &mut members,
            &HashSet::new(),
            start,
            Duration::from_secs(30),
            |node, now| node == 1 || now <= start + Duration::from_secs(3),
        );
        let (after, dead) = found.expect("node 2 declared dead");
        assert_eq!(dead, [2]);
        assert!(
            after > Duration::from_secs(5) && after <= Duration::from_millis(5500),
            "declared {after:?} after the start, within a tick of 3 s + the timeout"
        );
        assert!(members.contains_key(&1) && !members.contains_key(&2));
        assert_eq!(
            run(
                &mut detector,
                &mut members,
                &HashSet::new(),
                start + after,
                Duration::from_secs(60),
                |node, _| node == 1
            ),
            None,
            "a peer that keeps talking is never declared dead"
        );
    }

    #[test]
    fn a_frozen_node_judges_nobody_and_gives_everyone_time() {
        let start = Instant::now();
        let mut detector = Detector::new(TIMEOUT, start);
        let mut members: HashMap<NodeId, Member> = [member(1, start)].into();
        // This process sleeps 10 s (SIGSTOP): the next tick comes late, and
        // the peer, silent meanwhile only because nobody listened, lives.
        let woke = start + Duration::from_secs(10);
        let verdict = detector.tick(woke, true, &mut members, &HashSet::new(), 0);
        assert_eq!(
            verdict,
            Verdict {
                frozen: true,
                dead: Vec::new()
            }
        );
        // It is heard again within the grace: never dead.
        let verdict = detector.tick(woke + TICK, true, &mut members, &HashSet::new(), 0);
        assert!(verdict.dead.is_empty() && !verdict.frozen);
        members.get_mut(&1).unwrap().last_seen = woke + TICK;
        let found = run(
            &mut detector,
            &mut members,
            &HashSet::new(),
            woke + TICK,
            Duration::from_secs(20),
            |_, _| true,
        );
        assert_eq!(found, None);
        // Not listening (NATS lost) is the same: nobody is judged.
        let later = woke + Duration::from_secs(60);
        let verdict = detector.tick(later - TICK, false, &mut members, &HashSet::new(), 0);
        assert!(verdict.dead.is_empty());
        assert!(members.contains_key(&1));
    }

    #[test]
    fn a_node_only_in_the_registry_is_dead_once_and_again_after_three_timeouts() {
        let start = Instant::now();
        let mut detector = Detector::new(TIMEOUT, start);
        let mut members = HashMap::new();
        let registered: HashSet<NodeId> = [0, 7].into();
        // Not before this node has run for a timeout (it may not have heard
        // node 7's heartbeat yet); this node itself never.
        let verdict = detector.tick(start + TICK, true, &mut members, &registered, 0);
        assert!(verdict.dead.is_empty());
        let mut now = start + TICK;
        let mut declared = Vec::new();
        while now < start + Duration::from_secs(20) {
            now += TICK;
            if detector
                .tick(now, true, &mut members, &registered, 0)
                .dead
                .contains(&7)
            {
                declared.push(now - start);
            }
        }
        assert_eq!(declared.len(), 3, "{declared:?}");
        assert!(declared[0] > TIMEOUT && declared[0] <= TIMEOUT + TICK);
        for pair in declared.windows(2) {
            assert!(pair[1] - pair[0] > TIMEOUT * 3 && pair[1] - pair[0] <= TIMEOUT * 3 + TICK);
        }
    }
}
