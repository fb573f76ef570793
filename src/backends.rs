//! Composing backends: a broker chosen by URL scheme, and the [`Backends`] connector that
//! makes the facade's `Pool` reach head nodes (by join token or password) and broker URLs.

use std::path::{Path, PathBuf};
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
/// `rediss://`, or a head node by join token, or by `address:port` and password), RabbitMQ
/// for `amqp://` and `amqps://` URLs.
///
/// A value with options of its own, for every broker it reaches: the Redis options (key
/// prefix, chunk size, response timeout, and a TLS trust for URLs that name none), a CA file
/// for `rediss://` URLs, and the known-heads file that pins heads reached with a password.
/// What the pool's builder says wins: its connect timeout always, and its `tls_ca` and
/// `known_heads` when set.
///
/// Without the `redis` feature it reaches nothing yet: every URL and head is refused with a
/// message naming the missing feature.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use distributed_computing::{Backends, RedisOptions};
///
/// let backends = Backends::new()
///     .redis_options(RedisOptions { prefix: "lab".into(), ..RedisOptions::default() })
///     .tls_ca("/etc/ssl/lab-ca.pem");
/// # let _ = backends;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Backends {
    #[cfg(feature = "redis")]
    redis: RedisOptions,
    #[cfg(feature = "amqp")]
    amqp: dc_broker_amqp::AmqpOptions,
    tls_ca: Option<PathBuf>,
    known_heads: Option<PathBuf>,
}

impl Backends {
    /// Backends with every option at its default.
    pub fn new() -> Self {
        Backends::default()
    }

    /// Options of every Redis broker reached (default [`RedisOptions::default()`]); the
    /// connect timeout is the pool's, and `tls` applies to URLs whose trust nothing else sets
    /// (a `redis://` URL, or a `rediss://` URL without a CA file).
    #[cfg(feature = "redis")]
    #[must_use]
    pub fn redis_options(mut self, options: RedisOptions) -> Self {
        self.redis = options;
        self
    }

    /// Options of every RabbitMQ broker reached (`amqp://`, `amqps://`; default
    /// [`AmqpOptions::default()`](dc_broker_amqp::AmqpOptions)): its namespace above all; the
    /// connect timeout is the pool's.
    #[cfg(feature = "amqp")]
    #[must_use]
    pub fn amqp_options(mut self, options: dc_broker_amqp::AmqpOptions) -> Self {
        self.amqp = options;
        self
    }

    /// The CA certificate file (PEM) that `rediss://` and `amqps://` brokers' certificates
    /// must chain to, unless the pool's builder names one.
    #[must_use]
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// The known-heads file that pins heads reached with a password, unless the pool's
    /// builder names one (default: `DC_KNOWN_HEADS`, else the user's config directory).
    #[must_use]
    pub fn known_heads(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_heads = Some(path.into());
        self
    }

    /// Reach what `target` names; see [`connect_target`].
    #[cfg(not(feature = "redis"))]
    async fn reach(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        match &target.url {
            Some(url) => {
                let tls_ca = target.tls_ca.as_deref().or(self.tls_ca.as_deref());
                self.broker_from(url, target.connect_timeout, tls_ca).await
            }
            None => Err(PoolError::Config(
                "head nodes are reached over Redis, and this build has no `redis` feature".into(),
            )),
        }
    }

    /// Reach what `target` names; see [`connect_target`].
    #[cfg(feature = "redis")]
    async fn reach(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        if let Some(url) = &target.url {
            let tls_ca = target.tls_ca.as_deref().or(self.tls_ca.as_deref());
            return self.broker_from(url, target.connect_timeout, tls_ca).await;
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
                match self
                    .redis(&url, target.connect_timeout, trust.clone())
                    .await
                {
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
                .or_else(|| self.known_heads.clone())
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
        self.redis(&url, target.connect_timeout, trust).await
    }

    /// The broker a URL names, by scheme (see [`broker_from_url`]); `tls_ca` is the CA file
    /// `rediss://` certificates are checked against.
    async fn broker_from(
        &self,
        url: &str,
        timeout: Duration,
        tls_ca: Option<&Path>,
    ) -> Result<Arc<dyn Broker>, PoolError> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            #[cfg(feature = "redis")]
            "redis" => self.redis(url, timeout, self.redis.tls.clone()).await,
            #[cfg(feature = "redis")]
            "rediss" => {
                let trust = match tls_ca {
                    Some(file) => TlsTrust::CaFile(file.to_path_buf()),
                    None => self.redis.tls.clone().unwrap_or(TlsTrust::System),
                };
                self.redis(url, timeout, Some(trust)).await
            }
            #[cfg(not(feature = "redis"))]
            "redis" | "rediss" => {
                let _ = (timeout, tls_ca, &self.known_heads);
                Err(PoolError::Config(format!(
                    "{}: this build has no `redis` feature (the Redis backend)",
                    redact_url(url)
                )))
            }
            #[cfg(feature = "amqp")]
            "amqp" | "amqps" => {
                let mut options = self.amqp.clone().connect_timeout(timeout);
                if let Some(file) = tls_ca {
                    options = options.tls_ca(file);
                }
                match dc_broker_amqp::AmqpBroker::connect(url, &options).await {
                    Ok(broker) => Ok(Arc::new(broker)),
                    Err(e) => Err(classify(e)),
                }
            }
            #[cfg(not(feature = "amqp"))]
            "amqp" | "amqps" => Err(PoolError::Config(format!(
                "{}: this build has no `amqp` feature (the RabbitMQ backend)",
                redact_url(url)
            ))),
            _ => Err(PoolError::Broker(BrokerError::UnsupportedUrl(redact_url(
                url,
            )))),
        }
    }

