//! The composition root: turns a [`Config`] into a running server. This is the
//! only crate that names concrete backends (SQLite or PostgreSQL storage, the
//! local bus or the NATS bus).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rookery_cluster::{Bus, LocalBus};
use rookery_cluster_nats::{NatsBus, NatsConfig};
use rookery_net::C2s;
use rookery_net::limit::{AddressLimiter, ConnectionLimiter};
use rookery_router::{Router, RouterConfig};
use rookery_store::{Quota, Store};
use rookery_store_postgres::PostgresStore;
use rookery_store_sqlite::SqliteStore;
use rookery_stream::sasl::Decoy;
use rookery_stream::{ComponentConfig, Limits, StreamConfig, Timeouts, TlsPolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod config;

pub use config::Config;

/// The configured storage backend.
#[derive(Debug, Clone)]
pub enum StoreBackend {
    /// One node: a SQLite file.
    Sqlite(Arc<SqliteStore>),
    /// Any number of nodes: PostgreSQL.
    Postgres(Arc<PostgresStore>),
}

impl StoreBackend {
    /// The store behind its traits.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            StoreBackend::Sqlite(store) => store.clone(),
            StoreBackend::Postgres(store) => store.clone(),
        }
    }

    /// Closes connections (SQLite checkpoints its journal).
    pub async fn close(&self) {
        match self {
            StoreBackend::Sqlite(store) => store.close().await,
            StoreBackend::Postgres(store) => store.close().await,
        }
    }
}

/// Opens the configured store (migrations included).
pub async fn open_store(config: &Config) -> anyhow::Result<StoreBackend> {
    match config.storage.backend.as_str() {
        "postgres" => {
            let url = config
                .storage
                .postgres_url
                .as_deref()
                .context("storage.postgres_url is not set")?;
            let store = PostgresStore::connect(url, config.storage.postgres_max_connections)
                .await
                .context("cannot open the PostgreSQL database (storage.postgres_url)")?;
            Ok(StoreBackend::Postgres(Arc::new(store)))
        }
        _ => {
            private_folder(&config.server.data_dir)?;
            let path = config.sqlite_path();
            private_file(&path)?;
            let store = SqliteStore::open(&path)
                .await
                .with_context(|| format!("cannot open database {}", path.display()))?;
            Ok(StoreBackend::Sqlite(Arc::new(store)))
        }
    }
}

/// The certificate and key files to use, generating a self-signed pair on first start.
pub fn certificate_files(config: &Config) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) {
        return Ok((cert.clone(), key.clone()));
    }
    let dir = config.server.data_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if config.cluster.is_some() {
        // Each node would serve a certificate of its own: a client that
        // accepted one node's is refused by the next it lands on.
        tracing::warn!(
            "This cluster node serves a self-signed certificate of its own. Set [tls] cert and key to the domain's certificate, the same on every node."
        );
    }
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    private_folder(&config.server.data_dir)?;
    private_folder(&dir)?;
    let mut names = vec![config.server.domain.clone()];
    if config.server.domain == "localhost" {
        names.push("127.0.0.1".into());
    }
    let (pem, key_pem) = self_signed(&config.server.domain, names)?;
    write_private(&key, key_pem.as_bytes())?;
    std::fs::write(&cert, pem).with_context(|| format!("cannot write {}", cert.display()))?;
    tracing::warn!(cert = %cert.display(), domain = %config.server.domain, "Generated a self-signed certificate; clients will ask to trust it. Set [tls] cert and key for a real one.");
    Ok((cert, key))
}

