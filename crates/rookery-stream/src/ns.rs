//! Namespace names used on the stream level.

/// `jabber:client`, the content namespace of client streams.
pub const CLIENT: &str = "jabber:client";
/// `jabber:component:accept`, the content namespace of external component
/// streams (XEP-0114).
pub const COMPONENT: &str = "jabber:component:accept";
/// The stream namespace (RFC 6120 section 4.8.1).
pub const STREAM: &str = "http://etherx.jabber.org/streams";
/// Stream error conditions.
pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// STARTTLS.
pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
/// SASL.
pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// Resource binding.
pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// Legacy session establishment (RFC 3921), advertised as optional.
pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// Stanza error conditions.
pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// XEP-0198 stream management.
pub const SM: &str = "urn:xmpp:sm:3";
/// RFC 7395 WebSocket framing.
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// XEP-0077 in-band registration (query).
pub const REGISTER: &str = "jabber:iq:register";
/// XEP-0077 in-band registration (stream feature).
pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
/// XEP-0199 ping.
pub const PING: &str = "urn:xmpp:ping";
/// The XML namespace (`xml:lang`).
pub const XML: &str = "http://www.w3.org/XML/1998/namespace";
/// XEP-0352 client state indication.
pub const CSI: &str = "urn:xmpp:csi:0";
