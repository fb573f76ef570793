//! The Redis servers a run uses: a dedicated redis-server on a free loopback port (plain, or
//! TLS only with its CA pinned), or an existing one by URL under a key prefix of its own.

use std::sync::Arc;
use std::time::Duration;

use dc_broker_redis::server::{NODE_USER, RedisProcess, RedisServerOptions, start_redis_server};
use dc_broker_redis::{RedisBroker, RedisOptions, TlsTrust, redis_url_as};
use dc_core::testing::support::{TempDir, free_port};
use dc_core::{BoxError, Broker};

use super::worker::unix_ms;

/// A Redis server the bench runs on.
#[derive(Debug, Clone)]
pub(super) struct Server {
    pub(super) url: String,
    /// The prefix of every key the run writes.
    pub(super) prefix: String,
    /// How its TLS port is trusted: `None` for a plain `redis://` URL (and the system's roots
    /// for `rediss://`).
    pub(super) tls: Option<TlsTrust>,
}

impl Server {
    /// Broker options for this server, answers bounded by `response_timeout`.
    pub(super) fn options(&self, response_timeout: Duration) -> RedisOptions {
        RedisOptions {
            prefix: self.prefix.clone(),
            tls: self.tls.clone(),
            response_timeout,
            ..RedisOptions::default()
        }
    }
}

/// A dedicated redis-server on a free loopback port, with a password, in a temp dir, reached
/// as the node user. Plain unless `tls`: then its port speaks TLS only, with certificates made
/// in `dir` as a head makes them, and clients pin its CA.
pub(super) async fn dedicated_redis(
    dir: &TempDir,
    tls: bool,
) -> Result<(RedisProcess, Server, u16, String), BoxError> {
    let port = free_port()?;
    let password = format!("bench-{}-{}", std::process::id(), unix_ms());
    let mut options = RedisServerOptions::new(password.clone(), port, dir.path().join("redis"));
    options.bind = vec!["127.0.0.1".into()];
    options.tls = tls;
    let redis = start_redis_server(&options)
        .await?
        .ok_or("a redis-server already answered on the free port")?;
    let server = Server {
        url: redis_url_as("127.0.0.1", port, NODE_USER, &password),
        prefix: "dc".into(),
        tls: options.client_tls()?,
    };
    Ok((redis, server, port, password))
}

pub(super) async fn redis_broker(server: &Server) -> Result<Arc<dyn Broker>, BoxError> {
    let options = server.options(RedisOptions::default().response_timeout);
    Ok(Arc::new(RedisBroker::connect(&server.url, options).await?))
}
