//! SQLite storage backend: [`SqliteStore`] implements every `rookery-store` trait with sqlx.
//!
//! The database runs in WAL mode with `synchronous = FULL`, so that what the
//! server acknowledged survives a crash of the process or the machine.

#![forbid(unsafe_code)]

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use jid::{BareJid, Jid};
use rookery_store::{
    AccountStore, BlockingStore, DocumentKind, DocumentStore, LastActivity, OfflineMessage,
    OfflineStore, Quota, Roster, RosterItem, RosterStore, StoreError, StoreResult, StoredOffline,
    Subscription, sql_limit,
};
use rookery_stream::{ScramHash, ScramKeys};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr};

/// A Rookery store in one SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn backend(error: sqlx::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

fn migrator() -> Migrator {
    let migration = |version, name: &str, sql: &'static str| {
        Migration::new(
            version,
            name.to_owned().into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    Migrator::with_migrations(vec![
        migration(1, "init", include_str!("../migrations/0001_init.sql")),
        migration(2, "quotas", include_str!("../migrations/0002_quotas.sql")),
    ])
}

fn parse_bare(value: &str) -> StoreResult<BareJid> {
    BareJid::new(value).map_err(|error| StoreError::Corrupt(format!("{value:?}: {error}")))
}

fn hash_name(hash: ScramHash) -> &'static str {
    hash.name()
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and runs pending migrations.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(backend)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // A connection to a local file does not drop the way a network
            // one does; the default ping before every acquire would double
            // the cross-thread round trips of each query.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(backend)?;
        migrator()
            .run(&pool)
            .await
            .map_err(|error| StoreError::Backend(error.to_string()))?;
        Ok(SqliteStore { pool })
    }

    /// Closes the pool, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn read_roster_item(
        connection: &mut sqlx::SqliteConnection,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<Option<RosterItem>> {
        let row = sqlx::query("SELECT * FROM roster_items WHERE jid = ?1 AND contact = ?2")
            .bind(user.as_str())
            .bind(contact.as_str())
            .fetch_optional(&mut *connection)
            .await
            .map_err(backend)?;
        let Some(row) = row else { return Ok(None) };
        let mut item = roster_item_from_row(&row)?;
        let groups = sqlx::query(
            "SELECT name FROM roster_groups WHERE jid = ?1 AND contact = ?2 ORDER BY position",
        )
        .bind(user.as_str())
        .bind(contact.as_str())
        .fetch_all(&mut *connection)
        .await
        .map_err(backend)?;
        item.groups = groups.into_iter().map(|row| row.get(0)).collect();
        Ok(Some(item))
    }

    /// Creates or replaces the item and its groups.
    async fn write_roster_item(
        connection: &mut sqlx::SqliteConnection,
        user: &BareJid,
        item: &RosterItem,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO roster_items (jid, contact, name, subscription, ask, approved) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (jid, contact) DO UPDATE SET name = excluded.name, subscription = excluded.subscription,
             ask = excluded.ask, approved = excluded.approved",
        )
        .bind(user.as_str())
        .bind(item.jid.as_str())
        .bind(item.name.as_deref())
        .bind(item.subscription.as_str())
        .bind(i64::from(item.ask))
        .bind(i64::from(item.approved))
        .execute(&mut *connection)
        .await
        .map_err(backend)?;
        sqlx::query("DELETE FROM roster_groups WHERE jid = ?1 AND contact = ?2")
            .bind(user.as_str())
            .bind(item.jid.as_str())
            .execute(&mut *connection)
            .await
            .map_err(backend)?;
        for (position, group) in item.groups.iter().enumerate() {
            sqlx::query(
                "INSERT INTO roster_groups (jid, contact, position, name) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(user.as_str())
            .bind(item.jid.as_str())
            .bind(position as i64)
            .bind(group)
            .execute(&mut *connection)
            .await
            .map_err(backend)?;
        }
        Ok(())
    }

    async fn bump_roster_version(tx: &mut sqlx::SqliteConnection, user: &str) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO roster_versions (jid, version) VALUES (?1, 1)
             ON CONFLICT (jid) DO UPDATE SET version = version + 1 RETURNING version",
        )
        .bind(user)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        Ok(row.get(0))
    }

    async fn groups(&self, user: &str) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT contact, name FROM roster_groups WHERE jid = ?1 ORDER BY contact, position",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }
}

