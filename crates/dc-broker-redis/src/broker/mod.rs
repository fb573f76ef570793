//! [`RedisBroker`]: the [`Broker`] traits on Redis streams and Lua scripts.
//!
//! One file per role:
//! - `mod.rs`: the broker, its connection and options, and how a script is run;
//! - `scripts.rs`: the Lua scripts; `replies.rs`: their replies decoded into typed rows;
//! - `staging.rs`: big payloads written and read by chunks;
//! - `waits.rs`: blocking reads of streams, pipelined with the script they wake;
//! - one file per capability: `session.rs` ([`SessionControl`]), `jobs.rs` ([`JobQueue`]'s
//!   submit, take and complete), `results.rs` (its `take_results`), `updates.rs`
//!   ([`UpdateLog`]), `nodes.rs` ([`NodeRegistry`]), `inspect.rs` ([`Inspect`]);
//! - `leases.rs`: listing and ending leases (reaping, abandoning, leaving);
//!   `presence.rs`: heartbeats and noticing nodes whose process died.
//!
//! [`SessionControl`]: dc_core::broker::SessionControl
//! [`JobQueue`]: dc_core::broker::JobQueue
//! [`UpdateLog`]: dc_core::broker::UpdateLog
//! [`NodeRegistry`]: dc_core::broker::NodeRegistry
//! [`Inspect`]: dc_core::broker::Inspect

mod inspect;
mod jobs;
mod leases;
mod nodes;
mod presence;
mod replies;
mod results;
mod scripts;
mod session;
mod staging;
mod updates;
mod waits;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use dc_core::broker::{NodeId, SessionId, WorkerId};
use dc_core::{Broker, BrokerError};
use redis::aio::MultiplexedConnection;
use redis::{ScriptInvocation, Value};
use tokio::time::Instant;

use crate::RedisOptions;
use crate::conn::Conns;
use crate::keys::Keys;

/// Largest job, result, update or init this broker moves (chunked at `chunk_size`).
const MAX_PAYLOAD: usize = 1 << 30;
/// Payloads up to this size travel inside script calls; larger ones are staged by chunks.
const INLINE_MAX: usize = 256 << 10;
/// TTL of a session's long-lived keys in milliseconds (a day), refreshed by every keep-alive:
/// cleans up after a pool that vanished. Also the TTL of node status keys and staged payloads.
const KEY_TTL_MS: u64 = 24 * 3600 * 1000;
/// A submit or complete script call carries at most this many inline bytes.
const BATCH_BYTES: usize = 4 << 20;

/// A [`Broker`] on a Redis 7.0+ or Valkey server. Cheap to clone (clones share connections).
///
/// Ordinary commands and scripts share one multiplexed connection (made with the configured
/// connect timeout, then kept); each blocking read (`XREAD BLOCK`) and each chunk transfer
/// takes a dedicated connection from a pool of its kind, so neither ever stalls the shared one.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conns: Conns,
    options: RedisOptions,
    keys: Keys,
    /// Heartbeats sent; every `PURGE_EVERY`-th also purges dead sessions.
    beats: AtomicU64,
    /// A node's own named connection: heartbeats go over it (so no other traffic can delay
    /// them), and its presence in `CLIENT LIST` says the node process is alive.
    presence: tokio::sync::Mutex<Option<(NodeId, MultiplexedConnection)>>,
    /// Nodes holding leases whose presence connection the reaper did not see, since when.
    absent: Mutex<HashMap<NodeId, Instant>>,
    /// Where each worker's last look at its session's job stream ended: a blocking take
    /// starts waiting from there at once (one round trip instead of a look, then a wait).
    job_cursors: Mutex<HashMap<WorkerId, jobs::Cursor>>,
    /// The same for the pool's reads of its session's results stream: the session and the
    /// last notice id seen.
    result_cursor: Mutex<Option<(SessionId, String)>>,
    /// Jobs whose result notices `take_results` has read and whose results it is still
    /// reading (a big output by chunks), by session: `lost_jobs` leaves them out, since their
    /// notices are gone and their outputs may be too, yet nothing is lost.
    reading: Mutex<HashSet<(SessionId, u64)>>,
    /// What the session this client opened last holds in its meta, as its pool set it: lease
    /// (ms), attempt limit, spec chunk count and spec length. A keep-alive finds a session
    /// whose stored values differ damaged.
    opened: Mutex<Option<(SessionId, [u64; 4])>>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `target` is the redacted URL: never the password.
        f.debug_struct("RedisBroker")
            .field("target", &self.inner.conns.target())
            .field("prefix", &self.inner.options.prefix)
            .field("chunk_size", &self.inner.options.chunk_size)
            .finish()
    }
}

