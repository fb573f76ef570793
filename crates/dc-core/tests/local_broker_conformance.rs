//! LocalBroker passes the broker conformance suite.

use std::sync::Arc;

use dc_core::{Broker, LocalBroker};

dc_core::broker_conformance_tests!(async { Arc::new(LocalBroker::new()) as Arc<dyn Broker> });
