//! Stanza helpers: kinds, addressing, types and stanza errors (RFC 6120 section 8).

use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use rookery_stream::ns;
use rookery_stream::xml::set_attr;

/// The three stanza kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `<message/>`.
    Message,
    /// `<presence/>`.
    Presence,
    /// `<iq/>`.
    Iq,
}

impl Kind {
    /// The kind of a `jabber:client` element, if it is a stanza.
    pub fn of(element: &Element) -> Option<Kind> {
        if !element.has_ns(ns::CLIENT) {
            return None;
        }
        match element.name() {
            "message" => Some(Kind::Message),
            "presence" => Some(Kind::Presence),
            "iq" => Some(Kind::Iq),
            _ => None,
        }
    }
}

/// Message types (RFC 6121 section 5.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// `chat`.
    Chat,
    /// `error`.
    Error,
    /// `groupchat`.
    Groupchat,
    /// `headline`.
    Headline,
    /// `normal`, also the default.
    Normal,
}

impl MessageType {
    /// The type of a message; unknown values count as `normal` (RFC 6121 section 5.2.2).
    pub fn of(message: &Element) -> MessageType {
        match message.attr("type") {
            Some("chat") => MessageType::Chat,
            Some("error") => MessageType::Error,
            Some("groupchat") => MessageType::Groupchat,
            Some("headline") => MessageType::Headline,
            _ => MessageType::Normal,
        }
    }
}

/// Presence types (RFC 6121 section 4.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceType {
    /// No type: available.
    Available,
    /// `unavailable`.
    Unavailable,
    /// `subscribe`.
    Subscribe,
    /// `subscribed`.
    Subscribed,
    /// `unsubscribe`.
    Unsubscribe,
    /// `unsubscribed`.
    Unsubscribed,
    /// `probe`.
    Probe,
    /// `error`.
    Error,
}

impl PresenceType {
    /// The type of a presence, `None` for an unknown value.
    pub fn of(presence: &Element) -> Option<PresenceType> {
        Some(match presence.attr("type") {
            None => PresenceType::Available,
            Some("unavailable") => PresenceType::Unavailable,
            Some("subscribe") => PresenceType::Subscribe,
            Some("subscribed") => PresenceType::Subscribed,
            Some("unsubscribe") => PresenceType::Unsubscribe,
            Some("unsubscribed") => PresenceType::Unsubscribed,
            Some("probe") => PresenceType::Probe,
            Some("error") => PresenceType::Error,
            Some(_) => return None,
        })
    }

    /// True for the four subscription types.
    pub fn is_subscription(self) -> bool {
        matches!(
            self,
            PresenceType::Subscribe
                | PresenceType::Subscribed
                | PresenceType::Unsubscribe
                | PresenceType::Unsubscribed
        )
    }

    /// The attribute value, `None` for available.
    pub fn as_attr(self) -> Option<&'static str> {
        Some(match self {
            PresenceType::Available => return None,
            PresenceType::Unavailable => "unavailable",
            PresenceType::Subscribe => "subscribe",
            PresenceType::Subscribed => "subscribed",
            PresenceType::Unsubscribe => "unsubscribe",
            PresenceType::Unsubscribed => "unsubscribed",
            PresenceType::Probe => "probe",
            PresenceType::Error => "error",
        })
    }
}

/// The `to` of a stanza, parsed; an error when it is not a valid JID.
pub fn to(stanza: &Element) -> Result<Option<Jid>, jid::Error> {
    stanza.attr("to").map(Jid::new).transpose()
}

/// The `from` of a stanza the server stamped; always a valid full or bare JID.
pub fn from(stanza: &Element) -> Option<Jid> {
    stanza.attr("from").and_then(|from| Jid::new(from).ok())
}

/// A stanza error condition and its type (RFC 6120 section 8.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCondition {
    /// `auth`, `cancel`, `continue`, `modify` or `wait`.
    pub error_type: &'static str,
    /// The defined condition element name.
    pub condition: &'static str,
}

macro_rules! conditions {
    ($($name:ident = ($ty:literal, $cond:literal);)*) => {
        impl ErrorCondition {
            $(
                #[doc = concat!("`", $cond, "` (type `", $ty, "`).")]
                pub const $name: ErrorCondition = ErrorCondition { error_type: $ty, condition: $cond };
            )*
        }
    };
}

