//! One module per XEP. Each implements [`rookery_router::Extension`] and answers
//! the iqs of its namespace; [`all`] builds the set a server runs.

#![forbid(unsafe_code)]

use std::sync::Arc;

use rookery_router::Extension;

pub mod blocking;
pub mod carbons;
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
        }
    }
}

/// Every module, configured.
pub fn all(config: &ExtConfig) -> Vec<Arc<dyn Extension>> {
    vec![
        Arc::new(disco::Disco),
        Arc::new(ping::Ping),
        Arc::new(version::Version {
            show_os: config.show_os,
        }),
        Arc::new(time::EntityTime),
        Arc::new(last::LastActivity),
        Arc::new(vcard::VCard),
        Arc::new(private::Private {
            quota: config.private_quota,
        }),
        Arc::new(blocking::Blocking),
        Arc::new(carbons::Carbons),
        Arc::new(register::Register {
            open: config.registration,
            iterations: config.scram_iterations,
        }),
    ]
}
