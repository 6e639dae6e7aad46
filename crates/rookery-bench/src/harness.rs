//! The processes the fault checker ([`crate::check`]) runs and breaks, each
//! on loopback ports that stay the same across restarts: a throwaway
//! PostgreSQL server, `nats-server` (one, or a cluster of three), Rookery
//! nodes, and TCP proxies between the nodes and NATS that can be cut.
//!
//! Everything lives under one folder, removed when the [`Folder`] is dropped;
//! every process is killed when its handle is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

/// A free loopback port (free when asked; the caller binds it soon after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something listens on `port`.
fn wait_listening(port: u16, within: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn signal(child: &Child, signal: rustix::process::Signal) -> anyhow::Result<()> {
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .context("a live pid")?;
    rustix::process::kill_process(pid, signal)?;
    Ok(())
}

/// The run's folder, removed at the end unless kept.
#[derive(Debug)]
pub struct Folder {
    /// Where it is.
    pub path: PathBuf,
    /// Keep it (logs) after the run.
    pub keep: bool,
}

impl Folder {
    /// Makes `path` (emptied first).
    pub fn create(path: PathBuf, keep: bool) -> anyhow::Result<Folder> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Folder { path, keep })
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A PostgreSQL server of its own (initdb in the run's folder), so that it can
/// be restarted without touching anybody else's.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    as_root: bool,
}

impl Postgres {
    /// Creates and starts a server in `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is installed (Debian package postgresql)")?
            .flatten()
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .context("no initdb under /usr/lib/postgresql")?;
        std::fs::create_dir_all(dir)?;
        let as_root = rustix::process::geteuid().is_root();
        let postgres = Postgres {
            bin,
            dir: dir.to_owned(),
            port: free_port()?,
            as_root,
        };
        if as_root {
            // PostgreSQL refuses to run as root.
            let status = Command::new("chown").arg("postgres").arg(dir).status()?;
            anyhow::ensure!(status.success(), "chown postgres {}", dir.display());
        }
        let initdb = postgres
            .command("initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(initdb.success(), "initdb failed");
        postgres.pg_ctl("start")?;
        Ok(postgres)
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = if self.as_root {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(program));
            command
        } else {
            Command::new(self.bin.join(program))
        };
        command.stdin(Stdio::null());
        command
    }

    fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-m", "immediate", "-o", &options, action])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "pg_ctl {action} failed");
        Ok(())
    }

    /// Stops it as a crash would (immediate: no checkpoint) and starts it again.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl("restart")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl("stop");
    }
}

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct Nats {
    /// Client port.
    pub port: u16,
    cluster_port: u16,
    /// Monitoring (HTTP) port: `/healthz`.
    monitor_port: u16,
    routes: Vec<u16>,
    name: String,
    dir: PathBuf,
    /// Stores made so far (a restart without its store takes a new one).
    stores: u32,
    child: Option<Child>,
}

