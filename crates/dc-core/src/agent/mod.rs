//! The node agent: one per machine. It spawns one worker process per slot, takes jobs from the
//! broker, feeds them to its children, returns results, heartbeats for the whole node, and
//! restarts a child that dies (re-init, replay the update log, retry the job).
//!
//! The agent is backend-agnostic: a `local()` pool runs one in-process over a `LocalBroker`, and
//! a node of a distributed deployment runs the same loop over Redis or RabbitMQ.
//!
//! # Layout
//!
//! - this module: [`AgentConfig`], [`AgentHandle`], [`spawn_agent`], the node heartbeat and the
//!   lease table;
//! - `session`: following the broker's active session, one slot task per slot for it;
//! - `slot`: one slot's supervision loop: start the worker process, restart it with backoff;
//! - `flow`: running jobs on a slot's worker, batched (jobs taken ahead, outcomes reported in one
//!   exchange), with the policy in `pace`;
//! - `updates`: the session's update log, cached once per node, replayed to workers;
//! - `worker_proc`: one worker process: spawn, handshake, frames, output forwarding.
//!
//! # The slot protocol
//!
//! Each slot serves the active session with one worker process at a time:
//!
//! 1. The slot spawns its worker process, checks its handshake (protocol name and version), and
//!    sends `Init` with the session's kind and init payload. A failed start is retried with
//!    backoff; after [`AgentConfig::init_attempts`] failures in a row the slot reports
//!    `InitFailed` to the pool and gives up on the session.
//! 2. An idle slot takes one job, waiting up to [`AgentConfig::poll`] for it, and runs it alone
//!    and timed before it holds any other job for this worker; so does the first job after any
//!    wait. An empty take refreshes the update log, so that idle workers apply updates promptly.
//! 3. While its jobs are short next to a broker round trip (and the session allows batching),
//!    the slot takes more jobs ahead of the running one: about two round trips' worth, at most
//!    `MAX_AHEAD` jobs and `AHEAD_BYTES` of payload. It takes them in a background exchange,
//!    overlapping the running job, that also reports the outcomes finished since the last one.
//!    For jobs under `SHORT_JOB`, `PIPE_AHEAD` (one) job is also written to the worker's channel
//!    behind the running one, so that the worker never waits on the agent.
//! 4. Updates are applied between jobs: before a job is sent, the worker applies, in order,
//!    every update entry the job needs and every entry the node knows of. Never while a job sits
//!    in the worker's channel: that job's answer comes first, and a job that needs a later entry
//!    is not sent behind it. An update the worker refuses is reported to the pool once
//!    (`UpdateFailed`) and the worker goes on.
//! 5. A job's outcome (its output, or the error the worker gave for it) is reported in the next
//!    exchange.
//! 6. Jobs taken ahead are given back unstarted and uncharged (`AttemptEnd::Returned`): when the
//!    running job outlives what they were taken for (two of its estimated run times plus two
//!    round trips, at least `GIVE_BACK_FLOOR`), at once, and so is every job an exchange brings
//!    in after that while the same job still runs. A job written to the worker's channel cannot
//!    be given back this way: it waits for the worker.
//! 7. When the slot stops serving its worker (session over, node stopping, worker dead), the
//!    outcomes already finished are reported first; then every job the slot still holds, taken
//!    ahead or written to the worker's channel and unanswered, goes back to the queue uncharged
//!    (`AttemptEnd::NodeLeft`).
//! 8. When the worker process dies or breaks the frame protocol, the job it was running (the
//!    oldest one sent and unanswered) is handed back as a failed attempt, with how the process
//!    ended and its last lines of output; the others it held go back as in step 7. An idle
//!    worker that speaks unprompted or closes its channel is treated the same. The slot starts a
//!    new process (step 1) after a pause that grows while processes keep dying young, and the
//!    new worker replays the whole update log before its first job (step 4).
//! 9. When the session ends while a job runs, that job is dropped with its session and the
//!    worker killed; otherwise the worker gets `Shutdown`, then SIGTERM, then SIGKILL after
//!    [`AgentConfig::stop_grace`].
//!
//! # Leases
//!
//! The broker keeps a job leased to this node for as long as the node's heartbeats list the
//! lease. The agent keeps one lease table for the whole node, and:
//!
//! 1. A job's lease enters the table as soon as the take that leased it answers, whether the
//!    job will run now, is taken ahead, or is written behind the running one. A take that shares
//!    an exchange with a slow report (a big result on a busy machine) does not wait for the
//!    report: a lease that waited could expire, and the job run a second time elsewhere.
//! 2. The node heartbeat, every [`AgentConfig::heartbeat`], sends the whole table: every job
//!    taken, running, held ahead, or finished but not yet reported, has its lease renewed.
//! 3. A lease leaves the table once the broker has the job's outcome, or has the job back
//!    (given back unstarted as in step 6, or handed back after its worker died as in step 8).
//!    Until then a report is retried while the broker cannot be reached, the lease renewed
//!    meanwhile, so that retrying cannot lose the job. Step 7's give-back is the exception: the
//!    slot is done with those jobs and drops their leases as it hands them back.
//! 4. A report the broker refuses for good, or one that cannot get through for a minute, leaves
//!    the lease to expire: the broker then queues the job again for another attempt.

