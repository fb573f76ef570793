//! [`RedisBroker`]: the [`Broker`] trait on Redis streams and Lua scripts.

use dc_core::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use dc_core::broker::{
    Abandoned, AttemptEnd, AttemptRecord, Completion, JobId, JobOutcome, JobResult, Lease,
    LeasedJob, NewJob, NodeId, NodeProblem, NodeSeen, NodeStatus, Outcome, SessionId, SessionInfo,
    SessionSpec, SessionState, SessionStats, UpdateSeq, WorkerId,
};
use dc_core::{Broker, BrokerError, JobFailure};
use redis::aio::MultiplexedConnection;
use redis::{Script, ScriptInvocation, Value};
use tokio::time::Instant;

use crate::RedisOptions;
use crate::codec::{
    array, bad, bytes, from_cbor, int, opt_bytes, opt_string, string, take, to_cbor, uint,
};
use crate::conn::{Conns, Dedicated, Kind};
use crate::keys::{Keys, glob_escape};

/// Largest job, result, update or init this broker moves (chunked at `chunk_size`).
const MAX_PAYLOAD: usize = 1 << 30;
/// Payloads up to this size travel inside script calls; larger ones are staged by chunks.
const INLINE_MAX: usize = 256 << 10;
/// TTL of a session's long-lived keys, refreshed by every keep-alive: cleans up after a pool
/// that vanished. Also the TTL of node status keys.
const KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// A submit script call carries at most this many inline bytes…
const SUBMIT_BATCH_BYTES: usize = 4 << 20;
/// …and at most this many jobs.
const SUBMIT_BATCH_JOBS: usize = 512;
/// A take script call leases at most this many jobs…
const TAKE_BATCH_JOBS: usize = 256;
/// …and returns at most this many inline payload bytes (at least one job's).
const TAKE_BATCH_BYTES: usize = 4 << 20;
/// Inline update bytes one `read_updates` call returns (at least one update is returned).
const UPDATE_READ_BYTES: usize = 8 << 20;
/// Leases one reaper or leave pass looks at per session.
const PENDING_PAGE: usize = 1000;
/// Every this many heartbeats a node also deletes the keys of sessions that expired, so a pool
/// that vanished is cleaned up even if no other pool calls `reap_expired`.
const PURGE_EVERY: u64 = 32;
/// Jobs checked per `lost` script call.
const LOST_BATCH: usize = 1000;
/// How often a lease is renewed while its job's payload is fetched.
const FETCH_RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long a lease holder's presence connection must be missing before its leases go.
const NODE_GONE_AFTER: Duration = Duration::from_millis(400);

/// The Lua scripts, one per atomic step (see `lua/*.lua`), each with the helpers of
/// `lua/lib.lua` prepended.
struct Scripts {
    open_session: Script,
    keep_alive: Script,
    close_session: Script,
    submit: Script,
    take: Script,
    renew: Script,
    pending: Script,
    end_attempt: Script,
    complete: Script,
    take_results: Script,
    publish_update: Script,
    read_updates: Script,
    stats: Script,
    heartbeat: Script,
    nodes: Script,
    report_problem: Script,
    active: Script,
    lost: Script,
    sessions: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    open_session: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/open_session.lua")
    )),
    keep_alive: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/keep_alive.lua")
    )),
    close_session: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/close_session.lua")
    )),
    submit: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/submit.lua")
    )),
    take: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/take.lua")
    )),
    renew: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/renew.lua")
    )),
    pending: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/pending.lua")
    )),
    end_attempt: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/end_attempt.lua")
    )),
    complete: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/complete.lua")
    )),
    take_results: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/take_results.lua")
    )),
    publish_update: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/publish_update.lua")
    )),
    read_updates: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/read_updates.lua")
    )),
    stats: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/stats.lua")
    )),
    heartbeat: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/heartbeat.lua")
    )),
    nodes: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/nodes.lua")
    )),
    report_problem: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/report_problem.lua")
    )),
    active: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/active.lua")
    )),
    lost: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/lost.lua")
    )),
    sessions: Script::new(concat!(
        include_str!("../lua/lib.lua"),
        include_str!("../lua/sessions.lua")
    )),
});

/// A [`Broker`] on a Redis 7.0+ or Valkey server. Cheap to clone (clones share connections).
///
/// Ordinary commands and scripts share one multiplexed connection (made with the configured
/// connect timeout, then kept); each blocking read (`XREAD BLOCK`) and each chunk transfer
/// takes a dedicated connection from a free-list, so neither ever stalls the shared one.
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
    absent: std::sync::Mutex<HashMap<NodeId, Instant>>,
    /// Where each worker's last look at its session's job stream ended: a blocking take
    /// starts waiting from there at once (one round trip instead of a look, then a wait).
    job_cursors: std::sync::Mutex<HashMap<WorkerId, Cursor>>,
    /// The same for the pool's reads of its session's results stream: the session and the
    /// last notice id seen.
    result_cursor: std::sync::Mutex<Option<(SessionId, String)>>,
    /// Jobs whose result notices `take_results` has read and whose results it is still
    /// reading (a big output by chunks), by session: `lost_jobs` leaves them out, since their
    /// notices are gone and their outputs may be too, yet nothing is lost.
    reading: std::sync::Mutex<HashSet<(SessionId, u64)>>,
    /// What the session this client opened last holds in its meta, as its pool set it: lease
    /// (ms), attempt limit, spec chunk count and spec length. A keep-alive finds a session
    /// whose stored values differ damaged.
    opened: std::sync::Mutex<Option<(SessionId, [u64; 4])>>,
}

/// Jobs in `Inner::reading` while their results are read; out of it when dropped.
struct Reading<'a> {
    set: &'a std::sync::Mutex<HashSet<(SessionId, u64)>>,
    jobs: Vec<(SessionId, u64)>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut set = lock(self.set);
        for job in &self.jobs {
            set.remove(job);
        }
    }
}

/// A stream position seen in a session: entries after `last` are new; `log_len` updates had
/// been published then.
#[derive(Debug, Clone)]
struct Cursor {
    session: SessionId,
    last: String,
    log_len: u64,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `target` is the redacted URL: never the password.
        f.debug_struct("RedisBroker")
            .field("target", &self.inner.conns.target)
            .field("prefix", &self.inner.options.prefix)
            .field("chunk_size", &self.inner.options.chunk_size)
            .finish()
    }
}

/// Where a payload travels: inside the script call, or staged by chunks under a key.
enum Blob<'a> {
    Inline(&'a [u8]),
    Staged(String),
    None,
}

