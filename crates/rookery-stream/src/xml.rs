//! Incremental reading and writing of the XML stream (RFC 6120 section 11) on top of rxml.
//!
//! [`StreamReader`] turns bytes into stream-level events: the stream header,
//! complete top-level elements (stanzas and nonzas) as [`minidom::Element`],
//! whitespace keep-alives and the stream footer. It enforces its [`Limits`]
//! as bytes arrive, so an oversized header or stanza, or an element head with
//! too many attributes, is refused before it is buffered whole: every byte
//! the parser takes counts against the unit (header or stanza) it belongs to,
//! also while rxml still holds it inside an unfinished tag. rxml itself
//! refuses DTDs, entity declarations, processing instructions, comments and
//! invalid UTF-8.

use bytes::BytesMut;
use minidom::Element;
use rxml::{Event, Parse, WithOptions};

use crate::Condition;
use crate::ns;

/// Bounds on what a peer may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element, in bytes of input.
    pub max_stanza_bytes: usize,
    /// Largest top-level element before authentication (SASL, registration).
    pub max_unauthenticated_stanza_bytes: usize,
    /// Largest stream header: the XML declaration and the root's opening tag.
    pub max_header_bytes: usize,
    /// Deepest element nesting inside one top-level element.
    pub max_depth: usize,
    /// Most attributes on one element, namespace declarations included.
    pub max_attributes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            // A SCRAM exchange with the longest user name XMPP allows, or a
            // registration form, is a few kilobytes.
            max_unauthenticated_stanza_bytes: 16 * 1024,
            // Real clients send 150 to 300 bytes.
            max_header_bytes: 4 * 1024,
            max_depth: 48,
            // Stanzas carry a handful (XEP payloads: up to about ten).
            max_attributes: 64,
        }
    }
}

impl Limits {
    /// These limits before authentication: stanzas no larger than
    /// `max_unauthenticated_stanza_bytes`.
    pub fn unauthenticated(self) -> Limits {
        Limits {
            max_stanza_bytes: self
                .max_stanza_bytes
                .min(self.max_unauthenticated_stanza_bytes),
            ..self
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

/// What an element costs in memory beyond its text: the tree node (name,
/// namespace, attribute map and children, as minidom keeps them), charged
/// against the byte budgets as if it were input. minidom copies the
/// namespace into every element, and an attribute's namespace into every
/// attribute; those copies are charged too, so that a long namespace
/// declared once cannot make thousands of `<a/>` cost megabytes.
const ELEMENT_BYTES: usize = 128;
/// The same for one attribute beyond its name and value.
const ATTRIBUTE_BYTES: usize = 32;
/// The longest namespace accepted (XEP namespaces are under 100 bytes); it
/// bounds what [`approximate_size`], which cannot see namespaces without
/// copying them, leaves out.
pub const MAX_NAMESPACE_BYTES: usize = 256;

/// The memory an event costs beyond its bytes of input, or `Err` for a
/// namespace longer than [`MAX_NAMESPACE_BYTES`].
fn charge(event: &Event) -> Result<usize, Condition> {
    let Event::StartElement(_, (namespace, _), attrs) = event else {
        return Ok(0);
    };
    if namespace.len() > MAX_NAMESPACE_BYTES {
        return Err(Condition::PolicyViolation);
    }
    let attributes: usize = attrs
        .iter()
        .map(|((namespace, _), _)| ATTRIBUTE_BYTES + namespace.len())
        .sum();
    Ok(ELEMENT_BYTES + namespace.len() + attributes)
}

/// Builds elements from rxml events, one top-level element at a time.
#[derive(Default)]
struct TreeBuilder {
    /// Elements under construction, outermost first; empty between top-level elements.
    open: Vec<Element>,
    /// Elements in this namespace are built in `jabber:client` instead: a
    /// component's `jabber:component:accept` (XEP-0114), so that the router
    /// sees one content namespace whatever stream a stanza came on.
    alias: Option<&'static str>,
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
        match event {
            Event::XmlDeclaration(..) => Ok(Built::Pending),
            Event::StartElement(_, (namespace, name), attrs) => {
                if self.open.len() >= limits.max_depth {
                    return Err(Condition::PolicyViolation);
                }
                let namespace = match self.alias {
                    Some(alias) if namespace.as_str() == alias => ns::CLIENT,
                    _ => namespace.as_str(),
                };
                let mut element = Element::bare(name.as_str(), namespace);
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
                    None => Ok(Built::Done(element)),
                }
            }
        }
    }
}

/// Where [`MarkupScanner`] is in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Scan {
    /// Character data between tags.
    #[default]
    Text,
    /// Just after `<`.
    Open,
    /// Inside an element's opening tag, outside attribute values.
    Head,
    /// Inside an attribute value delimited by this quote.
    Value(u8),
    /// Inside a closing tag, or the XML declaration (`<?`): until `>`.
    Tag,
    /// Inside `<!`: a CDATA section (anything else rxml refuses), until `]]>`.
    Section,
}