mod flow;
mod pace;
mod session;
mod slot;
mod updates;
mod worker_proc;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::broker::{
    AttemptEnd, Broker, JobId, Lease, NodeId, NodeStatus, SessionId, WorkerId, WorkerState,
    WorkerStatus,
};
use crate::error::BrokerError;
use crate::protocol::WORKER_SUBCOMMAND;
use crate::util::lock;
use session::run_agent;

/// The program (and arguments) a node runs as a worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This executable, with the hidden worker sub-command (for binaries whose `main` calls
    /// `Registry::serve_if_worker` or `main_with`).
    ///
    /// # Errors
    /// When the path of the running executable cannot be found.
    pub fn current_exe() -> std::io::Result<Self> {
        Ok(Self::program(std::env::current_exe()?))
    }

    /// Another program built with a `Registry`, run with the hidden worker sub-command.
    pub fn program(path: impl Into<PathBuf>) -> Self {
        WorkerCommand {
            program: path.into(),
            args: vec![WORKER_SUBCOMMAND.into()],
        }
    }
}

/// One worker slot of a node: its devices and the environment that pins it to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotSpec {
    /// GPU UUIDs (empty for a CPU worker).
    pub devices: Vec<String>,
    /// Variables for the worker process (`CUDA_VISIBLE_DEVICES`…).
    pub env: Vec<(String, String)>,
}

impl SlotSpec {
    /// A slot for one GPU, or a CPU slot when `device` is `None`.
    pub fn for_device(device: Option<&dc_gpu::GpuDevice>) -> Self {
        SlotSpec {
            devices: device.map(|d| vec![d.uuid.clone()]).unwrap_or_default(),
            env: dc_gpu::worker_env(device),
        }
    }

    /// The slots of a machine, for a node and for a local pool alike: `per_gpu` slots on each
    /// GPU that `gpus` selects, or, when it selects none, `cpu_workers` CPU slots.
    pub fn plan(gpus: &dc_gpu::GpuSelection, per_gpu: usize, cpu_workers: usize) -> Vec<Self> {
        let inventory = dc_gpu::discover(gpus);
        if inventory.gpus.is_empty() {
            return vec![SlotSpec::for_device(None); cpu_workers];
        }
        inventory
            .gpus
            .iter()
            .flat_map(|gpu| std::iter::repeat_n(SlotSpec::for_device(Some(gpu)), per_gpu))
            .collect()
    }
}

