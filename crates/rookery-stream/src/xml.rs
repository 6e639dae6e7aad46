//! Incremental reading and writing of the XML stream (RFC 6120 section 11) on top of rxml.
//!
//! [`StreamReader`] turns bytes into stream-level events: the stream header,
//! complete top-level elements (stanzas and nonzas) as [`minidom::Element`],
//! whitespace keep-alives and the stream footer. It enforces the stanza size
//! and depth limits as bytes arrive, so an oversized stanza is refused before
//! it is buffered whole. rxml itself refuses DTDs, entity declarations,
//! processing instructions, comments and invalid UTF-8.

use bytes::BytesMut;
use minidom::Element;
use rxml::writer::{Encoder, SimpleNamespaces, TrackNamespace};
use rxml::{Event, Parse, WithOptions};
use xso::AsXml;

use crate::Condition;
use crate::ns;

/// Bounds on what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element, in bytes of input.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside one top-level element.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 48,
        }
    }
}

/// What the stream reader recognised.
#[derive(Debug)]
pub enum XmlEvent {
    /// The stream root element opened.
    StreamOpen {
        /// Namespace and local name of the root element.
        name: rxml::QName,
        /// Its attributes (without namespace declarations).
        attrs: rxml::AttrMap,
    },
    /// A complete top-level element (a stanza or a nonza).
    Element(Element),
    /// Whitespace between top-level elements: a keep-alive.
    Whitespace,
    /// The stream root element closed.
    StreamClose,
}

/// Builds elements from rxml events, one top-level element at a time.
#[derive(Default)]
struct TreeBuilder {
    /// Elements under construction, outermost first; empty between top-level elements.
    open: Vec<Element>,
    /// Input bytes of the top-level element under construction.
    bytes: usize,
}

enum Built {
    Pending,
    Done(Element),
}

impl TreeBuilder {
    fn in_element(&self) -> bool {
        !self.open.is_empty()
    }

    fn feed(&mut self, event: Event, limits: &Limits) -> Result<Built, Condition> {
        self.bytes += event.metrics().len();
        if self.bytes > limits.max_stanza_bytes {
            return Err(Condition::PolicyViolation);
        }
        match event {
            Event::XmlDeclaration(..) => Ok(Built::Pending),
            Event::StartElement(_, (namespace, name), attrs) => {
                if self.open.len() >= limits.max_depth {
                    return Err(Condition::PolicyViolation);
                }
                let mut element = Element::bare(name.as_str(), namespace.as_str());
                *element.attrs_mut() = attrs;
                self.open.push(element);
                Ok(Built::Pending)
            }
            Event::Text(_, text) => {
                if let Some(top) = self.open.last_mut() {
                    top.append_text(text);
                }
                Ok(Built::Pending)
            }
            Event::EndElement(_) => {
                let element = self.open.pop().expect("rxml balances elements");
                match self.open.last_mut() {
                    Some(parent) => {
                        parent.append_child(element);
                        Ok(Built::Pending)
                    }
                    None => {
                        self.bytes = 0;
                        Ok(Built::Done(element))
                    }
                }
            }
        }
    }
}

/// Maps an rxml error to the RFC 6120 stream error condition.
fn condition_of(error: &rxml::Error) -> Condition {
    use rxml::Error as E;
    match error {
        E::InvalidUtf8Byte(_) => Condition::UnsupportedEncoding,
        E::RestrictedXml("long name or reference" | "event too long") => Condition::PolicyViolation,
        // `<!` that does not start CDATA is a DTD or a comment.
        E::RestrictedXml(_)
        | E::UndeclaredEntity
        | E::InvalidSyntax("malformed cdata or comment section start") => Condition::RestrictedXml,
        E::UndeclaredNamespacePrefix(_) | E::ReservedNamespacePrefix | E::ReservedNamespaceName => {
            Condition::BadNamespacePrefix
        }
        _ => Condition::NotWellFormed,
    }
}

fn parser_for(limits: &Limits) -> rxml::Parser {
    // A single token may be as long as a whole stanza; the stanza limit is the real bound.
    rxml::Parser::with_options(rxml::Options {
        max_token_length: limits.max_stanza_bytes,
        ..Default::default()
    })
}

/// Reads a TCP XML stream incrementally.
pub struct StreamReader {
    parser: rxml::Parser,
    tree: TreeBuilder,
    root_open: bool,
    /// Whether any byte other than leading whitespace arrived.
    started: bool,
    limits: Limits,
}

impl StreamReader {
    /// A reader for a new stream (also after a stream restart).
    pub fn new(limits: Limits) -> Self {
        StreamReader {
            parser: parser_for(&limits),
            tree: TreeBuilder::default(),
            root_open: false,
            started: false,
            limits,
        }
    }

    /// True while a top-level element has started but not finished.
    pub fn in_element(&self) -> bool {
        self.tree.in_element()
    }

    /// Frees parser scratch memory; call when the connection goes idle.
    pub fn release_memory(&mut self) {
        self.parser.release_temporaries();
        if self.tree.open.is_empty() {
            self.tree.open = Vec::new();
        }
    }