/// Follows the tags of the input byte by byte, ahead of rxml, to count the
/// attributes (namespace declarations included) of each opening tag while it
/// arrives. rxml resolves namespaces only once a tag is complete and keeps
/// every attribute until then; it has no limit on their number. The scanner
/// needs only to be right for input rxml accepts: anything else rxml refuses
/// itself, at the latest a few bytes later.
#[derive(Debug, Default)]
struct MarkupScanner {
    state: Scan,
    /// `=` signs in the current opening tag: one per attribute.
    attributes: usize,
    /// The two bytes before the current one inside a section, to find `]]>`.
    behind: [u8; 2],
}

impl MarkupScanner {
    /// Follows `bytes`; `Err` once an opening tag has more than `max_attributes`.
    fn scan(&mut self, bytes: &[u8], max_attributes: usize) -> Result<(), Condition> {
        let mut index = 0;
        while index < bytes.len() {
            match self.state {
                Scan::Text => match bytes[index..].iter().position(|&b| b == b'<') {
                    Some(at) => {
                        index += at;
                        self.state = Scan::Open;
                    }
                    None => return Ok(()),
                },
                Scan::Open => match bytes[index] {
                    b'/' | b'?' => self.state = Scan::Tag,
                    b'!' => {
                        self.behind = [0; 2];
                        self.state = Scan::Section;
                    }
                    _ => {
                        // An opening tag; its name's first byte is looked at again in Head.
                        self.attributes = 0;
                        self.state = Scan::Head;
                        continue;
                    }
                },
                Scan::Head => {
                    let Some(at) = bytes[index..]
                        .iter()
                        .position(|&b| matches!(b, b'=' | b'\'' | b'"' | b'>'))
                    else {
                        return Ok(());
                    };
                    index += at;
                    match bytes[index] {
                        b'=' => {
                            self.attributes += 1;
                            if self.attributes > max_attributes {
                                return Err(Condition::PolicyViolation);
                            }
                        }
                        b'>' => self.state = Scan::Text,
                        quote => self.state = Scan::Value(quote),
                    }
                }
                Scan::Value(quote) => match bytes[index..].iter().position(|&b| b == quote) {
                    Some(at) => {
                        index += at;
                        self.state = Scan::Head;
                    }
                    None => return Ok(()),
                },
                Scan::Tag => match bytes[index..].iter().position(|&b| b == b'>') {
                    Some(at) => {
                        index += at;
                        self.state = Scan::Text;
                    }
                    None => return Ok(()),
                },
                Scan::Section => {
                    let byte = bytes[index];
                    if byte == b'>' && self.behind == *b"]]" {
                        self.state = Scan::Text;
                    }
                    self.behind = [self.behind[1], byte];
                }
            }
            index += 1;
        }
        Ok(())
    }

