//! [`TestCluster`]: several in-process Rookery nodes sharing one NATS server and
//! one fresh PostgreSQL database, as a story-like test needs them.

use rookery_app::Config;
use rookery_app::config::ClusterConfig;
use rookery_cluster::RouteInfo;
use rookery_store_postgres::testing::TempDatabase;

use crate::nats::NatsServer;
use crate::server::{TestServer, test_config};

/// Cluster settings for tests: fast heartbeats and failure detection.
pub fn cluster_config(node: &str, nats: Vec<String>) -> ClusterConfig {
    ClusterConfig {
        node: node.to_owned(),
        nats,
        heartbeat_interval: 0.2,
        failure_timeout: 2.0,
        ..ClusterConfig::default()
    }
}

/// Nodes of one domain on NATS and PostgreSQL.
pub struct TestCluster {
    /// The nodes.
    pub nodes: Vec<TestServer>,
    /// The NATS server.
    pub nats: NatsServer,
    /// The database.
    pub database: TempDatabase,
    dirs: Vec<tempfile::TempDir>,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl TestCluster {
    /// Starts `size` nodes.
    pub async fn start(size: usize) -> TestCluster {
        Self::start_with(size, |_, _| {}).await
    }

    /// Starts `size` nodes after `configure(index, config)` adjusted each.
    pub async fn start_with(size: usize, configure: impl Fn(usize, &mut Config)) -> TestCluster {
        crate::init_tracing();
        let nats = NatsServer::start();
        let database = TempDatabase::create()
            .await
            .expect("a PostgreSQL server for tests");
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for index in 0..size {
            let dir = tempfile::tempdir().expect("a data folder");
            let config = node_config(index, dir.path(), &nats, &database, &configure);
            nodes.push(TestServer::start_config(config).await);
            dirs.push(dir);
        }
        TestCluster {
            nodes,
            nats,
            database,
            dirs,
        }
    }

    /// One node.
    pub fn node(&self, index: usize) -> &TestServer {
        &self.nodes[index]
    }

    /// Creates an account (through node 0; the database is shared).
    pub async fn create_user(&self, name: &str, password: &str) {
        self.nodes[0].create_user(name, password).await;
    }

    /// Waits (at most 10 s) until every node's copy of the session registry
    /// shows the session `jid` (a full JID) in a state `what` accepts. A
    /// session's routing state (availability, priority, carbons) reaches the
    /// other nodes through the registry watch a moment after its own node
    /// answered the client.
    pub async fn wait_until_every_node_sees(&self, jid: &str, what: impl Fn(&RouteInfo) -> bool) {
        let full: jid::FullJid = jid.parse().expect("a full JID");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let seen = self.nodes.iter().all(|node| {
                node.router()
                    .bus()
                    .route(&full)
                    .is_some_and(|route| what(&route.info))
            });
            if seen {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every node saw the expected state of {jid}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Adds a node.
    pub async fn add_node(&mut self, configure: impl Fn(usize, &mut Config)) -> usize {
        let index = self.nodes.len();
        let dir = tempfile::tempdir().expect("a data folder");
        let config = node_config(index, dir.path(), &self.nats, &self.database, &configure);
        self.nodes.push(TestServer::start_config(config).await);
        self.dirs.push(dir);
        index
    }
}

fn node_config(
    index: usize,
    dir: &std::path::Path,
    nats: &NatsServer,
    database: &TempDatabase,
    configure: &impl Fn(usize, &mut Config),
) -> Config {
    let mut config = test_config(dir);
    config.storage.backend = "postgres".into();
    config.storage.postgres_url = Some(database.url.clone());
    config.storage.postgres_max_connections = 5;
    config.cluster = Some(cluster_config(&format!("node{index}"), vec![nats.url()]));
    configure(index, &mut config);
    config
}
