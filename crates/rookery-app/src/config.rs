//! The configuration tree: built-in defaults, then a TOML file, then
//! `ROOKERY_`-prefixed environment variables (`ROOKERY_C2S__REQUIRE_TLS=false`
//! sets `[c2s] require_tls`). Keys mirror the module that uses them.
//!
//! Errors name the key and where it came from (file or variable), so that
//! `rookery config check` and start-up can refuse a bad configuration before
//! any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The served domain and where data lives.
    pub server: ServerConfig,
    /// Client-to-server TCP listeners and stream policy.
    pub c2s: C2sConfig,
    /// HTTP: WebSocket and probes.
    pub http: HttpConfig,
    /// Certificate and key.
    pub tls: TlsConfig,
    /// Durable storage.
    pub storage: StorageConfig,
    /// Clustering on NATS; absent for a single node.
    pub cluster: Option<ClusterConfig>,
    /// Account registration and password hashing.
    pub accounts: AccountsConfig,
    /// Limits that protect the server.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// The disco module: the server's contact addresses (XEP-0157).
    pub disco: rookery_ext::disco::DiscoConfig,
    /// The listener of external components.
    pub component: ComponentListenerConfig,
    /// External components (XEP-0114) that may connect: `[[components]]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentEntry>,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// The XMPP domain served (the part after `@` in user addresses).
    pub domain: String,
    /// Folder for the SQLite database, the generated certificate and other state.
    pub data_dir: PathBuf,
    /// Seconds given to sessions to close cleanly on shutdown.
    pub shutdown_grace: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            domain: "localhost".into(),
            data_dir: "data".into(),
            shutdown_grace: 10,
        }
    }
}

/// `[c2s]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2sConfig {
    /// Listener for clients that start in the clear and use STARTTLS (5222).
    pub starttls_listen: Option<SocketAddr>,
    /// Listener for clients that start with TLS, XEP-0368 (5223).
    pub direct_tls_listen: Option<SocketAddr>,
    /// Require STARTTLS before authentication on the STARTTLS listener.
    pub require_tls: bool,
    /// Allow SASL without TLS (never PLAIN). Only for trusted networks.
    pub allow_plaintext_auth: bool,
    /// Largest stanza a client may send, in bytes.
    pub max_stanza_size: usize,
    /// Seconds a client has from connecting to a bound session.
    pub negotiation_timeout: u64,
    /// Seconds a client has to finish a stanza it started sending.
    pub stanza_timeout: u64,
    /// Seconds of client silence before the server pings it.
    pub idle_timeout: u64,
    /// Seconds the client has to answer a ping.
    pub ping_timeout: u64,
    /// Seconds of server silence before a whitespace keep-alive.
    pub keepalive_interval: u64,
    /// Seconds a dropped session stays resumable (XEP-0198); 0 disables resumption.
    pub resume_timeout: u64,
    /// Unacknowledged stanzas kept per client before the stream is closed.
    pub max_unacked: usize,
}

impl Default for C2sConfig {
    fn default() -> Self {
        C2sConfig {
            starttls_listen: Some(SocketAddr::from(([0, 0, 0, 0], 5222))),
            direct_tls_listen: Some(SocketAddr::from(([0, 0, 0, 0], 5223))),
            require_tls: true,
            allow_plaintext_auth: false,
            max_stanza_size: 256 * 1024,
            negotiation_timeout: 60,
            stanza_timeout: 60,
            idle_timeout: 300,
            ping_timeout: 60,
            keepalive_interval: 120,
            resume_timeout: 300,
            max_unacked: 5000,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listener for HTTP: WebSocket at /xmpp-websocket, /live, /ready (5280).
    pub listen: Option<SocketAddr>,
    /// Treat WebSocket clients connecting from loopback as secure (a TLS proxy on this host).
    pub secure_loopback: bool,
    /// Seconds a client has to send a request's headers; also how long an
    /// idle keep-alive connection waits for its next request.
    pub request_timeout: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 5280))),
            secure_loopback: true,
            request_timeout: 10,
        }
    }
}

