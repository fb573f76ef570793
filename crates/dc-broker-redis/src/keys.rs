//! Key names. Global keys sit under the prefix; a session's keys under `<prefix>:{<session>}:`,
//! one hash tag, so every script touching them stays in one cluster slot.

use dc_core::broker::{NodeId, SessionId};

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// STRING, PX = lease: the active session's id.
    pub(crate) fn active(&self) -> String {
        format!("{}:active", self.prefix)
    }

    /// ZSET session id → opening time: sessions not yet closed or purged.
    pub(crate) fn sessions(&self) -> String {
        format!("{}:sessions", self.prefix)
    }

    /// STREAM (trimmed to ~64): one entry per opened session, to wake `active_session` waits.
    pub(crate) fn opened(&self) -> String {
        format!("{}:opened", self.prefix)
    }

    /// Counter of session ids.
    pub(crate) fn session_seq(&self) -> String {
        format!("{}:session-seq", self.prefix)
    }

    /// ZSET node → last heartbeat (server ms).
    pub(crate) fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// Prefix of the per-node status keys.
    pub(crate) fn node_prefix(&self) -> String {
        format!("{}:node:", self.prefix)
    }

    /// STRING (CBOR `NodeStatus`, PX 24 h): a node's last heartbeat.
    pub(crate) fn node(&self, node: &NodeId) -> String {
        format!("{}:node:{}", self.prefix, node.0)
    }

    /// `<prefix>:{<session>}:`, the start of every key of a session.
    pub(crate) fn base(&self, session: &SessionId) -> String {
        format!("{}:{{{}}}:", self.prefix, session.0)
    }

    /// HASH: lease, max attempts, counters, spec size.
    pub(crate) fn meta(&self, session: &SessionId) -> String {
        format!("{}meta", self.base(session))
    }
}

/// Escape a literal for a SCAN MATCH pattern.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
