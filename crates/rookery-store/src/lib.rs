//! Storage interfaces of Rookery, one trait per aggregate, bundled by [`Store`].
//!
//! The traits speak the domain (accounts, rosters, offline messages, ...), not
//! keys and values, so each backend writes real SQL with its own migrations.
//! Stanzas are stored as serialised XML strings: the store never interprets
//! them. Every backend runs the same [`conformance`] suite.

#![forbid(unsafe_code)]

use async_trait::async_trait;
use jid::{BareJid, Jid};
use rookery_stream::{ScramHash, ScramKeys};

pub mod conformance;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The account (or item) already exists.
    #[error("already exists")]
    AlreadyExists,
    /// The account does not exist.
    #[error("no such account")]
    NoSuchAccount,
    /// A per-user quota is full (e.g. offline messages).
    #[error("quota exceeded")]
    QuotaExceeded,
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The backend failed (connection, I/O, constraint).
    #[error("storage backend: {0}")]
    Backend(String),
}

/// Result of storage operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// Accounts and their credentials.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates an account with its SCRAM keys (one per hash).
    async fn create_account(&self, jid: &BareJid, keys: &[ScramKeys]) -> StoreResult<()>;
    /// Deletes an account and everything stored for it. Returns false if it did not exist.
    async fn delete_account(&self, jid: &BareJid) -> StoreResult<bool>;
    /// Replaces the keys of an existing account.
    async fn set_keys(&self, jid: &BareJid, keys: &[ScramKeys]) -> StoreResult<()>;
    /// The keys of an account for one hash, `None` if there is no such account or hash.
    async fn keys(&self, jid: &BareJid, hash: ScramHash) -> StoreResult<Option<ScramKeys>>;
    /// Whether the account exists.
    async fn account_exists(&self, jid: &BareJid) -> StoreResult<bool>;
    /// All accounts of a domain, sorted.
    async fn list_accounts(&self, domain: &str) -> StoreResult<Vec<BareJid>>;
    /// Records when the account's last session ended, and its last status (XEP-0012).
    async fn set_last_activity(&self, jid: &BareJid, last: &LastActivity) -> StoreResult<()>;
    /// The last recorded end of session, if any.
    async fn last_activity(&self, jid: &BareJid) -> StoreResult<Option<LastActivity>>;
    /// The server secret called `name`: random, made on first use, and the
    /// same afterwards for every node sharing this store, across restarts.
    async fn server_secret(&self, name: &str) -> StoreResult<[u8; 32]>;
}

/// When an account was last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastActivity {
    /// Unix time in seconds.
    pub at: i64,
    /// The status text of the last unavailable presence.
    pub status: Option<String>,
}

/// A roster subscription state (RFC 6121 section 2.1.2.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Subscription {
    /// No subscription either way.
    #[default]
    None,
    /// The user is subscribed to the contact's presence.
    To,
    /// The contact is subscribed to the user's presence.
    From,
    /// Both.
    Both,
}

impl Subscription {
    /// The `subscription` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }

    /// Parses the attribute value.
    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "none" => Subscription::None,
            "to" => Subscription::To,
            "from" => Subscription::From,
            "both" => Subscription::Both,
            _ => return None,
        })
    }

    /// True if the user receives the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }

    /// True if the contact receives the user's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }

    /// Builds a state from its two directions.
    pub fn from_flags(to: bool, from: bool) -> Self {
        match (to, from) {
            (false, false) => Subscription::None,
            (true, false) => Subscription::To,
            (false, true) => Subscription::From,
            (true, true) => Subscription::Both,
        }
    }
}

/// One contact in a user's roster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterItem {
    /// The contact.
    pub jid: BareJid,
    /// The user's name for the contact.
    pub name: Option<String>,
    /// Subscription state.
    pub subscription: Subscription,
    /// The user asked to subscribe and awaits an answer (`ask='subscribe'`).
    pub ask: bool,
    /// The user pre-approved a subscription request from the contact.
    pub approved: bool,
    /// Groups, in the order given.
    pub groups: Vec<String>,
}

impl RosterItem {
    /// A fresh item with no subscription.
    pub fn new(jid: BareJid) -> Self {
        RosterItem {
            jid,
            name: None,
            subscription: Subscription::None,
            ask: false,
            approved: false,
            groups: Vec::new(),
        }
    }
}

/// A whole roster with its version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    /// Increases with every change (RFC 6121 section 2.6).
    pub version: i64,
    /// Items, sorted by JID.
    pub items: Vec<RosterItem>,
}