/// `[tls]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. Unset: a self-signed one is generated in `<data_dir>/tls/`.
    pub cert: Option<PathBuf>,
    /// PEM private key, set together with `cert`.
    pub key: Option<PathBuf>,
}

/// `[storage]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Storage backend: "sqlite" (one node) or "postgres" (any number of nodes).
    pub backend: String,
    /// SQLite database file; relative paths are inside `data_dir`.
    pub sqlite_path: PathBuf,
    /// PostgreSQL connection URL, for the "postgres" backend.
    pub postgres_url: Option<String>,
    /// Connections to PostgreSQL per node.
    pub postgres_max_connections: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: "sqlite".into(),
            sqlite_path: "rookery.sqlite".into(),
            postgres_url: None,
            postgres_max_connections: 20,
        }
    }
}

/// `[cluster]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster and stable across restarts.
    pub node: String,
    /// NATS servers (with JetStream), as URLs; list them all for a NATS cluster.
    pub nats: Vec<String>,
    /// Seconds between this node's heartbeats.
    pub heartbeat_interval: f64,
    /// Seconds of silence after which a node counts as dead and its sessions end.
    pub failure_timeout: f64,
    /// Replicas of the JetStream state (3 on a three-server NATS cluster).
    pub nats_replicas: usize,
    /// Address (host:port) clients reach this node at, for see-other-host redirects;
    /// default: the STARTTLS listener's address.
    pub advertise: Option<String>,
    /// Most sessions on this node before new clients are redirected (0: no limit).
    pub max_sessions: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node: "rookery".into(),
            nats: vec!["nats://127.0.0.1:4222".into()],
            heartbeat_interval: 1.0,
            failure_timeout: 8.0,
            nats_replicas: 1,
            advertise: None,
            max_sessions: 0,
        }
    }
}

/// `[accounts]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// Let anyone create an account with in-band registration (XEP-0077).
    pub registration: bool,
    /// PBKDF2 iterations for stored SCRAM keys (at least 4096).
    pub scram_iterations: u32,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            registration: false,
            scram_iterations: 4096,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Failed logins allowed from one address in a burst.
    pub login_failures_burst: u32,
    /// Failed logins allowed from one address per minute after the burst.
    pub login_failures_per_minute: u32,
    /// In-band registrations allowed from one address per hour.
    pub registrations_per_hour: u32,
    /// Bytes per second a client may send (0: unlimited).
    pub c2s_rate: u64,
    /// Bytes a client may send in a burst above the rate.
    pub c2s_burst: u64,
    /// Offline messages kept per account.
    pub offline_messages: usize,
    /// Bytes of offline messages kept per account.
    pub offline_bytes: usize,
    /// Roster items per account.
    pub roster_items: usize,
    /// Namespaces kept in private XML storage (XEP-0049) per account.
    pub private_storage_items: usize,
    /// Bytes kept in private XML storage per account.
    pub private_storage_bytes: usize,
    /// Bytes of stanzas waiting for one session (its inbox, and separately
    /// what its client has not acknowledged) before the session is ended as
    /// too slow; what it had not taken goes to offline storage.
    pub session_queue_bytes: usize,
    /// Connections open at once from one address, on all listeners (0: no limit).
    pub connections_per_address: usize,
    /// New connections one address may open per minute, on all listeners,
    /// after `new_connections_burst` (0: no limit).
    pub new_connections_per_minute: u32,
    /// New connections one address may open at once before the rate applies.
    pub new_connections_burst: u32,
    /// Addresses or networks (CIDR) exempt from the connection limits:
    /// a load balancer or proxy in front of the server.
    pub connection_allowlist: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            login_failures_burst: 5,
            login_failures_per_minute: 6,
            registrations_per_hour: 5,
            // A client sends far less (Prosody's default is 10 kB/s); more
            // comes as the burst (logins, avatars) or over HTTP (uploads).
            c2s_rate: 64 * 1024,
            c2s_burst: 1024 * 1024,
            offline_messages: 1000,
            offline_bytes: 8 * 1024 * 1024,
            roster_items: 2000,
            private_storage_items: 100,
            private_storage_bytes: 1024 * 1024,
            session_queue_bytes: 2 * 1024 * 1024,
            connections_per_address: 100,
            new_connections_per_minute: 120,
            new_connections_burst: 60,
            // A proxy on this host (TLS termination, HAProxy) shows every client as loopback.
            connection_allowlist: vec!["127.0.0.0/8".into(), "::1".into()],
        }
    }
}