/// A self-signed certificate for `names`, named after `domain` (what a
/// client shows when it asks to trust it), valid from the start of this year
/// for ten years; with its key, both PEM.
fn self_signed(domain: &str, names: Vec<String>) -> anyhow::Result<(String, String)> {
    let mut params =
        rcgen::CertificateParams::new(names).context("cannot generate a certificate")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, domain);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Rookery (self-signed)");
    let year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(2026, |since| 1970 + since.as_secs() / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let cert = params
        .self_signed(&key)
        .context("cannot generate a certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Makes `dir` (and its parents) if missing, readable by this user only:
/// it holds the account database (SCRAM keys) and the TLS key. A folder of
/// this user's that exists already is narrowed if others could read it; one
/// that belongs to someone else (a volume mounted for a group) is left as
/// it is, with a warning.
pub fn private_folder(dir: &Path) -> anyhow::Result<()> {
    let cannot = || format!("cannot create data folder {}", dir.display());
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(cannot)?;
        }
        let metadata = std::fs::metadata(dir).with_context(cannot)?;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            let mode = format!("{:o}", mode & 0o7777);
            let ours = metadata.uid() == rustix::process::geteuid().as_raw();
            let narrowed = ours
                && std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).is_ok();
            if narrowed {
                tracing::warn!(folder = %dir.display(), %mode, "The data folder was open to other users; it is now 0700.");
            } else {
                tracing::warn!(folder = %dir.display(), %mode, "The data folder is open to other users and cannot be narrowed here; make it 0700 (it holds the account keys).");
            }
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).with_context(cannot)?;
    Ok(())
}

/// Makes sure the file at `path` exists readable by this user only before
/// it is opened (SQLite gives its journal files the database's mode). A
/// file that exists already is narrowed if others could read it (with a
/// warning when that is not possible here).
fn private_file(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let cannot = || format!("cannot create {}", path.display());
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(cannot)?;
        let mode = std::fs::metadata(path)
            .with_context(cannot)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            let mode = format!("{:o}", mode & 0o777);
            let files = [
                path.to_owned(),
                suffixed(path, "-wal"),
                suffixed(path, "-shm"),
            ];
            let narrowed = files.iter().filter(|file| file.exists()).all(|file| {
                std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).is_ok()
            });
            if narrowed {
                tracing::warn!(file = %path.display(), %mode, "The database was open to other users; it is now 0600.");
            } else {
                tracing::warn!(file = %path.display(), %mode, "The database is open to other users and cannot be narrowed here; make it 0600 (it holds the account keys).");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(unix)]
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Where the listeners ended up (port 0 in the config picks a free port).
#[derive(Debug, Clone, Copy, Default)]
pub struct Addresses {
    /// The STARTTLS listener.
    pub starttls: Option<SocketAddr>,
    /// The direct TLS listener.
    pub direct_tls: Option<SocketAddr>,
    /// The HTTP listener.
    pub http: Option<SocketAddr>,
    /// The external component listener.
    pub component: Option<SocketAddr>,
}

/// A server with its ports bound, ready to run.
pub struct App {
    config: Config,
    store: StoreBackend,
    nats: Option<Arc<NatsBus>>,
    router: Arc<Router>,
    c2s: Arc<C2s>,
    starttls: Option<(TcpListener, Arc<StreamConfig>)>,
    direct_tls: Option<(TcpListener, Arc<StreamConfig>)>,
    http: Option<(TcpListener, Arc<StreamConfig>)>,
    component: Option<(TcpListener, Arc<ComponentConfig>)>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("domain", &self.config.server.domain)
            .field("addresses", &self.addresses())
            .finish()
    }
}

impl App {
    /// Opens storage, sets up TLS and binds every configured port.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let store = open_store(&config).await?;
        let (cert, key) = certificate_files(&config)?;
        let tls = rookery_net::tls_config(&cert, &key).context("TLS setup failed")?;

