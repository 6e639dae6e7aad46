//! Real `nats-server` processes with JetStream on free loopback ports, one or a
//! three-server cluster, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// One `nats-server` process.
#[derive(Debug)]
pub struct NatsServer {
    /// Client port.
    pub port: u16,
    /// Cluster route port.
    pub cluster_port: u16,
    name: String,
    routes: Vec<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut command = Command::new("nats-server");
        command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-n",
                &self.name,
            ])
            .arg("-sd")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !self.routes.is_empty() {
            let routes: Vec<String> = self
                .routes
                .iter()
                .map(|port| format!("nats://127.0.0.1:{port}"))
                .collect();
            command
                .args(["--cluster_name", "rookery-test"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", self.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        self.child = Some(
            command
                .spawn()
                .expect("nats-server is installed (Debian package nats-server)"),
        );
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a single server.
    pub fn start() -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            cluster_port: free_port(),
            name: format!("nats-{}", free_port()),
            routes: Vec::new(),
            dir: tempfile::tempdir().expect("a data folder"),
            child: None,
        };
        server.spawn();
        server.wait_ready();
        server
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready();
    }

    /// Starts it again on the same ports with an empty store, as a server
    /// whose disk was lost or that an operator started on a fresh folder.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.dir = tempfile::tempdir().expect("a data folder");
        self.spawn();
        self.wait_ready();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of `nats-server` processes.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other, and waits until JetStream has a leader.
    pub fn start(size: usize) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let servers: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(index, (port, cluster_port))| {
                let mut server = NatsServer {
                    port: *port,
                    cluster_port: *cluster_port,
                    name: format!("nats-{index}-{port}"),
                    routes: ports.iter().map(|(_, route)| *route).collect(),
                    dir: tempfile::tempdir().expect("a data folder"),
                    child: None,
                };
                server.spawn();
                server
            })
            .collect();
        for server in &servers {
            server.wait_ready();
        }
        NatsCluster { servers }
    }

    /// Every client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }
}
