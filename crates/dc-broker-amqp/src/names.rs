//! The names of everything this backend declares in RabbitMQ, under one namespace (`dc` by
//! default), so several deployments (or test runs) can share a vhost.

use dc_core::broker::NodeId;

/// Longest queue name AMQP allows, in bytes.
const MAX_NAME: usize = 255;

/// Queue names under a namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    ns: String,
}

impl Names {
    pub(crate) fn new(ns: &str) -> Self {
        Names { ns: ns.to_string() }
    }

    /// The session queue: requests to the pool hosting the session; declared exclusive by
    /// that pool, it is also the one-session-at-a-time lock.
    pub(crate) fn session(&self) -> String {
        format!("{}.session", self.ns)
    }

    /// The session's second request queue, for requests too big for the first: a heartbeat
    /// never waits behind a big payload in one queue.
    pub(crate) fn session_bulk(&self) -> String {
        format!("{}.session.bulk", self.ns)
    }

    /// The node registry: a stream of node heartbeats, read by `status`.
    pub(crate) fn registry(&self) -> String {
        format!("{}.nodes", self.ns)
    }

    /// A node's presence queue: exists exactly while the node's connection does.
    pub(crate) fn presence(&self, node: &NodeId) -> String {
        let name = format!("{}.node.{}", self.ns, node.0);
        if name.len() <= MAX_NAME {
            return name;
        }
        // A very long node id: its hash (FNV-1a, the same in every build) keeps the name
        // within the limit.
        let hash = node.0.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{}.node.#{hash:016x}", self.ns)
    }
}

/// Whether `ns` can prefix queue names: 1 to 64 of `[A-Za-z0-9_.-]`, leaving room for the
/// rest of each name.
pub(crate) fn valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !ns.starts_with("amq.")
}
