//! XEP-0202: Entity Time of the server.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType};
use xmpp_parsers::time::TimeResult;

/// The entity time namespace.
pub const NS: &str = "urn:xmpp:time";

/// XEP-0202 module: the server's clock, in UTC.
#[derive(Debug)]
pub struct EntityTime;

#[async_trait]
impl Extension for EntityTime {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "time")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        if cx.target != IqTarget::Server {
            return None;
        }
        if cx.iq_type != IqType::Get {
            return Some(error_reply(cx.iq, ErrorCondition::NOT_ALLOWED, None, None));
        }
        let now = chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now());
        let now = TimeResult::from(now.fixed_offset());
        Some(iq_result(cx.iq, Some(Element::from(now))))
    }
}