fn roster_item_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<RosterItem> {
    let contact: String = row.get("contact");
    let subscription: String = row.get("subscription");
    Ok(RosterItem {
        jid: parse_bare(&contact)?,
        name: row.get("name"),
        subscription: Subscription::parse(&subscription)
            .ok_or_else(|| StoreError::Corrupt(format!("subscription {subscription:?}")))?,
        ask: row.get::<i64, _>("ask") != 0,
        approved: row.get::<i64, _>("approved") != 0,
        groups: Vec::new(),
    })
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_account(&self, jid: &BareJid, keys: &[ScramKeys]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let inserted = sqlx::query(
            "INSERT INTO accounts (jid, created_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )
        .bind(jid.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::AlreadyExists);
        }
        for key in keys {
            insert_keys(&mut tx, jid, key).await?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn delete_account(&self, jid: &BareJid) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        for table in [
            "account_keys",
            "last_activity",
            "roster_versions",
            "roster_items",
            "roster_groups",
            "subscription_requests",
            "offline_messages",
            "documents",
            "blocklist",
        ] {
            let sql = format!("DELETE FROM {table} WHERE jid = ?1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(jid.as_str())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        let deleted = sqlx::query("DELETE FROM accounts WHERE jid = ?1")
            .bind(jid.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn set_keys(&self, jid: &BareJid, keys: &[ScramKeys]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let exists = sqlx::query("SELECT 1 FROM accounts WHERE jid = ?1")
            .bind(jid.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        if exists.is_none() {
            return Err(StoreError::NoSuchAccount);
        }
        sqlx::query("DELETE FROM account_keys WHERE jid = ?1")
            .bind(jid.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        for key in keys {
            insert_keys(&mut tx, jid, key).await?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn keys(&self, jid: &BareJid, hash: ScramHash) -> StoreResult<Option<ScramKeys>> {
        let row = sqlx::query("SELECT salt, iterations, stored_key, server_key FROM account_keys WHERE jid = ?1 AND hash = ?2")
            .bind(jid.as_str())
            .bind(hash_name(hash))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.map(|row| ScramKeys {
            hash,
            salt: row.get(0),
            iterations: row.get::<i64, _>(1) as u32,
            stored_key: row.get(2),
            server_key: row.get(3),
        }))
    }

    async fn account_exists(&self, jid: &BareJid) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM accounts WHERE jid = ?1")
            .bind(jid.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    async fn list_accounts(&self, domain: &str) -> StoreResult<Vec<BareJid>> {
        let rows = sqlx::query("SELECT jid FROM accounts WHERE jid LIKE '%@' || ?1 ORDER BY jid")
            .bind(domain)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| parse_bare(row.get::<&str, _>(0)))
            .filter(|jid| {
                jid.as_ref()
                    .map_or(true, |jid| jid.domain().as_str() == domain)
            })
            .collect()
    }

    async fn set_last_activity(&self, jid: &BareJid, last: &LastActivity) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO last_activity (jid, at, status) VALUES (?1, ?2, ?3)
             ON CONFLICT (jid) DO UPDATE SET at = excluded.at, status = excluded.status",
        )
        .bind(jid.as_str())
        .bind(last.at)
        .bind(last.status.as_deref())
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn last_activity(&self, jid: &BareJid) -> StoreResult<Option<LastActivity>> {
        let row = sqlx::query("SELECT at, status FROM last_activity WHERE jid = ?1")
            .bind(jid.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.map(|row| LastActivity {
            at: row.get(0),
            status: row.get(1),
        }))
    }

    async fn server_secret(&self, name: &str) -> StoreResult<[u8; 32]> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(&fresh[..])
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        let row = sqlx::query("SELECT value FROM server_secrets WHERE name = ?1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        let value: Vec<u8> = row.get(0);
        value
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("server secret {name:?} is not 32 bytes")))
    }
}

async fn insert_keys(
    tx: &mut sqlx::SqliteConnection,
    jid: &BareJid,
    key: &ScramKeys,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO account_keys (jid, hash, salt, iterations, stored_key, server_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .bind(jid.as_str())
    .bind(hash_name(key.hash))
    .bind(&key.salt)
    .bind(i64::from(key.iterations))
    .bind(&key.stored_key)
    .bind(&key.server_key)
    .execute(&mut *tx)
    .await
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl RosterStore for SqliteStore {
    async fn roster(&self, user: &BareJid) -> StoreResult<Roster> {
        let version = sqlx::query("SELECT version FROM roster_versions WHERE jid = ?1")
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?
            .map_or(0, |row| row.get(0));
        let rows = sqlx::query("SELECT * FROM roster_items WHERE jid = ?1 ORDER BY contact")
            .bind(user.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        let mut items = rows
            .iter()
            .map(roster_item_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        for (contact, group) in self.groups(user.as_str()).await? {
            if let Some(item) = items.iter_mut().find(|item| item.jid.as_str() == contact) {
                item.groups.push(group);
            }
        }
        Ok(Roster { version, items })
    }

    async fn roster_item(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<Option<RosterItem>> {
        let mut connection = self.pool.acquire().await.map_err(backend)?;
        Self::read_roster_item(&mut connection, user, contact).await
    }

    async fn put_roster_item(&self, user: &BareJid, item: &RosterItem) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        // Every roster write takes the user's version first (see replace_roster_item).
        let version = Self::bump_roster_version(&mut tx, user.as_str()).await?;
        Self::write_roster_item(&mut tx, user, item).await?;
        tx.commit().await.map_err(backend)?;
        Ok(version)
    }

    async fn replace_roster_item(
        &self,
        user: &BareJid,
        expected: Option<&RosterItem>,
        item: &RosterItem,
    ) -> StoreResult<Option<i64>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        // Writing first takes the database's write lock until the commit:
        // the item read next is the latest, and stays so.
        let version = Self::bump_roster_version(&mut tx, user.as_str()).await?;
        let current = Self::read_roster_item(&mut tx, user, &item.jid).await?;
        if current.as_ref() != expected {
            tx.rollback().await.map_err(backend)?;
            return Ok(None);
        }
        Self::write_roster_item(&mut tx, user, item).await?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(version))
    }

    async fn remove_roster_item(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<Option<i64>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let version = Self::bump_roster_version(&mut tx, user.as_str()).await?;
        let deleted = sqlx::query("DELETE FROM roster_items WHERE jid = ?1 AND contact = ?2")
            .bind(user.as_str())
            .bind(contact.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if deleted.rows_affected() == 0 {
            tx.rollback().await.map_err(backend)?;
            return Ok(None);
        }
        sqlx::query("DELETE FROM roster_groups WHERE jid = ?1 AND contact = ?2")
            .bind(user.as_str())
            .bind(contact.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(Some(version))
    }

    async fn put_subscription_request(
        &self,
        user: &BareJid,
        contact: &BareJid,
        stanza: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO subscription_requests (jid, contact, stanza) VALUES (?1, ?2, ?3)
             ON CONFLICT (jid, contact) DO UPDATE SET stanza = excluded.stanza",
        )
        .bind(user.as_str())
        .bind(contact.as_str())
        .bind(stanza)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(())
    }

    async fn remove_subscription_request(
        &self,
        user: &BareJid,
        contact: &BareJid,
    ) -> StoreResult<bool> {
        let deleted =
            sqlx::query("DELETE FROM subscription_requests WHERE jid = ?1 AND contact = ?2")
                .bind(user.as_str())
                .bind(contact.as_str())
                .execute(&self.pool)
                .await
                .map_err(backend)?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn subscription_requests(&self, user: &BareJid) -> StoreResult<Vec<(BareJid, String)>> {
        let rows = sqlx::query(
            "SELECT contact, stanza FROM subscription_requests WHERE jid = ?1 ORDER BY seq",
        )
        .bind(user.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.iter()
            .map(|row| Ok((parse_bare(row.get::<&str, _>(0))?, row.get(1))))
            .collect()
    }
}

#[async_trait]
impl OfflineStore for SqliteStore {
    async fn push_offline(
        &self,
        user: &BareJid,
        message: &OfflineMessage,
        quota: Quota,
    ) -> StoreResult<()> {
        let size = message.stanza.len() as i64;
        // One statement, so the quota check and the insert are atomic.
        let inserted = sqlx::query(
            "INSERT INTO offline_messages (jid, stored_at, stanza, size)
             SELECT ?1, ?2, ?3, ?4
             WHERE (SELECT COUNT(*) FROM offline_messages WHERE jid = ?1) < ?5
               AND (SELECT COALESCE(SUM(size), 0) FROM offline_messages WHERE jid = ?1) <= ?6 - ?4",
        )
        .bind(user.as_str())
        .bind(message.stored_at)
        .bind(&message.stanza)
        .bind(size)
        .bind(sql_limit(quota.items))
        .bind(sql_limit(quota.bytes))
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if inserted.rows_affected() == 0 {
            return Err(StoreError::QuotaExceeded);
        }
        Ok(())
    }

    async fn read_offline(
        &self,
        user: &BareJid,
        after: i64,
        page: Quota,
    ) -> StoreResult<Vec<StoredOffline>> {
        // The page is chosen from the index (jid, id, size) alone;
        // only its messages are read.
        let rows = sqlx::query(
            "SELECT id, stored_at, stanza FROM offline_messages WHERE id IN (
                 SELECT id FROM (
                     SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n,
                            SUM(size) OVER (ORDER BY id) AS running
                     FROM offline_messages WHERE jid = ?1 AND id > ?2)
                 WHERE n <= ?3 AND (n = 1 OR running <= ?4))
             ORDER BY id",
        )
        .bind(user.as_str())
        .bind(after)
        .bind(sql_limit(page.items))
        .bind(sql_limit(page.bytes))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|row| StoredOffline {
                id: row.get(0),
                message: OfflineMessage {
                    stored_at: row.get(1),
                    stanza: row.get(2),
                },
            })
            .collect())
    }

    async fn remove_offline(&self, user: &BareJid, ids: &[i64]) -> StoreResult<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        // The ids as one JSON array (integers only): one statement whatever their number.
        let list = format!(
            "[{}]",
            ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
        );
        let removed = sqlx::query(
            "DELETE FROM offline_messages
             WHERE jid = ?1 AND id IN (SELECT value FROM json_each(?2))",
        )
        .bind(user.as_str())
        .bind(list)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        Ok(removed.rows_affected() as usize)
    }

    async fn count_offline(&self, user: &BareJid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COUNT(*) FROM offline_messages WHERE jid = ?1")
            .bind(user.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(row.get::<i64, _>(0) as usize)
    }
}

#[async_trait]
impl DocumentStore for SqliteStore {
    async fn put_document(
        &self,
        user: &BareJid,
        kind: DocumentKind,
        key: &str,
        xml: &str,
        quota: Quota,
    ) -> StoreResult<()> {
        if xml.is_empty() {
            sqlx::query("DELETE FROM documents WHERE jid = ?1 AND kind = ?2 AND key = ?3")
                .bind(user.as_str())
                .bind(kind.as_str())
                .bind(key)
                .execute(&self.pool)
                .await
                .map_err(backend)?;
            return Ok(());
        }
        // One statement: the quota counts the user's other documents of the kind.
        let written = sqlx::query(
            "INSERT INTO documents (jid, kind, key, xml) SELECT ?1, ?2, ?3, ?4
             WHERE (SELECT COUNT(*) FROM documents WHERE jid = ?1 AND kind = ?2 AND key <> ?3) < ?5
               AND (SELECT COALESCE(SUM(length(CAST(xml AS BLOB))), 0) FROM documents
                    WHERE jid = ?1 AND kind = ?2 AND key <> ?3) <= ?6 - ?7
             ON CONFLICT (jid, kind, key) DO UPDATE SET xml = excluded.xml",
        )
        .bind(user.as_str())
        .bind(kind.as_str())
        .bind(key)
        .bind(xml)
        .bind(sql_limit(quota.items))
        .bind(sql_limit(quota.bytes))
        .bind(xml.len() as i64)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        if written.rows_affected() == 0 {
            return Err(StoreError::QuotaExceeded);
        }
        Ok(())
    }

    async fn document(
        &self,
        user: &BareJid,
        kind: DocumentKind,
        key: &str,
    ) -> StoreResult<Option<String>> {
        let row =
            sqlx::query("SELECT xml FROM documents WHERE jid = ?1 AND kind = ?2 AND key = ?3")
                .bind(user.as_str())
                .bind(kind.as_str())
                .bind(key)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
        Ok(row.map(|row| row.get(0)))
    }
}

fn parse_jid(value: &str) -> StoreResult<Jid> {
    Jid::new(value).map_err(|error| StoreError::Corrupt(format!("{value:?}: {error}")))
}

#[async_trait]
impl BlockingStore for SqliteStore {
    async fn blocklist(&self, user: &BareJid) -> StoreResult<Vec<Jid>> {
        let rows = sqlx::query("SELECT blocked FROM blocklist WHERE jid = ?1 ORDER BY blocked")
            .bind(user.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|row| parse_jid(row.get::<&str, _>(0)))
            .collect()
    }

    async fn block(&self, user: &BareJid, jids: &[Jid]) -> StoreResult<Vec<Jid>> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let mut added = Vec::new();
        for jid in jids {
            let inserted = sqlx::query(
                "INSERT INTO blocklist (jid, blocked) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .bind(user.as_str())
            .bind(jid.as_str())
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            if inserted.rows_affected() > 0 {
                added.push(jid.clone());
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(added)
    }

    async fn unblock(&self, user: &BareJid, jids: &[Jid]) -> StoreResult<Vec<Jid>> {
        if jids.is_empty() {
            let rows = sqlx::query("DELETE FROM blocklist WHERE jid = ?1 RETURNING blocked")
                .bind(user.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
            return rows
                .iter()
                .map(|row| parse_jid(row.get::<&str, _>(0)))
                .collect();
        }
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let mut removed = Vec::new();
        for jid in jids {
            let deleted = sqlx::query("DELETE FROM blocklist WHERE jid = ?1 AND blocked = ?2")
                .bind(user.as_str())
                .bind(jid.as_str())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            if deleted.rows_affected() > 0 {
                removed.push(jid.clone());
            }
        }
        tx.commit().await.map_err(backend)?;
        Ok(removed)
    }
}
