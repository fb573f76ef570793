//! How a pool reaches a network broker: the [`NetworkTarget`] a builder describes, and the
//! [`Connector`] value that turns it into a broker.
//!
//! `dc-core` names no network backend. A builder holds its connector as `Arc<dyn Connector>`;
//! the default, [`LocalOnly`], refuses every network target, so a pool built from `dc-core`
//! alone runs locally (`.local()`) or on a broker object (`.broker_instance(..)`). The facade
//! crate presets its own connector, which knows Redis (and other backends by URL scheme) and
//! may carry backend options of its own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::error::PoolError;

/// A pool's network address: a head node (`address:port` + password) or a broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkTarget {
    /// Head node host (default `localhost`).
    pub address: String,
    /// Head node pool port (default [`DEFAULT_PORT`](crate::DEFAULT_PORT)).
    pub port: u16,
    /// Whether `address` was given (with a join token, it overrides the token's addresses).
    pub address_set: bool,
    /// The pool password.
    pub password: Option<String>,
    /// A join token: the head's addresses, port, user, secret and CA hash.
    pub token: Option<String>,
    /// Whether to speak TLS to a head node (default true; false for a head started with
    /// `--no-tls`).
    pub tls: bool,
    /// The CA file that `rediss://` brokers' certificates are checked against (default: the
    /// system's roots).
    pub tls_ca: Option<PathBuf>,
    /// The known-heads file that pins a head reached with a password (default: the
    /// `DC_KNOWN_HEADS` file, else the user's config directory).
    pub known_heads: Option<PathBuf>,
    /// A broker URL, when given instead of a head node.
    pub url: Option<String>,
    /// How long to try before reporting [`PoolError::Unreachable`].
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for NetworkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkTarget")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("known_heads", &self.known_heads)
            .field("url", &self.url.as_ref().map(|u| redact_url(u)))
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A URL with its password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Turns a [`NetworkTarget`] into a broker: how a pool reaches head nodes and broker URLs.
///
/// A connector is a value, held by the builder as `Arc<dyn Connector>` (see
/// `PoolBuilder::connector`), so it can carry options of its own (a backend's TLS trust,
/// key prefix, timeouts). The default, [`LocalOnly`], refuses network targets; the facade
/// crate's `Pool` presets a connector that knows Redis (and other backends by URL scheme).
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use dc_core::{Broker, Connector, LocalBroker, NetworkTarget, PoolError};
///
/// /// Every target reaches the same in-process broker.
/// #[derive(Debug)]
/// struct Fixed(Arc<LocalBroker>);
///
/// #[async_trait::async_trait]
/// impl Connector for Fixed {
///     async fn connect(&self, _target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
///         Ok(self.0.clone())
///     }
/// }
///
/// let connector: Arc<dyn Connector> = Arc::new(Fixed(Arc::new(LocalBroker::new())));
/// # let _ = connector;
/// ```
#[async_trait::async_trait]
pub trait Connector: Send + Sync + std::fmt::Debug {
    /// Connect to the broker named by `target`.
    ///
    /// # Errors
    /// [`PoolError::Auth`], [`PoolError::Unreachable`], or [`PoolError::Config`] for a URL
    /// scheme without a backend.
    async fn connect(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError>;
}

/// The connector of a pool built from `dc-core` alone: local pools and broker objects only.
/// Every network target is refused with [`PoolError::Config`] saying what to use instead.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalOnly;

#[async_trait::async_trait]
impl Connector for LocalOnly {
    async fn connect(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        Err(PoolError::Config(match &target.url {
            Some(url) => format!(
                "no broker backend for {:?} in this build: use the distributed-computing crate (Redis, RabbitMQ), .local() or .broker_instance(..)",
                redact_url(url)
            ),
            None => format!(
                "no network backend in this build to reach a head node at {}:{}: use the distributed-computing crate, .local() or .broker_instance(..)",
                target.address, target.port
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{Connector, NetworkTarget, redact_url};
    use crate::{BoxError, Broker, LocalBroker, Pool, PoolError, Worker, WorkerContext};

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

    /// Reaches one in-process broker whatever the target, counting the calls.
    #[derive(Debug, Default)]
    struct Counting {
        calls: AtomicUsize,
        url: std::sync::Mutex<Option<String>>,
    }

    #[async_trait::async_trait]
    impl Connector for Counting {
        async fn connect(&self, target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *crate::util::lock(&self.url) = target.url.clone();
            Ok(Arc::new(LocalBroker::new()))
        }
    }

    #[tokio::test]
    async fn a_network_target_goes_through_the_builders_connector() {
        let refused = Pool::<Echo>::builder(())
            .broker("redis://:pw@host:6379")
            .connect()
            .await;
        match refused {
            Err(PoolError::Config(message)) => {
                assert!(message.contains("no broker backend"), "{message}");
                assert!(!message.contains("pw@"), "the password leaked: {message}");
            }
            other => panic!("LocalOnly must refuse a URL, got {other:?}"),
        }
        let connector = Arc::new(Counting::default());
        let pool = Pool::<Echo>::builder(())
            .broker("redis://host:6379")
            .connector(connector.clone())
            .connect()
            .await
            .expect("the connector's broker");
        assert_eq!(connector.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            crate::util::lock(&connector.url).as_deref(),
            Some("redis://host:6379")
        );
        pool.close().await.expect("close");
    }

    #[test]
    fn urls_lose_their_password_in_logs() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("amqp://user:pw@h:5672/%2f"),
            "amqp://user:***@h:5672/%2f"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
    }
}
