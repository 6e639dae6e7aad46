//! XEP-0280: Message Carbons, enabling and disabling per session (the copying is routing).

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqType, namespaces::CARBONS};

/// XEP-0280 module.
#[derive(Debug)]
pub struct Carbons;

#[async_trait]
impl Extension for Carbons {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(CARBONS, "enable"), (CARBONS, "disable")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[CARBONS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        // The iq table gives this module only <enable/> and <disable/>.
        let enable = cx.payload.name() == "enable";
        if cx.iq_type != IqType::Set || !cx.to_self() {
            return Some(error_reply(cx.iq, ErrorCondition::BAD_REQUEST, None, None));
        }
        if cx.session.info.carbons != enable {
            cx.session.info.carbons = enable;
            cx.router.publish_route_info(cx.session).await;
        }
        Some(iq_result(cx.iq, None))
    }
}
