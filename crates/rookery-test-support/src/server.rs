//! [`TestServer`]: a whole Rookery server in the test process, on free loopback
//! ports, with its own data folder and the test certificate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rookery_app::{Addresses, App, Config};
use rookery_router::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::certs::pki;

/// A server configuration for tests: loopback, free ports, test certificate, data in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let loopback = |port| Some(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut config = Config::default();
    config.server.data_dir = dir.to_path_buf();
    config.server.shutdown_grace = 5;
    config.c2s.starttls_listen = loopback(0);
    config.c2s.direct_tls_listen = loopback(0);
    config.http.listen = loopback(0);
    config.component.listen = loopback(0);
    config.tls.cert = Some(pki().cert_path.clone());
    config.tls.key = Some(pki().key_path.clone());
    // Tests hammer one address; the limits are tested on their own.
    config.limits.login_failures_burst = 1000;
    config.limits.login_failures_per_minute = 1000;
    config.limits.registrations_per_hour = 1000;
    config
}

/// A running in-process server.
pub struct TestServer {
    /// Where it listens.
    pub addresses: Addresses,
    /// Its configuration.
    pub config: Config,
    router: Arc<Router>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl TestServer {
    /// Starts a server with the test defaults.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `configure` adjusted the test defaults.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        crate::init_tracing();
        let dir = tempfile::tempdir().expect("temporary data folder");
        let mut config = test_config(dir.path());
        configure(&mut config);
        let mut server = Self::start_config(config).await;
        server.dir = Some(dir);
        server
    }

    /// Starts a server on an explicit configuration (its data folder is the caller's).
    pub async fn start_config(config: Config) -> TestServer {
        let app = App::build(config.clone())
            .await
            .expect("the test server starts");
        let addresses = app.addresses();
        let router = app.router();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            addresses,
            config,
            router,
            stop: Some(stop),
            task: Some(task),
            dir: None,
        }
    }

    /// The data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.config.server.data_dir.clone()
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The STARTTLS listener.
    pub fn starttls(&self) -> SocketAddr {
        self.addresses.starttls.expect("STARTTLS listener")
    }

    /// The direct TLS listener.
    pub fn direct_tls(&self) -> SocketAddr {
        self.addresses.direct_tls.expect("direct TLS listener")
    }

    /// The HTTP listener.
    pub fn http(&self) -> SocketAddr {
        self.addresses.http.expect("HTTP listener")
    }

    /// The external component listener (when components are configured).
    pub fn component(&self) -> SocketAddr {
        self.addresses.component.expect("component listener")
    }

    /// Creates an account `name@localhost` (with `accounts.scram_iterations`).
    pub async fn create_user(&self, name: &str, password: &str) {
        let jid = rookery_ext::register::account_jid(name, &self.config.server.domain)
            .expect("valid user name");
        let iterations = self.config.accounts.scram_iterations;
        rookery_ext::register::create_account(self.router.store(), &jid, password, iterations)
            .await
            .expect("account created");
    }

    /// Number of bound sessions.
    pub fn sessions(&self) -> usize {
        self.router.bus().local_sessions()
    }

    /// Stops the server the way SIGTERM does and waits for it; keeps the data folder.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("clean shutdown");
        }
    }

    /// Stops, then starts a new server on the same data folder (new ports).
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let mut restarted = Self::start_config(self.config.clone()).await;
        restarted.dir = self.dir.take();
        restarted
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
