//! The storage conformance suite against PostgreSQL, one fresh database per test.

use rookery_store_postgres::PostgresStore;
use rookery_store_postgres::testing::TempDatabase;

/// A store on a database that is dropped with it.
struct TempStore {
    store: PostgresStore,
    _database: TempDatabase,
}

impl std::ops::Deref for TempStore {
    type Target = PostgresStore;
    fn deref(&self) -> &PostgresStore {
        &self.store
    }
}

async fn temp_store() -> TempStore {
    let database = TempDatabase::create()
        .await
        .expect("a PostgreSQL server for tests (ROOKERY_TEST_POSTGRES_URL)");
    let store = PostgresStore::connect(&database.url, 5)
        .await
        .expect("connect and migrate");
    TempStore {
        store,
        _database: database,
    }
}

rookery_store::store_conformance_tests!(temp_store());

#[tokio::test]
async fn migrations_run_once() {
    let database = TempDatabase::create().await.unwrap();
    let first = PostgresStore::connect(&database.url, 2).await.unwrap();
    first.close().await;
    let again = PostgresStore::connect(&database.url, 2)
        .await
        .expect("a second start finds the schema in place");
    again.close().await;
}