    /// True between `<` and the end of its tag or section.
    fn in_markup(&self) -> bool {
        self.state != Scan::Text
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
    scanner: MarkupScanner,
    root_open: bool,
    /// Whether any byte other than leading whitespace arrived.
    started: bool,
    /// Bytes the parser took for the unit under way: the header until the
    /// root opens, then the current top-level element (or whitespace).
    unit_bytes: usize,
    limits: Limits,
}

impl StreamReader {
    /// A reader for a new stream (also after a stream restart).
    pub fn new(limits: Limits) -> Self {
        StreamReader {
            parser: parser_for(&limits),
            tree: TreeBuilder::default(),
            scanner: MarkupScanner::default(),
            root_open: false,
            started: false,
            unit_bytes: 0,
            limits,
        }
    }

    /// A reader for an external component's stream (XEP-0114): elements in
    /// `jabber:component:accept` come out in `jabber:client`. (Written back
    /// with [`StreamWriter::new`] inside a header that declares
    /// `jabber:component:accept`, they are in the component's namespace again.)
    ///
    /// A component stream is not restarted after its handshake: the reader
    /// starts with the unauthenticated budgets of `limits` and takes the
    /// full ones from [`authenticated`](Self::authenticated).
    pub fn component(limits: Limits) -> Self {
        let mut reader = StreamReader::new(limits);
        reader.tree.alias = Some(ns::COMPONENT);
        reader.limits = limits.unauthenticated();
        reader
    }

