//! Heartbeats, and noticing nodes whose process died.
//!
//! 1. A node's heartbeats go over a connection of its own, named `dc-node:<prefix>:<node>`
//!    with `CLIENT SETNAME`, so no other traffic can delay them. `heartbeat.lua` stamps the
//!    node; then, per session, `renew.lua` renews exactly the leases the node lists.
//! 2. While the node process lives, its named connection is in the server's `CLIENT LIST`;
//!    when the process dies, the kernel closes its sockets at once and the name is gone.
//! 3. The reaper looks for the named connection of every node holding a lease; a node seen
//!    absent by looks at least `NODE_GONE_AFTER` apart has its leases ended (`NodeGone`),
//!    much sooner than the lease would expire. A cut-off node keeps its connection open on the
//!    server's side and is left to the lease.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use dc_core::BrokerError;
use dc_core::broker::{Abandoned, AttemptEnd, Lease, NodeId, NodeStatus, SessionId};
use dc_core::util::lock;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::scripts::SCRIPTS;
use super::{KEY_TTL_MS, RedisBroker};
use crate::codec::{bad, to_cbor};
use crate::keys::PRESENCE_PREFIX;

/// How long a lease holder's presence connection must be missing before its leases go.
const NODE_GONE_AFTER: Duration = Duration::from_millis(400);

impl RedisBroker {
    /// One heartbeat over the node's presence connection, made (and named) when missing.
    pub(super) async fn beat(&self, status: &NodeStatus) -> Result<(), BrokerError> {
        let mut presence = self.inner.presence.lock().await;
        if presence.as_ref().map(|(node, _)| node) != Some(&status.node) {
            let name = self.keys().presence_name(&status.node);
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
        beat
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
            .arg(KEY_TTL_MS);
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

    /// Names of the presence connections open now (`CLIENT LIST`).
    async fn present_nodes(&self) -> Result<HashSet<String>, BrokerError> {
        let list: String = self
            .command(redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("normal"))
            .await?;
        Ok(list
            .lines()
            .filter_map(|line| {
                line.split(' ')
                    .find_map(|field| field.strip_prefix("name="))
                    .filter(|name| name.starts_with(PRESENCE_PREFIX))
                    .map(str::to_string)
            })
            .collect())
    }

    /// End the leases in `session` of nodes whose process died (see the module docs); returns
    /// how many went back to the queue or failed.
    pub(super) async fn reap_gone_nodes(&self, session: &SessionId) -> Result<usize, BrokerError> {
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
                    if present.contains(&self.keys().presence_name(node)) {
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
}
