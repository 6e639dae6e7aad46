//! [`NodeProcess`]: a Rookery node as a separate `rookery serve` process, on
//! fixed loopback ports that survive restarts, killed or stopped like a real
//! deployment's node (SIGKILL, SIGTERM).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rookery_app::Config;

use rookery_store_postgres::testing::TempDatabase;

use crate::free_port;
use crate::server::test_config;

/// How long a node may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A `rookery serve` process.
#[derive(Debug)]
pub struct NodeProcess {
    /// Its name in the cluster.
    pub name: String,
    /// The STARTTLS listener.
    pub starttls: SocketAddr,
    /// The direct TLS listener.
    pub direct_tls: SocketAddr,
    /// The HTTP listener (WebSocket, probes).
    pub http: SocketAddr,
    /// The configuration it runs on.
    pub config: Config,
    binary: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The test configuration for a node kept in `dir`, on free loopback ports
/// that stay its own across restarts.
fn on_free_ports(dir: &tempfile::TempDir) -> Config {
    let mut config = test_config(&dir.path().join("data"));
    let loopback = |port| Some(SocketAddr::from(([127, 0, 0, 1], port)));
    config.c2s.starttls_listen = loopback(free_port());
    config.c2s.direct_tls_listen = loopback(free_port());
    config.http.listen = loopback(free_port());
    config
}

impl NodeProcess {
    /// Starts a node of the cluster on `nats` and `postgres`, on free loopback
    /// ports, with test certificates and fast failure detection, after
    /// `configure` adjusted its configuration; waits until it is ready.
    pub async fn start_clustered(
        binary: &Path,
        name: &str,
        nats: Vec<String>,
        postgres: &str,
        configure: impl FnOnce(&mut Config),
    ) -> NodeProcess {
        let dir = tempfile::tempdir().expect("a node folder");
        let mut config = on_free_ports(&dir);
        config.storage.backend = "postgres".into();
        config.storage.postgres_url = Some(postgres.to_owned());
        config.storage.postgres_max_connections = 5;
        config.cluster = Some(crate::cluster::cluster_config(name, nats));
        configure(&mut config);
        Self::start(binary, dir, config).await
    }

    /// Starts a single node on its own SQLite database (the embedded
    /// defaults), on free loopback ports, with test certificates, after
    /// `configure` adjusted its configuration; waits until it is ready.
    pub async fn start_single(binary: &Path, configure: impl FnOnce(&mut Config)) -> NodeProcess {
        let dir = tempfile::tempdir().expect("a node folder");
        let mut config = on_free_ports(&dir);
        configure(&mut config);
        Self::start(binary, dir, config).await
    }

    /// Starts `binary serve` on `config`, keeping its files in `dir`, and waits
    /// until it is ready.
    pub async fn start(binary: &Path, dir: tempfile::TempDir, config: Config) -> NodeProcess {
        let name = config
            .cluster
            .as_ref()
            .map_or_else(|| "rookery".to_owned(), |cluster| cluster.node.clone());
        let mut node = NodeProcess {
            name,
            starttls: config.c2s.starttls_listen.expect("STARTTLS listener"),
            direct_tls: config.c2s.direct_tls_listen.expect("direct TLS listener"),
            http: config.http.listen.expect("HTTP listener"),
            config,
            binary: binary.to_owned(),
            dir,
            child: None,
        };
        node.spawn();
        node.wait_ready().await;
        node
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("rookery.toml")
    }

    /// The node's log (standard error of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The end of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How many lines of the log contain `text` (colours left out, so
    /// that `key=value` matches a field).
    pub fn log_count(&self, text: &str) -> usize {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|line| rookery_bench::check::strip_ansi(line).contains(text))
            .count()
    }

    fn spawn(&mut self) {
        let text = toml::to_string(&self.config).expect("the configuration serializes");
        std::fs::write(self.config_path(), text).expect("configuration written");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let _ = writeln!(log, "===== start =====");
        let child = self
            .rookery()
            .arg("--config")
            .arg(self.config_path())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the rookery binary runs");
        self.child = Some(child);
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited ({status}) while starting:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if http_status(self.http, "/ready").await == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready:\n{}",
                self.name,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process without warning (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (a planned stop); [`wait_exit`](Self::wait_exit) reaps it.
    pub fn terminate(&mut self) {
        if let Some(pid) = self.pid() {
            let pid = rustix::process::Pid::from_raw(pid as i32).expect("a live pid");
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)
                .expect("SIGTERM sent");
        }
    }

    /// Waits (at most `timeout`) for the process to exit; kills it if it does not.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts the node again on the same configuration and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// The `rookery` binary, to run on its configuration file alone.
    fn rookery(&self) -> Command {
        rookery_bench::harness::rookery(&self.binary)
    }

    /// Runs `rookery` with `args` on this node's configuration; returns its output.
    pub fn command(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut child = self
            .rookery()
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the rookery binary runs");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("stdin written");
        child.wait_with_output().expect("rookery ran")
    }

    /// Creates `user password` accounts through `rookery user import -`.
    pub fn import_users(&self, lines: &str) {
        let output = self.command(&["user", "import", "-"], lines);
        assert!(
            output.status.success(),
            "user import failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
        // TEST_NODE_LOGS=<folder> keeps every node's whole log there.
        if let Some(folder) = std::env::var_os("TEST_NODE_LOGS") {
            let target =
                Path::new(&folder).join(format!("{}-{}.log", self.name, self.starttls.port()));
            let _ = std::fs::create_dir_all(&folder);
            let _ = std::fs::copy(self.log_path(), target);
        }
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}\n---", self.name, self.log_tail(60));
        }
    }
}

pub use rookery_bench::harness::http_status;

/// Rookery nodes as processes on NATS and a fresh PostgreSQL database.
#[derive(Debug)]
pub struct ProcessCluster {
    /// The nodes, `node0` ...
    pub nodes: Vec<NodeProcess>,
    /// The database they share.
    pub database: TempDatabase,
    nats: Vec<String>,
    binary: PathBuf,
}

impl ProcessCluster {
    /// Starts `size` nodes of `binary` on the NATS servers `nats`; `configure`
    /// adjusts each node's configuration by index.
    pub async fn start(
        binary: &Path,
        nats: Vec<String>,
        size: usize,
        configure: impl Fn(usize, &mut Config),
    ) -> ProcessCluster {
        crate::init_tracing();
        let database = TempDatabase::create()
            .await
            .expect("a PostgreSQL server for tests");
        let mut cluster = ProcessCluster {
            nodes: Vec::new(),
            database,
            nats,
            binary: binary.to_owned(),
        };
        for _ in 0..size {
            cluster.add_node(&configure).await;
        }
        cluster
    }

    /// Starts one more node; returns its index.
    pub async fn add_node(&mut self, configure: impl Fn(usize, &mut Config)) -> usize {
        let index = self.nodes.len();
        let node = NodeProcess::start_clustered(
            &self.binary,
            &format!("node{index}"),
            self.nats.clone(),
            &self.database.url,
            |config| configure(index, config),
        )
        .await;
        self.nodes.push(node);
        index
    }

    /// Creates `name` accounts with `password` through the CLI of node 0.
    pub fn create_users(&self, names: &[String], password: &str) {
        let lines: String = names
            .iter()
            .map(|name| format!("{name} {password}\n"))
            .collect();
        self.nodes[0].import_users(&lines);
    }

    /// The STARTTLS addresses of the nodes.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|node| node.starttls).collect()
    }
}
