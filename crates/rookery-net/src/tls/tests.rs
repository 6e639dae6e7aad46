//! The unbuffered TLS stream against tokio-rustls' client, over loopback TCP.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream as ClientStream;

use super::TlsStream;

/// A server configuration (the one `tls_config` builds) and a client that trusts it.
fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    configs_with(rustls::DEFAULT_VERSIONS)
}

/// Like [`configs`], with a client that speaks only `versions`.
fn configs_with(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let server = crate::tls_config(&cert_path, &key_path).expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, Arc::new(client))
}

/// A listener that runs the server side of one TLS handshake.
async fn accept_one(
    server_config: Arc<rustls::ServerConfig>,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<TlsStream>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        TlsStream::accept(server_config, tcp).await
    });
    (address, accept)
}

/// A server stream and a tokio-rustls client, handshake done.
async fn pair() -> (TlsStream, ClientStream<TcpStream>) {
    let (server_config, client_config) = configs();
    pair_with(server_config, client_config).await
}

async fn pair_with(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> (TlsStream, ClientStream<TcpStream>) {
    let (address, accept) = accept_one(server_config).await;
    let tcp = TcpStream::connect(address).await.expect("connect");
    let client = tokio_rustls::TlsConnector::from(client_config)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("client handshake");
    let server = accept.await.expect("join").expect("server handshake");
    (server, client)
}

/// Reads from the server until `n` bytes of plaintext are in.
async fn server_reads(server: &mut TlsStream, n: usize) -> BytesMut {
    let mut plain = BytesMut::new();
    while plain.len() < n {
        let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut plain))
            .await
            .expect("server read timed out")
            .expect("server read");
        assert!(read > 0, "end of stream after {} of {n} bytes", plain.len());
    }
    plain
}

/// Reads exactly `n` bytes of plaintext on the client.
async fn client_reads(client: &mut ClientStream<TcpStream>, n: usize) -> Vec<u8> {
    let mut received = vec![0; n];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut received))
        .await
        .expect("client read timed out")
        .expect("client read");
    received
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn holds_no_buffer(server: &TlsStream) -> bool {
    server.state.incoming.capacity() == 0
        && server.state.outgoing.capacity() == 0
        && server.early.is_empty()
}

#[tokio::test]
async fn data_flows_both_ways_and_an_idle_stream_holds_no_buffer() {
    let (mut server, mut client) = pair().await;
    assert!(holds_no_buffer(&server), "after the handshake: {server:?}");

    client.write_all(b"<stream:stream>").await.expect("write");
    client.flush().await.expect("flush");
    assert_eq!(&server_reads(&mut server, 15).await[..], b"<stream:stream>");

    // More than one record each way, and more than a socket buffer takes at once.
    let big = pattern(300_000, 7);
    let (written, read) =
        tokio::join!(server.write_all(&big), client_reads(&mut client, big.len()));
    written.expect("server write");
    assert!(read == big, "the client read other bytes");

    let big = pattern(200_000, 3);
    let (written, read) = tokio::join!(
        async {
            client.write_all(&big).await?;
            client.flush().await
        },
        server_reads(&mut server, big.len())
    );
    written.expect("client write");
    assert!(read[..] == big[..], "the server read other bytes");
    assert!(holds_no_buffer(&server), "after traffic: {server:?}");
}

#[tokio::test]
async fn a_record_split_across_reads_is_kept_until_complete_then_released() {
    let (mut server, client) = pair().await;
    let (mut tcp, mut conn) = client.into_inner();
    conn.writer().write_all(b"<message/>").expect("plaintext");
    let mut record = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut record).expect("encrypt");
    }
    let (head, tail) = record.split_at(record.len() / 2);

    tcp.write_all(head).await.expect("write head");
    let mut plain = BytesMut::new();
    let waited = tokio::time::timeout(Duration::from_millis(300), server.read(&mut plain)).await;
    assert!(waited.is_err(), "half a record was read as {waited:?}");
    assert_eq!(
        server.state.incoming.len(),
        head.len(),
        "the half record is kept"
    );

    tcp.write_all(tail).await.expect("write tail");
    let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut plain))
        .await
        .expect("timed out")
        .expect("read");
    assert_eq!(read, 10);
    assert_eq!(&plain[..], b"<message/>");
    assert!(holds_no_buffer(&server), "after the record: {server:?}");
}

#[tokio::test]
async fn data_still_flows_after_the_client_updates_its_keys() {
    let (mut server, mut client) = pair().await;
    client
        .get_mut()
        .1
        .refresh_traffic_keys()
        .expect("key update (TLS 1.3)");
    client.write_all(b"after the update").await.expect("write");
    client.flush().await.expect("flush");
    assert_eq!(
        &server_reads(&mut server, 16).await[..],
        b"after the update"
    );

    server.write_all(b"reply").await.expect("server write");
    assert_eq!(client_reads(&mut client, 5).await, b"reply");
}

