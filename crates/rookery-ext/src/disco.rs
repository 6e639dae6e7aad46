//! XEP-0030: Service Discovery for the server and accounts, the server's
//! XEP-0115 entity capabilities advertised in stream features, and its
//! XEP-0157 contact addresses (the module's config section, `[disco]`).

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType, Router};
use serde::{Deserialize, Serialize};
use xmpp_parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use xmpp_parsers::disco::{DiscoInfoResult, DiscoItemsResult, Identity, Item};

/// disco#info.
pub const INFO: &str = "http://jabber.org/protocol/disco#info";
/// disco#items.
pub const ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// Entity capabilities.
pub const CAPS: &str = "http://jabber.org/protocol/caps";
/// The caps node naming this software.
pub const CAPS_NODE: &str = "https://rookery.chat/caps";

/// The XEP-0128 form type of XEP-0157 contact addresses.
pub const SERVER_INFO: &str = "http://jabber.org/network/serverinfo";

/// `[disco]`: what the server's disco#info says about who runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoConfig {
    /// XEP-0157 contact addresses, as URIs (`mailto:abuse@example.org`,
    /// `xmpp:abuse@example.org`, `https://example.org/abuse`), by the
    /// field they are listed under.
    pub abuse_addresses: Vec<String>,
    /// Who administers the server.
    pub admin_addresses: Vec<String>,
    /// Where users send feedback.
    pub feedback_addresses: Vec<String>,
    /// Sales.
    pub sales_addresses: Vec<String>,
    /// Where security issues are reported.
    pub security_addresses: Vec<String>,
    /// Where the service's status is published.
    pub status_addresses: Vec<String>,
    /// Where users get support.
    pub support_addresses: Vec<String>,
}

impl DiscoConfig {
    /// The lists by XEP-0157 field name.
    fn fields(&self) -> [(&'static str, &[String]); 7] {
        [
            ("abuse-addresses", &self.abuse_addresses),
            ("admin-addresses", &self.admin_addresses),
            ("feedback-addresses", &self.feedback_addresses),
            ("sales-addresses", &self.sales_addresses),
            ("security-addresses", &self.security_addresses),
            ("status-addresses", &self.status_addresses),
            ("support-addresses", &self.support_addresses),
        ]
    }

    /// Checks every address is a URI; `Err` names the key (in this
    /// section) and what is wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (field, addresses) in self.fields() {
            for (index, address) in addresses.iter().enumerate() {
                let scheme = address.split_once(':').map(|(scheme, _)| scheme);
                let uri = scheme.is_some_and(|scheme| {
                    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                }) && !address.contains(char::is_whitespace);
                if !uri {
                    return Err((
                        format!("{}[{index}]", field.replace('-', "_")),
                        "not a URI (mailto:…, xmpp:…, https://…)".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The XEP-0157 form, if any address is configured.
    fn form(&self) -> Option<DataForm> {
        let fields: Vec<Field> = self
            .fields()
            .into_iter()
            .filter(|(_, addresses)| !addresses.is_empty())
            .map(|(var, addresses)| {
                let mut field = Field::new(var, FieldType::ListMulti);
                field.values = addresses.to_vec();
                field
            })
            .collect();
        (!fields.is_empty()).then(|| DataForm::new(DataFormType::Result_, SERVER_INFO, fields))
    }
}

/// XEP-0030 module.
#[derive(Debug, Default)]
pub struct Disco {
    /// Its `[disco]` section.
    pub config: DiscoConfig,
}

/// The server's disco#info, with the contact addresses of `config`.
pub fn server_info(router: &Router, config: &DiscoConfig) -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new("server", "im", "en", "Rookery")],
        features: router
            .server_features()
            .into_iter()
            .chain([INFO, ITEMS, CAPS])
            .map(str::to_owned)
            .collect(),
        extensions: config.form().into_iter().collect(),
    }
}

fn account_info(router: &Router) -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity {
            category: "account".into(),
            type_: "registered".into(),
            lang: None,
            name: None,
        }],
        features: router
            .account_features()
            .into_iter()
            .chain([INFO, ITEMS])
            .map(str::to_owned)
            .collect(),
        extensions: Vec::new(),
    }
}

/// The XEP-0115 hash of the server's disco#info (its forms included).
fn caps_hash(router: &Router, config: &DiscoConfig) -> xmpp_parsers::hashes::Hash {
    let data = xmpp_parsers::caps::compute_disco(&server_info(router, config));
    xmpp_parsers::caps::hash_caps(&data, xmpp_parsers::hashes::Algo::Sha_1)
        .expect("SHA-1 is supported")
}

/// The verification string of the server's capabilities.
pub fn caps_ver(router: &Router, config: &DiscoConfig) -> String {
    caps_hash(router, config).to_base64()
}

/// The `<c/>` element of XEP-0115 for the stream features.
pub fn caps_element(router: &Router, config: &DiscoConfig) -> Element {
    xmpp_parsers::caps::Caps::new(CAPS_NODE, caps_hash(router, config)).into()
}

#[async_trait]
impl Extension for Disco {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(INFO, "query"), (ITEMS, "query")]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        // The iq table gives this module only its two queries.
        let info = cx.payload.has_ns(INFO);
        if cx.iq_type != IqType::Get {
            return Some(error_reply(cx.iq, ErrorCondition::NOT_ALLOWED, None, None));
        }
        let node = cx.payload.attr("node").map(str::to_owned);
        if !info {
            if node.is_some() {
                return Some(error_reply(
                    cx.iq,
                    ErrorCondition::ITEM_NOT_FOUND,
                    None,
                    None,
                ));
            }
            // The server's items: the services modules host and the
            // external components (XEP-0030 section 4; XEP-0114 entities
            // are found this way).
            let items = match cx.target {
                IqTarget::Server => cx
                    .router
                    .hosted_domains()
                    .into_iter()
                    .filter_map(|domain| {
                        Some(Item {
                            jid: domain.parse().ok()?,
                            node: None,
                            name: None,
                        })
                    })
                    .collect(),
                IqTarget::Account(_) => Vec::new(),
            };
            let result = DiscoItemsResult {
                node: None,
                items,
                rsm: None,
            };
            return Some(iq_result(cx.iq, Some(result.into())));
        }
        let mut result = match &cx.target {
            IqTarget::Server => server_info(cx.router, &self.config),
            IqTarget::Account(_) => account_info(cx.router),
        };
        if let Some(node) = node {
            // Only the caps node of this server is known.
            if cx.target != IqTarget::Server
                || node != format!("{CAPS_NODE}#{}", caps_ver(cx.router, &self.config))
            {
                return Some(error_reply(
                    cx.iq,
                    ErrorCondition::ITEM_NOT_FOUND,
                    None,
                    None,
                ));
            }
            result.node = Some(node);
        }
        Some(iq_result(cx.iq, Some(result.into())))
    }
}
