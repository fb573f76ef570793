//! RedisBroker passes the broker conformance suite, on a dedicated password-protected
//! redis-server and on an existing Redis reached by URL.

mod common;

/// On a redis-server this test binary starts (password, free port), a prefix per case.
mod dedicated {
    use std::sync::Arc;

    use dc_broker_redis::{RedisBroker, RedisOptions};
    use dc_core::Broker;

    use super::common;

    dc_core::broker_conformance_tests!(async {
        let options = RedisOptions {
            prefix: common::unique_prefix(),
            ..RedisOptions::default()
        };
        let broker = RedisBroker::connect(&common::server().url(), options)
            .await
            .expect("connect to the dedicated redis-server");
        Arc::new(broker) as Arc<dyn Broker>
    });
}

/// On the Redis already running at 127.0.0.1:6379 (no password), a prefix per case.
mod existing {
    use std::sync::Arc;

    use dc_broker_redis::{RedisBroker, RedisOptions};
    use dc_core::Broker;

    use super::common;

    dc_core::broker_conformance_tests!(async {
        common::sweep_stale_test_keys();
        let options = RedisOptions {
            prefix: common::unique_prefix(),
            ..RedisOptions::default()
        };
        let broker = RedisBroker::connect(common::EXISTING, options)
            .await
            .expect("connect to the existing Redis at 127.0.0.1:6379");
        Arc::new(broker) as Arc<dyn Broker>
    });
}