#[tokio::test]
async fn a_forged_record_is_an_error_and_the_peer_gets_an_alert() {
    let (mut server, client) = pair().await;
    let (mut tcp, mut conn) = client.into_inner();
    // An application-data record whose tag cannot verify.
    tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
        .await
        .expect("header");
    tcp.write_all(&[0x55; 0x20]).await.expect("body");
    let mut plain = BytesMut::new();
    let error = tokio::time::timeout(Duration::from_secs(5), server.read(&mut plain))
        .await
        .expect("timed out")
        .expect_err("a forged record was accepted");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(plain.is_empty());

    let mut answer = vec![0; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("timed out")
        .expect("read alert");
    conn.read_tls(&mut &answer[..n]).expect("read_tls");
    let error = conn.process_new_packets().expect_err("no alert");
    assert!(
        matches!(
            error,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn close_notify_ends_the_stream_cleanly_both_ways() {
    let (mut server, mut client) = pair().await;
    client.shutdown().await.expect("client close");
    let mut plain = BytesMut::new();
    let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut plain))
        .await
        .expect("timed out")
        .expect("read");
    assert_eq!(read, 0, "close_notify is the end of the stream");

    server.shutdown().await.expect("server close");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("timed out")
        .expect("a clean end, not a truncation");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_client_that_does_not_speak_tls_fails_the_handshake() {
    let (server_config, _) = configs();
    let (address, accept) = accept_one(server_config).await;
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    tcp.write_all(b"<?xml version='1.0'?><stream:stream to='localhost'>")
        .await
        .expect("write");
    let result = tokio::time::timeout(Duration::from_secs(5), accept)
        .await
        .expect("timed out")
        .expect("join");
    let error = result.expect_err("plain XML passed for a TLS handshake");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);

    // And one that hangs up half-way is an error, not a hang.
    let (server_config, _) = configs();
    let (address, accept) = accept_one(server_config).await;
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("write");
    drop(tcp);
    let result = tokio::time::timeout(Duration::from_secs(5), accept)
        .await
        .expect("timed out")
        .expect("join");
    let error = result.expect_err("a cut handshake passed");
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_handshake_message_over_64_kib_is_refused_before_it_is_buffered() {
    let (server_config, _) = configs();
    let (address, accept) = accept_one(server_config).await;
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    // A ClientHello that announces 16 MiB, in full-size records.
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    record.resize(5 + 0x4000, 0);
    let sender = tokio::spawn(async move {
        let mut continuation = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        continuation.resize(5 + 0x4000, 0);
        tcp.write_all(&record).await?;
        for _ in 0..64 {
            tcp.write_all(&continuation).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let result = tokio::time::timeout(Duration::from_secs(5), accept)
        .await
        .expect("timed out")
        .expect("join");
    let error = result.expect_err("a 16 MiB handshake message was taken");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
    // The server stopped reading long before the 1 MiB the client had to send.
    let _ = sender.await;
}

#[tokio::test]
async fn handshake_messages_and_data_cut_into_the_smallest_records_are_joined() {
    let (server_config, client_config) = configs();
    let mut client_config = Arc::unwrap_or_clone(client_config);
    // The ClientHello and the client's Finished each span several records.
    client_config.max_fragment_size = Some(32);
    let (mut server, mut client) = pair_with(server_config, Arc::new(client_config)).await;
    let message = pattern(1000, 11);
    client.write_all(&message).await.expect("write");
    client.flush().await.expect("flush");
    assert!(server_reads(&mut server, message.len()).await[..] == message[..]);
    server.write_all(b"ok").await.expect("server write");
    assert_eq!(client_reads(&mut client, 2).await, b"ok");
    assert!(holds_no_buffer(&server), "{server:?}");
}

#[tokio::test]
async fn only_tls_1_2_and_1_3_are_spoken() {
    let (server_config, _) = configs();
    // A TLS 1.1 ClientHello (made by OpenSSL through Python, offering only
    // TLS 1.0 and 1.1): refused with a fatal alert (rustls says handshake_failure).
    let (address, accept) = accept_one(server_config.clone()).await;
    let mut tcp = TcpStream::connect(address).await.expect("connect");
    tcp.write_all(include_bytes!("tls11-client-hello.bin"))
        .await
        .expect("write");
    let result = tokio::time::timeout(Duration::from_secs(5), accept)
        .await
        .expect("timed out")
        .expect("join");
    assert_eq!(
        result.expect_err("TLS 1.1 was accepted").kind(),
        std::io::ErrorKind::InvalidData
    );
    let mut alert = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut alert)).await;
    // Alert record: content type 21, level fatal (2), handshake_failure (40).
    assert_eq!(alert, [21, 3, 3, 0, 2, 2, 40]);

    // A client limited to TLS 1.2 gets in, with an AEAD suite and forward secrecy.
    let (server_config, tls12) = configs_with(&[&rustls::version::TLS12]);
    let (_server, client) = pair_with(server_config, tls12).await;
    let (_, connection) = client.get_ref();
    assert_eq!(
        connection.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = format!(
        "{:?}",
        connection.negotiated_cipher_suite().unwrap().suite()
    );
    assert!(
        suite.starts_with("TLS_ECDHE_") && (suite.contains("GCM") || suite.contains("CHACHA20")),
        "{suite}"
    );
}
