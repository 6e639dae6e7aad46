//! Sans-IO XMPP client-to-server stream (RFC 6120): framing, stream features,
//! STARTTLS, SASL, resource binding and stream management (XEP-0198); and
//! the external component stream (XEP-0114).
//!
//! [`ServerStream`] does no I/O and reads no clock. The session task feeds it
//! bytes (`handle_input`) and the current time (`handle_timeout`), and takes
//! out bytes to write (`poll_transmit`), events to act on (`poll_event`) and
//! the next deadline (`poll_timeout`). Anything that needs storage or the
//! router (credentials, binding, resumption) is an event the caller answers
//! with the matching `handle_*` call.

#![forbid(unsafe_code)]

mod component;
pub mod ns;
pub mod sasl;
pub mod sm;
mod stream;
pub mod xml;

pub use component::{ComponentConfig, ComponentEvent, ComponentStream, handshake_digest};
pub use sasl::{ScramHash, ScramKeys};
pub use sm::SmState;
pub use stream::{
    AuthMechanism, CloseReason, Framing, KeysAnswer, ServerStream, StreamConfig, StreamEvent,
    Timeouts, TlsPolicy, random_id,
};
pub use xml::Limits;

/// A stream error condition (RFC 6120 section 4.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// XML that cannot be processed.
    BadFormat,
    /// An unsupported or missing namespace prefix.
    BadNamespacePrefix,
    /// A new stream conflicts with this one (same full JID bound elsewhere).
    Conflict,
    /// The peer has not sent anything for too long.
    ConnectionTimeout,
    /// The `to` domain is not served here.
    HostUnknown,
    /// A stanza lacked a required address.
    ImproperAddressing,
    /// The server failed in a way the peer is not to blame for.
    InternalServerError,
    /// The `from` address does not match the authenticated identity.
    InvalidFrom,
    /// The stream or content namespace is not supported.
    InvalidNamespace,
    /// The peer is not authorized for what it tried (e.g. a stanza before authentication).
    NotAuthorized,
    /// The XML is not well-formed.
    NotWellFormed,
    /// A local policy was violated (size limits, rate limits, TLS required).
    PolicyViolation,
    /// The server lacks resources to serve the stream.
    ResourceConstraint,
    /// Connect to another host instead (the host is the error's content).
    SeeOtherHost,
    /// Comments, processing instructions, DTDs or entity references.
    RestrictedXml,
    /// The server is going down.
    SystemShutdown,
    /// None of the defined conditions fits.
    UndefinedCondition,
    /// Not UTF-8, or invalid UTF-8.
    UnsupportedEncoding,
    /// A mandatory feature is not supported.
    UnsupportedFeature,
    /// A top-level element the server does not know.
    UnsupportedStanzaType,
    /// The stream version is not supported.
    UnsupportedVersion,
}

impl Condition {
    /// The element name of the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::BadFormat => "bad-format",
            Condition::BadNamespacePrefix => "bad-namespace-prefix",
            Condition::Conflict => "conflict",
            Condition::ConnectionTimeout => "connection-timeout",
            Condition::HostUnknown => "host-unknown",
            Condition::ImproperAddressing => "improper-addressing",
            Condition::InternalServerError => "internal-server-error",
            Condition::InvalidFrom => "invalid-from",
            Condition::InvalidNamespace => "invalid-namespace",
            Condition::NotAuthorized => "not-authorized",
            Condition::NotWellFormed => "not-well-formed",
            Condition::PolicyViolation => "policy-violation",
            Condition::ResourceConstraint => "resource-constraint",
            Condition::SeeOtherHost => "see-other-host",
            Condition::RestrictedXml => "restricted-xml",
            Condition::SystemShutdown => "system-shutdown",
            Condition::UndefinedCondition => "undefined-condition",
            Condition::UnsupportedEncoding => "unsupported-encoding",
            Condition::UnsupportedFeature => "unsupported-feature",
            Condition::UnsupportedStanzaType => "unsupported-stanza-type",
            Condition::UnsupportedVersion => "unsupported-version",
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stream error as sent to the peer just before the stream closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamError {
    /// The defined condition.
    pub condition: Condition,
    /// Human-readable explanation.
    pub text: Option<String>,
    /// The condition element's content: the host of `see-other-host`.
    pub content: Option<String>,
}

impl StreamError {
    /// An error with a condition and an explanation.
    pub fn new(condition: Condition, text: impl Into<String>) -> Self {
        StreamError {
            condition,
            text: Some(text.into()),
            content: None,
        }
    }

    /// `see-other-host` pointing at `host` (`host:port`, IPv6 in brackets).
    pub fn see_other_host(host: impl Into<String>) -> Self {
        StreamError {
            condition: Condition::SeeOtherHost,
            text: None,
            content: Some(host.into()),
        }
    }
}

impl From<Condition> for StreamError {
    fn from(condition: Condition) -> Self {
        StreamError {
            condition,
            text: None,
            content: None,
        }
    }
}
