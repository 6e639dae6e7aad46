//! One module per XEP. Each implements [`rookery_router::Extension`] and answers
//! the iqs of its namespace; [`all`] builds the set a server runs.

#![forbid(unsafe_code)]

use std::sync::Arc;

use rookery_router::Extension;
use rookery_store::Store;

pub mod blocking;
pub mod carbons;
pub mod csi;
pub mod disco;
pub mod last;
pub mod ping;
pub mod private;
pub mod register;
pub mod time;
pub mod vcard;
pub mod version;

/// Settings of the modules.
#[derive(Debug, Clone)]
pub struct ExtConfig {
    /// Allow XEP-0077 in-band registration of new accounts.
    pub registration: bool,
    /// PBKDF2 iterations for new passwords.
    pub scram_iterations: u32,
    /// Report the operating system in XEP-0092 answers.
    pub show_os: bool,
    /// What one account may keep in XEP-0049 private storage.
    pub private_quota: rookery_store::Quota,
    /// The disco module's section.
    pub disco: disco::DiscoConfig,
    /// Presence stanzas held for an inactive client (XEP-0352) before all are sent.
    pub csi_hold_limit: usize,
}

impl Default for ExtConfig {
    fn default() -> Self {
        ExtConfig {
            registration: false,
            scram_iterations: 4096,
            show_os: false,
            private_quota: rookery_store::Quota {
                items: 100,
                bytes: 1024 * 1024,
            },
            disco: disco::DiscoConfig::default(),
            csi_hold_limit: 200,
        }
    }
}

/// Every module, configured, each with the part of `store` it keeps its
/// data in (its own store trait: a module sees nothing else of storage).
pub fn all(config: &ExtConfig, store: &Arc<dyn Store>) -> Vec<Arc<dyn Extension>> {
    vec![
        Arc::new(disco::Disco {
            config: config.disco.clone(),
        }),
        Arc::new(ping::Ping),
        Arc::new(version::Version {
            show_os: config.show_os,
        }),
        Arc::new(time::EntityTime),
        Arc::new(last::LastActivity {
            accounts: store.clone(),
            rosters: store.clone(),
        }),
        Arc::new(vcard::VCard {
            documents: store.clone(),
        }),
        Arc::new(private::Private {
            quota: config.private_quota,
            documents: store.clone(),
        }),
        Arc::new(blocking::Blocking {
            lists: store.clone(),
        }),
        Arc::new(carbons::Carbons),
        Arc::new(register::Register {
            open: config.registration,
            iterations: config.scram_iterations,
            accounts: store.clone(),
        }),
        // Last among the delivery hooks: a stanza it lets through flushes
        // what it held, so no hook after it may keep one (a test holds this).
        Arc::new(csi::Csi {
            hold_limit: config.csi_hold_limit,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_state_indication_is_the_last_delivery_hook() {
        let dir = tempfile::tempdir().unwrap();
        let store = rookery_store_sqlite::SqliteStore::open(&dir.path().join("test.db"))
            .await
            .unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let modules = all(&ExtConfig::default(), &store);
        let last = modules
            .iter()
            .rfind(|module| module.hooks().delivery)
            .expect("delivery hooks");
        assert_eq!(last.server_features(), [rookery_router::namespaces::CSI]);
    }
}
