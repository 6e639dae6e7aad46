//! XEP-0191 blocking: matching JIDs against a block list, and the node's cache of
//! the block lists of local accounts so the message path needs no storage access.

use std::sync::{Arc, RwLock};

use jid::{BareJid, Jid};

use crate::Router;

/// True if `jid` matches an item of `blocklist` (XEP-0191 section 3.4, using the
/// JID matching rules of XEP-0016): a full JID item matches only itself, a bare
/// JID item every resource of it, a domain item everything at the domain, a
/// domain/resource item only itself.
pub fn is_blocked(blocklist: &[Jid], jid: &Jid) -> bool {
    blocklist
        .iter()
        .any(|item| match (item.node(), item.resource()) {
            (Some(_), Some(_)) => item == jid,
            (Some(node), None) => jid.node() == Some(node) && jid.domain() == item.domain(),
            (None, Some(_)) => item == jid,
            (None, None) => jid.domain() == item.domain(),
        })
}

/// Block lists of accounts with local sessions.
#[derive(Debug, Default)]
pub(crate) struct BlocklistCache {
    /// Read for both ends of every message: foldhash, as the bus's registry.
    lists: RwLock<foldhash::HashMap<BareJid, Arc<[Jid]>>>,
}

impl BlocklistCache {
    fn get(&self, user: &BareJid) -> Option<Arc<[Jid]>> {
        self.lists.read().expect("cache lock").get(user).cloned()
    }

    fn set(&self, user: &BareJid, list: Vec<Jid>) {
        self.lists
            .write()
            .expect("cache lock")
            .insert(user.clone(), list.into());
    }

    pub(crate) fn forget(&self, user: &BareJid) {
        self.lists.write().expect("cache lock").remove(user);
    }
}

impl Router {
    /// Loads an account's block list into the cache (at bind).
    pub(crate) async fn load_blocklist(&self, user: &BareJid) {
        if self.blocklists.get(user).is_some() {
            return;
        }
        match self.store.blocklist(user).await {
            Ok(list) => self.blocklists.set(user, list),
            Err(error) => tracing::warn!(%user, %error, "Block list could not be loaded."),
        }
    }

    /// The block list of `user`: cached for local accounts, else read from storage.
    pub async fn blocklist(&self, user: &BareJid) -> Arc<[Jid]> {
        if let Some(list) = self.blocklists.get(user) {
            return list;
        }
        match self.store.blocklist(user).await {
            Ok(list) => list.into(),
            Err(error) => {
                tracing::warn!(%user, %error, "Block list could not be read.");
                Arc::from(Vec::new())
            }
        }
    }

    /// Replaces the cached block list after a change.
    pub fn set_blocklist(&self, user: &BareJid, list: Vec<Jid>) {
        if self.blocklists.get(user).is_some() || !self.bus.routes(user).is_empty() {
            self.blocklists.set(user, list);
        }
    }

    /// True if `user` blocks `jid`.
    pub async fn blocks(&self, user: &BareJid, jid: &Jid) -> bool {
        let list = self.blocklist(user).await;
        !list.is_empty() && is_blocked(&list, jid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jids(list: &[&str]) -> Vec<Jid> {
        list.iter().map(|j| Jid::new(j).unwrap()).collect()
    }

    #[test]
    fn jid_matching_follows_xep_0016() {
        let list = jids(&[
            "bob@example.org",
            "carol@example.org/phone",
            "evil.example",
            "example.net/bot",
        ]);
        let cases = [
            ("bob@example.org", true),
            ("bob@example.org/any", true),
            ("bobby@example.org", false),
            ("carol@example.org/phone", true),
            ("carol@example.org/laptop", false),
            ("carol@example.org", false),
            ("evil.example", true),
            ("anyone@evil.example/res", true),
            ("sub.evil.example", false),
            ("example.net/bot", true),
            ("example.net", false),
            ("user@example.net/bot", false),
        ];
        for (jid, expected) in cases {
            assert_eq!(
                is_blocked(&list, &Jid::new(jid).unwrap()),
                expected,
                "{jid}"
            );
        }
        assert!(!is_blocked(&[], &Jid::new("bob@example.org").unwrap()));
    }
}
