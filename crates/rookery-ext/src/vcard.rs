//! XEP-0054: vcard-temp, stored per account and readable by anyone who may ask.

use async_trait::async_trait;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType};
use std::sync::Arc;

use rookery_store::{DocumentKind, DocumentStore};

/// The vCard namespace.
pub const NS: &str = "vcard-temp";

/// Largest vCard accepted, in bytes of XML (photos included).
const MAX_VCARD_BYTES: usize = 128 * 1024;
/// One vCard per account, checked above already.
const VCARD_QUOTA: rookery_store::Quota = rookery_store::Quota {
    items: 1,
    bytes: MAX_VCARD_BYTES,
};

/// XEP-0054 module.
pub struct VCard {
    /// Where vCards are kept.
    pub documents: Arc<dyn DocumentStore>,
}

#[async_trait]
impl Extension for VCard {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "vCard")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        let IqTarget::Account(account) = cx.target.clone() else {
            return Some(error_reply(
                cx.iq,
                ErrorCondition::SERVICE_UNAVAILABLE,
                None,
                None,
            ));
        };
        let store = &self.documents;
        let reply = match cx.iq_type {
            IqType::Get => match store.document(&account, DocumentKind::VCARD, "").await {
                Ok(stored) => {
                    let vcard = stored
                        .and_then(|xml| xml.parse::<Element>().ok())
                        .unwrap_or_else(|| Element::bare("vCard", NS));
                    iq_result(cx.iq, Some(vcard))
                }
                Err(error) => {
                    tracing::error!(%account, %error, "vCard could not be read.");
                    error_reply(cx.iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None)
                }
            },
            IqType::Set if !cx.to_self() => {
                error_reply(cx.iq, ErrorCondition::FORBIDDEN, None, None)
            }
            IqType::Set => {
                let xml = String::from(cx.payload);
                if xml.len() > MAX_VCARD_BYTES {
                    return Some(error_reply(
                        cx.iq,
                        ErrorCondition::NOT_ACCEPTABLE,
                        Some("The vCard is too large."),
                        None,
                    ));
                }
                match store
                    .put_document(&account, DocumentKind::VCARD, "", &xml, VCARD_QUOTA)
                    .await
                {
                    Ok(()) => iq_result(cx.iq, None),
                    Err(error) => {
                        tracing::error!(%account, %error, "vCard could not be stored.");
                        error_reply(cx.iq, ErrorCondition::INTERNAL_SERVER_ERROR, None, None)
                    }
                }
            }
        };
        Some(reply)
    }
}
