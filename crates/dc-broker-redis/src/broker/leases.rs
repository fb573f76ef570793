//! Listing and ending leases without a result: the lease reaper, a node that leaves, a worker
//! that hands its job back, and the presence reaper (`presence.rs`) all end attempts here.
//!
//! 1. `pending.lua` lists a session's leases: those idle past the lease (`XPENDING IDLE`, the
//!    lease clock that only the owner's renewals reset), or every lease, of one node or all.
//! 2. `end_attempt.lua` ends one, fenced on its attempt, entry and node (and, for the reaper,
//!    re-checking the idle time atomically, since a renewal may have landed): the attempt is
//!    recorded, counted as a failure unless the node left, and the job is queued again as a
//!    new entry, or fails for good (`Exhausted`) once out of attempts.
//! 3. A lease ended meanwhile by someone else answers `Stale`, which is not an error.

use dc_core::BrokerError;
use dc_core::JobFailure;
use dc_core::broker::{Abandoned, AttemptEnd, AttemptRecord, SessionId};

use super::RedisBroker;
use super::replies::{Held, end_attempt_reply, pending_reply};
use super::scripts::SCRIPTS;
use crate::codec::to_cbor;

/// Leases one reaper or leave pass looks at per session.
const PENDING_PAGE: usize = 1000;

impl RedisBroker {
    /// Leases held in `session`: those idle past the lease (`"lease"`) or all (`"any"`), of one
    /// node or of all (`""`). A lease record that cannot be read is skipped (and said).
    pub(super) async fn pending(
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
        let rows = pending_reply(self.run_in(session, &inv).await?)?;
        let mut held = Vec::with_capacity(rows.len());
        for row in rows {
            // One unreadable entry must not keep the others from being reaped.
            match row {
                Ok(h) => held.push(h),
                Err(e) => {
                    tracing::warn!(session = %session, error = %e, "skipping a lease record that cannot be read")
                }
            }
        }
        Ok(held)
    }

    /// End a leased attempt without a result; `idle_check`: only if idle past the lease.
    pub(super) async fn end_attempt(
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
        end_attempt_reply(self.run_in(session, &inv).await?)
    }
}
