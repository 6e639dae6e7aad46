-- Rookery schema, version 1.
CREATE TABLE accounts (
    jid TEXT PRIMARY KEY NOT NULL,
    created_at INTEGER NOT NULL
);

-- Salted SCRAM keys, one row per hash; never a password.
CREATE TABLE account_keys (
    jid TEXT NOT NULL REFERENCES accounts (jid) ON DELETE CASCADE,
    hash TEXT NOT NULL,
    salt BLOB NOT NULL,
    iterations INTEGER NOT NULL,
    stored_key BLOB NOT NULL,
    server_key BLOB NOT NULL,
    PRIMARY KEY (jid, hash)
);

CREATE TABLE last_activity (
    jid TEXT PRIMARY KEY NOT NULL,
    at INTEGER NOT NULL,
    status TEXT
);

CREATE TABLE roster_versions (
    jid TEXT PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE roster_items (
    jid TEXT NOT NULL,
    contact TEXT NOT NULL,
    name TEXT,
    subscription TEXT NOT NULL,
    ask INTEGER NOT NULL,
    approved INTEGER NOT NULL,
    PRIMARY KEY (jid, contact)
);

CREATE TABLE roster_groups (
    jid TEXT NOT NULL,
    contact TEXT NOT NULL,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (jid, contact, position)
);

CREATE TABLE subscription_requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    jid TEXT NOT NULL,
    contact TEXT NOT NULL,
    stanza TEXT NOT NULL,
    UNIQUE (jid, contact)
);

CREATE TABLE offline_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    jid TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    stanza TEXT NOT NULL
);
CREATE INDEX offline_messages_by_jid ON offline_messages (jid, id);

CREATE TABLE documents (
    jid TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    xml TEXT NOT NULL,
    PRIMARY KEY (jid, kind, key)
);

CREATE TABLE blocklist (
    jid TEXT NOT NULL,
    blocked TEXT NOT NULL,
    PRIMARY KEY (jid, blocked)
);
