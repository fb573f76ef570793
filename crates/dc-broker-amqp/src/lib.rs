//! RabbitMQ backend of distributed-computing: `amqp://` and `amqps://` broker URLs.
//!
//! RabbitMQ runs no code of ours, so the pool that opens a session is the session's
//! coordinator: it keeps the job table, attempts, leases, results and update log in memory
//! (it keeps every outstanding payload anyway) and answers the nodes' requests, which travel
//! through RabbitMQ queues. RabbitMQ provides the rest:
//!
//! - `<ns>.session`: the hosting pool's request queue, declared *exclusive*: only one
//!   connection can hold it, so it is the one-session-at-a-time lock, and it frees itself when
//!   that pool's connection closes; `<ns>.session.bulk` beside it takes requests over 1 MiB;
//! - `<ns>.node.<node>`: a node's presence queue (exclusive, holds nothing): it disappears when
//!   the node's connection closes, which tells the pool at once that the node's process is
//!   gone, before any lease runs out;
//! - a private, server-named queue per connection for answers;
//! - `<ns>.nodes`: a stream of node heartbeats, so `status` lists nodes with no pool open.
//!
//! Every request and answer is CBOR, cut into messages of at most 4 MiB (RabbitMQ 4 refuses
//! messages over 16 MiB by default); big ones travel on a second connection, so heartbeats never
//! wait behind them. Nothing is ever held unacknowledged while a job runs, so
//! RabbitMQ's `consumer_timeout` never ends a long job. `docs/amqp-protocol.md` describes the
//! protocol in full.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dc_core::BrokerError> {
//! use dc_broker_amqp::{AmqpBroker, AmqpOptions};
//! use dc_core::Broker;
//!
//! let broker = AmqpBroker::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     &AmqpOptions::default().namespace("sweep"),
//! )
//! .await?;
//! assert!(broker.max_payload() >= 600 << 20);
//! # Ok(())
//! # }
//! ```

mod broker;
mod host;
mod link;
mod names;
mod registry;
mod wire;

use std::path::PathBuf;
use std::time::Duration;

pub use broker::AmqpBroker;

/// How to reach RabbitMQ, beyond the URL.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AmqpOptions {
    /// Prefix of every queue this backend declares (`dc` by default): deployments sharing a
    /// vhost keep apart by namespace.
    pub namespace: String,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// PEM file of the certificate authority that signed the server's certificate
    /// (`amqps://` only); the system's roots otherwise.
    pub tls_ca: Option<PathBuf>,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            namespace: "dc".into(),
            connect_timeout: Duration::from_secs(10),
            tls_ca: None,
        }
    }
}

impl AmqpOptions {
    /// Set the namespace.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// Set the connect timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Trust this certificate authority (PEM file) for `amqps://`.
    #[must_use]
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }
}

/// Whether `url` is one this backend takes (`amqp://` or `amqps://`).
pub fn is_amqp_url(url: &str) -> bool {
    let lower = url.trim_start().to_ascii_lowercase();
    lower.starts_with("amqp://") || lower.starts_with("amqps://")
}
