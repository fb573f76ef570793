//! Nodes, servers and heads, from code: `start_node`, `start_head_node`, `start_server`,
//! `start_redis`, `is_server_running`, `is_node_running`. The CLI maps onto these 1:1.
//!
//! - `options`: [`NodeOptions`], how a worker node reaches its server and what it runs;
//! - `start`: [`start_node`] and [`NodeHandle`]: wait for the server, then run the agent;
//! - `slots`: the worker slots of a node (one per GPU and worker, or CPU workers);
//! - `state`: the state directory, its lock and pid file, and who holds it;
//! - `server`: [`ServerOptions`], [`start_server`], [`start_redis`] and the join token;
//! - `supervise`: [`ServerHandle`], restarting a pool server that dies;
//! - `head`: [`HeadOptions`], [`start_head_node`] and [`HeadHandle`].

mod head;
mod options;
mod server;
mod slots;
mod start;
mod state;
mod supervise;

use std::path::PathBuf;

use dc_core::PoolError;

pub use head::{HeadHandle, HeadOptions, start_head_node};
pub use options::NodeOptions;
#[cfg(feature = "cli")]
pub(crate) use server::reachable_address;
pub use server::{
    JOIN_TOKEN_FILE, ServerOptions, is_server_running, read_join_token, start_redis, start_server,
};
pub use start::{NodeHandle, start_node};
pub use state::{NodeProcess, is_node_running, is_node_running_in, node_pid, node_pid_checked};
pub use supervise::ServerHandle;

pub use dc_broker_redis::server::ServerError;

/// Why a node, server or head could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Another node already runs with this state directory (not an error for the CLI, which
    /// exits peacefully).
    #[error("a node is already running here (pid {pid}, state dir {dir})")]
    AlreadyRunning {
        /// Its pid, if recorded.
        pid: String,
        /// The state directory.
        dir: PathBuf,
    },
    /// The pool server (redis-server) could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The broker could not be reached or refused us.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The options are wrong; the message says how.
    #[error("{0}")]
    Config(String),
    /// The state directory could not be used.
    #[error("state dir {dir}: {source}")]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The state directory used when none is given: `$DC_STATE_DIR`, else
/// `$XDG_STATE_HOME/distributed-computing`, else `$HOME/.local/state/distributed-computing`.
/// There is no shared fallback (a fixed folder under the temp dir could be planted by another
/// user).
///
/// # Errors
/// [`NodeError::Config`] when none of those is set to an absolute path.
///
/// # Examples
/// ```
/// let dir = distributed_computing::default_state_dir();
/// assert!(dir.map(|d| d.is_absolute()).unwrap_or(true));
/// ```
pub fn default_state_dir() -> Result<PathBuf, NodeError> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|d| d.is_absolute())
    };
    if let Some(dir) = std::env::var_os("DC_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = absolute("XDG_STATE_HOME") {
        return Ok(dir.join("distributed-computing"));
    }
    if let Some(home) = absolute("HOME") {
        return Ok(home.join(".local/state/distributed-computing"));
    }
    Err(NodeError::Config(
        "no state directory: neither XDG_STATE_HOME nor HOME is set to an absolute path; pass --state-dir DIR (or DC_STATE_DIR)".into(),
    ))
}