/// How a node agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Its host name, for status output.
    pub host: String,
    /// Kinds `command` can build.
    pub kinds: Vec<String>,
    /// The worker program for those kinds.
    pub command: WorkerCommand,
    /// Kinds served by another program each (any language speaking the frame protocol).
    pub external: BTreeMap<String, WorkerCommand>,
    /// One entry per worker process.
    pub slots: Vec<SlotSpec>,
    /// How often the node heartbeats (renewing its leases).
    pub heartbeat: Duration,
    /// Longest blocking wait on the broker.
    pub poll: Duration,
    /// How long a stopping worker gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// Consecutive failures of `Worker::new` before the slot gives up on a session.
    pub init_attempts: u32,
    /// How long a new worker process has to send its handshake.
    pub hello_timeout: Duration,
    /// Benchmarks only: slots run no process; each job completes at once with its payload as
    /// its output. Measures the agent and broker alone (`dc-cli bench` W6).
    simulated: bool,
}

impl AgentConfig {
    /// A configuration with default timings: heartbeat 1 s, poll 1 s, grace 5 s.
    pub fn new(
        node_id: NodeId,
        command: WorkerCommand,
        kinds: Vec<String>,
        slots: Vec<SlotSpec>,
    ) -> Self {
        AgentConfig {
            node_id,
            host: host_name(),
            kinds,
            command,
            external: BTreeMap::new(),
            slots,
            heartbeat: Duration::from_secs(1),
            poll: Duration::from_secs(1),
            stop_grace: Duration::from_secs(5),
            init_attempts: 3,
            hello_timeout: Duration::from_secs(30),
            simulated: false,
        }
    }

    /// Benchmarks only: slots answer each job at once with its payload, without a worker
    /// process, so that a benchmark measures the agent and the broker alone.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn set_simulated(&mut self, on: bool) {
        self.simulated = on;
    }

    fn command_for(&self, kind: &str) -> Option<&WorkerCommand> {
        if let Some(cmd) = self.external.get(kind) {
            return Some(cmd);
        }
        self.kinds
            .iter()
            .any(|k| k == kind)
            .then_some(&self.command)
    }

    fn known_kinds(&self) -> Vec<String> {
        let mut all: Vec<String> = self.kinds.clone();
        all.extend(self.external.keys().cloned());
        all.sort();
        all.dedup();
        all
    }
}

/// This machine's host name (or "localhost").
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A running node agent.
#[derive(Debug)]
pub struct AgentHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    shared: Arc<NodeShared>,
}

impl AgentHandle {
    /// Stop: workers get `Shutdown`, then SIGTERM, then SIGKILL; held jobs go back to the queue.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Ask the agent to stop, without waiting (see [`AgentHandle::wait`]).
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Wait until the agent has stopped (after [`AgentHandle::request_stop`]).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }

    /// Whether the agent has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Pids of the worker processes alive now.
    pub fn worker_pids(&self) -> Vec<u32> {
        lock(&self.shared.pids).values().copied().collect()
    }
}

/// Start a node agent on the current tokio runtime.
pub fn spawn_agent(broker: Arc<dyn Broker>, config: AgentConfig) -> AgentHandle {
    let workers = config
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| WorkerStatus {
            worker: WorkerId(format!("{}/{}", config.node_id, i)),
            session: None,
            state: WorkerState::Starting,
            devices: slot.devices.clone(),
        })
        .collect();
    let shared = Arc::new(NodeShared {
        broker,
        config,
        workers: Mutex::new(workers),
        leases: Mutex::new(HashMap::new()),
        pids: Mutex::new(HashMap::new()),
        beat_now: Notify::new(),
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_agent(shared.clone(), stop_rx));
    AgentHandle { stop, task, shared }
}

