//! XEP-0077: In-Band Registration (new accounts when the operator allows it,
//! password changes and account removal always), and the account functions
//! the command line shares with it.

use async_trait::async_trait;
use jid::BareJid;
use minidom::Element;
use rookery_router::stanza::{ErrorCondition, error_reply, iq_result};
use rookery_router::{Extension, IqContext, IqTarget, IqType, Router};
use std::sync::Arc;

use rookery_store::{AccountStore, StoreError};
use rookery_stream::{ScramHash, ScramKeys};

/// The registration namespace.
pub const NS: &str = "jabber:iq:register";

/// Why an account operation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum AccountError {
    /// The user name is not a valid JID localpart.
    InvalidUsername,
    /// The password is empty or cannot be prepared.
    InvalidPassword,
    /// The account exists already.
    Exists,
    /// There is no such account.
    NoSuchAccount,
    /// Storage failed.
    Storage(String),
}

impl std::fmt::Display for AccountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountError::InvalidUsername => f.write_str("invalid user name"),
            AccountError::InvalidPassword => {
                f.write_str("invalid password (empty or not preparable)")
            }
            AccountError::Exists => f.write_str("the account already exists"),
            AccountError::NoSuchAccount => f.write_str("no such account"),
            AccountError::Storage(error) => write!(f, "storage: {error}"),
        }
    }
}

impl std::error::Error for AccountError {}

impl From<StoreError> for AccountError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::AlreadyExists => AccountError::Exists,
            StoreError::NoSuchAccount => AccountError::NoSuchAccount,
            other => AccountError::Storage(other.to_string()),
        }
    }
}

/// The account `username@domain`, if the name is a valid localpart.
pub fn account_jid(username: &str, domain: &str) -> Result<BareJid, AccountError> {
    if username.is_empty() || username.contains(['@', '/']) {
        return Err(AccountError::InvalidUsername);
    }
    BareJid::new(&format!("{username}@{domain}")).map_err(|_| AccountError::InvalidUsername)
}

/// SCRAM keys for both hashes; the password itself is never stored.
pub fn derive_keys(password: &str, iterations: u32) -> Result<Vec<ScramKeys>, AccountError> {
    if password.is_empty() {
        return Err(AccountError::InvalidPassword);
    }
    [ScramHash::Sha1, ScramHash::Sha256]
        .into_iter()
        .map(|hash| {
            ScramKeys::generate(hash, password, iterations)
                .map_err(|_| AccountError::InvalidPassword)
        })
        .collect()
}

/// Creates an account.
pub async fn create_account(
    store: &dyn AccountStore,
    jid: &BareJid,
    password: &str,
    iterations: u32,
) -> Result<(), AccountError> {
    let keys = derive_keys(password, iterations)?;
    store
        .create_account(jid, &keys)
        .await
        .map_err(AccountError::from)
}

/// Changes an account's password.
pub async fn set_password(
    store: &dyn AccountStore,
    jid: &BareJid,
    password: &str,
    iterations: u32,
) -> Result<(), AccountError> {
    let keys = derive_keys(password, iterations)?;
    store.set_keys(jid, &keys).await.map_err(AccountError::from)
}

/// XEP-0077 module.
pub struct Register {
    /// New accounts may register themselves.
    pub open: bool,
    /// PBKDF2 iterations for new keys.
    pub iterations: u32,
    /// Where accounts are kept.
    pub accounts: Arc<dyn AccountStore>,
}

fn field(query: &Element, name: &str) -> Option<String> {
    query.get_child(name, NS).map(|child| child.text())
}

fn form() -> Element {
    Element::builder("query", NS)
        .append(Element::builder("instructions", NS).append("Choose a user name and password."))
        .append(Element::bare("username", NS))
        .append(Element::bare("password", NS))
        .build()
}

fn account_error(iq: &Element, error: &AccountError) -> Element {
    let condition = match error {
        AccountError::Exists => ErrorCondition::CONFLICT,
        AccountError::InvalidUsername => ErrorCondition::JID_MALFORMED,
        AccountError::InvalidPassword => ErrorCondition::NOT_ACCEPTABLE,
        AccountError::NoSuchAccount => ErrorCondition::ITEM_NOT_FOUND,
        AccountError::Storage(_) => ErrorCondition::INTERNAL_SERVER_ERROR,
    };
    error_reply(iq, condition, None, None)
}

#[async_trait]
impl Extension for Register {
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }

    fn server_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    async fn handle_unauthenticated_iq(&self, router: &Router, iq: &Element) -> Option<Element> {
        let query = iq.get_child("query", NS)?;
        if !self.open {
            return Some(error_reply(iq, ErrorCondition::NOT_ALLOWED, None, None));
        }
        Some(match iq.attr("type") {
            Some("get") => iq_result(iq, Some(form())),
            Some("set") => {
                let (Some(username), Some(password)) =
                    (field(query, "username"), field(query, "password"))
                else {
                    return Some(error_reply(
                        iq,
                        ErrorCondition::NOT_ACCEPTABLE,
                        Some("User name and password are required."),
                        None,
                    ));
                };
                let created = match account_jid(&username, router.domain()) {
                    Ok(jid) => create_account(&*self.accounts, &jid, &password, self.iterations)
                        .await
                        .map(|()| jid),
                    Err(error) => Err(error),
                };
                match created {
                    Ok(jid) => {
                        tracing::info!(%jid, "Account registered in band.");
                        iq_result(iq, None)
                    }
                    Err(error) => account_error(iq, &error),
                }
            }
            _ => error_reply(iq, ErrorCondition::BAD_REQUEST, None, None),
        })
    }

    async fn handle_iq(&self, cx: &mut IqContext<'_>) -> Option<Element> {
        if cx.target != IqTarget::Server && !cx.to_self() {
            return Some(error_reply(cx.iq, ErrorCondition::FORBIDDEN, None, None));
        }
        let user = cx.session.user();
        let username = user.node().map(|n| n.to_string()).unwrap_or_default();
        let reply = match cx.iq_type {
            IqType::Get => {
                let query = Element::builder("query", NS)
                    .append(Element::bare("registered", NS))
                    .append(Element::builder("username", NS).append(username))
                    .build();
                iq_result(cx.iq, Some(query))
            }
            IqType::Set if cx.payload.has_child("remove", NS) => {
                match self.accounts.delete_account(&user).await {
                    Ok(_) => {
                        tracing::info!(%user, "Account removed in band.");
                        cx.router
                            .close_sessions(&user, rookery_stream::Condition::NotAuthorized)
                            .await;
                        iq_result(cx.iq, None)
                    }
                    Err(error) => account_error(cx.iq, &AccountError::from(error)),
                }
            }
            IqType::Set => {
                let (Some(given), Some(password)) =
                    (field(cx.payload, "username"), field(cx.payload, "password"))
                else {
                    return Some(error_reply(cx.iq, ErrorCondition::BAD_REQUEST, None, None));
                };
                if given != username {
                    return Some(error_reply(
                        cx.iq,
                        ErrorCondition::NOT_AUTHORIZED,
                        None,
                        None,
                    ));
                }
                match set_password(&*self.accounts, &user, &password, self.iterations).await {
                    Ok(()) => iq_result(cx.iq, None),
                    Err(error) => account_error(cx.iq, &error),
                }
            }
        };
        Some(reply)
    }
}
