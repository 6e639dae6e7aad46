//! The bus conformance suite on `NatsBus`, each check on a nats-server of
//! its own (the suite's other run is `LocalBus`, in rookery-cluster).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use jid::FullJid;
use minidom::Element;
use rookery_cluster::{Bus, Recovery, Route};
use rookery_cluster_nats::{NatsBus, NatsConfig};
use rookery_test_support::nats::NatsServer;

/// Nothing to recover in these checks: no peer dies, no session moves.
struct Nothing;

#[async_trait::async_trait]
impl Recovery for Nothing {
    async fn reroute(&self, to: FullJid, _stanza: Element) {
        panic!("nothing should need rerouting ({to})");
    }
    async fn session_lost(&self, route: Route) {
        panic!("no session should be lost ({})", route.jid);
    }
    fn registered_anew(&self) {}
}

/// A bus on a nats-server of its own.
struct OnNats {
    bus: Arc<NatsBus>,
    _recovery: Arc<dyn Recovery>,
    _server: NatsServer,
}

impl Deref for OnNats {
    type Target = dyn Bus;

    fn deref(&self) -> &(dyn Bus + 'static) {
        &*self.bus
    }
}

async fn on_nats() -> OnNats {
    let server = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig {
        name: "conformance".into(),
        urls: vec![server.url()],
        heartbeat: Duration::from_millis(500),
        failure_timeout: Duration::from_secs(2),
        replicas: 1,
        address: None,
    })
    .await
    .expect("the bus joins");
    let recovery: Arc<dyn Recovery> = Arc::new(Nothing);
    bus.start(Arc::downgrade(&recovery));
    OnNats {
        bus,
        _recovery: recovery,
        _server: server,
    }
}

rookery_cluster::bus_conformance_tests!(on_nats());
