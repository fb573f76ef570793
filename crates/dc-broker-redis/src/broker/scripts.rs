//! The Lua scripts, one per atomic step of the protocol (`lua/<name>.lua`, each with the
//! helpers of `lua/lib.lua` prepended). Each file opens with a comment giving its keys,
//! arguments and reply; `replies` decodes the replies. A script is sent by its SHA1 and loaded
//! on the first `NOSCRIPT` (redis-rs's `Script` does both), so a server that restarted and lost
//! its scripts gets them again on the next call.

use std::sync::LazyLock;

use redis::Script;

/// Every script of the protocol.
pub(super) struct Scripts {
    pub(super) open_session: Script,
    pub(super) keep_alive: Script,
    pub(super) close_session: Script,
    pub(super) submit: Script,
    pub(super) take: Script,
    pub(super) renew: Script,
    pub(super) pending: Script,
    pub(super) end_attempt: Script,
    pub(super) complete: Script,
    pub(super) take_results: Script,
    pub(super) publish_update: Script,
    pub(super) read_updates: Script,
    pub(super) stats: Script,
    pub(super) heartbeat: Script,
    pub(super) nodes: Script,
    pub(super) report_problem: Script,
    pub(super) active: Script,
    pub(super) lost: Script,
    pub(super) sessions: Script,
}

/// `lua/<name>.lua` after `lua/lib.lua`.
macro_rules! script {
    ($name:literal) => {
        Script::new(concat!(
            include_str!("../../lua/lib.lua"),
            include_str!(concat!("../../lua/", $name, ".lua"))
        ))
    };
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    open_session: script!("open_session"),
    keep_alive: script!("keep_alive"),
    close_session: script!("close_session"),
    submit: script!("submit"),
    take: script!("take"),
    renew: script!("renew"),
    pending: script!("pending"),
    end_attempt: script!("end_attempt"),
    complete: script!("complete"),
    take_results: script!("take_results"),
    publish_update: script!("publish_update"),
    read_updates: script!("read_updates"),
    stats: script!("stats"),
    heartbeat: script!("heartbeat"),
    nodes: script!("nodes"),
    report_problem: script!("report_problem"),
    active: script!("active"),
    lost: script!("lost"),
    sessions: script!("sessions"),
});