/// Rosters, and subscription requests waiting for an answer.
#[async_trait]
pub trait RosterStore: Send + Sync {
    /// The user's roster.
    async fn roster(&self, user: &BareJid) -> StoreResult<Roster>;
    /// One item.
    async fn roster_item(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<Option<RosterItem>>;
    /// Creates or replaces an item; returns the new roster version.
    async fn put_roster_item(&self, user: &BareJid, item: &RosterItem) -> StoreResult<i64>;
    /// Writes `item` only if the stored item for its contact is still
    /// `expected` (`None`: there is none), and returns the new roster
    /// version; `None` if it changed since it was read (read it again and
    /// redo the change). Nodes of a cluster change the same item: a
    /// subscription stanza changes the sender's and the recipient's items.
    async fn replace_roster_item(
        &self,
        user: &BareJid,
        expected: Option<&RosterItem>,
        item: &RosterItem,
    ) -> StoreResult<Option<i64>>;
    /// Removes an item; returns the new version, or `None` if there was no such item.
    async fn remove_roster_item(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<Option<i64>>;
    /// Stores an inbound subscription request (the presence stanza as XML), replacing an older one.
    async fn put_subscription_request(
        &self,
        user: &BareJid,
        contact: &BareJid,
        stanza: &str,
    ) -> StoreResult<()>;
    /// Removes a stored request; returns whether there was one.
    async fn remove_subscription_request(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<bool>;
    /// All stored inbound requests, oldest first.
    async fn subscription_requests(&self, user: &BareJid) -> StoreResult<Vec<(BareJid, String)>>;
}

/// A message kept for an offline user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineMessage {
    /// When it was stored, unix milliseconds.
    pub stored_at: i64,
    /// The stanza as XML.
    pub stanza: String,
}

/// An offline message as stored, with its id (ascending in storage order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOffline {
    /// Its id, for [`OfflineStore::remove_offline`] and as a read cursor.
    pub id: i64,
    /// The message.
    pub message: OfflineMessage,
}

/// How much one user may keep of something: items and bytes (of XML).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Most items.
    pub items: usize,
    /// Most bytes, all items together.
    pub bytes: usize,
}

impl Quota {
    /// No limit (tools and tests).
    pub const UNLIMITED: Quota = Quota {
        items: usize::MAX,
        bytes: usize::MAX,
    };
}

/// SQL integers are signed: a quota past `i64::MAX` is no limit.
pub fn sql_limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Messages kept for users who are not online (XEP-0160).
#[async_trait]
pub trait OfflineStore: Send + Sync {
    /// Appends a message unless the user's messages would then exceed
    /// `quota` (then `QuotaExceeded`, and nothing is stored).
    async fn push_offline(
        &self,
        user: &BareJid,
        message: &OfflineMessage,
        quota: Quota,
    ) -> StoreResult<()>;
    /// Reads the user's oldest messages with an id above `after`, oldest
    /// first: at most `page.items`, and no more than fit in `page.bytes` (but
    /// always the first one, however large). Empty when there are none. They
    /// stay stored until [`remove_offline`](Self::remove_offline): a node
    /// that dies while handing them out loses nothing.
    async fn read_offline(
        &self,
        user: &BareJid,
        after: i64,
        page: Quota,
    ) -> StoreResult<Vec<StoredOffline>>;
    /// Removes the user's messages with these ids (those already gone are
    /// skipped); returns how many were removed.
    async fn remove_offline(&self, user: &BareJid, ids: &[i64]) -> StoreResult<usize>;
    /// Number of stored messages.
    async fn count_offline(&self, user: &BareJid) -> StoreResult<usize>;
}

/// Per-user XML documents: private storage (XEP-0049) and vCards (XEP-0054).
#[async_trait]
pub trait DocumentStore: Send + Sync {
    /// Stores a document under `(kind, key)`, replacing the one there, unless
    /// the user's documents of that kind would then exceed `quota` (then
    /// `QuotaExceeded`, and nothing changes). An empty `xml` deletes it.
    async fn put_document(
        &self,
        user: &BareJid,
        kind: DocumentKind,
        key: &str,
        xml: &str,
        quota: Quota,
    ) -> StoreResult<()>;
    /// A stored document.
    async fn document(
        &self,
        user: &BareJid,
        kind: DocumentKind,
        key: &str,
    ) -> StoreResult<Option<String>>;
}

/// What a document is: a name a module picks for its documents (stored as
/// is, so it never changes once used). A module that keeps per-user XML
/// needs no table of its own: a kind of its own is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DocumentKind(&'static str);

impl DocumentKind {
    /// XEP-0049 private XML storage, keyed by namespace.
    pub const PRIVATE: DocumentKind = DocumentKind("private");
    /// XEP-0054 vcard-temp, key `""`.
    pub const VCARD: DocumentKind = DocumentKind("vcard");

    /// A kind named `name` (lower-case ASCII letters, digits and `-`).
    ///
    /// # Panics
    /// At compile time in a `const`, else at once, on another character or
    /// an empty name.
    pub const fn new(name: &'static str) -> DocumentKind {
        let bytes = name.as_bytes();
        assert!(!bytes.is_empty(), "a document kind needs a name");
        let mut index = 0;
        while index < bytes.len() {
            let b = bytes[index];
            assert!(
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-',
                "document kinds are lower-case letters, digits and '-'"
            );
            index += 1;
        }
        DocumentKind(name)
    }

    /// The stored name of the kind.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// Block lists (XEP-0191).
#[async_trait]
pub trait BlockingStore: Send + Sync {
    /// The blocked JIDs, sorted.
    async fn blocklist(&self, user: &BareJid) -> StoreResult<Vec<Jid>>;
    /// Adds JIDs; returns the ones that were not blocked before.
    async fn block(&self, user: &BareJid, jids: &[Jid]) -> StoreResult<Vec<Jid>>;
    /// Removes JIDs (all of them when `jids` is empty); returns the ones removed.
    async fn unblock(&self, user: &BareJid, jids: &[Jid]) -> StoreResult<Vec<Jid>>;
}

/// Everything a Rookery node stores durably.
pub trait Store: AccountStore + RosterStore + OfflineStore + DocumentStore + BlockingStore {}

impl<T: AccountStore + RosterStore + OfflineStore + DocumentStore + BlockingStore> Store for T {}
