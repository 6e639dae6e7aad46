//! [`ItemLocks`]: one roster item's read-modify-write at a time.
//!
//! A subscription stanza changes two roster items, the sender's and the
//! recipient's, and both users' sessions may act on the same pair at the same
//! moment (two users asking each other at once): each change reads an item,
//! applies a transition of RFC 6121 appendix A, and writes it back. Without
//! this lock, one of two concurrent changes to an item was lost (a mutual
//! subscription ended as `from` with `ask` still set).
//!
//! Striped: a pair maps to one of a fixed number of mutexes. Never hold one
//! guard while taking another: two pairs may share a stripe.
//!
//! The lock orders the changes made on one node. In a cluster the node of
//! each user of the pair writes the same items, so the write itself is
//! conditional too (`RosterStore::replace_roster_item`): a change whose item
//! changed since it was read is read and applied again
//! ([`retry_changed_item`]).

use std::hash::{BuildHasher, RandomState};

use jid::BareJid;
use tokio::sync::{Mutex, MutexGuard};

const STRIPES: usize = 1024;

/// Locks for (user, contact) roster items.
#[derive(Debug)]
pub(crate) struct ItemLocks {
    stripes: Box<[Mutex<()>]>,
    hasher: RandomState,
}

impl Default for ItemLocks {
    fn default() -> Self {
        ItemLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl ItemLocks {
    /// Waits for the item `contact` of `user`'s roster.
    pub(crate) async fn lock(&self, user: &BareJid, contact: &BareJid) -> MutexGuard<'_, ()> {
        let stripe = self.hasher.hash_one((user, contact)) as usize % STRIPES;
        self.stripes[stripe].lock().await
    }
}

/// How often a subscription change is redone when the roster item keeps
/// changing under it; in practice once is enough.
const ITEM_CHANGE_ATTEMPTS: u32 = 8;

/// Whether to redo a change whose roster item changed since it was read.
pub(crate) fn retry_changed_item(attempts: &mut u32, user: &BareJid, contact: &BareJid) -> bool {
    *attempts += 1;
    if *attempts < ITEM_CHANGE_ATTEMPTS {
        return true;
    }
    tracing::error!(%user, %contact, "Roster item kept changing; this change is dropped.");
    false
}
