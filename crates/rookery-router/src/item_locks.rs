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
