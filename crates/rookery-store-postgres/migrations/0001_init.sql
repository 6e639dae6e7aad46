-- Rookery schema for PostgreSQL, version 1.
CREATE TABLE accounts (
    jid TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

-- Salted SCRAM keys, one row per hash; never a password.
CREATE TABLE account_keys (
    jid TEXT NOT NULL REFERENCES accounts (jid) ON DELETE CASCADE,
    hash TEXT NOT NULL,
    salt BYTEA NOT NULL,
    iterations INTEGER NOT NULL,
    stored_key BYTEA NOT NULL,
    server_key BYTEA NOT NULL,
    PRIMARY KEY (jid, hash)
);

CREATE TABLE last_activity (
    jid TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    status TEXT
);

CREATE TABLE roster_versions (
    jid TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);

CREATE TABLE roster_items (
    jid TEXT NOT NULL,
    contact TEXT NOT NULL,
    name TEXT,
    subscription TEXT NOT NULL,
    ask BOOLEAN NOT NULL,
    approved BOOLEAN NOT NULL,
    groups TEXT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (jid, contact)
);

CREATE TABLE subscription_requests (
    seq BIGSERIAL PRIMARY KEY,
    jid TEXT NOT NULL,
    contact TEXT NOT NULL,
    stanza TEXT NOT NULL,
    UNIQUE (jid, contact)
);

CREATE TABLE offline_messages (
    id BIGSERIAL PRIMARY KEY,
    jid TEXT NOT NULL,
    stored_at BIGINT NOT NULL,
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
