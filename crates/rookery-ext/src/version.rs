//! XEP-0092: Software Version of the server.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType};

/// The version namespace.
pub const NS: &str = "jabber:iq:version";

/// XEP-0092 module.
#[derive(Debug)]
pub struct Version {
    /// Include the operating system in answers.
    pub show_os: bool,
}

#[async_trait]
impl Extension for Version {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
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
        let mut query = Element::builder("query", NS)
            .append(Element::builder("name", NS).append("Rookery"))
            .append(Element::builder("version", NS).append(env!("CARGO_PKG_VERSION")))
            .build();
        if self.show_os {
            query.append_child(
                Element::builder("os", NS)
                    .append(std::env::consts::OS)
                    .build(),
            );
        }
        Some(iq_result(cx.iq, Some(query)))
    }
}
