//! Fresh, throw-away databases on a PostgreSQL server, for tests: each test gets
//! its own, so tests stay isolated and can run in parallel.

use sqlx::Connection as _;

/// The server tests use: `ROOKERY_TEST_POSTGRES_URL`, else the local server.
pub fn admin_url() -> String {
    std::env::var("ROOKERY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that is dropped with this value.
#[derive(Debug)]
pub struct TempDatabase {
    /// Connection URL of the new database.
    pub url: String,
    name: String,
    admin: String,
}

impl TempDatabase {
    /// Creates an empty database with a unique name.
    pub async fn create() -> Result<TempDatabase, sqlx::Error> {
        let admin = admin_url();
        let name = format!(
            "rookery_test_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let mut connection = sqlx::PgConnection::connect(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut connection)
            .await?;
        connection.close().await?;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Ok(TempDatabase {
            url: format!("{base}/{name}"),
            name,
            admin,
        })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop may run inside a runtime: do the blocking work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut connection = sqlx::PgConnection::connect(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut connection)
                .await?;
                connection.close().await
            })?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: test database {} was not dropped", self.name);
        }
    }
}
