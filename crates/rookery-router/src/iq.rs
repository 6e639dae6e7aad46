//! Iq routing (RFC 6120 section 10, RFC 6121 section 8.5) and dispatch of iqs
//! addressed to the server or an account to the router and the extensions.

use jid::Jid;
use minidom::Element;
use rookery_stream::ns;

use crate::stanza::{self, ErrorCondition, error_reply, iq_result};
use crate::{Destination, IqContext, IqTarget, IqType, Router, Session, namespaces};

impl Router {
    /// An iq from the session's client.
    pub(crate) async fn handle_iq(&self, session: &mut Session, iq: Element, to: Option<Jid>) {
        let iq_type = match iq.attr("type") {
            Some("get") => Some(IqType::Get),
            Some("set") => Some(IqType::Set),
            Some("result" | "error") => None,
            _ => {
                let text = Some("The iq 'type' must be get, set, result or error.");
                return session.outbox.push(error_reply(
                    &iq,
                    ErrorCondition::BAD_REQUEST,
                    text,
                    None,
                ));
            }
        };
        if iq_type.is_some() && (iq.attr("id").is_none() || iq.children().count() != 1) {
            let text = Some("A request needs an 'id' and exactly one payload.");
            return session
                .outbox
                .push(error_reply(&iq, ErrorCondition::BAD_REQUEST, text, None));
        }
        match to.as_ref().map(|to| self.resolve(to)) {
            Some(Destination::Remote) => {
                if iq_type.is_some() {
                    session.outbox.push(error_reply(
                        &iq,
                        ErrorCondition::REMOTE_SERVER_NOT_FOUND,
                        None,
                        None,
                    ));
                }
                return;
            }
            Some(Destination::Service(module)) => return module.handle_service(self, iq).await,
            Some(Destination::Component(domain)) => {
                if let Some(error) = self.to_component(&domain, iq).await {
                    session.outbox.push(error);
                }
                return;
            }
            Some(Destination::Account | Destination::Server) | None => {}
        }
        let target = match &to {
            None => IqTarget::Account(session.user()),
            Some(to) => match (to.node(), to.try_as_full()) {
                (None, Err(_)) => IqTarget::Server,
                (None, Ok(_)) => {
                    if iq_type.is_some() {
                        session.outbox.push(error_reply(
                            &iq,
                            ErrorCondition::SERVICE_UNAVAILABLE,
                            None,
                            None,
                        ));
                    }
                    return;
                }
                (Some(_), Ok(full)) => {
                    let full = full.clone();
                    return self.forward_iq(session, iq, &full, iq_type.is_some()).await;
                }
                (Some(_), Err(bare)) => IqTarget::Account(bare.clone()),
            },
        };
        // Responses to the server or an account are consumed here.
        let Some(iq_type) = iq_type else { return };
        if let IqTarget::Account(account) = &target
            && *account != session.user()
        {
            // The stamped `from`: a client's own JID, or the address at a
            // component that sent it.
            let requester = stanza::from(&iq).unwrap_or_else(|| Jid::from(session.jid.clone()));
            let blocked = self.blocks(account, &requester).await;
            let condition = if blocked {
                Some(ErrorCondition::SERVICE_UNAVAILABLE)
            } else {
                match self.account_exists(account).await {
                    Some(true) => None,
                    Some(false) => Some(ErrorCondition::SERVICE_UNAVAILABLE),
                    None => Some(ErrorCondition::INTERNAL_SERVER_ERROR_WAIT),
                }
            };
            if let Some(condition) = condition {
                return session.outbox.push(error_reply(&iq, condition, None, None));
            }
        }
        let payload = iq.children().next().expect("checked above").clone();
        let reply = self
            .dispatch_iq(session, &iq, &payload, iq_type, target)
            .await;
        session.outbox.push(reply);
    }

    async fn dispatch_iq(
        &self,
        session: &mut Session,
        iq: &Element,
        payload: &Element,
        iq_type: IqType,
        target: IqTarget,
    ) -> Element {
        let own = target == IqTarget::Account(session.user());
        if payload.is("query", namespaces::ROSTER) {
            if !own {
                return error_reply(
                    iq,
                    ErrorCondition::FORBIDDEN,
                    Some("A roster belongs to its owner."),
                    None,
                );
            }
            return self.handle_roster_iq(session, iq, payload, iq_type).await;
        }
        if payload.is("session", ns::SESSION) && iq_type == IqType::Set {
            // RFC 3921 session establishment, kept for old clients: nothing to do.
            return iq_result(iq, None);
        }
        if payload.is("bind", ns::BIND) {
            return error_reply(
                iq,
                ErrorCondition::NOT_ALLOWED,
                Some("A resource is already bound."),
                None,
            );
        }
        let mut cx = IqContext {
            router: self,
            session,
            iq,
            payload,
            iq_type,
            target,
        };
        let module = self
            .iq_table
            .get(payload.ns().as_str())
            .and_then(|names| names.get(payload.name()));
        if let Some(module) = module
            && let Some(reply) = module.handle_iq(&mut cx).await
        {
            return reply;
        }
        error_reply(iq, ErrorCondition::SERVICE_UNAVAILABLE, None, None)
    }

    /// An iq to a full JID goes to that session, or errors back (section 8.5.3.2.1).
    async fn forward_iq(
        &self,
        session: &mut Session,
        iq: Element,
        to: &jid::FullJid,
        is_request: bool,
    ) {
        let recipient = to.to_bare();
        let requester = stanza::from(&iq).unwrap_or_else(|| Jid::from(session.jid.clone()));
        if recipient != session.user() && self.blocks(&recipient, &requester).await {
            if is_request {
                session.outbox.push(error_reply(
                    &iq,
                    ErrorCondition::SERVICE_UNAVAILABLE,
                    None,
                    None,
                ));
            }
            return;
        }
        let returned = match self.bus.route(to) {
            Some(route) => self.send_to(&route, iq).await.err(),
            None => Some(iq),
        };
        if let Some(iq) = returned
            && is_request
        {
            session.outbox.push(error_reply(
                &iq,
                ErrorCondition::SERVICE_UNAVAILABLE,
                None,
                None,
            ));
        }
    }
}