/// `[component]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentListenerConfig {
    /// Listener for external components (XEP-0114, 5347), opened only when
    /// `[[components]]` lists some. Components authenticate with a shared
    /// secret over plain TCP: keep it on loopback or a private network.
    pub listen: Option<SocketAddr>,
}

impl Default for ComponentListenerConfig {
    fn default() -> Self {
        ComponentListenerConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 5347))),
        }
    }
}

/// One `[[components]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentEntry {
    /// The component's domain (`echo.example.org`): every address at it
    /// reaches the component, on whichever node it is connected.
    pub domain: String,
    /// The secret its handshake proves.
    pub secret: String,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Level or filter: "info", "debug", "rookery_net=debug,info" (RUST_LOG syntax).
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// What toml says, with line, column and key.
        message: String,
    },
    /// An environment override is bad.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("{source_name}: key `{key}`: {message}")]
    Invalid {
        /// File or "defaults".
        source_name: String,
        /// The dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "ROOKERY_";

impl Config {
    /// Loads defaults, then `file` (if any), then environment overrides from `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let source_name = file.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: source_name.clone(),
                    error,
                })?;
                // Parse into the typed tree first: toml reports line, column and key.
                toml::from_str::<Config>(&text).map_err(|error| ConfigError::File {
                    path: source_name.clone(),
                    message: error.to_string(),
                })?;
                text.parse::<toml::Table>()
                    .map_err(|error| ConfigError::File {
                        path: source_name.clone(),
                        message: error.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        let mut overridden = Vec::new();
        for (var, value) in env {
            let Some(path) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if path == "CONFIG" {
                continue;
            }
            let keys: Vec<String> = path.split("__").map(str::to_lowercase).collect();
            if keys.len() < 2 || keys.iter().any(String::is_empty) {
                return Err(ConfigError::Env {
                    var,
                    message: "expected ROOKERY_<SECTION>__<KEY>".into(),
                });
            }
            set_path(&mut table, &keys, parse_env_value(&value));
            overridden.push((keys.join("."), var));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
                let key = error.path().to_string();
                let var = overridden
                    .iter()
                    .find(|(path, _)| *path == key)
                    .map(|(_, var)| var.clone());
                match var {
                    Some(var) => ConfigError::Env {
                        var,
                        message: error.inner().to_string(),
                    },
                    None => ConfigError::File {
                        path: source_name.clone(),
                        message: format!("key `{key}`: {}", error.inner()),
                    },
                }
            })?;
        config.validate(&source_name)?;
        Ok(config)
    }

    fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            source_name: source_name.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        if jid::BareJid::new(&self.server.domain).map_or(true, |jid| jid.node().is_some()) {
            return Err(invalid("server.domain", "not a valid domain name"));
        }
        match self.storage.backend.as_str() {
            "sqlite" if self.cluster.is_some() => {
                return Err(invalid(
                    "storage.backend",
                    "a clustered node needs storage all nodes share: set backend = \"postgres\" and postgres_url",
                ));
            }
            "sqlite" => {}
            "postgres" if self.storage.postgres_url.is_none() => {
                return Err(invalid(
                    "storage.postgres_url",
                    "the postgres backend needs a URL",
                ));
            }
            "postgres" => {}
            _ => {
                return Err(invalid(
                    "storage.backend",
                    "unknown backend (supported: \"sqlite\", \"postgres\")",
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            if cluster.node.is_empty()
                || !cluster
                    .node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
            {
                return Err(invalid("cluster.node", "use letters, digits, '-' and '_'"));
            }
            if cluster.nats.is_empty() {
                return Err(invalid("cluster.nats", "list at least one NATS server"));
            }
            if cluster.heartbeat_interval.is_nan() || cluster.heartbeat_interval <= 0.0 {
                return Err(invalid("cluster.heartbeat_interval", "must be above 0"));
            }
            if cluster.failure_timeout < 2.0 * cluster.heartbeat_interval {
                return Err(invalid(
                    "cluster.failure_timeout",
                    "must be at least two heartbeat intervals",
                ));
            }
            if cluster.nats_replicas == 0 || cluster.nats_replicas > 5 {
                return Err(invalid("cluster.nats_replicas", "must be between 1 and 5"));
            }
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                "tls.cert",
                "`tls.cert` and `tls.key` are set together",
            ));
        }
        if self.accounts.scram_iterations < rookery_stream::sasl::MIN_ITERATIONS {
            return Err(invalid(
                "accounts.scram_iterations",
                "must be at least 4096",
            ));
        }
        if self.c2s.max_stanza_size < 10_000 {
            return Err(invalid(
                "c2s.max_stanza_size",
                "must be at least 10000 bytes",
            ));
        }
        for (key, value) in [
            ("c2s.negotiation_timeout", self.c2s.negotiation_timeout),
            ("c2s.stanza_timeout", self.c2s.stanza_timeout),
            ("c2s.idle_timeout", self.c2s.idle_timeout),
            ("c2s.ping_timeout", self.c2s.ping_timeout),
            ("c2s.keepalive_interval", self.c2s.keepalive_interval),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1 second"));
            }
        }
        if let Err((key, message)) = self.disco.validate() {
            return Err(invalid(&format!("disco.{key}"), &message));
        }
        let mut component_domains = std::collections::HashSet::new();
        for (index, component) in self.components.iter().enumerate() {
            let key = |field: &str| format!("components[{index}].{field}");
            let domain_ok = jid::BareJid::new(&component.domain)
                .is_ok_and(|jid| jid.node().is_none() && jid.as_str() == component.domain);
            if !domain_ok {
                return Err(invalid(&key("domain"), "not a valid domain name"));
            }
            if component.domain == self.server.domain {
                return Err(invalid(
                    &key("domain"),
                    "is the server's own domain; give the component a subdomain",
                ));
            }
            if !component_domains.insert(component.domain.as_str()) {
                return Err(invalid(&key("domain"), "listed twice"));
            }
            if component.secret.is_empty() {
                return Err(invalid(&key("secret"), "must not be empty"));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        if self.http.request_timeout == 0 {
            return Err(invalid("http.request_timeout", "must be at least 1 second"));
        }
        for (index, entry) in self.limits.connection_allowlist.iter().enumerate() {
            if parse_network(entry).is_none() {
                return Err(invalid(
                    &format!("limits.connection_allowlist[{index}]"),
                    "not an IP address or network (\"10.0.0.0/8\", \"::1\")",
                ));
            }
        }
        // A stanza counts about its size plus its tree nodes in a queue: one
        // of the largest must always fit.
        if self.limits.session_queue_bytes < 2 * self.c2s.max_stanza_size {
            return Err(invalid(
                "limits.session_queue_bytes",
                "must be at least twice c2s.max_stanza_size",
            ));
        }
        if self.limits.offline_bytes < self.c2s.max_stanza_size {
            return Err(invalid(
                "limits.offline_bytes",
                "must be at least c2s.max_stanza_size",
            ));
        }
        if self.limits.c2s_rate > 0 && self.limits.c2s_burst < self.c2s.max_stanza_size as u64 {
            return Err(invalid(
                "limits.c2s_burst",
                "must be at least c2s.max_stanza_size",
            ));
        }
        Ok(())
    }

    /// The SQLite database file.
    pub fn sqlite_path(&self) -> PathBuf {
        self.server.data_dir.join(&self.storage.sqlite_path)
    }
}

/// Parses an allow-list entry: an address, or a network in CIDR notation.
pub fn parse_network(entry: &str) -> Option<ipnet::IpNet> {
    entry.parse::<ipnet::IpNet>().ok().or_else(|| {
        entry
            .parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

/// Environment values are TOML values when they parse as one (numbers, booleans,
/// arrays, quoted strings), else plain strings.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    let (last, parents) = keys.split_last().expect("at least two keys");
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        current = entry.as_table_mut().expect("just made a table");
    }
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests;
