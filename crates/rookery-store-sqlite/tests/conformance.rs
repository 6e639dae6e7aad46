//! The storage conformance suite against SQLite, one fresh database file per test.

use rookery_store_sqlite::SqliteStore;

/// A store in a temporary directory that lives as long as the test.
struct TempStore {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempStore {
    type Target = SqliteStore;
    fn deref(&self) -> &SqliteStore {
        &self.store
    }
}

async fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(&dir.path().join("rookery.sqlite"))
        .await
        .expect("open SQLite store");
    TempStore { store, _dir: dir }
}

rookery_store::store_conformance_tests!(temp_store());

#[tokio::test]
async fn data_survives_reopening() {
    use rookery_store::{AccountStore, OfflineMessage, OfflineStore};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rookery.sqlite");
    let alice = jid::BareJid::new("alice@localhost").unwrap();
    {
        let store = SqliteStore::open(&path).await.unwrap();
        let keys =
            rookery_stream::ScramKeys::generate(rookery_stream::ScramHash::Sha256, "pw", 4096)
                .unwrap();
        store.create_account(&alice, &[keys]).await.unwrap();
        store
            .push_offline(
                &alice,
                &OfflineMessage {
                    stored_at: 1,
                    stanza: "<message/>".into(),
                },
                rookery_store::Quota::UNLIMITED,
            )
            .await
            .unwrap();
        store.close().await;
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert!(store.account_exists(&alice).await.unwrap());
    assert_eq!(
        store
            .read_offline(&alice, 0, rookery_store::Quota::UNLIMITED)
            .await
            .unwrap()
            .len(),
        1
    );
}
