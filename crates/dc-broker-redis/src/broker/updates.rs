//! [`UpdateLog`] on Redis: the session's `upd` stream, whose entry ids are the update
//! sequence numbers (`<seq>-0`), so the log's length is its last number.
//!
//! 1. `publish_update` stages a big body, then `publish_update.lua` appends it as number
//!    `XLEN + 1`; given the number it must get, a log that already holds it adds nothing (a
//!    retry after a lost answer).
//! 2. `read_updates` reads entries after a number, at most 8 MiB inline per call (at least one
//!    update), fetching chunked bodies from `updb:<seq>`.

use async_trait::async_trait;
use bytes::Bytes;
use dc_core::BrokerError;
use dc_core::broker::{SessionId, UpdateLog, UpdateSeq};

use super::replies::updates_reply;
use super::scripts::SCRIPTS;
use super::staging::{chunk_count, too_large};
use super::{KEY_TTL_MS, RedisBroker};
use crate::codec::uint;

/// Inline update bytes one `read_updates` call returns (at least one update is returned).
const UPDATE_READ_BYTES: usize = 8 << 20;

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
        let mut inv = SCRIPTS.read_updates.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(after)
            .arg(max)
            .arg(UPDATE_READ_BYTES);
        let rows = updates_reply(self.run_in(session, &inv).await?, self.keys(), session)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push((row.seq, self.load(row.payload).await?));
        }
        Ok(out)
    }
}

impl RedisBroker {
    /// Publish an update, as number `at` of the log when given (see
    /// [`UpdateLog::publish_update_at`]).
    async fn publish(
        &self,
        session: &SessionId,
        at: Option<UpdateSeq>,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        too_large(payload.len())?;
        let blob = self.put(session, &payload).await?;
        let mut inv = SCRIPTS.publish_update.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(blob.mode())
            .arg(blob.arg())
            .arg(chunk_count(payload.len(), self.chunk()))
            .arg(payload.len())
            .arg(KEY_TTL_MS);
        if let Some(at) = at {
            inv.arg(at);
        }
        uint(&self.run_in(session, &inv).await?)
    }
}
