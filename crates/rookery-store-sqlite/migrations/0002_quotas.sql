-- Rookery schema, version 2: offline storage limited in bytes (each
-- message's size kept beside it, so that quotas and pages are summed from the
-- index), and server secrets shared by every node.
ALTER TABLE offline_messages ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
UPDATE offline_messages SET size = length(CAST(stanza AS BLOB));
DROP INDEX offline_messages_by_jid;
CREATE INDEX offline_messages_by_jid ON offline_messages (jid, id, size);

CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
);
