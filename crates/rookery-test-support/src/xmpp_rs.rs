//! Connecting tokio-xmpp (the xmpp-rs client library) to a test server: a
//! `ServerConnector` that does STARTTLS trusting the test CA, and can cut the
//! connection to test stream resumption.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::jid::Jid;
use tokio_xmpp::parsers::starttls;
use tokio_xmpp::xmlstream::{
    PendingFeaturesRecv, StreamHeader, Timeouts, XmppStreamElement, initiate_stream,
};

use crate::certs::client_config;

/// STARTTLS to a fixed address, trusting the test CA.
#[derive(Debug, Clone)]
pub struct TestConnector {
    address: SocketAddr,
    /// A handle on the current socket, to cut it.
    current: Arc<Mutex<Option<std::net::TcpStream>>>,
}

impl TestConnector {
    /// A connector for `address`.
    pub fn new(address: SocketAddr) -> Self {
        TestConnector {
            address,
            current: Arc::new(Mutex::new(None)),
        }
    }

    /// Cuts the current TCP connection (both directions), as a network failure would.
    pub fn cut(&self) {
        if let Some(socket) = self.current.lock().expect("lock").take() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn io_error(error: impl std::fmt::Display) -> tokio_xmpp::Error {
    tokio_xmpp::Error::Io(std::io::Error::other(error.to_string()))
}

impl ServerConnector for TestConnector {
    type Stream = BufStream<tokio_rustls::client::TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<
        (
            PendingFeaturesRecv<Self::Stream>,
            sasl::common::ChannelBinding,
        ),
        tokio_xmpp::Error,
    > {
        let tcp = TcpStream::connect(self.address).await?;
        let std_socket = tcp.into_std()?;
        *self.current.lock().expect("lock") = Some(std_socket.try_clone()?);
        let tcp = TcpStream::from_std(std_socket)?;
        let header = || StreamHeader {
            to: Some(Cow::Owned(jid.domain().to_string())),
            from: None,
            id: None,
        };
        let pending = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
        let (features, mut stream) = pending.recv_features::<XmppStreamElement>().await?;
        if !features.can_starttls() {
            return Err(io_error("the server offers no STARTTLS"));
        }
        stream
            .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                starttls::Request,
            )))
            .await?;
        loop {
            match stream.next().await {
                Some(Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)))) => break,
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(io_error(error)),
                None => return Err(io_error("closed before <proceed/>")),
            }
        }
        let tcp = stream.into_inner().into_inner();
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io_error)?;
        let tls = tokio_rustls::TlsConnector::from(client_config())
            .connect(name, tcp)
            .await?;
        let pending = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        Ok((pending, sasl::common::ChannelBinding::None))
    }
}

/// A tokio-xmpp client for `jid` connecting through `connector`.
pub fn client(jid: &str, password: &str, connector: TestConnector) -> tokio_xmpp::Client {
    let jid = Jid::new(jid).expect("valid JID");
    tokio_xmpp::Client::new_with_connector(jid, password.to_owned(), connector, Timeouts::default())
}
