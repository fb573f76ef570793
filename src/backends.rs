//! Composing backends: a broker chosen by URL scheme, and the [`Backends`] connector that
//! makes the facade's `Pool` reach head nodes (by join token or password) and broker URLs.

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "redis")]
use dc_broker_redis::server::NODE_USER;
#[cfg(feature = "redis")]
use dc_broker_redis::token::JoinToken;
#[cfg(feature = "redis")]
use dc_broker_redis::{RedisBroker, RedisOptions, TlsTrust, redis_url_as};
use dc_core::{Broker, BrokerError, Connector, NetworkTarget, PoolError, redact_url};

/// The connector of the facade's [`crate::Pool`]: Redis by default (`redis://`,
/// `rediss://`, or a head node by join token, or by `address:port` and password).
#[derive(Debug, Clone, Copy, Default)]
pub struct Backends;

#[async_trait::async_trait]
impl Connector for Backends {
    async fn connect(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        connect_target(target).await
    }
}

/// Reach what `target` names: a broker URL; a head by join token (its CA pinned, its
/// addresses tried in order unless an address was given); or a head by address, port and
/// password (over TLS, its CA pinned on first use in the known-heads file, unless `tls` is
/// off).
///
/// # Errors
/// [`PoolError::Config`] for a damaged token, a missing password, or no known-heads file (and
/// for any head node in a build without the `redis` feature); otherwise as [`broker_from_url`].
#[cfg(feature = "redis")]
pub async fn connect_target(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
    if let Some(url) = &target.url {
        return broker_from(url, target.connect_timeout, target.tls_ca.as_deref()).await;
    }
    if let Some(token) = &target.token {
        let token = JoinToken::parse(token).map_err(|e| PoolError::Config(e.to_string()))?;
        let addresses = if target.address_set {
            vec![target.address.clone()]
        } else {
            token.addresses.clone()
        };
        let trust = token.ca_sha256.map(TlsTrust::PinnedCa);
        let mut last = None;
        for address in &addresses {
            let url = redis_url_as(address, token.port, &token.user, &token.secret);
            match redis(&url, target.connect_timeout, trust.clone()).await {
                Err(PoolError::Unreachable(why)) => last = Some(PoolError::Unreachable(why)),
                other => return other,
            }
        }
        return Err(
            last.unwrap_or_else(|| PoolError::Config("the join token names no address".into()))
        );
    }
    let password = target.password.as_deref().ok_or_else(|| {
        PoolError::Config(
            "no password and no join token: pass a token (--token-file, DC_TOKEN) or the pool password (--password-file, DC_PASSWORD)".into(),
        )
    })?;
    let trust = if target.tls {
        let file = target
            .known_heads
            .clone()
            .or_else(dc_broker_redis::tls::default_known_heads)
            .ok_or_else(|| {
                PoolError::Config(
                    "no known-heads file to pin the head's certificate in: set DC_KNOWN_HEADS (or HOME), or use a join token".into(),
                )
            })?;
        Some(TlsTrust::KnownHeads(file))
    } else {
        None
    };
    let url = redis_url_as(&target.address, target.port, NODE_USER, password);
    redis(&url, target.connect_timeout, trust).await
}

/// [`connect_target`] in a build without the `redis` feature: broker URLs only.
///
/// # Errors
/// [`PoolError::Config`] for a head node (reached over Redis); otherwise as
/// [`broker_from_url`].
#[cfg(not(feature = "redis"))]
pub async fn connect_target(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
    match &target.url {
        Some(url) => broker_from(url, target.connect_timeout, target.tls_ca.as_deref()).await,
        None => Err(PoolError::Config(
            "head nodes are reached over Redis, and this build has no `redis` feature".into(),
        )),
    }
}

/// Connect to the broker a URL names, by scheme: `redis://` (Redis, the default backend) and
/// `rediss://` (Redis over TLS, checked against the system's root certificates); `amqp://` (until
/// the RabbitMQ backend lands) is refused with a message saying what to use instead.
///
/// # Errors
/// [`PoolError::Auth`] for a refused password or certificate, [`PoolError::Unreachable`] when
/// nothing answers within `timeout`, [`PoolError::Broker`] when what answers is not a Redis
/// server, [`PoolError::Config`] for `amqp://`, and an unsupported URL for any other scheme.
///
/// # Examples
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use distributed_computing::{PoolError, broker_from_url};
///
/// let refused = broker_from_url("amqp://head:5672", Duration::from_secs(1)).await;
/// let Err(PoolError::Config(message)) = refused else { panic!("amqp:// is refused") };
/// assert!(message.contains("RabbitMQ"));
/// # });
/// ```
pub async fn broker_from_url(url: &str, timeout: Duration) -> Result<Arc<dyn Broker>, PoolError> {
    broker_from(url, timeout, None).await
}

/// [`broker_from_url`], with the CA file `rediss://` certificates are checked against.
pub(crate) async fn broker_from(
    url: &str,
    timeout: Duration,
    tls_ca: Option<&std::path::Path>,
) -> Result<Arc<dyn Broker>, PoolError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        #[cfg(feature = "redis")]
        "redis" => redis(url, timeout, None).await,
        #[cfg(feature = "redis")]
        "rediss" => {
            let trust = match tls_ca {
                Some(file) => TlsTrust::CaFile(file.to_path_buf()),
                None => TlsTrust::System,
            };
            redis(url, timeout, Some(trust)).await
        }
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" => {
            let _ = (timeout, tls_ca);
            Err(PoolError::Config(format!(
                "{}: this build has no `redis` feature (the Redis backend)",
                redact_url(url)
            )))
        }
        "amqp" | "amqps" => Err(PoolError::Config(format!(
            "{}: the RabbitMQ backend is not in this build yet; use a head node or redis://",
            redact_url(url)
        ))),
        _ => Err(PoolError::Broker(BrokerError::UnsupportedUrl(redact_url(
            url,
        )))),
    }
}

#[cfg(feature = "redis")]
async fn redis(
    url: &str,
    timeout: Duration,
    tls: Option<TlsTrust>,
) -> Result<Arc<dyn Broker>, PoolError> {
    let options = RedisOptions {
        connect_timeout: timeout,
        tls,
        ..RedisOptions::default()
    };
    match RedisBroker::connect(url, options).await {
        Ok(broker) => Ok(Arc::new(broker)),
        Err(e) => Err(classify(e)),
    }
}

/// Map a backend's connect error to what a pool user matches on.
#[cfg(feature = "redis")]
pub(crate) fn classify(e: BrokerError) -> PoolError {
    match e {
        BrokerError::Auth(m) => PoolError::Auth(m),
        BrokerError::Connection(m) => PoolError::Unreachable(m),
        other => PoolError::Broker(other),
    }
}