impl Blob<'_> {
    fn mode(&self) -> &'static str {
        match self {
            Blob::Inline(_) => "i",
            Blob::Staged(_) => "s",
            Blob::None => "n",
        }
    }

    fn arg(&self) -> &[u8] {
        match self {
            Blob::Inline(data) => data,
            Blob::Staged(key) => key.as_bytes(),
            Blob::None => b"",
        }
    }
}

/// A lease as the `pending` script lists it.
struct Held {
    job: u64,
    attempt: u32,
    entry: String,
    node: NodeId,
    worker: WorkerId,
}

fn chunk_count(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk.max(1)).max(1)
}

/// A name for a staging key, unique across processes and hosts in practice.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn too_large(size: usize) -> Result<(), BrokerError> {
    if size > MAX_PAYLOAD {
        return Err(BrokerError::PayloadTooLarge {
            size,
            limit: MAX_PAYLOAD,
        });
    }
    Ok(())
}

fn parse_job_id(v: Value) -> Result<u64, BrokerError> {
    let s = string(v)?;
    s.parse()
        .map_err(|_| bad(format!("job id {s:?} is not a number")))
}

impl RedisBroker {
    /// Connect to `url` (`redis://[:password@]host:port[/db]`; `rediss://` needs a TLS build of
    /// the `redis` crate) and check that the server answers (PING after AUTH).
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
                absent: std::sync::Mutex::new(HashMap::new()),
                job_cursors: std::sync::Mutex::new(HashMap::new()),
                result_cursor: std::sync::Mutex::new(None),
                reading: std::sync::Mutex::new(HashSet::new()),
                opened: std::sync::Mutex::new(None),
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

    fn chunk(&self) -> usize {
        self.inner.options.chunk_size.max(1)
    }

    fn inline_max(&self) -> usize {
        INLINE_MAX.min(self.chunk())
    }

