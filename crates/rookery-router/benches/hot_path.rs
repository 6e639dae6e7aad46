//! The per-stanza hot path of a 1:1 message between two online users on one
//! node: parse the sender's bytes, route, accept at the recipient, serialise.
//!
//! Run with `cargo bench -p rookery-router --bench hot_path`.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use minidom::Element;
use rookery_cluster::{Inbox, LocalBus, Mail, Mailbox};
use rookery_router::{Router, RouterConfig, Session};
use rookery_store::Store;
use rookery_stream::{
    Framing, KeysAnswer, ScramHash, ScramKeys, ServerStream, StreamConfig, StreamEvent, TlsPolicy,
};

const OPEN: &[u8] = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";
const MESSAGE: &[u8] = b"<message to='bob@localhost' type='chat' id='a1b2c3'><body>Hello Bob, how are you today?</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>";

/// A bound stream for `user`, as the session task would hold it.
fn bound_stream(user: &str, keys: &ScramKeys) -> ServerStream {
    let mut config = StreamConfig::new("localhost");
    config.tls = TlsPolicy::Unavailable;
    let now = Instant::now();
    let mut stream = ServerStream::new(Arc::new(config), Framing::Tcp, true, now);
    stream.handle_input(now, OPEN);
    while stream.poll_event().is_some() {}
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0secret"));
    stream.handle_input(
        now,
        format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>")
            .as_bytes(),
    );
    assert!(matches!(
        stream.poll_event(),
        Some(StreamEvent::NeedKeys { .. })
    ));
    stream.handle_keys(now, KeysAnswer::Keys(Some(keys.clone())));
    while stream.poll_event().is_some() {}
    stream.handle_input(now, OPEN);
    stream.handle_input(now, b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>");
    let Some(StreamEvent::Bind {
        requested: Some(jid),
    }) = stream.poll_event()
    else {
        panic!("bind")
    };
    stream.handle_bound(now, jid);
    while stream.poll_transmit().is_some() {}
    stream
}

struct Node {
    runtime: tokio::runtime::Runtime,
    router: Router,
    alice: Session,
    bob: Session,
    bob_inbox: Inbox,
    alice_stream: ServerStream,
    bob_stream: ServerStream,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = ScramKeys::generate(ScramHash::Sha256, "secret", 4096).unwrap();
    let (router, alice, bob, bob_inbox) = runtime.block_on(async {
        let store: Arc<dyn Store> = Arc::new(
            rookery_store_sqlite::SqliteStore::open(&dir.path().join("b.sqlite"))
                .await
                .unwrap(),
        );
        for user in ["alice@localhost", "bob@localhost"] {
            store
                .create_account(
                    &jid::BareJid::new(user).unwrap(),
                    std::slice::from_ref(&keys),
                )
                .await
                .unwrap();
        }
        let router = Router::new(
            RouterConfig::new("localhost"),
            store,
            Arc::new(LocalBus::new()),
            Vec::new(),
        );
        let (alice_mailbox, _alice_inbox) = Mailbox::new();
        std::mem::forget(_alice_inbox);
        let mut alice = router
            .bind(
                &jid::BareJid::new("alice@localhost").unwrap(),
                None,
                alice_mailbox,
            )
            .await
            .unwrap();
        let (bob_mailbox, mut bob_inbox) = Mailbox::new();
        let mut bob = router
            .bind(
                &jid::BareJid::new("bob@localhost").unwrap(),
                None,
                bob_mailbox,
            )
            .await
            .unwrap();
        for session in [&mut alice, &mut bob] {
            let presence: Element =
                format!("<presence xmlns='jabber:client' from='{}'/>", session.jid)
                    .parse()
                    .unwrap();
            router.handle_stanza(session, presence).await;
            session.take_outbox();
        }
        while bob_inbox.try_recv().is_some() {}
        (router, alice, bob, bob_inbox)
    });
    Node {
        router,
        alice,
        bob,
        bob_inbox,
        alice_stream: bound_stream("alice", &keys),
        bob_stream: bound_stream("bob", &keys),
        runtime,
        _dir: dir,
    }
}

fn parse(stream: &mut ServerStream) -> Element {
    stream.handle_input(Instant::now(), MESSAGE);
    match stream.poll_event() {
        Some(StreamEvent::Stanza(stanza)) => stanza,
        other => panic!("{other:?}"),
    }
}

fn hot_path(c: &mut Criterion) {
    let mut node = node();
    let mut group = c.benchmark_group("one_to_one_message");
    group.throughput(Throughput::Elements(1));

    group.bench_function("parse", |b| {
        b.iter(|| {
            let stanza = parse(&mut node.alice_stream);
            std::hint::black_box(stanza);
        })
    });

    let sample = parse(&mut node.alice_stream);
    group.bench_function("serialize", |b| {
        b.iter(|| {
            node.bob_stream.send_stanza(sample.clone()).unwrap();
            std::hint::black_box(node.bob_stream.poll_transmit());
        })
    });

    group.bench_function("route", |b| {
        b.iter(|| {
            let stanza = sample.clone();
            node.runtime
                .block_on(node.router.handle_stanza(&mut node.alice, stanza));
            let Some(Mail::Stanza {
                stanza: delivered, ..
            }) = node.bob_inbox.try_recv()
            else {
                panic!("delivered")
            };
            std::hint::black_box(delivered);
        })
    });

    group.bench_function("parse_route_serialize", |b| {
        b.iter(|| {
            let stanza = parse(&mut node.alice_stream);
            node.runtime
                .block_on(node.router.handle_stanza(&mut node.alice, stanza));
            let Some(Mail::Stanza {
                stanza: delivered, ..
            }) = node.bob_inbox.try_recv()
            else {
                panic!("delivered")
            };
            node.router.accept_delivery(&mut node.bob, *delivered);
            for stanza in node.bob.take_outbox() {
                node.bob_stream.send_stanza(stanza).unwrap();
            }
            std::hint::black_box(node.bob_stream.poll_transmit());
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