        let limits = &config.limits;
        let router_config = RouterConfig {
            domain: config.server.domain.clone(),
            offline_quota: Quota {
                items: limits.offline_messages,
                bytes: limits.offline_bytes,
            },
            max_roster_items: limits.roster_items,
            inbox_bytes: limits.session_queue_bytes,
            components: config
                .components
                .iter()
                .map(|component| component.domain.clone())
                .collect(),
        };
        let ext_config = rookery_ext::ExtConfig {
            registration: config.accounts.registration,
            scram_iterations: config.accounts.scram_iterations,
            show_os: false,
            private_quota: Quota {
                items: limits.private_storage_items,
                bytes: limits.private_storage_bytes,
            },
            disco: config.disco.clone(),
            ..rookery_ext::ExtConfig::default()
        };
        // Unknown users are answered with stand-in SCRAM parameters derived
        // from this secret: the same on every node, and across restarts.
        let decoy = Decoy {
            secret: store
                .store()
                .server_secret(DECOY_SECRET)
                .await
                .context("cannot read the server secret from storage")?,
            iterations: config.accounts.scram_iterations,
        };
        // Ports are bound before the cluster is joined, so peers learn a reachable address.
        let starttls_listener = bind(config.c2s.starttls_listen, "c2s.starttls_listen").await?;
        let direct_tls_listener =
            bind(config.c2s.direct_tls_listen, "c2s.direct_tls_listen").await?;
        let http_listener = bind(config.http.listen, "http.listen").await?;
        let component_listener = match config.components.is_empty() {
            true => None,
            false => bind(config.component.listen, "component.listen").await?,
        };
        let (bus, nats): (Arc<dyn Bus>, Option<Arc<NatsBus>>) = match &config.cluster {
            None => (Arc::new(LocalBus::new()), None),
            Some(cluster) => {
                let address = cluster.advertise.clone().or_else(|| {
                    starttls_listener
                        .as_ref()
                        .and_then(|l| l.local_addr().ok())
                        .map(|a| a.to_string())
                });
                let nats = NatsBus::connect(NatsConfig {
                    name: cluster.node.clone(),
                    urls: cluster.nats.clone(),
                    heartbeat: Duration::from_secs_f64(cluster.heartbeat_interval),
                    failure_timeout: Duration::from_secs_f64(cluster.failure_timeout),
                    replicas: cluster.nats_replicas,
                    address,
                })
                .await
                .context("cannot join the cluster (cluster.nats)")?;
                (nats.clone(), Some(nats))
            }
        };
        let router = Arc::new(Router::new(
            router_config,
            store.store(),
            bus,
            rookery_ext::all(&ext_config, &store.store()),
        ));
        if let Some(nats) = &nats {
            let recovery: Arc<dyn rookery_cluster::Recovery> = router.clone();
            nats.start(Arc::downgrade(&recovery));
        }

        let mut session_features = router.stream_features();
        session_features.push(rookery_ext::disco::caps_element(&router, &config.disco));
        let c2s_config = &config.c2s;
        let base = StreamConfig {
            domain: config.server.domain.clone(),
            tls: if c2s_config.require_tls {
                TlsPolicy::Required
            } else {
                TlsPolicy::Optional
            },
            allow_plaintext_auth: c2s_config.allow_plaintext_auth,
            registration: config.accounts.registration,
            resume_timeout: (c2s_config.resume_timeout > 0)
                .then(|| c2s_config.resume_timeout.min(u64::from(u32::MAX)) as u32),
            max_unacked: c2s_config.max_unacked,
            max_unacked_bytes: config.limits.session_queue_bytes,
            max_auth_failures: 3,
            limits: Limits {
                max_stanza_bytes: c2s_config.max_stanza_size,
                ..Limits::default()
            },
            timeouts: Timeouts {
                negotiation: Duration::from_secs(c2s_config.negotiation_timeout),
                stanza: Duration::from_secs(c2s_config.stanza_timeout),
                idle: Duration::from_secs(c2s_config.idle_timeout),
                ping: Duration::from_secs(c2s_config.ping_timeout),
                keepalive: Duration::from_secs(c2s_config.keepalive_interval),
            },
            session_features,
            decoy,
        };
        let unencrypted_listener = StreamConfig {
            tls: TlsPolicy::Unavailable,
            ..base.clone()
        };