impl RedisBroker {
    /// Connect to `url` (`redis://[:password@]host:port[/db]`, or `rediss://` for TLS) and
    /// check that the server answers (PING after AUTH).
    ///
    /// # Errors
    /// [`BrokerError::Auth`] when the server refuses the password (or asks for one);
    /// [`BrokerError::Connection`] when nothing answers within `options.connect_timeout`
    /// (the message names the host and port, never the password);
    /// [`BrokerError::UnsupportedUrl`] for a URL that is not a usable Redis URL.
    ///
    /// # Examples
    /// ```no_run
    /// # async fn demo() -> Result<(), dc_core::BrokerError> {
    /// use dc_broker_redis::{RedisBroker, RedisOptions};
    ///
    /// let options = RedisOptions { prefix: "my-pool".into(), ..RedisOptions::default() };
    /// let broker = RedisBroker::connect("redis://127.0.0.1:6379", options).await?;
    /// # let _ = broker;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, BrokerError> {
        let conns = Conns::new(
            url,
            options.connect_timeout,
            options.response_timeout,
            options.tls.as_ref(),
        )?;
        let check = async {
            let mut conn = conns.control().await?;
            redis::cmd("PING")
                .query_async::<Value>(&mut conn)
                .await
                .map_err(|e| conns.error(e))
        };
        tokio::time::timeout(options.connect_timeout, check)
            .await
            .map_err(|_| conns.timed_out())??;
        let keys = Keys::new(&options.prefix);
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                conns,
                options,
                keys,
                beats: AtomicU64::new(0),
                presence: tokio::sync::Mutex::new(None),
                absent: Mutex::new(HashMap::new()),
                job_cursors: Mutex::new(HashMap::new()),
                result_cursor: Mutex::new(None),
                reading: Mutex::new(HashSet::new()),
                opened: Mutex::new(None),
            }),
        })
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn conns(&self) -> &Conns {
        &self.inner.conns
    }

    /// Largest piece of a payload in one Redis value.
    fn chunk(&self) -> usize {
        self.inner.options.chunk_size.max(1)
    }

    /// Largest payload that travels inside a script call.
    fn inline_max(&self) -> usize {
        INLINE_MAX.min(self.chunk())
    }

    /// Run a script on the shared connection.
    async fn run(&self, inv: &ScriptInvocation<'_>) -> Result<Value, BrokerError> {
        let mut conn = self.conns().control().await?;
        inv.invoke_async::<Value>(&mut conn)
            .await
            .map_err(|e| self.conns().error(e))
    }

    /// Run a script of `session`, naming it in `SessionGone`.
    async fn run_in(
        &self,
        session: &SessionId,
        inv: &ScriptInvocation<'_>,
    ) -> Result<Value, BrokerError> {
        self.run(inv).await.map_err(|e| in_session(e, session))
    }

    /// Run one command on the shared connection.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, BrokerError> {
        let mut conn = self.conns().control().await?;
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| self.conns().error(e))
    }
}

/// Name `session` in a `SessionGone` error.
fn in_session(e: BrokerError, session: &SessionId) -> BrokerError {
    match e {
        BrokerError::SessionGone(_) => BrokerError::SessionGone(session.to_string()),
        other => other,
    }
}

impl Broker for RedisBroker {
    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }
}
