//! XEP-0012: Last Activity: server uptime, and when a contact was last online.

use std::sync::Arc;

use async_trait::async_trait;
use jid::Jid;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType};
use rookery_store::{AccountStore, RosterStore};
use rookery_stream::xml::set_attr;

/// The last activity namespace.
pub const NS: &str = "jabber:iq:last";

/// XEP-0012 module.
pub struct LastActivity {
    /// Where the last activity of accounts is kept.
    pub accounts: Arc<dyn AccountStore>,
    /// Whose presence a requester may see (the roster of the account asked about).
    pub rosters: Arc<dyn RosterStore>,
}

fn answer(iq: &Element, seconds: u64, status: Option<String>) -> Element {
    let mut query = Element::bare("query", NS);
    set_attr(&mut query, "seconds", seconds.to_string());
    if let Some(status) = status {
        query.append_text(status);
    }
    iq_result(iq, Some(query))
}

#[async_trait]
impl Extension for LastActivity {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        if cx.iq_type != IqType::Get {
            return Some(error_reply(cx.iq, ErrorCondition::NOT_ALLOWED, None, None));
        }
        let account = match &cx.target {
            IqTarget::Server => {
                return Some(answer(cx.iq, cx.router.started().elapsed().as_secs(), None));
            }
            IqTarget::Account(account) => account.clone(),
        };
        let requester = cx.requester();
        if account != requester {
            // Only those who may see the account's presence may know when it was last seen.
            let item = self
                .rosters
                .roster_item(&account, &requester)
                .await
                .ok()
                .flatten();
            if !item.is_some_and(|item| item.subscription.has_from()) {
                return Some(error_reply(cx.iq, ErrorCondition::FORBIDDEN, None, None));
            }
        }
        if cx
            .router
            .bus()
            .routes(&account)
            .iter()
            .any(|route| route.info.available())
        {
            return Some(answer(cx.iq, 0, None));
        }
        match self.accounts.last_activity(&account).await {
            Ok(Some(last)) => {
                let now = rookery_router::unix_millis() / 1000;
                Some(answer(
                    cx.iq,
                    now.saturating_sub(last.at).max(0) as u64,
                    last.status,
                ))
            }
            Ok(None) => Some(error_reply(
                cx.iq,
                ErrorCondition::ITEM_NOT_FOUND,
                None,
                None,
            )),
            Err(error) => {
                tracing::error!(%account, %error, "Last activity could not be read.");
                let _ = Jid::from(account);
                Some(error_reply(
                    cx.iq,
                    ErrorCondition::INTERNAL_SERVER_ERROR,
                    None,
                    None,
                ))
            }
        }
    }
}
