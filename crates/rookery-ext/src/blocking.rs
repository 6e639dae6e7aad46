//! XEP-0191: Blocking Command: the block list, its pushes, and hiding the user
//! from newly blocked contacts. Enforcement is part of routing.

use std::sync::Arc;

use async_trait::async_trait;
use jid::Jid;
use minidom::Element;
use rookery_cluster::ModuleState;
use rookery_router::namespaces::BLOCKING as NS;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, Hooks, IqContext, IqType, Router, Session, is_server_push};
use rookery_store::BlockingStore;
use rookery_stream::xml::set_attr;

/// Most entries in one block list.
const MAX_ITEMS: usize = 1000;

/// XEP-0191 module.
pub struct Blocking {
    /// Where block lists are kept.
    pub lists: Arc<dyn BlockingStore>,
}

/// What a session's client asked of the module.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BlockingSession {
    /// The client fetched the block list, so it gets the pushes (XEP-0191 §5).
    pub list_requested: bool,
}

impl ModuleState for BlockingSession {
    const KEY: &'static str = "blocking";
}

fn item(jid: &Jid) -> Element {
    let mut item = Element::bare("item", NS);
    set_attr(&mut item, "jid", jid.as_str());
    item
}

fn push(name: &str, jids: &[Jid]) -> Element {
    let mut payload = Element::bare(name, NS);
    for jid in jids {
        payload.append_child(item(jid));
    }
    let mut iq = Element::builder("iq", rookery_stream::ns::CLIENT)
        .append(payload)
        .build();
    set_attr(&mut iq, "type", "set");
    set_attr(
        &mut iq,
        "id",
        format!("block-{}", rookery_stream::random_id()),
    );
    iq
}

/// The JIDs of the `<item/>` children; `Err` on a missing or malformed one.
fn items(payload: &Element) -> Result<Vec<Jid>, ErrorCondition> {
    payload
        .children()
        .filter(|child| child.is("item", NS))
        .map(|child| {
            child
                .attr("jid")
                .ok_or(ErrorCondition::BAD_REQUEST)
                .and_then(|jid| Jid::new(jid).map_err(|_| ErrorCondition::JID_MALFORMED))
        })
        .collect()
}

#[async_trait]
impl Extension for Blocking {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "blocklist"), (NS, "block"), (NS, "unblock")]
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            delivery: true,
            ..Hooks::default()
        }
    }

    fn on_delivery(
        &self,
        _router: &Router,
        session: &mut Session,
        stanza: Element,
    ) -> Option<Element> {
        // Pushes go only to clients that fetched the block list.
        let unwanted = is_server_push(&stanza, NS)
            && !session
                .modules
                .get::<BlockingSession>()
                .is_some_and(|state| state.list_requested);
        (!unwanted).then_some(stanza)
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        if !cx.to_self() {
            return Some(error_reply(cx.iq, ErrorCondition::FORBIDDEN, None, None));
        }
        let user = cx.session.user();
        let store = &self.lists;
        let reply = match (cx.iq_type, cx.payload.name()) {
            (IqType::Get, "blocklist") => match store.blocklist(&user).await {
                Ok(list) => {
                    cx.session
                        .modules
                        .get_mut::<BlockingSession>()
                        .list_requested = true;
                    let mut blocklist = Element::bare("blocklist", NS);
                    for jid in &list {
                        blocklist.append_child(item(jid));
                    }
                    iq_result(cx.iq, Some(blocklist))
                }
                Err(error) => {
                    tracing::error!(%user, %error, "Block list could not be read.");
                    error_reply(cx.iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None)
                }
            },
            (IqType::Set, name @ ("block" | "unblock")) => {
                let jids = match items(cx.payload) {
                    Ok(jids) => jids,
                    Err(condition) => return Some(error_reply(cx.iq, condition, None, None)),
                };
                if name == "block" && jids.is_empty() {
                    return Some(error_reply(
                        cx.iq,
                        ErrorCondition::BAD_REQUEST,
                        Some("Nothing to block."),
                        None,
                    ));
                }
                let current = store.blocklist(&user).await.map(|l| l.len()).unwrap_or(0);
                if name == "block" && current + jids.len() > MAX_ITEMS {
                    return Some(error_reply(
                        cx.iq,
                        ErrorCondition::RESOURCE_CONSTRAINT,
                        Some("The block list is full."),
                        None,
                    ));
                }
                let changed = if name == "block" {
                    store.block(&user, &jids).await
                } else {
                    store.unblock(&user, &jids).await
                };
                let changed = match changed {
                    Ok(changed) => changed,
                    Err(error) => {
                        tracing::error!(%user, %error, "Block list could not be changed.");
                        return Some(error_reply(
                            cx.iq,
                            ErrorCondition::INTERNAL_SERVER_ERROR,
                            None,
                            None,
                        ));
                    }
                };
                if let Ok(list) = store.blocklist(&user).await {
                    cx.router.set_blocklist(&user, list);
                }
                for jid in &changed {
                    if name == "block" {
                        // Directed presence to anyone the item covers.
                        let directed =
                            cx.session.directed.iter().any(|to| {
                                rookery_router::is_blocked(std::slice::from_ref(jid), to)
                            });
                        cx.router.hide_presence(&user, jid, directed).await;
                    } else {
                        cx.router.show_presence(&user, jid).await;
                    }
                }
                if !changed.is_empty() || (name == "unblock" && jids.is_empty()) {
                    let pushed = if name == "unblock" && jids.is_empty() {
                        Vec::new()
                    } else {
                        changed
                    };
                    cx.router
                        .send_to_all_sessions(&user, &push(name, &pushed))
                        .await;
                }
                iq_result(cx.iq, None)
            }
            _ => error_reply(cx.iq, ErrorCondition::BAD_REQUEST, None, None),
        };
        Some(reply)
    }
}
