//! XEP-0199: XMPP Ping, answered for the server and accounts.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::iq_result;
use rookery_router::{Extension, IqContext, IqType};

/// The ping namespace.
pub const NS: &str = "urn:xmpp:ping";

/// XEP-0199 module.
#[derive(Debug)]
pub struct Ping;

#[async_trait]
impl Extension for Ping {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "ping")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        (cx.iq_type == IqType::Get).then(|| iq_result(cx.iq, None))
    }
}