    /// The peer authenticated without a stream restart: the budgets of
    /// `limits` apply from now on (its parser was sized for them already).
    pub fn authenticated(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// True from the first byte of a top-level element (its `<`) until it is complete.
    pub fn in_element(&self) -> bool {
        self.root_open && (self.tree.in_element() || self.scanner.in_markup())
    }

    /// Frees parser scratch memory; call when the connection goes idle.
    pub fn release_memory(&mut self) {
        self.parser.release_temporaries();
        if self.tree.open.is_empty() {
            self.tree.open = Vec::new();
        }
    }

    /// Like [`read`](Self::read), on a buffer: what was consumed is split off it.
    pub fn read_buffered(&mut self, buffer: &mut BytesMut) -> Result<Option<XmlEvent>, Condition> {
        let mut input = &buffer[..];
        let before = input.len();
        let result = self.read(&mut input);
        let consumed = before - input.len();
        let _ = buffer.split_to(consumed);
        result
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
            let before = *input;
            let parsed = self.parser.parse(input, false);
            let taken = &before[..before.len() - input.len()];
            self.unit_bytes += taken.len();
            let budget = if self.root_open {
                self.limits.max_stanza_bytes
            } else {
                self.limits.max_header_bytes
            };
            if self.unit_bytes > budget {
                return Err(Condition::PolicyViolation);
            }
            self.scanner.scan(taken, self.limits.max_attributes)?;
            let event = match parsed {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(Some(XmlEvent::StreamClose)),
                Err(rxml::error::EndOrError::NeedMoreData) => return Ok(None),
                Err(rxml::error::EndOrError::Error(error)) => return Err(condition_of(&error)),
            };
            self.unit_bytes += charge(&event)?;
            if self.unit_bytes > budget {
                return Err(Condition::PolicyViolation);
            }
            if !self.root_open {
                match event {
                    Event::XmlDeclaration(..) => continue,
                    Event::StartElement(_, name, attrs) => {
                        self.root_open = true;
                        self.unit_bytes = 0;
                        return Ok(Some(XmlEvent::StreamOpen { name, attrs }));
                    }
                    _ => return Err(Condition::NotWellFormed),
                }
            }
            if !self.tree.in_element() {
                match event {
                    Event::Text(_, text) if is_xml_whitespace(&text) => {
                        self.unit_bytes = 0;
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
                self.unit_bytes = 0;
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
    MarkupScanner::default().scan(frame, limits.max_attributes)?;
    let mut parser = parser_for(limits);
    let mut tree = TreeBuilder::default();
    let mut input = frame.trim_ascii();
    let mut element = None;
    let mut bytes = frame.len();
    loop {
        match parser.parse(&mut input, true) {
            Ok(Some(Event::Text(_, text))) if !tree.in_element() && is_xml_whitespace(&text) => {}
            Ok(Some(event)) => {
                if element.is_some() {
                    return Err(Condition::NotWellFormed);
                }
                bytes += charge(&event)?;
                if bytes > limits.max_stanza_bytes {
                    return Err(Condition::PolicyViolation);
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
///
/// Written by hand over minidom's tree rather than through rxml's encoder:
/// the encoder tracks namespace scopes in allocated state and takes every
/// element as a stream of items, which made serialisation (with making the
/// encoder again for each burst) about 40 % of the server's own instructions
/// per routed message (bench/callgrind.sh). The output is the same bytes: the
/// tests compare both writers on a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamWriter {
    /// The default namespace in scope around each element written.
    default_ns: &'static str,
    /// Whether the `stream` prefix is declared on the root (TCP framing).
    stream_prefix: bool,
}

impl StreamWriter {
    /// A writer for elements inside a `jabber:client` stream with the `stream` prefix declared.
    pub const fn new() -> Self {
        StreamWriter {
            default_ns: ns::CLIENT,
            stream_prefix: true,
        }
    }

    /// A writer for standalone documents (each WebSocket message declares its namespaces).
    pub const fn standalone() -> Self {
        StreamWriter {
            default_ns: ns::FRAMING,
            stream_prefix: false,
        }
    }

    /// Appends the serialisation of `element` to `out`.
    pub fn write(&self, element: &Element, out: &mut BytesMut) {
        self.write_element(element, self.default_ns, out);
    }

    fn write_element(&self, element: &Element, parent_ns: &str, out: &mut BytesMut) {
        let prefixed = self.stream_prefix && element.has_ns(ns::STREAM);
        out.extend_from_slice(b"<");
        if prefixed {
            out.extend_from_slice(b"stream:");
        }
        out.extend_from_slice(element.name().as_bytes());
        // Only a change of namespace costs the namespace's copy.
        let own_ns;
        let scope = if prefixed || element.has_ns(parent_ns) {
            parent_ns
        } else {
            own_ns = element.ns();
            out.extend_from_slice(b" xmlns='");
            escape_into(out, &own_ns, true);
            out.extend_from_slice(b"'");
            &own_ns
        };
        // Attributes in a namespace other than xml get a prefix of their own, declared here.
        let mut declared: Vec<&rxml::Namespace<'static>> = Vec::new();
        for ((namespace, name), value) in element.attrs().iter() {
            out.extend_from_slice(b" ");
            if *namespace == rxml::Namespace::XML {
                out.extend_from_slice(b"xml:");
            } else if *namespace != rxml::Namespace::NONE {
                let index = match declared.iter().position(|known| *known == namespace) {
                    Some(index) => index,
                    None => {
                        declared.push(namespace);
                        let index = declared.len() - 1;
                        out.extend_from_slice(format!("xmlns:tns{index}='").as_bytes());
                        escape_into(out, namespace.as_str(), true);
                        out.extend_from_slice(b"' ");
                        index
                    }
                };
                out.extend_from_slice(format!("tns{index}:").as_bytes());
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"='");
            escape_into(out, value, true);
            out.extend_from_slice(b"'");
        }
        let mut nodes = element.nodes().peekable();
        if nodes.peek().is_none() {
            out.extend_from_slice(b"/>");
            return;
        }
        out.extend_from_slice(b">");
        for node in nodes {
            match node {
                minidom::Node::Element(child) => self.write_element(child, scope, out),
                minidom::Node::Text(text) => escape_into(out, text, false),
            }
        }
        out.extend_from_slice(b"</");
        if prefixed {
            out.extend_from_slice(b"stream:");
        }
        out.extend_from_slice(element.name().as_bytes());
        out.extend_from_slice(b">");
    }
}

impl Default for StreamWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends `text` escaped for XML content or, with `attribute`, for an
/// attribute value delimited by `'`. The escapes are rxml's, so that line
/// ends and tabs survive attribute normalisation. Characters XML cannot carry
/// at all (C0 controls other than tab, line feed and carriage return, and
/// U+FFFE, U+FFFF) never come from a parsed stanza; one the server made
/// itself is written as U+FFFD rather than breaking the stream.
fn escape_into(out: &mut BytesMut, text: &str, attribute: bool) {
    let bytes = text.as_bytes();
    let wanted = if attribute {
        IN_CONTENT | IN_ATTRIBUTE
    } else {
        IN_CONTENT
    };
    let mut start = 0;
    let mut from = 0;
    // Most text needs nothing: skip to the next byte that might, by table.
    while let Some(found) = bytes[from..]
        .iter()
        .position(|&byte| ATTENTION[usize::from(byte)] & wanted != 0)
    {
        let index = from + found;
        from = index + 1;
        let escaped: &[u8] = match bytes[index] {
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'&' => b"&amp;",
            b'\r' => b"&#xd;",
            b'\'' => b"&#39;",
            b'"' => b"&#34;",
            b'\n' => b"&#xa;",
            b'\t' => b"&#x9;",
            0x00..=0x1f => "\u{fffd}".as_bytes(),
            // The last byte of U+FFFE (EF BF BE) or U+FFFF (EF BF BF).
            0xbe | 0xbf if index >= 2 && bytes[index - 2] == 0xef && bytes[index - 1] == 0xbf => {
                out.extend_from_slice(&bytes[start..index - 2]);
                out.extend_from_slice("\u{fffd}".as_bytes());
                start = from;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..index]);
        out.extend_from_slice(escaped);
        start = from;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// [`ATTENTION`] bit: the byte is escaped or replaced wherever it appears.
const IN_CONTENT: u8 = 1;
/// [`ATTENTION`] bit: the byte is escaped in an attribute value.
const IN_ATTRIBUTE: u8 = 2;

/// For every byte, what [`escape_into`] must look at it for: `<`, `>`, `&`,
/// carriage return and the other C0 controls everywhere, and the last byte
/// of U+FFFE and U+FFFF (checked against the two before it); quotes, line
/// feed and tab in attribute values only.
static ATTENTION: [u8; 256] = {
    let mut table = [0; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = IN_CONTENT;
        byte += 1;
    }
    table[b'\n' as usize] = IN_ATTRIBUTE;
    table[b'\t' as usize] = IN_ATTRIBUTE;
    table[b'\'' as usize] = IN_ATTRIBUTE;
    table[b'"' as usize] = IN_ATTRIBUTE;
    table[b'<' as usize] = IN_CONTENT;
    table[b'>' as usize] = IN_CONTENT;
    table[b'&' as usize] = IN_CONTENT;
    table[0xbe] = IN_CONTENT;
    table[0xbf] = IN_CONTENT;
    table
};

/// About how many bytes `element` takes in memory: its names, attributes
/// and text, with a node's cost per element and attribute (as the reader
/// charges them), without the element namespaces (at most
/// [`MAX_NAMESPACE_BYTES`] each; minidom hands them out only as copies).
/// What queues count.
pub fn approximate_size(element: &Element) -> usize {
    let mut size = ELEMENT_BYTES + element.name().len();
    for ((namespace, name), value) in element.attrs().iter() {
        size += ATTRIBUTE_BYTES + namespace.len() + name.len() + value.len();
    }
    for node in element.nodes() {
        size += match node {
            minidom::Node::Element(child) => approximate_size(child),
            minidom::Node::Text(text) => text.len(),
        };
    }
    size
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
