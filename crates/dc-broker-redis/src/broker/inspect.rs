//! [`Inspect`] on Redis: a session's counters, problems and workers (`stats.lua`, counters kept
//! exact by the scripts that move jobs), and the nodes heard from (`nodes.lua`, ages on the
//! server's clock). One node's unreadable status is skipped, and said, rather than hiding the
//! others.

use std::time::Duration;

use async_trait::async_trait;
use dc_core::BrokerError;
use dc_core::broker::{Inspect, NodeSeen, SessionId, SessionStats};

use super::RedisBroker;
use super::replies::{nodes_reply, stats_reply};
use super::scripts::SCRIPTS;

#[async_trait]
impl Inspect for RedisBroker {
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError> {
        let mut inv = SCRIPTS.stats.prepare_invoke();
        inv.key(self.keys().meta(session))
            .key(self.keys().nodes())
            .arg(self.keys().base(session))
            .arg(self.keys().node_prefix());
        let reply = stats_reply(self.run_in(session, &inv).await?)?;
        let mut stats = SessionStats {
            queued: reply.queued,
            running: reply.running,
            done: reply.done,
            failed: reply.failed,
            problems: reply.problems,
            ..SessionStats::default()
        };
        for status in reply.statuses {
            match status {
                Ok(status) => stats.count_node(&status, session),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a node status that cannot be read");
                }
            }
        }
        Ok(stats)
    }

    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError> {
        let mut inv = SCRIPTS.nodes.prepare_invoke();
        inv.key(self.keys().nodes())
            .arg(u64::try_from(within.as_millis()).unwrap_or(u64::MAX))
            .arg(self.keys().node_prefix());
        let reply = nodes_reply(self.run(&inv).await?)?;
        let mut seen = Vec::new();
        let mut unreadable = 0usize;
        for row in reply.rows {
            match row {
                Ok(Some(node)) => seen.push(NodeSeen {
                    ago: Duration::from_millis(
                        u64::try_from(reply.now.saturating_sub(node.at)).unwrap_or(0),
                    ),
                    status: node.status,
                }),
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
