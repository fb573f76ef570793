//! Redis backend of distributed-computing: [`RedisBroker`] implements [`dc_core::Broker`] on a
//! Redis 7.0+ (or Valkey) server, and [`server`] launches the head node's own redis-server.
//!
//! Jobs are entries of one stream per session read through one consumer group, each taken by a
//! Lua script that delivers the entry and records the lease in one atomic step; a lease is the
//! entry's idle time in the group's pending list, reset only by the node heartbeat through an
//! owner-checked script; results are committed first-writer-wins by a script. The key layout,
//! the scripts and the life of a job are described in `docs/redis-protocol.md`.
//!
//! # Examples
//! ```no_run
//! # async fn demo() -> Result<(), dc_core::BrokerError> {
//! use dc_broker_redis::{RedisBroker, RedisOptions, redis_url};
//! use dc_core::Broker;
//!
//! let url = redis_url("127.0.0.1", 6379, Some("secret"));
//! let broker = RedisBroker::connect(&url, RedisOptions::default()).await?;
//! assert!(broker.max_payload() >= 600 << 20);
//! # Ok(())
//! # }
//! ```

pub mod acl;
mod broker;
mod codec;
mod conn;
mod keys;
pub mod server;
pub mod tls;
pub mod token;

use std::time::Duration;

pub use broker::RedisBroker;
pub use tls::TlsTrust;

/// How a [`RedisBroker`] names its keys and moves large values.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Prefix of every key (default `"dc"`); brokers with different prefixes on one server do
    /// not see each other.
    pub prefix: String,
    /// Largest piece of a payload stored in one Redis value (default 16 MiB; a Redis string is
    /// capped at 512 MB). Payloads above this are split into chunks.
    pub chunk_size: usize,
    /// How long [`RedisBroker::connect`] (and each new connection) may take (default 5 s).
    pub connect_timeout: Duration,
    /// How long a script or small command may wait for its whole answer (default 30 s). A
    /// server that stalls, or sends part of an answer and then nothing, fails the command with
    /// [`dc_core::BrokerError::Connection`] after this; the connection is dropped and the next
    /// command makes a new one. A blocking read's bound is its wait plus 5 s, and a chunk of a big
    /// payload's is 120 s.
    pub response_timeout: Duration,
    /// How TLS connections trust the server. `None` (the default): plain for `redis://` URLs,
    /// the system's root certificates for `rediss://`. `Some`: TLS whatever the scheme, as
    /// this says (a head's pinned CA, a known-heads file, a private CA file).
    pub tls: Option<TlsTrust>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "dc".into(),
            chunk_size: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// One connection of its own to the server at `url`, made as the broker makes its
/// connections (TLS when the URL is `rediss://` or `options.tls` names a trust, within
/// `options.connect_timeout`, answers bounded by `options.response_timeout`), for tools that
/// send their own commands to a pool's server: `dc-cli bench` measures its baselines on one.
/// `options.prefix` and `options.chunk_size` are not used.
///
/// # Errors
/// The same as [`RedisBroker::connect`]'s: a bad URL, a refused certificate or password, no
/// answer in time.
pub async fn connect_raw(
    url: &str,
    options: &RedisOptions,
) -> Result<redis::aio::MultiplexedConnection, dc_core::BrokerError> {
    conn::Server::new(
        url,
        options.connect_timeout,
        options.response_timeout,
        options.tls.as_ref(),
    )?
    .connect(options.response_timeout)
    .await
}

/// The URL of a Redis server: `redis://:<password>@host:port`, the password percent-encoded.
///
/// # Examples
/// ```
/// use dc_broker_redis::redis_url;
///
/// assert_eq!(redis_url("head", 6379, None), "redis://head:6379");
/// assert_eq!(redis_url("head", 7000, Some("p@ss w")), "redis://:p%40ss%20w@head:7000");
/// assert_eq!(redis_url("::1", 6379, None), "redis://[::1]:6379");
/// ```
pub fn redis_url(host: &str, port: u16, password: Option<&str>) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    match password {
        Some(pw) => format!("redis://:{}@{host}:{port}", percent_encode(pw)),
        None => format!("redis://{host}:{port}"),
    }
}

/// The URL of a Redis server for `user` with `password`: `redis://user:password@host:port`,
/// both percent-encoded.
///
/// # Examples
/// ```
/// use dc_broker_redis::redis_url_as;
///
/// assert_eq!(redis_url_as("head", 8899, "dc-node", "p@ss"), "redis://dc-node:p%40ss@head:8899");
/// assert_eq!(redis_url_as("::1", 8899, "dc-node", "pw"), "redis://dc-node:pw@[::1]:8899");
/// ```
pub fn redis_url_as(host: &str, port: u16, user: &str, password: &str) -> String {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!(
        "redis://{}:{}@{host}:{port}",
        percent_encode(user),
        percent_encode(password)
    )
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