/// What the agent's tasks share: the broker, the configuration, and the node's state that the
/// heartbeat reports.
#[derive(Debug)]
struct NodeShared {
    broker: Arc<dyn Broker>,
    config: AgentConfig,
    /// Each slot's worker, as the heartbeat reports it.
    workers: Mutex<Vec<WorkerStatus>>,
    /// The lease table: every lease the node's slots hold, by slot and job; the heartbeat
    /// renews them all (see "Leases" in the module docs).
    leases: Mutex<HashMap<(usize, JobId), Lease>>,
    /// The pid of each slot's live worker process.
    pids: Mutex<HashMap<usize, u32>>,
    /// Wakes the heartbeat for a beat now.
    beat_now: Notify,
}

impl NodeShared {
    /// The node as its heartbeat reports it.
    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.config.node_id.clone(),
            host: self.config.host.clone(),
            kinds: self.config.known_kinds(),
            workers: lock(&self.workers).clone(),
            leases: lock(&self.leases).values().cloned().collect(),
        }
    }

    /// Record what slot `slot`'s worker is doing; a change in readiness beats at once.
    fn set_state(&self, slot: usize, session: Option<&SessionId>, state: WorkerState) {
        let changed_readiness = {
            let mut workers = lock(&self.workers);
            let Some(w) = workers.get_mut(slot) else {
                return;
            };
            let was_ready = w.state != WorkerState::Starting && w.session.is_some();
            w.session = session.cloned();
            w.state = state;
            let is_ready = w.state != WorkerState::Starting && w.session.is_some();
            was_ready != is_ready
        };
        if changed_readiness {
            // Worker counts matter to the pool at once; busy/idle flips wait for the next beat.
            self.beat_now.notify_one();
        }
    }
}

/// Sleep for `d`, or less if `stop` changes first.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = stop.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Shortest pause of the agent's retry loops (reading the session, taking jobs, restarting a
/// worker), after the first failure.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// Longest pause of the agent's retry loops.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A fresh backoff for one of the agent's retry loops.
fn retry_backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX)
}

/// Send the node's status (its lease table included) every `heartbeat`, and at once when a
/// worker becomes ready or stops being ready, until the node stops.
async fn heartbeat_loop(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        let status = shared.status();
        match shared.broker.heartbeat(&status).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(node = %status.node, "heartbeat restored");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(node = %status.node, error = %e, "heartbeat failed; retrying");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = shared.beat_now.notified() => {}
            _ = tokio::time::sleep(shared.config.heartbeat) => {}
        }
    }
}

/// Hand back every job the slot still holds (taken ahead, or sent to a worker that died or was
/// stopped before answering it): back to the queue now, not counted as a failure.
async fn release_slot_leases(shared: &NodeShared, slot: usize) {
    let held: Vec<Lease> = {
        let mut leases = lock(&shared.leases);
        let keys: Vec<(usize, JobId)> =
            leases.keys().filter(|(s, _)| *s == slot).copied().collect();
        keys.iter().filter_map(|k| leases.remove(k)).collect()
    };
    for lease in held {
        report(&lease, || {
            shared.broker.abandon(&lease, AttemptEnd::NodeLeft)
        })
        .await;
    }
}

/// How long a slot keeps retrying a report while the broker cannot be reached.
const REPORT_PATIENCE: Duration = Duration::from_secs(60);
/// Longest pause between two tries of a report: a slot hears that the broker is back (a link
/// healed, a server restarted) within this, instead of idling through a long back-off.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Call the broker about `lease` until it answers, the error is not transient, or
/// `REPORT_PATIENCE` has passed.
async fn report<T, F, Fut>(lease: &Lease, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    let mut backoff = Backoff::new(RETRY_MIN, REPORT_RETRY_MAX);
    let deadline = tokio::time::Instant::now() + REPORT_PATIENCE;
    loop {
        match call().await {
            Ok(_) => return,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(backoff.next_pause()).await;
            }
            Err(BrokerError::SessionGone(_)) => {
                tracing::debug!(job = %lease.job, "the session is gone; nothing to report to");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %lease.job, error = %e, "could not report the job's outcome; its lease will expire and it will run again");
                return;
            }
        }
    }
}
