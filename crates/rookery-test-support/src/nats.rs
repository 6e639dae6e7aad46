//! Real `nats-server` processes with JetStream on free loopback ports, one or a
//! three-server cluster, killed when dropped: the fault checker's
//! ([`rookery_bench::harness::Nats`]) in a temporary folder.

use rookery_bench::harness::Nats;

/// One `nats-server` process.
#[derive(Debug)]
pub struct NatsServer {
    /// Client port.
    pub port: u16,
    server: Nats,
    _dir: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// The client URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Starts a single server.
    pub fn start() -> NatsServer {
        let mut servers = NatsCluster::start(1).servers;
        servers.pop().expect("one server")
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again with the same ports and data.
    pub fn restart(&mut self) {
        self.server.start(true).expect("nats-server starts again");
    }

    /// Starts it again on the same ports with an empty store, as a server
    /// whose disk was lost or that an operator started on a fresh folder.
    pub fn restart_empty(&mut self) {
        self.server.start(false).expect("nats-server starts again");
    }
}

/// A cluster of `nats-server` processes.
#[derive(Debug)]
pub struct NatsCluster {
    /// The servers.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers routed to each other (one: a lone server).
    pub fn start(size: usize) -> NatsCluster {
        let dir = tempfile::tempdir().expect("a data folder");
        let servers = Nats::start_all(dir.path(), size)
            .expect("nats-server is installed (Debian package nats-server)");
        let mut servers: Vec<NatsServer> = servers
            .into_iter()
            .map(|server| NatsServer {
                port: server.port,
                server,
                _dir: None,
            })
            .collect();
        // The last server to go removes the folder.
        if let Some(last) = servers.last_mut() {
            last._dir = Some(dir);
        }
        NatsCluster { servers }
    }

    /// Every client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }
}
