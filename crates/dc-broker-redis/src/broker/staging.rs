//! Payloads too big to travel inside a script call: written by chunks before the script runs,
//! read by chunks after it answered.
//!
//! 1. A payload up to the inline limit (256 KiB, or `chunk_size` if smaller) goes inside the
//!    script call ([`Blob::Inline`]).
//! 2. A larger one is written first, chunk by chunk (`HSET <stage key> c<i>`, one command per
//!    chunk on a bulk connection), into a staging key that expires by itself if the writer
//!    dies; the script then renames the staged key into place ([`Blob::Staged`]).
//! 3. A reader gets the chunk count and total length from a script and `HGET`s the chunks on a
//!    bulk connection, checking both numbers before it allocates and the bytes as they come.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use dc_core::BrokerError;
use dc_core::broker::{Lease, SessionId};
use redis::Value;

use super::replies::Payload;
use super::scripts::SCRIPTS;
use super::{KEY_TTL_MS, MAX_PAYLOAD, RedisBroker};
use crate::codec::bad;
use crate::conn::Kind;
use crate::keys::chunk_field;

/// How often a lease is renewed while its job's payload is fetched.
const FETCH_RENEW_EVERY: Duration = Duration::from_millis(500);

/// Where a payload travels: inside the script call, or staged by chunks under a key.
pub(super) enum Blob<'a> {
    Inline(&'a [u8]),
    Staged(String),
    None,
}

impl Blob<'_> {
    /// The script argument saying where the payload is.
    pub(super) fn mode(&self) -> &'static str {
        match self {
            Blob::Inline(_) => "i",
            Blob::Staged(_) => "s",
            Blob::None => "n",
        }
    }

    /// The script argument carrying the payload, or the staged key.
    pub(super) fn arg(&self) -> &[u8] {
        match self {
            Blob::Inline(data) => data,
            Blob::Staged(key) => key.as_bytes(),
            Blob::None => b"",
        }
    }
}

/// Chunks a payload of `len` bytes takes (at least one).
pub(super) fn chunk_count(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk.max(1)).max(1)
}

/// Refuse a payload over [`MAX_PAYLOAD`].
pub(super) fn too_large(size: usize) -> Result<(), BrokerError> {
    if size > MAX_PAYLOAD {
        return Err(BrokerError::PayloadTooLarge {
            size,
            limit: MAX_PAYLOAD,
        });
    }
    Ok(())
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

impl RedisBroker {
    /// Put a payload of `session` where a script can take it: inline when small, else staged
    /// by chunks.
    pub(super) async fn put<'a>(
        &self,
        session: &SessionId,
        data: &'a [u8],
    ) -> Result<Blob<'a>, BrokerError> {
        if data.len() <= self.inline_max() {
            return Ok(Blob::Inline(data));
        }
        let key = self.keys().stage(session, &unique());
        self.stage(&key, data).await?;
        Ok(Blob::Staged(key))
    }

    /// Write `data` by chunks (`c0`, `c1`…) into the hash `key`, one command per chunk, on a
    /// bulk connection.
    pub(super) async fn stage(&self, key: &str, data: &[u8]) -> Result<(), BrokerError> {
        let mut conn = self.conns().dedicated(Kind::Bulk).await?;
        let result = async {
            for (i, chunk) in data.chunks(self.chunk()).enumerate() {
                let mut pipe = redis::pipe();
                pipe.cmd("HSET").arg(key).arg(chunk_field(i)).arg(chunk);
                if i == 0 {
                    // A stage left behind by a crash goes away by itself.
                    pipe.cmd("PEXPIRE").arg(key).arg(KEY_TTL_MS);
                }
                pipe.query_async::<Value>(conn.conn()).await?;
            }
            Ok::<(), redis::RedisError>(())
        }
        .await;
        conn.finish(result).map_err(|e| self.conns().error(e))
    }

    /// The bytes of a payload a script handed over: its own, or fetched by chunks.
    pub(super) async fn load(&self, payload: Payload) -> Result<Bytes, BrokerError> {
        match payload {
            Payload::Inline(data) => Ok(Bytes::from(data)),
            Payload::Chunked { key, n, len } => self.fetch(&key, n, len).await,
        }
    }

    /// Read `n` chunks of the hash `key`, checking they add up to `len` bytes. Both numbers
    /// come from the broker, so they are checked before anything is allocated for them: at
    /// most `MAX_PAYLOAD` bytes, at least one chunk and no more chunks than bytes, and a length
    /// that `n` chunks the size of the first one can hold; the bytes read never run past `len`.
    pub(super) async fn fetch(
        &self,
        key: &str,
        n: usize,
        len: usize,
    ) -> Result<Bytes, BrokerError> {
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
                    .arg(chunk_field(i))
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
        let out = conn.finish(result).map_err(|e| self.conns().error(e))?;
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
    pub(super) async fn fetch_leased(
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
}
