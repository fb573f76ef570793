//! [`SessionControl`] on Redis: the active-session pointer (`P:active`, `SET NX PX lease`),
//! the registry of sessions (`P:sessions`), and purging a session's keys.
//!
//! 1. `try_open_session` takes a new id from `P:session-seq`, stages a big spec, and runs
//!    `open_session.lua`, which takes the pointer only if no session holds it.
//! 2. `keep_session_alive` renews the pointer and the session's 24 h TTLs; the client sends
//!    what it set when it opened the session, so a damaged `meta` answers Gone.
//! 3. `active_session` reads the pointer and the spec; with none, it waits on the `P:opened`
//!    stream, which every opening appends to.
//! 4. A session is purged (`close_session.lua`, then `SCAN` + `UNLINK` of every key under its
//!    hash tag) when closed, and once it is no longer active by [`RedisBroker::purge_dead`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dc_core::BrokerError;
use dc_core::broker::{SessionControl, SessionId, SessionInfo, SessionSpec, SessionState};
use dc_core::util::lock;
use redis::Value;
use tokio::time::Instant;

use super::replies::{Active, active_reply, flag_reply, sessions_reply};
use super::scripts::SCRIPTS;
use super::staging::{Blob, chunk_count, too_large};
use super::{KEY_TTL_MS, RedisBroker};
use crate::codec::{from_cbor, to_cbor};

#[async_trait]
impl SessionControl for RedisBroker {
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError> {
        let n: u64 = self
            .command(redis::cmd("INCR").arg(self.keys().session_seq()))
            .await?;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let id = SessionId(format!("s{n}-{millis:x}"));
        let encoded = to_cbor(spec)?;
        too_large(encoded.len())?;
        let blob = if encoded.len() <= self.inline_max() {
            Blob::Inline(&encoded)
        } else {
            self.stage(&self.keys().spec(&id), &encoded).await?;
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
            .arg(self.keys().base(&id))
            .arg(lease_ms)
            .arg(spec.max_attempts)
            .arg(KEY_TTL_MS)
            .arg(blob.mode())
            .arg(blob.arg())
            .arg(chunk_count(encoded.len(), self.chunk()))
            .arg(encoded.len());
        if flag_reply(&self.run(&inv).await?)? {
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
            let _ = self
                .command::<Value>(redis::cmd("UNLINK").arg(self.keys().spec(&id)))
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
            .arg(KEY_TTL_MS);
        if let Some((_, set)) = lock(&self.inner.opened)
            .as_ref()
            .filter(|(id, _)| id == session)
        {
            for value in set {
                inv.arg(*value);
            }
        }
        Ok(if flag_reply(&self.run(&inv).await?)? {
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
            let last = match active_reply(self.run(&inv).await?, self.keys())? {
                Active::Open { id, spec } => {
                    let spec = match self.load(spec).await {
                        Ok(spec) => spec,
                        // Closed between the two reads: look again.
                        Err(BrokerError::Protocol(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    return Ok(Some(SessionInfo {
                        id,
                        spec: from_cbor("a session spec", &spec)?,
                    }));
                }
                Active::None { last } => last,
            };
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

impl RedisBroker {
    /// Close `session` (only if it is not the active one, when `only_inactive`), then delete
    /// every key left under its hash tag.
    pub(super) async fn purge(
        &self,
        session: &SessionId,
        only_inactive: bool,
    ) -> Result<(), BrokerError> {
        let mut inv = SCRIPTS.close_session.prepare_invoke();
        inv.key(self.keys().active())
            .key(self.keys().sessions())
            .arg(&session.0)
            .arg(self.keys().base(session))
            .arg(if only_inactive { "1" } else { "0" });
        if !flag_reply(&self.run(&inv).await?)? {
            return Ok(());
        }
        let pattern = self.keys().session_pattern(session);
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
    pub(super) async fn purge_dead(&self) -> Result<Option<SessionId>, BrokerError> {
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
    pub(super) async fn sessions(&self) -> Result<(Option<String>, Vec<SessionId>), BrokerError> {
        let mut inv = SCRIPTS.sessions.prepare_invoke();
        inv.key(self.keys().active()).key(self.keys().sessions());
        sessions_reply(self.run(&inv).await?)
    }
}