        let allowlist = limits
            .connection_allowlist
            .iter()
            .filter_map(|entry| config::parse_network(entry))
            .collect();
        let c2s = Arc::new(C2s {
            router: router.clone(),
            tls: Some(tls),
            auth_limiter: AddressLimiter::new(
                limits.login_failures_burst,
                limits.login_failures_per_minute,
            ),
            register_limiter: AddressLimiter::per_hour(
                limits.registrations_per_hour.max(1),
                limits.registrations_per_hour,
            ),
            connections: Arc::new(
                ConnectionLimiter::new(limits.connections_per_address, allowlist).with_rate(
                    limits.new_connections_burst,
                    limits.new_connections_per_minute,
                ),
            ),
            byte_rate: (limits.c2s_rate > 0).then_some((limits.c2s_rate, limits.c2s_burst)),
            resume_timeout: Duration::from_secs(c2s_config.resume_timeout),
            max_unacked_bytes: limits.session_queue_bytes,
            max_unacked: c2s_config.max_unacked,
            max_sessions: config
                .cluster
                .as_ref()
                .map_or(0, |cluster| cluster.max_sessions),
            redirect: std::sync::Mutex::new(None),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });

        let starttls = starttls_listener.map(|l| (l, Arc::new(base.clone())));
        let direct_tls = direct_tls_listener.map(|l| (l, Arc::new(unencrypted_listener.clone())));
        let http = http_listener.map(|l| (l, Arc::new(unencrypted_listener.clone())));
        let component = component_listener.map(|listener| {
            let secrets = config
                .components
                .iter()
                .map(|component| (component.domain.clone(), component.secret.clone()))
                .collect();
            let component_config = ComponentConfig {
                server: config.server.domain.clone(),
                secrets,
                limits: base.limits,
                timeouts: base.timeouts,
            };
            (listener, Arc::new(component_config))
        });
        Ok(App {
            config,
            store,
            nats,
            router,
            c2s,
            starttls,
            direct_tls,
            http,
            component,
        })
    }

    /// The bound addresses.
    pub fn addresses(&self) -> Addresses {
        let address = |listener: &Option<(TcpListener, Arc<StreamConfig>)>| {
            listener.as_ref().and_then(|(l, _)| l.local_addr().ok())
        };
        Addresses {
            starttls: address(&self.starttls),
            direct_tls: address(&self.direct_tls),
            http: address(&self.http),
            component: self
                .component
                .as_ref()
                .and_then(|(listener, _)| listener.local_addr().ok()),
        }
    }

    /// The router (for tests and administration).
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }

    /// Serves until `shutdown` completes, then closes every stream with
    /// `system-shutdown`, keeps unacknowledged stanzas in offline storage and
    /// waits (up to the grace period) for sessions to end.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        let App {
            config,
            store,
            nats,
            router,
            c2s,
            starttls,
            direct_tls,
            http,
            component,
        } = self;
        let servers = TaskTracker::new();
        if let Some((listener, stream)) = starttls {
            tracing::info!(address = %listener.local_addr()?, "Listening for clients (STARTTLS).");
            servers.spawn(rookery_net::serve_starttls(listener, c2s.clone(), stream));
        }
        if let Some((listener, stream)) = direct_tls {
            tracing::info!(address = %listener.local_addr()?, "Listening for clients (direct TLS).");
            servers.spawn(rookery_net::serve_direct_tls(listener, c2s.clone(), stream));
        }
        if let Some((listener, component)) = component {
            tracing::info!(address = %listener.local_addr()?, components = component.secrets.len(), "Listening for external components.");
            servers.spawn(rookery_net::component::serve(
                listener,
                c2s.clone(),
                component,
            ));
        }
        if let Some((listener, stream)) = http {
            tracing::info!(address = %listener.local_addr()?, "Listening for HTTP (WebSocket at /xmpp-websocket).");
            let state = rookery_http::HttpState {
                c2s: c2s.clone(),
                stream,
                secure_loopback: config.http.secure_loopback,
                request_timeout: Duration::from_secs(config.http.request_timeout),
            };
            servers.spawn(async move {
                if let Err(error) = rookery_http::serve(listener, state).await {
                    tracing::error!(%error, "HTTP server failed.");
                }
            });
        }
        // Messages stored offline while a cluster fault hid their recipients'
        // sessions go to those sessions once the registry is current again.
        // After an outage of the bus, that includes what other nodes stored
        // for this node's users meanwhile (a node that stopped during the
        // outage cannot hand them over itself).
        let stop_redelivery = CancellationToken::new();
        let redelivery = {
            let router = router.clone();
            let stop = stop_redelivery.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(REDELIVERY_INTERVAL);
                let mut was_ready = true;
                loop {
                    // Stopped only between rounds: a round takes stored
                    // messages out of storage before it routes them.
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = stop.cancelled() => break,
                    }
                    let ready = router.bus().ready();
                    if ready && !was_ready {
                        let users = router.defer_local_users();
                        tracing::info!(
                            users,
                            "The cluster is back; looking for what was stored for this node's users meanwhile."
                        );
                    }
                    was_ready = ready;
                    if router.bus().healthy() {
                        let routed = router.redeliver_deferred().await;
                        if routed > 0 {
                            tracing::info!(
                                routed,
                                "Messages stored during a cluster fault were delivered."
                            );
                        }
                    }
                }
            })
        };
        tracing::info!(domain = %config.server.domain, "Rookery is ready.");
        shutdown.await;
        stop_redelivery.cancel();
        if tokio::time::timeout(REDELIVERY_STOP, redelivery)
            .await
            .is_err()
        {
            tracing::warn!("The redelivery of stored messages did not finish its round in time.");
        }
        tracing::info!(sessions = router.bus().local_sessions(), "Shutting down.");
        if let Some(nats) = &nats {
            // Peers stop sending new clients here; ours are sent to the least
            // loaded peer, unless this node cannot reach its cluster (its
            // peers may be as cut off, and refuse them).
            nats.stop_accepting();
            let target = router
                .bus()
                .peers()
                .into_iter()
                .filter(|_| router.bus().ready())
                .filter(|peer| peer.address.is_some())
                .min_by_key(|peer| peer.sessions)
                .and_then(|peer| peer.address);
            if let Some(target) = &target {
                tracing::info!(%target, "Clients are redirected to another node.");
            }
            *c2s.redirect.lock().expect("redirect lock") = target;
        }
        router.begin_shutdown();
        c2s.shutdown.cancel();
        servers.close();
        c2s.tasks.close();
        let grace = Duration::from_secs(config.server.shutdown_grace);
        if tokio::time::timeout(grace, async {
            servers.wait().await;
            c2s.tasks.wait().await;
        })
        .await
        .is_err()
        {
            tracing::warn!(
                remaining = c2s.tasks.len(),
                "Some sessions did not end within the grace period."
            );
        }
        if let Some(nats) = &nats {
            // The ending sessions stored what their clients had not
            // acknowledged for users who may already be binding on another
            // node; the periodic redelivery is gone with this node, so it
            // runs once more when the registry is known current past now.
            // Without NATS, nothing can be confirmed: the peers look at what
            // was stored for their users when NATS is back.
            let ended = Instant::now();
            let deadline = ended + FINAL_REDELIVERY_WAIT;
            while router.bus().healthy()
                && router
                    .bus()
                    .registry_confirmed()
                    .is_none_or(|at| at < ended)
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let routed = if router.bus().healthy() {
                router.redeliver_deferred().await
            } else {
                0
            };
            if routed > 0 {
                tracing::info!(
                    routed,
                    "Messages stored while stopping went to sessions on other nodes."
                );
            }
            nats.leave().await;
        }
        store.close().await;
        tracing::info!("Stopped.");
        Ok(())
    }
}

/// How often messages deferred by a cluster outage are retried.
const REDELIVERY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopping node lets a round of redelivery finish.
const REDELIVERY_STOP: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its registry view to be confirmed
/// before its last redelivery (the registry is checked every second).
const FINAL_REDELIVERY_WAIT: Duration = Duration::from_secs(3);

/// The name of the server secret behind the SCRAM stand-in parameters.
const DECOY_SECRET: &str = "scram-decoy";

async fn bind(address: Option<SocketAddr>, key: &str) -> anyhow::Result<Option<TcpListener>> {
    match address {
        None => Ok(None),
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on {address} (`{key}`)"))?;
            Ok(Some(listener))
        }
    }
}