    /// Run a script on a pooled connection.
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
        self.run(inv).await.map_err(|e| match e {
            BrokerError::SessionGone(_) => BrokerError::SessionGone(session.to_string()),
            other => other,
        })
    }

    /// Write `data` by chunks (`c0`, `c1`…) into the hash `key`, one command per chunk, on a
    /// bulk connection.
    async fn stage(&self, key: &str, data: &[u8]) -> Result<(), BrokerError> {
        let mut conn = self.conns().dedicated(Kind::Bulk).await?;
        let result = async {
            for (i, chunk) in data.chunks(self.chunk()).enumerate() {
                let mut pipe = redis::pipe();
                pipe.cmd("HSET").arg(key).arg(format!("c{i}")).arg(chunk);
                if i == 0 {
                    // A stage left behind by a crash goes away by itself.
                    pipe.cmd("PEXPIRE").arg(key).arg(KEY_TTL.as_millis() as u64);
                }
                pipe.query_async::<Value>(conn.conn()).await?;
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        finish(conn, result).map_err(|e| self.conns().error(e))
    }

    /// Read `n` chunks of the hash `key`, checking they add up to `len` bytes. Both numbers
    /// come from the broker, so they are checked before anything is allocated for them: at
    /// most `MAX_PAYLOAD` bytes, at least one chunk and no more chunks than bytes, and a length
    /// that `n` chunks the size of the first one can hold; the bytes read never run past `len`.
    async fn fetch(&self, key: &str, n: usize, len: usize) -> Result<Bytes, BrokerError> {
        if len > MAX_PAYLOAD || n == 0 || n > len.max(1) {
            return Err(bad(format!(
                "{key} claims {len} bytes in {n} chunks (at most {MAX_PAYLOAD} bytes, one chunk \
                 at least, no empty chunk)"
            )));
        }
        let mut conn = self.conns().dedicated(Kind::Bulk).await?;
        let result = async {
            let mut out = BytesMut::new();
            for i in 0..n {
                let chunk: Option<Vec<u8>> = redis::cmd("HGET")
                    .arg(key)
                    .arg(format!("c{i}"))
                    .query_async(conn.conn())
                    .await?;
                let Some(c) = chunk else {
                    return Ok(Err(format!("{key} lacks chunk {i} of {n}")));
                };
                if i == 0 {
                    // Chunks all have the first one's size, but the last (which may be shorter).
                    let most = c.len().saturating_mul(n);
                    let least = c.len().saturating_mul(n - 1);
                    if len > most || (n > 1 && len <= least) {
                        return Ok(Err(format!(
                            "{key} claims {len} bytes in {n} chunks, but its first chunk holds {}",
                            c.len()
                        )));
                    }
                    out.reserve(len);
                }
                if out.len() + c.len() > len {
                    return Ok(Err(format!(
                        "{key} holds more than the {len} bytes it claims"
                    )));
                }
                out.extend_from_slice(&c);
            }
            Ok(Ok(out))
        }
        .await;
        let out = finish(conn, result).map_err(|e| self.conns().error(e))?;
        match out {
            Ok(out) if out.len() == len => Ok(out.freeze()),
            Ok(out) => Err(bad(format!(
                "{key} holds {} bytes, {len} expected",
                out.len()
            ))),
            Err(what) => Err(bad(what)),
        }
    }

    /// [`RedisBroker::fetch`] a leased job's payload, renewing its lease all the while: the
    /// node's heartbeat renews it only once `take_jobs` has returned, and a big payload on a
    /// busy machine may take longer than the lease to arrive.
    async fn fetch_leased(
        &self,
        lease: &Lease,
        key: &str,
        n: usize,
        len: usize,
    ) -> Result<Bytes, BrokerError> {
        let fetch = self.fetch(key, n, len);
        tokio::pin!(fetch);
        let mut tick = tokio::time::interval(FETCH_RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                fetched = &mut fetch => return fetched,
                _ = tick.tick() => {
                    if let Err(e) = self.renew(lease).await {
                        tracing::debug!(job = %lease.job, error = %e, "renewing a lease while its payload arrives failed");
                    }
                }
            }
        }
    }

    /// Renew one lease (as a heartbeat does for all of a node's).
    async fn renew(&self, lease: &Lease) -> Result<(), BrokerError> {
        let mut inv = SCRIPTS.renew.prepare_invoke();
        inv.key(self.keys().meta(&lease.session))
            .arg(self.keys().base(&lease.session))
            .arg(&lease.node.0)
            .arg(lease.job.0)
            .arg(lease.attempt)
            .arg(&lease.token);
        self.run_in(&lease.session, &inv).await.map(drop)
    }

    /// Put a payload where a script can take it: inline when small, else staged by chunks.
    async fn put<'a>(&self, base: &str, data: &'a [u8]) -> Result<Blob<'a>, BrokerError> {
        if data.len() <= self.inline_max() {
            return Ok(Blob::Inline(data));
        }
        let key = format!("{base}stage:{}", unique());
        self.stage(&key, data).await?;
        Ok(Blob::Staged(key))
    }

    /// Wait up to `wait` for an entry after `ids` in any of `streams` (XREAD BLOCK on a
    /// dedicated connection); returns the streams that got one (empty when the wait ended).
    async fn wait_streams(
        &self,
        streams: &[&str],
        ids: &[&str],
        wait: Duration,
    ) -> Result<Vec<String>, BrokerError> {
        if wait.is_zero() {
            return Ok(Vec::new());
        }
        let mut conn = self.conns().dedicated(Kind::Blocking).await?;
        Conns::arm(&mut conn, wait);
        let result = xread_block(streams, ids, wait)
            .query_async::<Value>(conn.conn())
            .await;
        let reply = finish(conn, result).map_err(|e| self.conns().error(e))?;
        let mut woke = Vec::new();
        match reply {
            Value::Map(pairs) => {
                for (name, _) in pairs {
                    woke.push(string(name)?);
                }
            }
            other => {
                for stream in array(other)? {
                    let [name, _] = take::<2>(stream)?;
                    woke.push(string(name)?);
                }
            }
        }
        Ok(woke)
    }

    /// Wait up to `wait` for an entry after `ids` in any of `streams`, then run `inv` at once:
    /// `XREAD BLOCK` and the script go out as one pipeline on a dedicated connection, so the
    /// server runs the script the moment the read unblocks (no round trip between waking and
    /// taking). Returns the script's reply, whether the wait ended by an entry or by time.
    async fn wait_then_run(
        &self,
        session: &SessionId,
        streams: &[&str],
        ids: &[&str],
        wait: Duration,
        inv: &ScriptInvocation<'_>,
    ) -> Result<Value, BrokerError> {
        let mut conn = self.conns().dedicated(Kind::Blocking).await?;
        Conns::arm(&mut conn, wait);
        let mut pipe = redis::pipe();
        pipe.add_command(xread_block(streams, ids, wait))
            .ignore()
            .invoke_script(inv);
        let mut result = pipe.query_async::<(Value,)>(conn.conn()).await;
        if matches!(&result, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // The server lost its scripts (a restart): load and run it now, without waiting.
            result = inv.invoke_async::<Value>(conn.conn()).await.map(|v| (v,));
        }
        let (reply,) = finish(conn, result).map_err(|e| match self.conns().error(e) {
            BrokerError::SessionGone(_) => BrokerError::SessionGone(session.to_string()),
            other => other,
        })?;
        Ok(reply)
    }

    /// The `CLIENT SETNAME` of a node's presence connection (no spaces allowed).
    fn presence_name(&self, node: &NodeId) -> String {
        let clean = |s: &str| s.replace(|c: char| c.is_whitespace(), "_");
        format!(
            "dc-node:{}:{}",
            clean(&self.inner.options.prefix),
            clean(&node.0)
        )
    }

    /// The heartbeat script and the lease renewals of one beat, on `conn`.
    async fn beat_on(
        &self,
        conn: &mut MultiplexedConnection,
        status: &NodeStatus,
    ) -> Result<(), BrokerError> {
        let mut inv = SCRIPTS.heartbeat.prepare_invoke();
        inv.key(self.keys().nodes())
            .key(self.keys().node(&status.node))
            .arg(&status.node.0)
            .arg(to_cbor(status)?)
            .arg(KEY_TTL.as_millis() as u64);
        inv.invoke_async::<Value>(conn)
            .await
            .map_err(|e| self.conns().error(e))?;
        let mut by_session: HashMap<&SessionId, Vec<&Lease>> = HashMap::new();
        for lease in status.leases.iter().filter(|l| l.node == status.node) {
            by_session.entry(&lease.session).or_default().push(lease);
        }
        for (session, leases) in by_session {
            let mut inv = SCRIPTS.renew.prepare_invoke();
            inv.key(self.keys().meta(session))
                .arg(self.keys().base(session))
                .arg(&status.node.0);
            for lease in leases {
                inv.arg(lease.job.0).arg(lease.attempt).arg(&lease.token);
            }
            match inv.invoke_async::<Value>(conn).await {
                Ok(_) => {}
                Err(e) => match self.conns().error(e) {
                    // A lease of a closed session: nothing to renew.
                    BrokerError::SessionGone(_) => {}
                    other => return Err(other),
                },
            }
        }
        Ok(())
    }

    /// Nodes whose presence connection is open now (`CLIENT LIST`).
    async fn present_nodes(&self) -> Result<HashSet<String>, BrokerError> {
        let mut conn = self.conns().control().await?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.conns().error(e))?;
        Ok(list
            .lines()
            .filter_map(|line| {
                line.split(' ')
                    .find_map(|field| field.strip_prefix("name="))
                    .filter(|name| name.starts_with("dc-node:"))
                    .map(str::to_string)
            })
            .collect())
    }

    /// Leases of nodes whose process died: their presence connection closed (the kernel closes
    /// a dead process's sockets at once), seen absent by scans at least `NODE_GONE_AFTER`
    /// apart. Faster than the lease for the same-host case; a cut-off node keeps its
    /// connection open on the server's side and is left to the lease.
    async fn reap_gone_nodes(&self, session: &SessionId) -> Result<usize, BrokerError> {
        let held = match self.pending(session, "any", "").await {
            Err(BrokerError::SessionGone(_)) => return Ok(0),
            other => other?,
        };
        if held.is_empty() {
            lock(&self.inner.absent).clear();
            return Ok(0);
        }
        let present = self.present_nodes().await?;
        let now = Instant::now();
        let gone: HashSet<NodeId> = {
            let mut absent = lock(&self.inner.absent);
            let holders: HashSet<&NodeId> = held.iter().map(|h| &h.node).collect();
            absent.retain(|node, _| holders.contains(node));
            holders
                .into_iter()
                .filter(|node| {
                    if present.contains(&self.presence_name(node)) {
                        absent.remove(*node);
                        false
                    } else {
                        let since = *absent.entry((*node).clone()).or_insert(now);
                        now.duration_since(since) >= NODE_GONE_AFTER
                    }
                })
                .cloned()
                .collect()
        };
        let mut reaped = 0;
        for h in held.iter().filter(|h| gone.contains(&h.node)) {
            match self
                .end_attempt(session, h, AttemptEnd::NodeGone, false)
                .await
            {
                Ok(Abandoned::Stale) | Err(BrokerError::SessionGone(_)) => {}
                Ok(_) => {
                    tracing::warn!(job = h.job, node = %h.node, attempt = h.attempt, "node process gone (its connections closed): job goes back to the queue");
                    reaped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(reaped)
    }

    /// Leases held in `session`: those idle past the lease (`"lease"`) or all (`"any"`), of one
    /// node or of all (`""`).
    async fn pending(
        &self,
        session: &SessionId,
        idle: &str,
        node: &str,
    ) -> Result<Vec<Held>, BrokerError> {
        let mut inv = SCRIPTS.pending.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(idle)
            .arg(node)
            .arg(PENDING_PAGE);
        let items = array(self.run_in(session, &inv).await?)?;
        let mut held = Vec::new();
        let mut it = items.into_iter();
        while let (Some(job), Some(attempt), Some(entry), Some(node), Some(worker)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        {
            // One unreadable entry must not keep the others from being reaped.
            let one = (|| {
                Ok::<_, BrokerError>(Held {
                    job: parse_job_id(job)?,
                    attempt: uint(&attempt)?,
                    entry: string(entry)?,
                    node: NodeId(string(node)?),
                    worker: WorkerId(string(worker)?),
                })
            })();
            match one {
                Ok(h) => held.push(h),
                Err(e) => {
                    tracing::warn!(session = %session, error = %e, "skipping a lease record that cannot be read")
                }
            }
        }
        Ok(held)
    }

    /// End a leased attempt without a result; `idle_check`: only if idle past the lease.
    async fn end_attempt(
        &self,
        session: &SessionId,
        held: &Held,
        end: AttemptEnd,
        idle_check: bool,
    ) -> Result<Abandoned, BrokerError> {
        let message = end.to_string();
        let charge = match &end {
            AttemptEnd::Returned => "r",
            end if end.counts_as_failure() => "1",
            _ => "0",
        };
        let record = to_cbor(&AttemptRecord {
            attempt: held.attempt,
            node: held.node.clone(),
            worker: held.worker.clone(),
            end,
        })?;
        let mut inv = SCRIPTS.end_attempt.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(held.job)
            .arg(held.attempt)
            .arg(&held.entry)
            .arg(&held.node.0)
            .arg(record)
            .arg(charge)
            .arg(if idle_check { "lease" } else { "any" })
            .arg(message)
            .arg(to_cbor(&JobFailure::Exhausted)?);
        match string(self.run_in(session, &inv).await?)?.as_str() {
            "requeued" => Ok(Abandoned::Requeued),
            "failed" => Ok(Abandoned::Failed),
            "stale" => Ok(Abandoned::Stale),
            other => Err(bad(format!("end_attempt answered {other:?}"))),
        }
    }

    /// Close `session` (only if it is not the active one, when `only_inactive`), then delete
    /// every key left under its hash tag.
    async fn purge(&self, session: &SessionId, only_inactive: bool) -> Result<(), BrokerError> {
        let base = self.keys().base(session);
        let mut inv = SCRIPTS.close_session.prepare_invoke();
        inv.key(self.keys().active())
            .key(self.keys().sessions())
            .arg(&session.0)
            .arg(&base)
            .arg(if only_inactive { "1" } else { "0" });
        if int(&self.run(&inv).await?)? == 0 {
            return Ok(());
        }
        let pattern = format!("{}*", glob_escape(&base));
        let mut conn = self.conns().control().await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.conns().error(e))?;
            if !found.is_empty() {
                redis::cmd("UNLINK")
                    .arg(&found)
                    .query_async::<Value>(&mut conn)
                    .await
                    .map_err(|e| self.conns().error(e))?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Delete the sessions that are registered but no longer active (expired or replaced);
    /// returns the active one, if any.
    async fn purge_dead(&self) -> Result<Option<SessionId>, BrokerError> {
        let (active, sessions) = self.sessions().await?;
        let mut live = None;
        for session in sessions {
            if active.as_deref() == Some(session.0.as_str()) {
                live = Some(session);
            } else {
                tracing::warn!(session = %session, "pool session expired or replaced: deleting its keys");
                self.purge(&session, true).await?;
            }
        }
        Ok(live)
    }

    /// The active session and every registered one.
    async fn sessions(&self) -> Result<(Option<String>, Vec<SessionId>), BrokerError> {
        let mut inv = SCRIPTS.sessions.prepare_invoke();
        inv.key(self.keys().active()).key(self.keys().sessions());
        let [active, all] = take::<2>(self.run(&inv).await?)?;
        let all = array(all)?
            .into_iter()
            .map(|v| string(v).map(SessionId))
            .collect::<Result<_, _>>()?;
        Ok((opt_string(active)?, all))
    }

    /// Publish an update, as number `at` of the log when given (see
    /// `Broker::publish_update_at`).
    async fn publish(
        &self,
        session: &SessionId,
        at: Option<UpdateSeq>,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        too_large(payload.len())?;
        let base = self.keys().base(session);
        let blob = self.put(&base, &payload).await?;
        let mut inv = SCRIPTS.publish_update.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(&base)
            .arg(blob.mode())
            .arg(blob.arg())
            .arg(chunk_count(payload.len(), self.chunk()))
            .arg(payload.len())
            .arg(KEY_TTL.as_millis() as u64);
        if let Some(at) = at {
            inv.arg(at);
        }
        uint(&self.run_in(session, &inv).await?)
    }

    /// Decode one entry of the `take_results` script.
    async fn result_of(&self, base: &str, item: Value) -> Result<JobResult, BrokerError> {
        let fields = array(item)?;
        if fields.len() < 9 {
            return Err(bad("a result notice without a job id"));
        }
        let [job, kind, failure, attempts, message, n, len, data, history] =
            take::<9>(Value::Array(fields))?;
        let job = parse_job_id(job)?;
        // Whatever is damaged past the job id fails that job, with what was wrong, instead of
        // leaving its owner waiting for a result that can never be read.
        let attempts: u32 = uint(&attempts).unwrap_or(0);
        let outcome = async {
            Ok(match opt_string(kind)?.as_deref() {
                Some("d") => match opt_bytes(data)? {
                    Some(data) => JobOutcome::Done(Bytes::from(data)),
                    None => {
                        let key = format!("{base}out:{job}");
                        let fetched = self.fetch(&key, uint(&n)?, uint(&len)?).await;
                        let mut cmd;
                        if matches!(fetched, Ok(_) | Err(BrokerError::Protocol(_))) {
                            cmd = redis::cmd("UNLINK");
                            cmd.arg(&key);
                        } else {
                            // Put the notice back so that a retry finds the result again.
                            cmd = redis::cmd("XADD");
                            cmd.arg(format!("{base}results")).arg("*").arg("j").arg(job);
                        }
                        if let Ok(mut conn) = self.conns().control().await {
                            let _ = cmd.query_async::<Value>(&mut conn).await;
                        }
                        JobOutcome::Done(fetched?)
                    }
                },
                Some("f") => JobOutcome::Failed {
                    kind: from_cbor("a job's failure kind", &bytes(failure)?)?,
                    message: string(message)?,
                    history: array(history)?
                        .into_iter()
                        .map(|r| from_cbor("an attempt record", &bytes(r)?))
                        .collect::<Result<_, _>>()?,
                },
                _ => return Err(bad("no result is recorded")),
            })
        }
        .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(BrokerError::Protocol(what)) => {
                tracing::warn!(job, %what, "a job's result in the broker is damaged; the job fails");
                JobOutcome::Failed {
                    kind: JobFailure::Broker,
                    message: format!("its result in the broker is damaged: {what}"),
                    history: Vec::new(),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(JobResult {
            job: JobId(job),
            attempts,
            outcome,
        })
    }

    fn set_job_cursor(&self, worker: &WorkerId, session: &SessionId, last: &str, log_len: u64) {
        let mut cursors = lock(&self.inner.job_cursors);
        if let Some(c) = cursors.get_mut(worker) {
            c.session.clone_from(session);
            c.last.clear();
            c.last.push_str(last);
            c.log_len = log_len;
        } else {
            cursors.insert(
                worker.clone(),
                Cursor {
                    session: session.clone(),
                    last: last.to_string(),
                    log_len,
                },
            );
        }
    }

    /// Decode the jobs a `take` script leased (fetching the chunked payloads).
    async fn leased(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        items: Vec<Value>,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        let base = self.keys().base(session);
        let mut items = items.into_iter().skip(1);
        let log_len: u64 = uint(&items.next().ok_or_else(|| bad("no log length"))?)?;
        let rest: Vec<Value> = items.collect();
        if rest.is_empty() || rest.len() % 8 != 0 {
            return Err(bad(format!("a take reply of {} fields", rest.len())));
        }
        let mut jobs = Vec::with_capacity(rest.len() / 8);
        let mut failure = None;
        let mut fields = rest.into_iter();
        while fields.len() > 0 {
            let mut next = || fields.next().unwrap_or(Value::Nil);
            let (job, attempt, entry, upd, n, len, holder, data) = (
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
                next(),
            );
            let lease = Lease {
                session: session.clone(),
                job: JobId(parse_job_id(job)?),
                attempt: uint(&attempt)?,
                node: node.clone(),
                worker: worker.clone(),
                token: string(entry)?,
            };
            // The job's own fields (lengths, update position) may be damaged: that fails this
            // job's attempt, not the batch.
            let payload = async {
                let update_seq: UpdateSeq = uint(&upd)?;
                let payload = match opt_bytes(data)? {
                    Some(data) => Bytes::from(data),
                    None => match string(holder)? {
                        holder if holder.starts_with(&base) => {
                            self.fetch_leased(&lease, &holder, uint(&n)?, uint(&len)?)
                                .await?
                        }
                        _ => {
                            return Err(bad(format!(
                                "{}'s payload is in a foreign key",
                                lease.job
                            )));
                        }
                    },
                };
                Ok((payload, update_seq))
            }
            .await;
            match payload {
                Ok((payload, update_seq)) => jobs.push(LeasedJob {
                    lease,
                    payload,
                    update_seq,
                    log_len,
                }),
                Err(e) => {
                    // Leased but unreadable: hand it back as a failed attempt now (it fails for
                    // good after max attempts), and still hand out the batch's other jobs.
                    tracing::error!(job = %lease.job, error = %e, "cannot read a leased job's payload");
                    let end = AttemptEnd::Protocol(format!("its payload cannot be read: {e}"));
                    if let Err(e) = self.abandon(&lease, end).await {
                        tracing::warn!(job = %lease.job, error = %e, "cannot hand the job back; its lease will expire");
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if jobs.is_empty() => Err(e),
            _ => Ok(jobs),
        }
    }

    /// One `complete` script call for outcomes of one session (outputs over the inline limit
    /// are staged first).
    async fn complete_batch(
        &self,
        session: &SessionId,
        batch: &[(Lease, Outcome)],
    ) -> Result<Vec<Completion>, BrokerError> {
        let base = self.keys().base(session);
        let mut args = Vec::with_capacity(batch.len());
        for (lease, outcome) in batch {
            let (kind, failure, message, end, blob, len) = match outcome {
                Ok(output) => {
                    too_large(output.len())?;
                    let blob = self.put(&base, output).await?;
                    let len = output.len();
                    (
                        "d",
                        Vec::new(),
                        String::new(),
                        AttemptEnd::Completed,
                        blob,
                        len,
                    )
                }
                Err((kind, end)) => {
                    let message = match end {
                        AttemptEnd::WorkerError(m) | AttemptEnd::Undecodable(m) => m.clone(),
                        other => other.to_string(),
                    };
                    ("f", to_cbor(kind)?, message, end.clone(), Blob::None, 0)
                }
            };
            let record = to_cbor(&AttemptRecord {
                attempt: lease.attempt,
                node: lease.node.clone(),
                worker: lease.worker.clone(),
                end,
            })?;
            args.push((lease, kind, failure, message, record, blob, len));
        }
        let mut inv = SCRIPTS.complete.prepare_invoke();
        inv.key(self.keys().meta(session)).arg(&base);
        for (lease, kind, failure, message, record, blob, len) in &args {
            let chunks = if *kind == "d" {
                chunk_count(*len, self.chunk())
            } else {
                0
            };
            inv.arg(lease.job.0)
                .arg(lease.attempt)
                .arg(&lease.token)
                .arg(&lease.node.0)
                .arg(record)
                .arg(*kind)
                .arg(failure)
                .arg(message)
                .arg(chunks)
                .arg(*len)
                .arg(blob.mode())
                .arg(blob.arg());
        }
        let answers = array(self.run_in(session, &inv).await?)?;
        if answers.len() != batch.len() {
            return Err(bad(format!(
                "{} answers for {} outcomes",
                answers.len(),
                batch.len()
            )));
        }
        answers
            .iter()
            .map(|a| {
                Ok(if int(a)? == 1 {
                    Completion::Accepted
                } else {
                    Completion::Discarded
                })
            })
            .collect()
    }
}

/// `XREAD BLOCK <wait> COUNT 1 STREAMS <streams> <ids>`.
fn xread_block(streams: &[&str], ids: &[&str], wait: Duration) -> redis::Cmd {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("BLOCK")
        .arg(ms)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(streams)
        .arg(ids);
    cmd
}

/// Hand a dedicated connection back after success; discard it after an error.
fn finish<T>(conn: Dedicated<'_>, result: Result<T, redis::RedisError>) -> redis::RedisResult<T> {
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            conn.discard();
            Err(e)
        }
    }
}

impl Broker for RedisBroker {
    fn max_payload(&self) -> usize {
        MAX_PAYLOAD
    }
}

#[async_trait]
impl SessionControl for RedisBroker {
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError> {
        let mut conn = self.conns().control().await?;
        let n: u64 = redis::cmd("INCR")
            .arg(self.keys().session_seq())
            .query_async(&mut conn)
            .await
            .map_err(|e| self.conns().error(e))?;
        drop(conn);
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let id = SessionId(format!("s{n}-{millis:x}"));
        let encoded = to_cbor(spec)?;
        too_large(encoded.len())?;
        let base = self.keys().base(&id);
        let blob = if encoded.len() <= self.inline_max() {
            Blob::Inline(&encoded)
        } else {
            self.stage(&format!("{base}spec"), &encoded).await?;
            Blob::Staged(String::new())
        };
        let lease_ms = u64::try_from(spec.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut inv = SCRIPTS.open_session.prepare_invoke();
        inv.key(self.keys().active())
            .key(self.keys().sessions())
            .key(self.keys().opened())
            .key(self.keys().meta(&id))
            .arg(&id.0)
            .arg(&base)
            .arg(lease_ms)
            .arg(spec.max_attempts)
            .arg(KEY_TTL.as_millis() as u64)
            .arg(blob.mode())
            .arg(blob.arg())
            .arg(chunk_count(encoded.len(), self.chunk()))
            .arg(encoded.len());
        if int(&self.run(&inv).await?)? == 1 {
            let set = [
                lease_ms,
                u64::from(spec.max_attempts),
                chunk_count(encoded.len(), self.chunk()) as u64,
                encoded.len() as u64,
            ];
            *lock(&self.inner.opened) = Some((id.clone(), set));
            return Ok(Some(SessionInfo {
                id,
                spec: spec.clone(),
            }));
        }
        if matches!(blob, Blob::Staged(_)) {
            let mut conn = self.conns().control().await?;
            let _ = redis::cmd("UNLINK")
                .arg(format!("{base}spec"))
                .query_async::<Value>(&mut conn)
                .await;
        }
        Ok(None)
    }
    async fn keep_session_alive(&self, session: &SessionId) -> Result<SessionState, BrokerError> {
        let mut inv = SCRIPTS.keep_alive.prepare_invoke();
        inv.key(self.keys().active())
            .key(self.keys().meta(session))
            .arg(&session.0)
            .arg(self.keys().base(session))
            .arg(KEY_TTL.as_millis() as u64);
        if let Some((_, set)) = lock(&self.inner.opened)
            .as_ref()
            .filter(|(id, _)| id == session)
        {
            for value in set {
                inv.arg(*value);
            }
        }
        Ok(if int(&self.run(&inv).await?)? == 1 {
            SessionState::Active
        } else {
            SessionState::Gone
        })
    }
    async fn close_session(&self, session: &SessionId) -> Result<(), BrokerError> {
        self.purge(session, false).await
    }
    async fn active_session(&self, wait: Duration) -> Result<Option<SessionInfo>, BrokerError> {
        let deadline = Instant::now() + wait;
        let opened = self.keys().opened();
        loop {
            let mut inv = SCRIPTS.active.prepare_invoke();
            inv.key(self.keys().active())
                .key(&opened)
                .arg(self.keys().prefix())
                .arg(self.inline_max());
            let mut items = array(self.run(&inv).await?)?.into_iter();
            let flag = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
            if flag == 1 {
                let [id, n, len, data] = take::<4>(Value::Array(items.collect()))?;
                let id = SessionId(string(id)?);
                let spec = match opt_bytes(data)? {
                    Some(data) => Bytes::from(data),
                    None => {
                        let key = format!("{}spec", self.keys().base(&id));
                        match self.fetch(&key, uint(&n)?, uint(&len)?).await {
                            Ok(spec) => spec,
                            // Closed between the two reads: look again.
                            Err(BrokerError::Protocol(_)) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                };
                return Ok(Some(SessionInfo {
                    id,
                    spec: from_cbor("a session spec", &spec)?,
                }));
            }
            let last = string(items.next().ok_or_else(|| bad("no stream id"))?)?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let woke = self
                .wait_streams(&[&opened], &[&last], deadline - now)
                .await?;
            if woke.is_empty() {
                return Ok(None);
            }
        }
    }
}

#[async_trait]
impl JobQueue for RedisBroker {
    async fn lost_jobs(
        &self,
        session: &SessionId,
        jobs: &[JobId],
    ) -> Result<Vec<JobId>, BrokerError> {
        let mut lost = Vec::new();
        // Jobs whose results are being read now are not lost.
        let jobs: Vec<JobId> = {
            let reading = lock(&self.inner.reading);
            jobs.iter()
                .filter(|j| !reading.contains(&(session.clone(), j.0)))
                .copied()
                .collect()
        };
        for batch in jobs.chunks(LOST_BATCH) {
            let mut inv = SCRIPTS.lost.prepare_invoke();
            inv.key(self.keys().meta(session))
                .arg(self.keys().base(session));
            for job in batch {
                inv.arg(job.0);
            }
            for id in array(self.run_in(session, &inv).await?)? {
                lost.push(JobId(parse_job_id(id)?));
            }
        }
        Ok(lost)
    }
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError> {
        for job in &jobs {
            too_large(job.payload.len())?;
        }
        let base = self.keys().base(session);
        let meta = self.keys().meta(session);
        let mut batch: Vec<(&NewJob, Blob<'_>)> = Vec::new();
        let mut bytes = 0;
        for (i, job) in jobs.iter().enumerate() {
            let blob = self.put(&base, &job.payload).await?;
            bytes += blob.arg().len();
            batch.push((job, blob));
            let last = i + 1 == jobs.len();
            if !(last || bytes >= SUBMIT_BATCH_BYTES || batch.len() >= SUBMIT_BATCH_JOBS) {
                continue;
            }
            let mut inv = SCRIPTS.submit.prepare_invoke();
            inv.key(&meta).arg(&base);
            for (job, blob) in &batch {
                inv.arg(job.id.0)
                    .arg(job.update_seq)
                    .arg(chunk_count(job.payload.len(), self.chunk()))
                    .arg(job.payload.len())
                    .arg(blob.mode())
                    .arg(blob.arg());
            }
            self.run_in(session, &inv).await?;
            batch.clear();
            bytes = 0;
        }
        Ok(())
    }
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        let deadline = Instant::now() + wait;
        let base = self.keys().base(session);
        let results_key = format!("{base}results");
        let mut inv = SCRIPTS.take_results.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(&base)
            .arg(max.max(1))
            .arg(self.inline_max());
        let cursor = lock(&self.inner.result_cursor)
            .as_ref()
            .filter(|(s, _)| s == session)
            .map(|(_, last)| last.clone());
        let mut reply = match cursor {
            Some(last) if !wait.is_zero() => {
                self.wait_then_run(session, &[&results_key], &[&last], wait, &inv)
                    .await?
            }
            _ => self.run_in(session, &inv).await?,
        };
        loop {
            let mut items = array(reply)?.into_iter();
            let flag = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
            let last = string(items.next().ok_or_else(|| bad("no stream id"))?)?;
            *lock(&self.inner.result_cursor) = Some((session.clone(), last.clone()));
            if flag == 1 {
                let items: Vec<Value> = items.collect();
                let jobs: Vec<(SessionId, u64)> = items
                    .iter()
                    .filter_map(|item| match item {
                        Value::Array(fields) => fields.first().cloned(),
                        _ => None,
                    })
                    .filter_map(|id| parse_job_id(id).ok())
                    .map(|id| (session.clone(), id))
                    .collect();
                lock(&self.inner.reading).extend(jobs.iter().cloned());
                let _reading = Reading {
                    set: &self.inner.reading,
                    jobs,
                };
                let mut got = Vec::new();
                let mut first_error = None;
                for item in items {
                    match self.result_of(&base, item).await {
                        Ok(r) => got.push(r),
                        Err(e) => {
                            tracing::error!(session = %session, error = %e, "dropping a result notice that cannot be read");
                            first_error.get_or_insert(e);
                        }
                    }
                }
                return match first_error {
                    Some(e) if got.is_empty() => Err(e),
                    _ => Ok(got),
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            reply = self
                .wait_then_run(session, &[&results_key], &[&last], deadline - now, &inv)
                .await?;
        }
    }
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        let deadline = Instant::now() + wait;
        let base = self.keys().base(session);
        let jobs_key = format!("{base}jobs");
        let upd_key = format!("{base}upd");
        let mut first_log = None;
        let mut inv = SCRIPTS.take.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(&base)
            .arg(&node.0)
            .arg(&worker.0)
            .arg(self.inline_max())
            .arg(max.clamp(1, TAKE_BATCH_JOBS))
            .arg(TAKE_BATCH_BYTES)
            .arg(to_cbor(&JobFailure::Broker)?);
        let cursor = lock(&self.inner.job_cursors)
            .get(worker)
            .filter(|c| c.session == *session)
            .cloned();
        let mut reply = match cursor {
            Some(c) if !wait.is_zero() => {
                first_log = Some(c.log_len);
                let log_id = format!("{}-0", c.log_len);
                self.wait_then_run(
                    session,
                    &[&jobs_key, &upd_key],
                    &[&c.last, &log_id],
                    wait,
                    &inv,
                )
                .await?
            }
            _ => self.run_in(session, &inv).await?,
        };
        loop {
            let items = array(reply)?;
            let flag = int(items.first().ok_or_else(|| bad("empty reply"))?)?;
            if flag == 1 {
                let jobs = self.leased(session, node, worker, items).await?;
                if let Some(job) = jobs.last() {
                    self.set_job_cursor(worker, session, &job.lease.token, job.log_len);
                }
                return Ok(jobs);
            }
            let [_, last, log_len] = take::<3>(Value::Array(items))?;
            let log_len: u64 = uint(&log_len)?;
            let last = string(last)?;
            self.set_job_cursor(worker, session, &last, log_len);
            if *first_log.get_or_insert(log_len) != log_len {
                // An update arrived: hand back nothing so the idle worker applies it now.
                return Ok(Vec::new());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let log_id = format!("{log_len}-0");
            reply = self
                .wait_then_run(
                    session,
                    &[&jobs_key, &upd_key],
                    &[&last, &log_id],
                    deadline - now,
                    &inv,
                )
                .await?;
        }
    }
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Completion, BrokerError> {
        let answers = self.complete_many(vec![(lease.clone(), outcome)]).await?;
        answers
            .into_iter()
            .next()
            .ok_or_else(|| bad("no answer for the outcome"))
    }
    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        let mut answers = Vec::with_capacity(outcomes.len());
        // One script call per session and per few MiB of inline output.
        let mut rest = outcomes.as_slice();
        while let Some((first, _)) = rest.first() {
            let session = &first.session;
            let mut bytes = 0;
            let n = rest
                .iter()
                .take_while(|(lease, outcome)| {
                    let size = match outcome {
                        Ok(b) if b.len() <= self.inline_max() => b.len(),
                        _ => 0,
                    };
                    let fits = lease.session == *session
                        && (bytes == 0 || bytes + size <= SUBMIT_BATCH_BYTES);
                    bytes += size;
                    fits
                })
                .count()
                .max(1);
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            answers.extend(self.complete_batch(session, batch).await?);
        }
        Ok(answers)
    }
    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> Result<Abandoned, BrokerError> {
        let held = Held {
            job: lease.job.0,
            attempt: lease.attempt,
            entry: lease.token.clone(),
            node: lease.node.clone(),
            worker: lease.worker.clone(),
        };
        self.end_attempt(&lease.session, &held, end, false).await
    }
}

#[async_trait]
impl UpdateLog for RedisBroker {
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.publish(session, None, payload).await
    }
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.publish(session, Some(seq), payload).await
    }
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> Result<Vec<(UpdateSeq, Bytes)>, BrokerError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let base = self.keys().base(session);
        let mut inv = SCRIPTS.read_updates.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(&base)
            .arg(after)
            .arg(max)
            .arg(UPDATE_READ_BYTES);
        let items = array(self.run_in(session, &inv).await?)?;
        let mut out = Vec::new();
        let mut it = items.into_iter();
        while let (Some(seq), Some(data), Some(n), Some(len)) =
            (it.next(), it.next(), it.next(), it.next())
        {
            let seq: UpdateSeq = match seq {
                Value::Nil => return Err(bad("an update entry without a sequence number")),
                v => uint(&v)?,
            };
            let payload = match (opt_bytes(data)?, n, len) {
                (Some(data), _, _) => Bytes::from(data),
                (None, Value::Nil, _) | (None, _, Value::Nil) => {
                    return Err(bad(format!("update {seq} has neither a body nor chunks")));
                }
                (None, n, len) => {
                    self.fetch(&format!("{base}updb:{seq}"), uint(&n)?, uint(&len)?)
                        .await?
                }
            };
            out.push((seq, payload));
        }
        Ok(out)
    }
}

#[async_trait]
impl NodeRegistry for RedisBroker {
    async fn reap_expired(&self) -> Result<usize, BrokerError> {
        let mut reaped = 0;
        let Some(session) = self.purge_dead().await? else {
            return Ok(0);
        };
        // Expired leases exist only in the active session: the others were just purged.
        let held = match self.pending(&session, "lease", "").await {
            Err(BrokerError::SessionGone(_)) => return Ok(0),
            other => other?,
        };
        for h in held {
            match self
                .end_attempt(&session, &h, AttemptEnd::LeaseExpired, true)
                .await
            {
                Ok(Abandoned::Stale) | Err(BrokerError::SessionGone(_)) => {}
                Ok(_) => {
                    tracing::warn!(job = h.job, node = %h.node, attempt = h.attempt, "lease expired: job goes back to the queue");
                    reaped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        reaped += self.reap_gone_nodes(&session).await?;
        Ok(reaped)
    }
    async fn heartbeat(&self, status: &NodeStatus) -> Result<(), BrokerError> {
        let mut presence = self.inner.presence.lock().await;
        if presence.as_ref().map(|(node, _)| node) != Some(&status.node) {
            let name = self.presence_name(&status.node);
            *presence = Some((status.node.clone(), self.conns().named(&name).await?));
        }
        let Some((_, conn)) = presence.as_mut() else {
            return Err(bad("no presence connection"));
        };
        let beat = self.beat_on(conn, status).await;
        if let Err(BrokerError::Connection(_)) = &beat {
            // Broken: a new one next beat (the node is absent from CLIENT LIST meanwhile).
            *presence = None;
        }
        drop(presence);
        beat?;
        if self.inner.beats.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            self.purge_dead().await?;
        }
        Ok(())
    }
    async fn leave(&self, node: &NodeId) -> Result<(), BrokerError> {
        let mut conn = self.conns().control().await?;
        redis::pipe()
            .cmd("ZREM")
            .arg(self.keys().nodes())
            .arg(&node.0)
            .cmd("DEL")
            .arg(self.keys().node(node))
            .query_async::<Value>(&mut conn)
            .await
            .map_err(|e| self.conns().error(e))?;
        drop(conn);
        let (_, sessions) = self.sessions().await?;
        for session in sessions {
            let held = match self.pending(&session, "any", &node.0).await {
                Err(BrokerError::SessionGone(_)) => continue,
                other => other?,
            };
            for h in held {
                match self
                    .end_attempt(&session, &h, AttemptEnd::NodeLeft, false)
                    .await
                {
                    Ok(_) | Err(BrokerError::SessionGone(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
    async fn report_problem(
        &self,
        session: &SessionId,
        problem: NodeProblem,
    ) -> Result<(), BrokerError> {
        let mut inv = SCRIPTS.report_problem.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(to_cbor(&problem)?);
        self.run_in(session, &inv).await?;
        Ok(())
    }
}

#[async_trait]
impl Inspect for RedisBroker {
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError> {
        let mut inv = SCRIPTS.stats.prepare_invoke();
        inv.key(self.keys().meta(session))
            .key(self.keys().nodes())
            .arg(self.keys().base(session))
            .arg(self.keys().node_prefix());
        let [q, r, d, f, problems, statuses] = take::<6>(self.run_in(session, &inv).await?)?;
        let count = |v: &Value| int(v).map(|i| usize::try_from(i).unwrap_or(0));
        let mut stats = SessionStats {
            queued: count(&q)?,
            running: count(&r)?,
            done: count(&d)?,
            failed: count(&f)?,
            problems: array(problems)?
                .into_iter()
                .map(|p| from_cbor::<NodeProblem>("a node problem", &bytes(p)?))
                .collect::<Result<_, _>>()?,
            ..SessionStats::default()
        };
        for raw in array(statuses)? {
            let status: NodeStatus = match from_cbor("a node status", &bytes(raw)?) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a node status that cannot be read");
                    continue;
                }
            };
            stats.count_node(&status, session);
        }
        Ok(stats)
    }
    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError> {
        let mut inv = SCRIPTS.nodes.prepare_invoke();
        inv.key(self.keys().nodes())
            .arg(u64::try_from(within.as_millis()).unwrap_or(u64::MAX))
            .arg(self.keys().node_prefix());
        let mut items = array(self.run(&inv).await?)?.into_iter();
        let now = int(&items.next().ok_or_else(|| bad("empty reply"))?)?;
        let mut seen = Vec::new();
        // One node's unreadable entry must not hide the others: it is skipped, and said.
        let mut unreadable = 0usize;
        for item in items {
            let entry = (|| {
                let [_, at, status] = take::<3>(item)?;
                let Some(status) = opt_bytes(status)? else {
                    return Ok(None);
                };
                let ago = u64::try_from(now.saturating_sub(int(&at)?)).unwrap_or(0);
                Ok::<_, BrokerError>(Some(NodeSeen {
                    status: from_cbor("a node status", &status)?,
                    ago: Duration::from_millis(ago),
                }))
            })();
            match entry {
                Ok(Some(node)) => seen.push(node),
                Ok(None) => {}
                Err(e) => {
                    unreadable += 1;
                    tracing::debug!(error = %e, "a node entry cannot be read");
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                unreadable,
                "skipped node entries in the broker that cannot be read"
            );
        }
        seen.sort_by(|a, b| a.status.node.cmp(&b.status.node));
        Ok(seen)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
