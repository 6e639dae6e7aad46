//! XEP-0352: Client State Indication. While a client says it is inactive,
//! presence for it is held (only the latest from each sender) and sent
//! when it is active again, when anything else is sent to it (in order,
//! before that stanza), or when more than the bounds are held. All of it a
//! delivery hook and a session hook; the state moves with the session.

use async_trait::async_trait;
use minidom::Element;
use rookery_cluster::ModuleState;
use rookery_router::namespaces::CSI as NS;
use rookery_router::stanza::PresenceType;
use rookery_router::{Extension, Hooks, IqContext, Router, Session, SessionEvent};
use rookery_stream::ns;

/// Bytes of presence held for an inactive client before all of it is sent.
pub const HOLD_BYTES: usize = 256 * 1024;

/// XEP-0352 module.
#[derive(Debug)]
pub struct Csi {
    /// Presence stanzas held for an inactive client before all are sent.
    pub hold_limit: usize,
}

/// An inactive session's state (a session that is active has none).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CsiSession {
    /// Presence held back, oldest first, one per sender.
    #[serde(with = "as_xml")]
    held: Vec<Element>,
}

impl ModuleState for CsiSession {
    const KEY: &'static str = "csi";
}

/// Held stanzas travel to another node as XML text.
mod as_xml {
    use minidom::Element;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(held: &[Element], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(held.iter().map(String::from))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Element>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        let parse = |text: &String| match text.parse() {
            Ok(element) => Some(element),
            Err(error) => {
                tracing::error!(%error, "A held presence from another node does not parse.");
                None
            }
        };
        Ok(texts.iter().filter_map(parse).collect())
    }
}

/// True for presence an inactive client can do without for a while.
fn holdable(stanza: &Element) -> bool {
    stanza.is("presence", ns::CLIENT)
        && matches!(
            PresenceType::of(stanza),
            Some(PresenceType::Available | PresenceType::Unavailable)
        )
}

#[async_trait]
impl Extension for Csi {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            delivery: true,
            session: true,
            ..Hooks::default()
        }
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn stream_features(&self) -> Vec<Element> {
        vec![Element::bare("csi", NS)]
    }

    async fn handle_iq(&self, _cx: &mut IqContext<'_>) -> Option<Element> {
        None
    }

    fn on_delivery(
        &self,
        _router: &Router,
        session: &mut Session,
        stanza: Element,
    ) -> Option<Element> {
        let Some(state) = session.modules.existing_mut::<CsiSession>() else {
            return Some(stanza);
        };
        if holdable(&stanza) {
            let from = stanza.attr("from").map(str::to_owned);
            state
                .held
                .retain(|held| held.attr("from").map(str::to_owned) != from);
            state.held.push(stanza);
            let bytes: usize = state
                .held
                .iter()
                .map(rookery_stream::xml::approximate_size)
                .sum();
            if state.held.len() > self.hold_limit || bytes > HOLD_BYTES {
                let held = std::mem::take(&mut state.held);
                session.outbox.extend(held);
            }
            return None;
        }
        if !state.held.is_empty() {
            let held = std::mem::take(&mut state.held);
            session.outbox.extend(held);
        }
        Some(stanza)
    }

    async fn on_session(&self, _router: &Router, session: &mut Session, event: SessionEvent) {
        match event {
            SessionEvent::Inactive => {
                session.modules.get_mut::<CsiSession>();
            }
            SessionEvent::Active => {
                if let Some(state) = session.modules.existing_mut::<CsiSession>() {
                    let held = std::mem::take(&mut state.held);
                    session.outbox.extend(held);
                }
                session.modules.remove::<CsiSession>();
            }
            // Held presence is not worth keeping for anyone else.
            SessionEvent::Bound | SessionEvent::Resumed | SessionEvent::Ended => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use rookery_cluster::ModuleStates;

    use super::*;

    #[test]
    fn held_presence_crosses_to_another_node() {
        let mut states = ModuleStates::default();
        let presence: Element =
            "<presence xmlns='jabber:client' from='bob@localhost/desk'><status>away</status></presence>"
                .parse()
                .unwrap();
        states.get_mut::<CsiSession>().held.push(presence.clone());
        let mut there = ModuleStates::from_wire(states.to_wire());
        let state = there.existing_mut::<CsiSession>().expect("still inactive");
        assert_eq!(state.held, [presence]);
    }
}