impl Nats {
    /// `count` servers (1, or a cluster of 3) with their stores under `dir`.
    pub fn start_all(dir: &Path, count: usize) -> anyhow::Result<Vec<Nats>> {
        let ports: Vec<(u16, u16, u16)> = (0..count)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let mut servers = Vec::new();
        for (index, (port, cluster_port, monitor_port)) in ports.iter().enumerate() {
            let routes = if count > 1 {
                ports.iter().map(|(_, cluster, _)| *cluster).collect()
            } else {
                Vec::new()
            };
            let mut server = Nats {
                port: *port,
                cluster_port: *cluster_port,
                monitor_port: *monitor_port,
                routes,
                name: format!("nats{index}"),
                dir: dir.join(format!("nats{index}")),
                stores: 0,
                child: None,
            };
            server.spawn()?;
            servers.push(server);
        }
        for server in &servers {
            wait_listening(server.port, Duration::from_secs(20), "nats-server")?;
        }
        Ok(servers)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let store = self.dir.join(format!("store{}", self.stores));
        std::fs::create_dir_all(&store)?;
        let log = std::fs::File::create(self.dir.join(format!("nats{}.log", self.stores)))?;
        let mut command = Command::new("nats-server");
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .args(["-n", &self.name])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            command
                .args(["--cluster_name", "rookery-check"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", self.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        self.child = Some(
            command
                .spawn()
                .context("nats-server is installed (Debian package nats-server)")?,
        );
        Ok(())
    }

    /// True when the server answers `/healthz` with 200: running, and with
    /// JetStream current (every stream and consumer it holds a replica of
    /// caught up with its group).
    pub async fn healthy(&self) -> bool {
        let address = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        http_status(address, "/healthz").await == Some(200)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The store folders it lost (one per start with an empty store), kept
    /// in the run's folder.
    pub fn lost_stores(&self) -> Vec<PathBuf> {
        (0..self.stores)
            .map(|store| self.dir.join(format!("store{store}")))
            .collect()
    }

    /// Starts it again, with its store or an empty one (a lost disk).
    pub fn start(&mut self, keep_store: bool) -> anyhow::Result<()> {
        self.kill();
        if !keep_store {
            self.stores += 1;
        }
        self.spawn()?;
        wait_listening(self.port, Duration::from_secs(20), "nats-server")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Rookery node: `rookery serve` on a configuration file of its own.
#[derive(Debug)]
pub struct Node {
    /// Its name in the cluster.
    pub name: String,
    /// The STARTTLS listener.
    pub starttls: SocketAddr,
    /// The HTTP listener (probes).
    pub http: SocketAddr,
    binary: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// What a node is started with.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The `rookery` binary.
    pub binary: PathBuf,
    /// Where the node reaches NATS (one URL per server).
    pub nats: Vec<String>,
    /// The PostgreSQL URL.
    pub postgres: String,
    /// JetStream replicas.
    pub replicas: usize,
    /// `[cluster] failure_timeout`, seconds.
    pub failure_timeout: f64,
    /// `[server] shutdown_grace`, seconds.
    pub shutdown_grace: u64,
}

impl Node {
    /// Writes the node's configuration in `dir` and starts it (not waiting).
    pub fn start(name: &str, dir: &Path, settings: &NodeSettings) -> anyhow::Result<Node> {
        std::fs::create_dir_all(dir)?;
        let (starttls, direct, http) = (free_port()?, free_port()?, free_port()?);
        let nats: Vec<String> = settings.nats.iter().map(|url| format!("{url:?}")).collect();
        let config = format!(
            "[server]\n\
             data_dir = {data:?}\n\
             shutdown_grace = {grace}\n\
             [c2s]\n\
             starttls_listen = \"127.0.0.1:{starttls}\"\n\
             direct_tls_listen = \"127.0.0.1:{direct}\"\n\
             [http]\n\
             listen = \"127.0.0.1:{http}\"\n\
             [storage]\n\
             backend = \"postgres\"\n\
             postgres_url = {postgres:?}\n\
             postgres_max_connections = 5\n\
             [cluster]\n\
             node = {name:?}\n\
             nats = [{nats}]\n\
             heartbeat_interval = {heartbeat}\n\
             failure_timeout = {failure}\n\
             nats_replicas = {replicas}\n\
             [limits]\n\
             login_failures_burst = 1000\n\
             login_failures_per_minute = 1000\n\
             [log]\n\
             level = \"info\"\n",
            data = dir.join("data").display().to_string(),
            grace = settings.shutdown_grace,
            postgres = settings.postgres,
            nats = nats.join(", "),
            heartbeat = settings.failure_timeout / 10.0,
            failure = settings.failure_timeout,
            replicas = settings.replicas,
        );
        std::fs::write(dir.join("rookery.toml"), config)?;
        let mut node = Node {
            name: name.to_owned(),
            starttls: SocketAddr::from(([127, 0, 0, 1], starttls)),
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            binary: settings.binary.clone(),
            dir: dir.to_owned(),
            child: None,
            stopped: false,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))?;
        let child = rookery(&self.binary)
            .arg("--config")
            .arg(self.dir.join("rookery.toml"))
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    /// Runs `rookery <args>` on the node's configuration with `stdin`.
    pub fn command(&self, args: &[&str], stdin: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut child = rookery(&self.binary)
            .arg("--config")
            .arg(self.dir.join("rookery.toml"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        let output = child.wait_with_output()?;
        anyhow::ensure!(
            output.status.success(),
            "rookery {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if http_status(self.http, "/ready").await == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} was not ready within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How it ended, if it ended by itself (a crash).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGKILL, without warning.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.stopped {
                let _ = signal(&child, rustix::process::Signal::CONT);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (at most `within`; killed after).
    /// True when it ended by itself and well.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        if signal(child, rustix::process::Signal::TERM).is_err() {
            return false;
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        false
    }

    /// SIGSTOP: frozen, as in a long pause of a VM.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        signal(child, rustix::process::Signal::STOP)?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        signal(child, rustix::process::Signal::CONT)?;
        self.stopped = false;
        Ok(())
    }

    /// Starts it again on the same configuration (not waiting).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Lines of its log that contain `text`.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("node.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(text))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `rookery` `binary`, to run on its configuration file alone:
/// `ROOKERY_*` variables of the caller's environment (`ROOKERY_CHECK_SEED`,
/// `ROOKERY_TEST_POSTGRES_URL`, ...) would be read as configuration overrides.
pub fn rookery(binary: &Path) -> Command {
    let mut command = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ROOKERY_") {
            command.env_remove(key);
        }
    }
    command
}

/// The status code of `GET path` at `address`, if it answers within 2 s.
pub async fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: rookery\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// Forwards connections to a target until cut: a network partition between
/// one node and one NATS server.
#[derive(Debug)]
pub struct Proxy {
    /// Where the node connects.
    pub address: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let task = {
            let (open, cuts) = (open.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // Dropped: the connection is reset.
                    }
                    let mut cut = cuts.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Ok(Proxy {
            address,
            open,
            cuts,
            task,
        })
    }

    /// Closes every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|generation| *generation += 1);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