    /// Consumes bytes from `input` until one event is recognised.
    ///
    /// Returns `Ok(None)` once `input` is exhausted without a complete event.
    pub fn read(&mut self, input: &mut &[u8]) -> Result<Option<XmlEvent>, Condition> {
        if !self.started {
            // XML allows no whitespace before the declaration; clients send some anyway.
            let skip = input.iter().take_while(|b| b.is_ascii_whitespace()).count();
            *input = &input[skip..];
            if input.is_empty() {
                return Ok(None);
            }
            if input[0] != b'<' {
                // Not XML at all (an HTTP request, a TLS handshake on the wrong port):
                // refuse at once instead of waiting for a '<' that never comes.
                return Err(Condition::NotWellFormed);
            }
            self.started = true;
        }
        loop {
            let event = match self.parser.parse(input, false) {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(Some(XmlEvent::StreamClose)),
                Err(rxml::error::EndOrError::NeedMoreData) => return Ok(None),
                Err(rxml::error::EndOrError::Error(error)) => return Err(condition_of(&error)),
            };
            if !self.root_open {
                match event {
                    Event::XmlDeclaration(..) => continue,
                    Event::StartElement(_, name, attrs) => {
                        self.root_open = true;
                        return Ok(Some(XmlEvent::StreamOpen { name, attrs }));
                    }
                    _ => return Err(Condition::NotWellFormed),
                }
            }
            if !self.tree.in_element() {
                match event {
                    Event::Text(_, text) if is_xml_whitespace(&text) => {
                        return Ok(Some(XmlEvent::Whitespace));
                    }
                    Event::Text(..) => return Err(Condition::BadFormat),
                    Event::EndElement(_) => {
                        self.root_open = false;
                        return Ok(Some(XmlEvent::StreamClose));
                    }
                    _ => {}
                }
            }
            if let Built::Done(element) = self.tree.feed(event, &self.limits)? {
                return Ok(Some(XmlEvent::Element(element)));
            }
        }
    }
}

fn is_xml_whitespace(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Parses one WebSocket message (RFC 7395): exactly one complete element.
pub fn parse_frame(frame: &[u8], limits: &Limits) -> Result<Element, Condition> {
    if frame.len() > limits.max_stanza_bytes {
        return Err(Condition::PolicyViolation);
    }
    let mut parser = parser_for(limits);
    let mut tree = TreeBuilder::default();
    let mut input = frame.trim_ascii();
    let mut element = None;
    loop {
        match parser.parse(&mut input, true) {
            Ok(Some(Event::Text(_, text))) if !tree.in_element() && is_xml_whitespace(&text) => {}
            Ok(Some(event)) => {
                if element.is_some() {
                    return Err(Condition::NotWellFormed);
                }
                if let Built::Done(done) = tree.feed(event, limits)? {
                    element = Some(done);
                }
            }
            Ok(None) => return element.ok_or(Condition::NotWellFormed),
            Err(rxml::error::EndOrError::NeedMoreData) => return Err(Condition::NotWellFormed),
            Err(rxml::error::EndOrError::Error(error)) => return Err(condition_of(&error)),
        }
    }
}

/// Serialises elements inside a stream whose default namespace is already declared.
pub struct StreamWriter {
    encoder: Encoder<SimpleNamespaces>,
}

impl StreamWriter {
    /// A writer for elements inside a `jabber:client` stream with the `stream` prefix declared.
    pub fn new() -> Self {
        let mut encoder = Encoder::new();
        let stream_prefix = rxml::NcName::try_from("stream").expect("valid");
        encoder
            .ns_tracker_mut()
            .declare_fixed(Some(&stream_prefix), ns::STREAM.into());
        encoder
            .ns_tracker_mut()
            .declare_fixed(None, ns::CLIENT.into());
        Self::inside_root(encoder, ns::STREAM)
    }

    /// A writer for standalone documents (each WebSocket message declares its namespaces).
    pub fn standalone() -> Self {
        Self::inside_root(Encoder::new(), ns::FRAMING)
    }

    /// Positions the encoder inside a root element (the stream), whose header
    /// the stream state machine writes itself.
    fn inside_root(mut encoder: Encoder<SimpleNamespaces>, root_ns: &str) -> Self {
        let mut discard = BytesMut::new();
        let root = rxml::NcName::try_from("stream").expect("valid");
        encoder
            .encode_into_bytes(
                rxml::writer::Item::ElementHeadStart(root_ns.into(), &root),
                &mut discard,
            )
            .expect("valid root");
        encoder
            .encode_into_bytes(rxml::writer::Item::ElementHeadEnd, &mut discard)
            .expect("valid root");
        StreamWriter { encoder }
    }

    /// Appends the serialisation of `element` to `out`.
    pub fn write(&mut self, element: &Element, out: &mut BytesMut) {
        let mut items = element
            .as_xml_iter()
            .expect("minidom elements always serialise")
            .map(|item| item.expect("minidom elements always serialise"))
            .peekable();
        while let Some(item) = items.next() {
            // A header end directly followed by the foot is an empty element: write `<x/>`.
            if matches!(item, xso::Item::ElementHeadEnd)
                && matches!(items.peek(), Some(xso::Item::ElementFoot))
            {
                continue;
            }
            self.encoder
                .encode_into_bytes(item.as_rxml_item(), out)
                .expect("minidom elements hold valid names and text");
        }
    }
}

impl Default for StreamWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Sets (or replaces) an unnamespaced attribute.
pub fn set_attr(element: &mut Element, name: &str, value: impl Into<String>) {
    let name = rxml::NcName::try_from(name).expect("valid attribute name");
    element.set_attr(rxml::Namespace::NONE, name, value.into());
}

/// Removes an unnamespaced attribute.
pub fn remove_attr(element: &mut Element, name: &str) {
    element.attrs_mut().remove(&rxml::Namespace::NONE, name);
}

/// Escapes text for use in an XML attribute value delimited by `'`.
pub fn escape_attr(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['<', '>', '&', '\'', '"']) {
        return std::borrow::Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests;