    /// A Redis broker at `url`, with this value's Redis options, `timeout` and `tls`.
    #[cfg(feature = "redis")]
    async fn redis(
        &self,
        url: &str,
        timeout: Duration,
        tls: Option<TlsTrust>,
    ) -> Result<Arc<dyn Broker>, PoolError> {
        let options = RedisOptions {
            connect_timeout: timeout,
            tls,
            ..self.redis.clone()
        };
        match RedisBroker::connect(url, options).await {
            Ok(broker) => Ok(Arc::new(broker)),
            Err(e) => Err(classify(e)),
        }
    }
}

#[async_trait::async_trait]
impl Connector for Backends {
    async fn connect(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        self.reach(target).await
    }
}

/// Reach what `target` names: a broker URL; a head by join token (its CA pinned, its
/// addresses tried in order unless an address was given); or a head by address, port and
/// password (over TLS, its CA pinned on first use in the known-heads file, unless `tls` is
/// off).
///
/// # Errors
/// [`PoolError::Config`] for a damaged token, a missing password, or no known-heads file;
/// otherwise as [`broker_from_url`].
pub async fn connect_target(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
    Backends::default().reach(target).await
}

/// Connect to the broker a URL names, by scheme: `redis://` (Redis, the default backend) and
/// `rediss://` (Redis over TLS, checked against the system's root certificates); `amqp://`
/// and `amqps://` (RabbitMQ, namespace `dc`).
///
/// # Errors
/// [`PoolError::Auth`] for a refused password or certificate, [`PoolError::Unreachable`] when
/// nothing answers within `timeout`, [`PoolError::Broker`] when what answers is not a Redis
/// server, [`PoolError::Config`] for a scheme whose backend this build lacks, and an
/// unsupported URL for any other scheme.
///
/// # Examples
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use distributed_computing::{BrokerError, PoolError, broker_from_url};
///
/// let refused = broker_from_url("mqtt://head:1883", Duration::from_secs(1)).await;
/// assert!(matches!(refused, Err(PoolError::Broker(BrokerError::UnsupportedUrl(_)))));
/// # });
/// ```
pub async fn broker_from_url(url: &str, timeout: Duration) -> Result<Arc<dyn Broker>, PoolError> {
    Backends::default().broker_from(url, timeout, None).await
}

/// Map a backend's connect error to what a pool user matches on.
#[cfg(any(feature = "redis", feature = "amqp"))]
pub(crate) fn classify(e: BrokerError) -> PoolError {
    match e {
        BrokerError::Auth(m) => PoolError::Auth(m.to_string()),
        BrokerError::Connection(m) => PoolError::Unreachable(m.to_string()),
        other => PoolError::Broker(other),
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use std::time::Duration;

    use dc_core::{BoxError, PoolError, Worker, WorkerContext};

    use super::Backends;
    use crate::Pool;

    struct Echo;

    impl Worker for Echo {
        const KIND: &'static str = "echo";
        type Init = ();
        type Job = u32;
        type Output = u32;
        type Update = ();
        fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> {
            Ok(Echo)
        }
        fn run(&mut self, job: u32) -> Result<u32, BoxError> {
            Ok(job)
        }
    }

    /// The error of a `rediss://` pool with these CA files (neither exists, so the error names
    /// the one that was used).
    async fn refusal(backends_ca: &str, builder_ca: Option<&str>) -> String {
        let mut builder = Pool::<Echo>::builder(())
            .broker("rediss://127.0.0.1:9")
            .connect_timeout(Duration::from_millis(300))
            .backends(Backends::new().tls_ca(backends_ca));
        if let Some(ca) = builder_ca {
            builder = builder.tls_ca(ca);
        }
        match builder.connect().await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("nothing serves rediss:// on port 9"),
        }
    }

    #[tokio::test]
    async fn the_backends_ca_file_applies_unless_the_builder_names_one() {
        let used = refusal("/nonexistent/backends-ca.pem", None).await;
        assert!(used.contains("backends-ca.pem"), "{used}");
        let used = refusal(
            "/nonexistent/backends-ca.pem",
            Some("/nonexistent/builder-ca.pem"),
        )
        .await;
        assert!(used.contains("builder-ca.pem"), "{used}");
    }

    #[tokio::test]
    async fn a_facade_pool_reaches_urls_without_naming_a_connector() {
        // Nothing listens on port 9: the RabbitMQ backend itself says so (a pool without the
        // facade's connector refuses every URL instead).
        let refused = Pool::<Echo>::builder(())
            .broker("amqp://guest:guest@127.0.0.1:9/%2f")
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await;
        let Err(PoolError::Unreachable(message)) = refused else {
            panic!("amqp:// is reached through Backends, not LocalOnly: {refused:?}")
        };
        assert!(message.contains("RabbitMQ"), "{message}");
        // An amqps:// URL takes the CA file as rediss:// does.
        let refused = Pool::<Echo>::builder(())
            .broker("amqps://127.0.0.1:9/%2f")
            .connect_timeout(Duration::from_millis(500))
            .backends(Backends::new().tls_ca("/nonexistent/amqp-ca.pem"))
            .connect()
            .await;
        let Err(error) = refused else {
            panic!("nothing serves amqps:// on port 9")
        };
        assert!(error.to_string().contains("amqp-ca.pem"), "{error}");
    }
}
