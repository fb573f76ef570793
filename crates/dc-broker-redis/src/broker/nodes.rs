//! [`NodeRegistry`] on Redis: heartbeats (see `presence.rs`), reaping expired leases and dead
//! nodes' leases, a node leaving, and node problems.
//!
//! 1. `reap_expired` purges sessions no longer active, then ends the active session's leases
//!    idle past the lease (`LeaseExpired`), then those of nodes whose process died.
//! 2. `heartbeat` beats on the node's presence connection; every `PURGE_EVERY`-th beat also
//!    purges dead sessions, so a pool that vanished is cleaned up even if no pool reaps.
//! 3. `leave` forgets the node and ends its leases in every session (`NodeLeft`, not counted
//!    as a failure).

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use dc_core::BrokerError;
use dc_core::broker::{
    Abandoned, AttemptEnd, NodeId, NodeProblem, NodeRegistry, NodeStatus, SessionId,
};
use redis::Value;

use super::RedisBroker;
use super::scripts::SCRIPTS;
use crate::codec::to_cbor;

/// Every this many heartbeats a node also deletes the keys of sessions that expired, so a pool
/// that vanished is cleaned up even if no other pool calls `reap_expired`.
const PURGE_EVERY: u64 = 32;

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
        self.beat(status).await?;
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
            self.end_leases_of(&session, node).await?;
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

impl RedisBroker {
    /// End every lease `node` holds in `session`, as a node that left.
    async fn end_leases_of(&self, session: &SessionId, node: &NodeId) -> Result<(), BrokerError> {
        let held = match self.pending(session, "any", &node.0).await {
            Err(BrokerError::SessionGone(_)) => return Ok(()),
            other => other?,
        };
        for h in held {
            match self
                .end_attempt(session, &h, AttemptEnd::NodeLeft, false)
                .await
            {
                Ok(_) | Err(BrokerError::SessionGone(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