conditions! {
    BAD_REQUEST = ("modify", "bad-request");
    CONFLICT = ("cancel", "conflict");
    FEATURE_NOT_IMPLEMENTED = ("cancel", "feature-not-implemented");
    FORBIDDEN = ("auth", "forbidden");
    INTERNAL_SERVER_ERROR = ("cancel", "internal-server-error");
    INTERNAL_SERVER_ERROR_WAIT = ("wait", "internal-server-error");
    ITEM_NOT_FOUND = ("cancel", "item-not-found");
    JID_MALFORMED = ("modify", "jid-malformed");
    NOT_ACCEPTABLE = ("modify", "not-acceptable");
    NOT_ALLOWED = ("cancel", "not-allowed");
    NOT_AUTHORIZED = ("auth", "not-authorized");
    POLICY_VIOLATION = ("modify", "policy-violation");
    RECIPIENT_UNAVAILABLE = ("wait", "recipient-unavailable");
    REMOTE_SERVER_NOT_FOUND = ("cancel", "remote-server-not-found");
    RESOURCE_CONSTRAINT = ("wait", "resource-constraint");
    SERVICE_UNAVAILABLE = ("cancel", "service-unavailable");
    SUBSCRIPTION_REQUIRED = ("auth", "subscription-required");
    UNDEFINED_CONDITION = ("cancel", "undefined-condition");
    UNEXPECTED_REQUEST = ("wait", "unexpected-request");
}

/// True if the stanza must never be answered with an error (it is an error, or an iq result).
pub fn is_error_or_result(stanza: &Element) -> bool {
    matches!(stanza.attr("type"), Some("error" | "result"))
}

/// Builds the error reply to `stanza`: addresses swapped, original payload kept
/// for messages and presence (RFC 6120 section 8.3.1), optional `extra` child
/// (an application-specific condition) and text.
pub fn error_reply(
    stanza: &Element,
    error: ErrorCondition,
    text: Option<&str>,
    extra: Option<Element>,
) -> Element {
    let mut reply = Element::bare(stanza.name(), ns::CLIENT);
    if stanza.name() != "iq" {
        for child in stanza.children() {
            reply.append_child(child.clone());
        }
    } else if let Some(payload) = stanza.children().next() {
        reply.append_child(payload.clone());
    }
    set_attr(&mut reply, "type", "error");
    if let Some(id) = stanza.attr("id") {
        set_attr(&mut reply, "id", id);
    }
    if let Some(from) = stanza.attr("from") {
        set_attr(&mut reply, "to", from);
    }
    if let Some(to) = stanza.attr("to") {
        set_attr(&mut reply, "from", to);
    }
    let mut element = Element::bare("error", ns::CLIENT);
    set_attr(&mut element, "type", error.error_type);
    element.append_child(Element::bare(error.condition, ns::STANZAS));
    if let Some(text) = text {
        let mut text_element = Element::builder("text", ns::STANZAS).append(text).build();
        text_element.set_attr(rxml_xml_ns(), rxml_lang(), "en".to_owned());
        element.append_child(text_element);
    }
    if let Some(extra) = extra {
        element.append_child(extra);
    }
    reply.append_child(element);
    reply
}

fn rxml_xml_ns() -> minidom::rxml::Namespace<'static> {
    minidom::rxml::Namespace::from(ns::XML)
}

fn rxml_lang() -> minidom::rxml::NcName {
    minidom::rxml::NcName::try_from("lang").expect("valid")
}

/// An iq result to `iq`, with an optional payload.
pub fn iq_result(iq: &Element, payload: Option<Element>) -> Element {
    let mut result = Element::bare("iq", ns::CLIENT);
    set_attr(&mut result, "type", "result");
    if let Some(id) = iq.attr("id") {
        set_attr(&mut result, "id", id);
    }
    if let Some(from) = iq.attr("from") {
        set_attr(&mut result, "to", from);
    }
    if let Some(to) = iq.attr("to") {
        set_attr(&mut result, "from", to);
    }
    if let Some(payload) = payload {
        result.append_child(payload);
    }
    result
}

/// A new stanza of `name` with `from` and `to` set.
pub fn stanza(name: &str, from: &str, to: &str) -> Element {
    let mut element = Element::bare(name, ns::CLIENT);
    set_attr(&mut element, "from", from);
    set_attr(&mut element, "to", to);
    element
}

/// A bare JID as a `Jid`.
pub fn bare(jid: &BareJid) -> Jid {
    Jid::from(jid.clone())
}

/// A full JID as a `Jid`.
pub fn full(jid: &FullJid) -> Jid {
    Jid::from(jid.clone())
}
