//! XEP-0030: Service Discovery for the server and accounts, and the server's
//! XEP-0115 entity capabilities advertised in stream features.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType, Router};
use xmpp_parsers::disco::{DiscoInfoResult, Identity};

/// disco#info.
pub const INFO: &str = "http://jabber.org/protocol/disco#info";
/// disco#items.
pub const ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// Entity capabilities.
pub const CAPS: &str = "http://jabber.org/protocol/caps";
/// The caps node naming this software.
pub const CAPS_NODE: &str = "https://rookery.chat/caps";

/// XEP-0030 module.
#[derive(Debug)]
pub struct Disco;

/// The server's disco#info.
pub fn server_info(router: &Router) -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new("server", "im", "en", "Rookery")],
        features: router
            .server_features()
            .into_iter()
            .chain([INFO, ITEMS, CAPS])
            .map(str::to_owned)
            .collect(),
        extensions: Vec::new(),
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

/// The verification string of the server's capabilities.
pub fn caps_ver(router: &Router) -> String {
    let data = xmpp_parsers::caps::compute_disco(&server_info(router));
    let hash = xmpp_parsers::caps::hash_caps(&data, xmpp_parsers::hashes::Algo::Sha_1)
        .expect("SHA-1 is supported");
    hash.to_base64()
}

/// The `<c/>` element of XEP-0115 for the stream features.
pub fn caps_element(router: &Router) -> Element {
    let data = xmpp_parsers::caps::compute_disco(&server_info(router));
    let hash = xmpp_parsers::caps::hash_caps(&data, xmpp_parsers::hashes::Algo::Sha_1)
        .expect("SHA-1 is supported");
    xmpp_parsers::caps::Caps::new(CAPS_NODE, hash).into()
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
            return Some(iq_result(cx.iq, Some(Element::bare("query", ITEMS))));
        }
        let mut result = match &cx.target {
            IqTarget::Server => server_info(cx.router),
            IqTarget::Account(_) => account_info(cx.router),
        };
        if let Some(node) = node {
            // Only the caps node of this server is known.
            if cx.target != IqTarget::Server
                || node != format!("{CAPS_NODE}#{}", caps_ver(cx.router))
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
