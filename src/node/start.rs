//! Starting a worker node in this process: take the state directory, check the worker kinds,
//! wait for the pool server (backoff with jitter, a log line every 10 s), then run the node
//! agent with one worker process per slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dc_core::agent::{AgentConfig, AgentHandle, WorkerCommand, host_name, spawn_agent};
use dc_core::backoff::Backoff;
use dc_core::broker::NodeId;
use dc_core::{Broker, NetworkTarget, PoolError, Registry};

use super::slots::node_slots;
use super::state::StateLock;
use super::{NodeError, NodeOptions, default_state_dir};

/// A running node: its agent, its worker processes, its state directory.
#[derive(Debug)]
pub struct NodeHandle {
    agent: AgentHandle,
    node_id: NodeId,
    slots: usize,
    _lock: StateLock,
}

impl NodeHandle {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id.0
    }

    /// How many worker slots it runs.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Pids of its worker processes alive now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.agent.worker_pids()
    }

    /// Stop the node: workers are shut down, held jobs go back to the queue at once.
    ///
    /// # Errors
    /// None today; kept fallible for backends whose goodbye can fail.
    pub async fn terminate(&mut self) -> Result<(), NodeError> {
        self.agent.request_stop();
        self.agent.wait().await;
        Ok(())
    }

    /// Wait until the node stops (after `terminate`, or forever while it serves).
    ///
    /// # Errors
    /// None today; kept fallible like `terminate`.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        self.agent.wait().await;
        Ok(())
    }
}

/// Start a worker node in this process: one worker process per GPU (or `cpu_workers` CPU
/// workers), serving whatever pool is active on the server.
///
/// A node waits for its server: while nothing answers at the server's address (not started
/// yet, restarting, unreachable), the connection is retried with backoff and jitter and a log
/// line every 10 s, so nodes and heads can start in any order. Drop the future to give up.
///
/// # Errors
/// [`NodeError::AlreadyRunning`] when a node holds the state directory; [`NodeError::Pool`]
/// at once when the server refuses the password or is not a pool server;
/// [`NodeError::Config`] when this executable registered no worker kinds and none were given,
/// or an external worker would replace a registered kind; [`NodeError::StateDir`] when the
/// state directory cannot be used.
pub async fn start_node(options: NodeOptions) -> Result<NodeHandle, NodeError> {
    let dir = match &options.state_dir {
        Some(dir) => dir.clone(),
        None => default_state_dir()?,
    };
    let lock = StateLock::acquire(&dir)?;
    let command = match &options.worker_program {
        Some(path) => WorkerCommand::program(path),
        None => WorkerCommand::current_exe().map_err(|e| {
            NodeError::Config(format!("cannot find this executable to spawn workers: {e}"))
        })?,
    };
    let kinds = options
        .kinds
        .clone()
        .or_else(Registry::served_kinds)
        .unwrap_or_default();
    if kinds.is_empty() && options.external.is_empty() {
        return Err(NodeError::Config(
            "this node has no worker kinds: build the node binary with main_with(Registry::new().register::<YourWorker>()), or configure external workers".into(),
        ));
    }
    if let Some(kind) = options.external.keys().find(|k| kinds.contains(k)) {
        return Err(NodeError::Config(format!(
            "external worker kind {kind:?} is a kind this node binary registers: an external program cannot replace it (give the external kind another name)"
        )));
    }
    let server = options.shown_server();
    let broker = wait_for_server(&options.target, &server).await?;
    let slots = node_slots(&options);
    let node_id = NodeId(format!("{}-{}", host_name(), std::process::id()));
    let mut config = AgentConfig::new(node_id.clone(), command, kinds, slots);
    config.external = options.external.clone();
    config.heartbeat = options.heartbeat;
    let slots = config.slots.len();
    tracing::info!(node = %node_id, %server, slots, state_dir = %dir.display(), "node starting");
    let agent = spawn_agent(broker, config);
    Ok(NodeHandle {
        agent,
        node_id,
        slots,
        _lock: lock,
    })
}

/// How often a node waiting for its server says so.
const WAITING_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Connect to the pool server `target` names, retrying while nothing answers there; a refused
/// password or certificate, a service that is not a pool server, or a bad URL or token fail at
/// once.
async fn wait_for_server(
    target: &NetworkTarget,
    server: &str,
) -> Result<Arc<dyn Broker>, NodeError> {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut last_log: Option<Instant> = None;
    loop {
        match crate::backends::connect_target(target).await {
            Ok(broker) => {
                if last_log.is_some() {
                    tracing::info!(%server, waited_ms = started.elapsed().as_millis(), "pool server reached");
                }
                return Ok(broker);
            }
            Err(PoolError::Unreachable(why)) => {
                if last_log.is_none_or(|t| t.elapsed() >= WAITING_LOG_PERIOD) {
                    tracing::warn!(
                        %server,
                        waited_s = started.elapsed().as_secs(),
                        "waiting for the pool server (start the head, or check -a/-p): {why}"
                    );
                    last_log = Some(Instant::now());
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
