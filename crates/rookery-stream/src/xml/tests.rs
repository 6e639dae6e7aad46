//! Reading and writing stream XML.

use super::*;

fn read_all(reader: &mut StreamReader, mut input: &[u8]) -> Vec<XmlEvent> {
    let mut events = Vec::new();
    while let Some(event) = reader.read(&mut input).unwrap() {
        events.push(event);
    }
    assert!(input.is_empty());
    events
}

const DOC: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'> <message to='bob@localhost' xml:lang='de'><body>a &amp; b &lt;c&gt;</body><x xmlns='urn:ext' y='1'/></message>\n<presence/></stream:stream>";

#[test]
fn reads_a_stream_in_one_piece_and_byte_by_byte_alike() {
    let mut reader = StreamReader::new(Limits::default());
    let whole = read_all(&mut reader, DOC.as_bytes());
    let mut reader = StreamReader::new(Limits::default());
    let mut pieces = Vec::new();
    for byte in DOC.as_bytes() {
        pieces.extend(read_all(&mut reader, std::slice::from_ref(byte)));
    }
    let describe = |events: &[XmlEvent]| -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                XmlEvent::StreamOpen { name, .. } => format!("open {}", name.1),
                XmlEvent::Element(element) => String::from(element),
                XmlEvent::Whitespace => "ws".into(),
                XmlEvent::StreamClose => "close".into(),
            })
            .collect()
    };
    assert_eq!(describe(&whole), describe(&pieces));
    let described = describe(&whole);
    assert_eq!(described[0], "open stream");
    assert_eq!(described[1], "ws");
    assert!(
        described[2].contains("<body>a &amp; b &lt;c&gt;</body>"),
        "{}",
        described[2]
    );
    assert!(described[2].contains("xml:lang='de'"), "{}", described[2]);
    assert_eq!(described.last().unwrap(), "close");
}

#[test]
fn leading_whitespace_before_the_root_is_skipped() {
    let mut reader = StreamReader::new(Limits::default());
    let events = read_all(
        &mut reader,
        b"\r\n <stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    assert!(matches!(&events[..], [XmlEvent::StreamOpen { .. }]));
}

#[test]
fn elements_keep_namespaces_and_attributes() {
    let mut reader = StreamReader::new(Limits::default());
    let events = read_all(&mut reader, DOC.as_bytes());
    let XmlEvent::Element(message) = &events[2] else {
        panic!()
    };
    assert!(message.is("message", ns::CLIENT));
    assert_eq!(message.attr("to"), Some("bob@localhost"));
    assert_eq!(
        message.get_child("body", ns::CLIENT).unwrap().text(),
        "a & b <c>"
    );
    assert_eq!(
        message.get_child("x", "urn:ext").unwrap().attr("y"),
        Some("1")
    );
}

#[test]
fn the_writer_omits_the_stream_namespace_and_declares_others() {
    let element: Element = "<message xmlns='jabber:client' to='b@l'><body>x &lt; y</body><x xmlns='urn:ext'/></message>".parse().unwrap();
    let mut out = BytesMut::new();
    StreamWriter::new().write(&element, &mut out);
    assert_eq!(
        &out[..],
        &b"<message to='b@l'><body>x &lt; y</body><x xmlns='urn:ext'/></message>"[..]
    );
    let mut out = BytesMut::new();
    StreamWriter::standalone().write(&element, &mut out);
    assert_eq!(&out[..], &b"<message xmlns='jabber:client' to='b@l'><body>x &lt; y</body><x xmlns='urn:ext'/></message>"[..]);
}

#[test]
fn written_elements_read_back_identically() {
    let element: Element = "<iq xmlns='jabber:client' type='get' id='a&apos;b'><query xmlns='jabber:iq:roster' ver='1'><item jid='x@y' name='&quot;q&quot;'><group>G&amp;H</group></item></query></iq>".parse().unwrap();
    let mut out = BytesMut::new();
    out.extend_from_slice(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    StreamWriter::new().write(&element, &mut out);
    let mut reader = StreamReader::new(Limits::default());
    let events = read_all(&mut reader, &out);
    let XmlEvent::Element(read) = &events[1] else {
        panic!()
    };
    assert_eq!(read, &element);
}

#[test]
fn frames_hold_exactly_one_element() {
    let limits = Limits::default();
    assert!(parse_frame(b"<message xmlns='jabber:client'/>", &limits).is_ok());
    assert!(parse_frame(b" <presence xmlns='jabber:client'/> ", &limits).is_ok());
    assert_eq!(
        parse_frame(b"<a xmlns='x'/><b xmlns='x'/>", &limits),
        Err(Condition::NotWellFormed)
    );
    assert_eq!(
        parse_frame(b"<a xmlns='x'>", &limits),
        Err(Condition::NotWellFormed)
    );
    assert_eq!(parse_frame(b"", &limits), Err(Condition::NotWellFormed));
    assert_eq!(
        parse_frame(b"<a xmlns='x'><!-- c --></a>", &limits),
        Err(Condition::RestrictedXml)
    );
    let small = Limits {
        max_stanza_bytes: 10,
        max_depth: 4,
    };
    assert_eq!(
        parse_frame(b"<a xmlns='x'>0123456789</a>", &small),
        Err(Condition::PolicyViolation)
    );
    assert_eq!(
        parse_frame(b"<a><a><a><a><a/></a></a></a></a>", &small),
        Err(Condition::PolicyViolation)
    );
}

#[test]
fn attribute_helpers_set_and_remove() {
    let mut element = Element::bare("message", ns::CLIENT);
    set_attr(&mut element, "to", "a@b");
    set_attr(&mut element, "to", "c@d");
    assert_eq!(element.attr("to"), Some("c@d"));
    remove_attr(&mut element, "to");
    assert_eq!(element.attr("to"), None);
    assert_eq!(escape_attr("a'b<c"), "a&apos;b&lt;c");
    assert!(matches!(
        escape_attr("plain"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn input_that_is_not_xml_is_refused_at_once() {
    for garbage in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"\x16\x03\x01\x02\x00",
        b"  hello",
    ] {
        let mut reader = StreamReader::new(Limits::default());
        let mut input = garbage;
        assert_eq!(
            reader.read(&mut input).unwrap_err(),
            Condition::NotWellFormed
        );
    }
}
