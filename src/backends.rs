//! Composing backends: a broker chosen by URL scheme, and the [`Backends`] connector that
//! makes the facade's `Pool` reach head nodes and broker URLs.

use std::sync::Arc;
use std::time::Duration;

use dc_broker_redis::{RedisBroker, RedisOptions, redis_url};
use dc_core::{Broker, BrokerError, Connector, NetworkTarget, PoolError, redact_url};

/// The connector of the facade's [`crate::Pool`]: Redis by default (`redis://`, or a head
/// node's `address:port` + password).
#[derive(Debug, Clone, Copy, Default)]
pub struct Backends;

#[async_trait::async_trait]
impl Connector for Backends {
    async fn connect(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        let url = match &target.url {
            Some(url) => url.clone(),
            None => redis_url(&target.address, target.port, target.password.as_deref()),
        };
        broker_from_url(&url, target.connect_timeout).await
    }
}

/// Connect to the broker a URL names, by scheme: `redis://` (Redis, the default backend);
/// `rediss://` (this build has no TLS) and `amqp://` (until the RabbitMQ backend lands) are
/// refused with a message saying what to use instead.
///
/// # Errors
/// [`PoolError::Auth`] for a refused password, [`PoolError::Unreachable`] when nothing answers
/// within `timeout`, [`PoolError::Broker`] when what answers is not a Redis server,
/// [`PoolError::Config`] for `rediss://` and `amqp://`, and an unsupported URL for any other
/// scheme.
///
/// # Examples
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use distributed_computing::{PoolError, broker_from_url};
///
/// let refused = broker_from_url("rediss://head:6380", Duration::from_secs(1)).await;
/// let Err(PoolError::Config(message)) = refused else { panic!("rediss:// is refused") };
/// assert!(message.contains("use redis://") && !message.contains("use rediss://"));
/// # });
/// ```
pub async fn broker_from_url(url: &str, timeout: Duration) -> Result<Arc<dyn Broker>, PoolError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "redis" => {
            let options = RedisOptions {
                connect_timeout: timeout,
                ..RedisOptions::default()
            };
            match RedisBroker::connect(url, options).await {
                Ok(broker) => Ok(Arc::new(broker)),
                Err(e) => Err(classify(e)),
            }
        }
        "rediss" => Err(PoolError::Config(format!(
            "{}: TLS (rediss://) is not supported by this build; use redis:// on a trusted network, or through a tunnel (ssh -L, stunnel, WireGuard)",
            redact_url(url)
        ))),
        "amqp" | "amqps" => Err(PoolError::Config(format!(
            "{}: the RabbitMQ backend is not in this build yet; use a head node or redis://",
            redact_url(url)
        ))),
        _ => Err(PoolError::Broker(BrokerError::UnsupportedUrl(redact_url(
            url,
        )))),
    }
}

/// Map a backend's connect error to what a pool user matches on.
pub(crate) fn classify(e: BrokerError) -> PoolError {
    match e {
        BrokerError::Auth(m) => PoolError::Auth(m),
        BrokerError::Connection(m) => PoolError::Unreachable(m),
        other => PoolError::Broker(other),
    }
}
