//! Every key name, and the client name of a node's presence connection. Global keys sit under
//! the prefix; a session's keys under `<prefix>:{<session>}:`, one hash tag, so every script
//! touching them stays in one cluster slot. The layout is the one `docs/redis-protocol.md`
//! lists; a head's node user may touch only keys under its prefix (`dc:*`), so no key is named
//! anywhere else.
//!
//! The Lua scripts receive a session's base ([`Keys::base`]) and append the same suffixes
//! themselves (`jobs`, `job:<id>`, `in:<id>`, `out:<id>`…); the names built here are those
//! the client touches directly.

use dc_core::broker::{NodeId, SessionId, UpdateSeq};

/// The start of every presence connection's client name (`CLIENT SETNAME`).
pub(crate) const PRESENCE_PREFIX: &str = "dc-node:";

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

    /// SCAN MATCH pattern of every key of a session.
    pub(crate) fn session_pattern(&self, session: &SessionId) -> String {
        format!("{}*", glob_escape(&self.base(session)))
    }

    /// HASH: lease, max attempts, counters, spec size.
    pub(crate) fn meta(&self, session: &SessionId) -> String {
        format!("{}meta", self.base(session))
    }

    /// HASH `c<i>`: the session spec by chunks, when it is too big to travel inline.
    pub(crate) fn spec(&self, session: &SessionId) -> String {
        format!("{}spec", self.base(session))
    }

    /// STREAM + group `w`: one entry per queued attempt.
    pub(crate) fn jobs(&self, session: &SessionId) -> String {
        format!("{}jobs", self.base(session))
    }

    /// STREAM, ids `<seq>-0`: the update log.
    pub(crate) fn updates(&self, session: &SessionId) -> String {
        format!("{}upd", self.base(session))
    }

    /// HASH `c<i>`: the body of a large update.
    pub(crate) fn update_body(&self, session: &SessionId, seq: UpdateSeq) -> String {
        format!("{}updb:{seq}", self.base(session))
    }

    /// STREAM: one notice per committed outcome.
    pub(crate) fn results(&self, session: &SessionId) -> String {
        format!("{}results", self.base(session))
    }

    /// HASH: a committed result too big for its notice (`c<i>` holds the output).
    pub(crate) fn output(&self, session: &SessionId, job: u64) -> String {
        format!("{}out:{job}", self.base(session))
    }

    /// HASH `c<i>`: a large payload being written, `unique` across writers; a script renames
    /// it into place.
    pub(crate) fn stage(&self, session: &SessionId, unique: &str) -> String {
        format!("{}stage:{unique}", self.base(session))
    }

    /// The `CLIENT SETNAME` of a node's presence connection (not a key; no spaces allowed).
    pub(crate) fn presence_name(&self, node: &NodeId) -> String {
        let clean = |s: &str| s.replace(|c: char| c.is_whitespace(), "_");
        format!(
            "{PRESENCE_PREFIX}{}:{}",
            clean(&self.prefix),
            clean(&node.0)
        )
    }
}

/// The field of chunk `i` in a chunked value's hash.
pub(crate) fn chunk_field(i: usize) -> String {
    format!("c{i}")
}

/// Escape a literal for a SCAN MATCH pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_documented_layout() {
        let keys = Keys::new("dc");
        let s = SessionId("s1-ab".into());
        assert_eq!(keys.base(&s), "dc:{s1-ab}:");
        assert_eq!(keys.meta(&s), "dc:{s1-ab}:meta");
        assert_eq!(keys.spec(&s), "dc:{s1-ab}:spec");
        assert_eq!(keys.jobs(&s), "dc:{s1-ab}:jobs");
        assert_eq!(keys.updates(&s), "dc:{s1-ab}:upd");
        assert_eq!(keys.update_body(&s, 7), "dc:{s1-ab}:updb:7");
        assert_eq!(keys.results(&s), "dc:{s1-ab}:results");
        assert_eq!(keys.output(&s, 3), "dc:{s1-ab}:out:3");
        assert_eq!(keys.stage(&s, "u1"), "dc:{s1-ab}:stage:u1");
        assert_eq!(keys.node(&NodeId("n1".into())), "dc:node:n1");
        assert_eq!(chunk_field(2), "c2");
        assert_eq!(
            keys.presence_name(&NodeId("my node".into())),
            "dc-node:dc:my_node"
        );
        assert_eq!(Keys::new("a*b").session_pattern(&s), "a\\*b:{s1-ab}:*");
    }
}
