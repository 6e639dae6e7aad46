//! The LocalBus registry contract: the bus conformance suite.

use std::sync::Arc;

use crate::{Bus, LocalBus};

crate::bus_conformance_tests!(async { Arc::new(LocalBus::new()) as Arc<dyn Bus> });
