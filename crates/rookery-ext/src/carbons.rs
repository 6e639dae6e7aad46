//! XEP-0280: Message Carbons. A session enables or disables them with an iq;
//! the module marks it ([`CARBONS_MARK`], which routing on every node sees)
//! and copies routed messages to the user's marked sessions: what the user
//! sent from one session (`<sent/>`) and what reached other sessions
//! (`<received/>`).

use std::sync::Arc;

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;
use rookery_cluster::Route;
use rookery_router::stanza::{ErrorCondition, MessageType, error_reply, iq_result, stanza};
use rookery_router::{Extension, Hooks, IqContext, IqType, Routed, Side, namespaces};
use rookery_stream::ns;
use rookery_stream::xml::set_attr;

/// The mark of a session that enabled carbons.
pub const CARBONS_MARK: &str = "carbons";

/// XEP-0280 module.
#[derive(Debug)]
pub struct Carbons;

/// XEP-0280 section 6: which messages are copied.
fn eligible(message: &Element, message_type: MessageType) -> bool {
    let eligible_type = match message_type {
        MessageType::Chat => true,
        MessageType::Normal => message.has_child("body", ns::CLIENT),
        _ => false,
    };
    eligible_type
        && !is_carbon(message)
        && !message.has_child("private", namespaces::CARBONS)
        && !message.has_child("no-copy", namespaces::HINTS)
}

/// True for a carbon copy (a `<sent/>` or `<received/>` wrapper).
fn is_carbon(message: &Element) -> bool {
    message.has_child("sent", namespaces::CARBONS)
        || message.has_child("received", namespaces::CARBONS)
}

/// Wraps a message for a carbons-enabled session of `user`.
fn carbon(direction: &str, user: &BareJid, to: &FullJid, message: &Element) -> Element {
    let mut wrapper = stanza("message", user.as_str(), to.as_str());
    if let Some(message_type) = message.attr("type") {
        set_attr(&mut wrapper, "type", message_type);
    }
    let forwarded = Element::builder("forwarded", namespaces::FORWARD)
        .append(message.clone())
        .build();
    wrapper.append_child(
        Element::builder(direction, namespaces::CARBONS)
            .append(forwarded)
            .build(),
    );
    wrapper
}

#[async_trait]
impl Extension for Carbons {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (namespaces::CARBONS, "enable"),
            (namespaces::CARBONS, "disable"),
        ]
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            routed: Some(CARBONS_MARK),
            ..Hooks::default()
        }
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[namespaces::CARBONS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        // The iq table gives this module only <enable/> and <disable/>.
        let enable = cx.payload.name() == "enable";
        if cx.iq_type != IqType::Set || !cx.to_self() {
            return Some(error_reply(cx.iq, ErrorCondition::BAD_REQUEST, None, None));
        }
        if cx.session.info.marks.set(CARBONS_MARK, enable) {
            cx.router.publish_route_info(cx.session).await;
        }
        Some(iq_result(cx.iq, None))
    }

    fn copies_message(&self, message: &Element, message_type: MessageType) -> bool {
        eligible(message, message_type)
    }

    fn on_routed(&self, routed: &Routed<'_>) -> Vec<(Arc<Route>, Element)> {
        let direction = match routed.side {
            Side::Sent => "sent",
            Side::Received => "received",
        };
        routed
            .routes
            .iter()
            .filter(|route| {
                route.info.marks.contains(CARBONS_MARK) && !routed.have_it.contains(&&route.jid)
            })
            .map(|route| {
                let copy = carbon(direction, routed.user, &route.jid, routed.message);
                (route.clone(), copy)
            })
            .collect()
    }

    fn is_copy(&self, message: &Element) -> bool {
        is_carbon(message)
    }
}
