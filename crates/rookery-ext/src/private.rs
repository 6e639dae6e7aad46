//! XEP-0049: Private XML Storage.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqType};
use std::sync::Arc;

use rookery_store::{DocumentKind, DocumentStore, Quota, StoreError};

/// The private storage namespace.
pub const NS: &str = "jabber:iq:private";

/// Namespaces that cannot be stored (XEP-0049 section 3).
const RESERVED: [&str; 3] = ["jabber:client", "jabber:server", NS];

/// XEP-0049 module.
pub struct Private {
    /// What one account may store (`limits.private_storage_items` and `_bytes`).
    pub quota: Quota,
    /// Where the documents are kept.
    pub documents: Arc<dyn DocumentStore>,
}

#[async_trait]
impl Extension for Private {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        if !cx.to_self() {
            return Some(error_reply(cx.iq, ErrorCondition::FORBIDDEN, None, None));
        }
        let mut children = cx.payload.children();
        let (Some(child), None) = (children.next(), children.next()) else {
            return Some(error_reply(
                cx.iq,
                ErrorCondition::BAD_REQUEST,
                Some("Exactly one child is expected."),
                None,
            ));
        };
        let namespace = child.ns();
        if RESERVED.contains(&namespace.as_str()) || namespace.is_empty() {
            return Some(error_reply(
                cx.iq,
                ErrorCondition::NOT_ACCEPTABLE,
                None,
                None,
            ));
        }
        let user = cx.session.user();
        let store = &self.documents;
        let reply = match cx.iq_type {
            IqType::Get => match store
                .document(&user, DocumentKind::PRIVATE, &namespace)
                .await
            {
                Ok(stored) => {
                    let data = stored
                        .and_then(|xml| xml.parse::<Element>().ok())
                        .unwrap_or_else(|| child.clone());
                    iq_result(
                        cx.iq,
                        Some(Element::builder("query", NS).append(data).build()),
                    )
                }
                Err(error) => {
                    tracing::error!(%user, %error, "Private data could not be read.");
                    error_reply(cx.iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None)
                }
            },
            IqType::Set => match store
                .put_document(
                    &user,
                    DocumentKind::PRIVATE,
                    &namespace,
                    &String::from(child),
                    self.quota,
                )
                .await
            {
                Ok(()) => iq_result(cx.iq, None),
                Err(StoreError::QuotaExceeded) => error_reply(
                    cx.iq,
                    ErrorCondition::RESOURCE_CONSTRAINT,
                    Some("Your private storage is full."),
                    None,
                ),
                Err(error) => {
                    tracing::error!(%user, %error, "Private data could not be stored.");
                    error_reply(cx.iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None)
                }
            },
        };
        Some(reply)
    }
}
