//! The node agent: one per machine. It spawns one worker process per slot, takes jobs from the
//! broker, feeds them to its children, returns results, heartbeats for the whole node, and
//! restarts a child that dies (re-init, replay the update log, retry the job).
//!
//! The agent is backend-agnostic: a `local()` pool runs one in-process over a `LocalBroker`, and
//! a node of a distributed deployment runs the same loop over Redis or RabbitMQ.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::broker::{
    AttemptEnd, Broker, JobId, Lease, LeasedJob, NodeId, NodeProblem, NodeStatus, Outcome,
    SessionId, SessionInfo, UpdateSeq, WorkerId, WorkerState, WorkerStatus,
};
use crate::error::{BrokerError, JobFailure};
use crate::protocol::{
    self, FrameError, FromWorker, PROTOCOL_NAME, PROTOCOL_VERSION, ToWorker, WORKER_SUBCOMMAND,
};

/// Lines of a worker's output kept for crash reports.
const TAIL_LINES: usize = 20;

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
    pub simulate: bool,
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
            simulate: false,
        }
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
        self.shared.lock_pids().values().copied().collect()
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

#[derive(Debug)]
struct NodeShared {
    broker: Arc<dyn Broker>,
    config: AgentConfig,
    workers: Mutex<Vec<WorkerStatus>>,
    /// Leases held, by slot and job (a slot holds two for a moment: the job it completes and
    /// the next one it took at the same time).
    leases: Mutex<HashMap<(usize, JobId), Lease>>,
    pids: Mutex<HashMap<usize, u32>>,
    beat_now: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeShared {
    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.config.node_id.clone(),
            host: self.config.host.clone(),
            kinds: self.config.known_kinds(),
            workers: lock(&self.workers).clone(),
            leases: lock(&self.leases).values().cloned().collect(),
        }
    }

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

    fn lock_pids(&self) -> std::sync::MutexGuard<'_, HashMap<usize, u32>> {
        lock(&self.pids)
    }
}

async fn run_agent(shared: Arc<NodeShared>, mut stop: watch::Receiver<bool>) {
    let node = shared.config.node_id.clone();
    tracing::info!(%node, slots = shared.config.slots.len(), kinds = ?shared.config.known_kinds(), "node agent started");
    let beat = tokio::spawn(heartbeat_loop(shared.clone(), stop.clone()));
    // The last session this node refused (a kind it does not have): not again.
    let mut refused: Option<SessionId> = None;
    // The last session it served, and when that ended: served again if it is still active a
    // while later (the node may have left it on a glitch: damaged broker state, an answer it
    // could not read), never in a tight loop.
    let mut served: Option<(SessionId, tokio::time::Instant)> = None;
    let mut failures = 0u32;
    while !*stop.borrow() {
        let active = tokio::select! {
            _ = stop.changed() => break,
            r = shared.broker.active_session(shared.config.poll) => r,
        };
        let info = match active {
            Ok(Some(info))
                if refused.as_ref() == Some(&info.id)
                    || served.as_ref().is_some_and(|(id, at)| {
                        *id == info.id && at.elapsed() < SERVE_AGAIN_AFTER
                    }) =>
            {
                // Refused, or just served: wait.
                sleep_or_stop(&mut stop, shared.config.poll).await;
                continue;
            }
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => {
                failures += 1;
                tracing::warn!(%node, error = %e, "cannot read the active session; retrying");
                sleep_or_stop(&mut stop, backoff(failures)).await;
                continue;
            }
        };
        failures = 0;
        if shared.config.command_for(&info.spec.kind).is_none() {
            let known = shared.config.known_kinds();
            tracing::error!(%node, kind = %info.spec.kind, ?known, "pool asks for a worker kind this node does not have");
            let problem = NodeProblem::UnknownKind {
                node: node.clone(),
                known,
            };
            if let Err(e) = shared.broker.report_problem(&info.id, problem).await {
                tracing::warn!(%node, error = %e, "cannot report the unknown worker kind");
            }
            refused = Some(info.id);
        } else {
            tracing::info!(%node, session = %info.id, kind = %info.spec.kind, "serving pool session");
            run_session(&shared, &info, &mut stop).await;
            tracing::info!(%node, session = %info.id, "pool session over");
            served = Some((info.id, tokio::time::Instant::now()));
        }
    }
    let _ = beat.await;
    if let Err(e) = shared.broker.leave(&node).await {
        tracing::warn!(%node, error = %e, "could not deregister the node");
    }
    tracing::info!(%node, "node agent stopped");
}

/// How long after leaving a session a node serves it again if it is still the active one.
const SERVE_AGAIN_AFTER: Duration = Duration::from_secs(2);

async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = stop.changed() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5_000))
}

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

/// Serve one session until it closes or the node stops.
async fn run_session(
    shared: &Arc<NodeShared>,
    info: &SessionInfo,
    stop: &mut watch::Receiver<bool>,
) {
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let log = Arc::new(UpdateLog::new(info.id.clone()));
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..shared.config.slots.len() {
        slots.spawn(run_slot(
            shared.clone(),
            info.clone(),
            slot,
            log.clone(),
            cancel_rx.clone(),
        ));
    }
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            done = slots.join_next() => {
                if done.is_none() {
                    break;
                }
            }
            _ = tokio::time::sleep(shared.config.poll) => {
                match shared.broker.active_session(Duration::ZERO).await {
                    Ok(Some(s)) if s.id == info.id => {}
                    Ok(_) => break,
                    Err(e) if e.is_transient() => {}
                    Err(_) => break,
                }
            }
        }
    }
    let _ = cancel_tx.send(true);
    while slots.join_next().await.is_some() {}
}

/// The ordered update log of one session, cached once per node for all its slots.
#[derive(Debug)]
struct UpdateLog {
    session: SessionId,
    entries: tokio::sync::Mutex<Vec<Bytes>>,
    len: AtomicU64,
}

impl UpdateLog {
    fn new(session: SessionId) -> Self {
        UpdateLog {
            session,
            entries: tokio::sync::Mutex::new(Vec::new()),
            len: AtomicU64::new(0),
        }
    }

    /// Fetch new entries until at least `need` are known (`None`: everything there is).
    async fn fetch(&self, broker: &dyn Broker, need: Option<UpdateSeq>) -> Result<(), BrokerError> {
        let mut entries = self.entries.lock().await;
        loop {
            let have = entries.len() as UpdateSeq;
            if need.is_some_and(|n| have >= n) {
                return Ok(());
            }
            let batch = broker.read_updates(&self.session, have, 256).await?;
            let got = batch.len();
            for (seq, payload) in batch {
                if seq == entries.len() as UpdateSeq + 1 {
                    entries.push(payload);
                }
            }
            self.len
                .store(entries.len() as UpdateSeq, Ordering::Release);
            if got == 0 {
                return match need {
                    Some(n) if (entries.len() as UpdateSeq) < n => Err(BrokerError::Protocol(
                        format!("update log ends at {} but a job needs {n}", entries.len()),
                    )),
                    _ => Ok(()),
                };
            }
        }
    }

    fn known(&self) -> UpdateSeq {
        self.len.load(Ordering::Acquire)
    }

    async fn after(&self, applied: UpdateSeq) -> Vec<(UpdateSeq, Bytes)> {
        let entries = self.entries.lock().await;
        entries
            .iter()
            .enumerate()
            .skip(applied as usize)
            .map(|(i, b)| (i as UpdateSeq + 1, b.clone()))
            .collect()
    }
}

enum SlotExit {
    /// The session is over (or the node stops): stop the worker gracefully.
    Done,
    /// The session ended while a job ran: the job is aborted, the worker killed.
    Abort,
    /// The worker process must be replaced.
    Restart,
}

async fn run_slot(
    shared: Arc<NodeShared>,
    info: SessionInfo,
    slot: usize,
    log: Arc<UpdateLog>,
    mut cancel: watch::Receiver<bool>,
) {
    let node = shared.config.node_id.clone();
    let worker_id = WorkerId(format!("{node}/{slot}"));
    if shared.config.simulate {
        run_simulated_slot(&shared, &info, slot, &worker_id, &mut cancel).await;
        return;
    }
    let mut init_failures = 0u32;
    let mut crashes = 0u32;
    loop {
        if *cancel.borrow() {
            break;
        }
        if crashes > 0 {
            // A worker that keeps dying (a poison update, a broken install) must not spin.
            sleep_or_stop(&mut cancel, backoff(crashes)).await;
            if *cancel.borrow() {
                break;
            }
        }
        shared.set_state(slot, Some(&info.id), WorkerState::Starting);
        let started = tokio::select! {
            _ = cancel.changed() => break,
            r = WorkerProc::start(&shared, &info, slot, &worker_id) => r,
        };
        let mut proc = match started {
            Ok(p) => p,
            Err(StartError::UnknownKind(known)) => {
                tracing::error!(worker = %worker_id, kind = %info.spec.kind, ?known, "worker program has no such kind");
                let _ = shared
                    .broker
                    .report_problem(
                        &info.id,
                        NodeProblem::UnknownKind {
                            node: node.clone(),
                            known,
                        },
                    )
                    .await;
                break;
            }
            Err(StartError::Init(message)) => {
                init_failures += 1;
                tracing::warn!(worker = %worker_id, attempt = init_failures, %message, "worker failed to start");
                if init_failures >= shared.config.init_attempts {
                    let _ = shared
                        .broker
                        .report_problem(
                            &info.id,
                            NodeProblem::InitFailed {
                                node: node.clone(),
                                worker: worker_id.clone(),
                                message,
                            },
                        )
                        .await;
                    break;
                }
                sleep_or_stop(&mut cancel, backoff(init_failures)).await;
                continue;
            }
        };
        init_failures = 0;
        lock(&shared.pids).insert(slot, proc.pid);
        shared.set_state(slot, Some(&info.id), WorkerState::Idle);
        let started_at = std::time::Instant::now();
        let exit = serve_jobs(
            &shared,
            &info,
            slot,
            &worker_id,
            &log,
            &mut proc,
            &mut cancel,
        )
        .await;
        lock(&shared.pids).remove(&slot);
        release_slot_leases(&shared, slot).await;
        match exit {
            SlotExit::Done => {
                proc.stop(shared.config.stop_grace).await;
                break;
            }
            SlotExit::Abort => {
                proc.kill().await;
                break;
            }
            SlotExit::Restart => {
                proc.kill().await;
                // A worker that lived a while before dying starts a fresh count.
                crashes = if started_at.elapsed() > Duration::from_secs(30) {
                    1
                } else {
                    crashes + 1
                };
            }
        }
    }
    shared.set_state(slot, None, WorkerState::Starting);
}

/// Hand back any lease the slot still holds (a job taken ahead, when the worker broke or the
/// session ended before running it): back to the queue now, not counted as a failure.
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

/// Benchmarks only: take jobs and complete each at once with its payload, no process.
async fn run_simulated_slot(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker_id: &WorkerId,
    cancel: &mut watch::Receiver<bool>,
) {
    let broker = shared.broker.as_ref();
    shared.set_state(slot, Some(&info.id), WorkerState::Idle);
    let mut failures = 0u32;
    loop {
        let taken = tokio::select! {
            biased;
            _ = cancel.changed() => break,
            r = broker.take_job(&info.id, &shared.config.node_id, worker_id, shared.config.poll) => r,
        };
        match taken {
            Ok(Some(job)) => {
                failures = 0;
                let key = (slot, job.lease.job);
                lock(&shared.leases).insert(key, job.lease.clone());
                let lease = &job.lease;
                report(lease, || broker.complete(lease, Ok(job.payload.clone()))).await;
                lock(&shared.leases).remove(&key);
            }
            Ok(None) => {}
            Err(BrokerError::SessionGone(_)) => break,
            Err(e) => {
                failures += 1;
                tracing::warn!(worker = %worker_id, error = %e, "cannot take a job; retrying");
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
    shared.set_state(slot, None, WorkerState::Starting);
}

/// Most jobs a slot keeps sent to its worker behind the one it runs (tiny jobs only). A job
/// in the worker's channel cannot be handed back, so this bounds how many jobs wait behind
/// one that turns out long: one (more gains the local pool some throughput, and makes a job
/// wait behind several long ones when long jobs follow tiny ones in one stream).
const PIPE_AHEAD: usize = 1;
/// Jobs shorter than this are pipelined to the worker whatever the broker's round trip: the
/// agent's own turnaround between a result and the next job (tens of µs) would otherwise idle
/// the worker.
const SHORT_JOB: Duration = Duration::from_millis(1);
/// Most jobs a slot holds taken ahead of the one it runs (automatic batching).
const MAX_AHEAD: usize = 64;
/// Payload bytes a slot holds taken ahead at most (it tops up only below this).
const AHEAD_BYTES: usize = 64 << 20;
/// A slot takes jobs ahead only while a broker round trip is at least this fraction of a job's
/// run time: longer jobs gain nothing from it, and a job held ahead is one another idle worker
/// cannot start.
const AHEAD_MIN_RATIO: f64 = 0.05;
/// The least time a job runs before the jobs held ahead of it are handed back: scheduling
/// noise on a busy machine must not send a batch of tiny jobs back and forth.
const GIVE_BACK_FLOOR: Duration = Duration::from_millis(2);

/// A slot's measured pace: how long its jobs run and how long a broker exchange takes
/// (moving averages), which set how many jobs it takes ahead.
///
/// The rules that keep batching from holding work an idle worker could run:
/// - an idle slot takes one job, and runs it alone and timed before holding more (the pool's
///   next jobs may be unlike those measured so far); so does the first job after any wait;
/// - jobs are taken ahead only when they are short next to a round trip, and a slow job raises
///   the estimate at once ([`Pace::note_job`]);
/// - a slot whose running job outlives what its jobs ahead were taken for
///   ([`Pace::give_back_after`]) hands them back to the queue at once, unstarted and
///   uncharged, for any idle worker to take;
/// - at most `PIPE_AHEAD` (one) job waits in the worker's channel, the only place a job cannot
///   be handed back from.
///
/// Each job held ahead has its own lease, renewed by the heartbeat like the running one.
#[derive(Debug, Default)]
struct Pace {
    job_us: Option<f64>,
    io_us: Option<f64>,
    /// Moving average of payload sizes, in bytes.
    payload: Option<f64>,
}

impl Pace {
    /// Fold `x` into a moving average.
    fn note(avg: &mut Option<f64>, x: f64) {
        *avg = Some(match *avg {
            Some(a) => 0.8 * a + 0.2 * x,
            None => x,
        });
    }

    fn note_us(avg: &mut Option<f64>, d: Duration) {
        Pace::note(avg, d.as_secs_f64() * 1e6);
    }

    /// Fold in a job's run time. A job slower than the average counts at once (the estimate
    /// becomes at least half of it), faster ones fold in slowly: a slot that meets long jobs
    /// after tiny ones stops taking ahead from its next take on, and takes ahead again only
    /// after a run of short jobs.
    fn note_job(&mut self, d: Duration) {
        let x = d.as_secs_f64() * 1e6;
        Pace::note(&mut self.job_us, x);
        if let Some(avg) = self.job_us.as_mut() {
            *avg = avg.max(x / 2.0);
        }
    }

    /// How long a job may run before the jobs held ahead of it go back to the queue: what they
    /// were taken for (two of the job's estimated run times plus two round trips, the batch's
    /// horizon), and at least `GIVE_BACK_FLOOR`. A job held ahead thus waits at most about this
    /// long, then one round trip until an idle worker has it.
    fn give_back_after(&self) -> Duration {
        let horizon_us = 2.0 * self.job_us.unwrap_or(0.0) + 2.0 * self.io_us.unwrap_or(0.0);
        Duration::from_secs_f64(horizon_us / 1e6).max(GIVE_BACK_FLOOR)
    }

    /// Jobs to hold taken ahead of the running one: about two round trips' worth of jobs, so
    /// that the worker never waits on the broker, and for jobs under `SHORT_JOB` at least
    /// enough to keep `PIPE_AHEAD` in the worker's channel (so it never waits on the agent's
    /// turnaround either); none for jobs long next to a round trip, or with batching off.
    fn depth(&self, batching: bool) -> usize {
        let (Some(job), Some(io)) = (self.job_us, self.io_us) else {
            return 0;
        };
        if !batching {
            return 0;
        }
        let ratio = io / job.max(1.0);
        let by_round_trip = if ratio < AHEAD_MIN_RATIO {
            0
        } else {
            ((2.0 * ratio).ceil() as usize).clamp(1, MAX_AHEAD)
        };
        let by_turnaround = if job < SHORT_JOB.as_secs_f64() * 1e6 {
            PIPE_AHEAD
        } else {
            0
        };
        by_round_trip.max(by_turnaround)
    }
}

/// What one background broker exchange did: outcomes reported, jobs taken.
struct Exchange {
    reported: Vec<JobId>,
    taken: Result<Vec<LeasedJob>, BrokerError>,
    took: Duration,
}

/// Report finished outcomes and take up to `want` more jobs (without waiting), concurrently.
///
/// The jobs taken are leased from the moment the broker answers, while the report may go on
/// for long (a big result on a busy machine): their leases join `shared.leases` (renewed by the
/// heartbeat) right then, not when the whole exchange is done, or a report slower than the
/// lease would let them expire and run a second time elsewhere.
async fn exchange(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker: &WorkerId,
    outcomes: Vec<(Lease, Outcome)>,
    want: usize,
) -> Exchange {
    let started = tokio::time::Instant::now();
    let broker = shared.broker.as_ref();
    let reported: Vec<JobId> = outcomes.iter().map(|(l, _)| l.job).collect();
    let report = async {
        if let Some((first, _)) = outcomes.first() {
            report(first, || broker.complete_many(outcomes.clone())).await;
        }
    };
    let take = async {
        if want == 0 {
            return Ok(Vec::new());
        }
        let taken = broker
            .take_jobs(
                &info.id,
                &shared.config.node_id,
                worker,
                want,
                Duration::ZERO,
            )
            .await;
        if let Ok(jobs) = &taken {
            let mut leases = lock(&shared.leases);
            for job in jobs {
                leases.insert((slot, job.lease.job), job.lease.clone());
            }
        }
        taken
    };
    let ((), taken) = tokio::join!(report, take);
    Exchange {
        reported,
        taken,
        took: started.elapsed(),
    }
}

/// A slot's jobs between the broker and its worker: taken ahead, and finished but not yet
/// reported. Every one of them holds a lease in `shared.leases` (renewed by the heartbeat).
struct Flow<'a> {
    shared: &'a NodeShared,
    info: &'a SessionInfo,
    slot: usize,
    worker_id: &'a WorkerId,
    ahead: VecDeque<LeasedJob>,
    done: Vec<(Lease, Outcome)>,
    pace: Pace,
    /// The broker said the session is gone.
    gone: bool,
}

impl<'a> Flow<'a> {
    fn ahead_bytes(&self) -> usize {
        self.ahead.iter().map(|j| j.payload.len()).sum()
    }

    /// Jobs to take now, given what is held ahead: up to the depth, and no more payload bytes
    /// (at the jobs' average size) than `AHEAD_BYTES`; one at least when the worker has
    /// nothing else to run (`idle`: nothing held, nothing sent behind its current job).
    fn want(&self, idle: bool) -> usize {
        let depth = self.pace.depth(self.info.spec.auto_batching);
        let fit = match self.pace.payload {
            Some(avg) if avg >= 1.0 => ((AHEAD_BYTES as f64 / avg) as usize).max(1),
            _ => MAX_AHEAD,
        };
        if idle && self.ahead.is_empty() {
            return depth.min(fit).max(1);
        }
        if depth == 0 || self.ahead.len() > depth / 2 || self.ahead_bytes() >= AHEAD_BYTES {
            return 0;
        }
        (depth - self.ahead.len()).min(fit)
    }

    /// Start a background exchange if one is due: outcomes to report, or jobs to top up.
    /// `idle`: the worker has no job sent behind its current one.
    fn start(&mut self, idle: bool) -> Option<futures::future::BoxFuture<'a, Exchange>> {
        let want = if self.gone { 0 } else { self.want(idle) };
        // Nothing to report and nothing held: the idle path's blocking take is next, not a
        // look that finds the queue empty over and over.
        if self.done.is_empty() && (want == 0 || self.ahead.is_empty()) {
            return None;
        }
        let outcomes = std::mem::take(&mut self.done);
        let (shared, info, slot, worker) = (self.shared, self.info, self.slot, self.worker_id);
        Some(Box::pin(exchange(
            shared, info, slot, worker, outcomes, want,
        )))
    }

    /// Take in an exchange's answer.
    fn finish(&mut self, ex: Exchange) {
        {
            let mut leases = lock(&self.shared.leases);
            for job in &ex.reported {
                leases.remove(&(self.slot, *job));
            }
        }
        Pace::note_us(&mut self.pace.io_us, ex.took);
        match ex.taken {
            Ok(jobs) => self.hold(jobs),
            Err(BrokerError::SessionGone(_)) => self.gone = true,
            Err(e) => {
                tracing::debug!(worker = %self.worker_id, error = %e, "taking jobs ahead failed")
            }
        }
    }

    /// Hand every job held ahead back to the queue, in order, unstarted and uncharged (the
    /// running job outlived what they were taken for). Their leases are renewed until the
    /// broker has them back.
    fn give_back(&mut self) -> futures::future::BoxFuture<'a, ()> {
        let jobs: Vec<LeasedJob> = self.ahead.drain(..).collect();
        let (shared, slot) = (self.shared, self.slot);
        tracing::debug!(worker = %self.worker_id, jobs = jobs.len(), "handing jobs taken ahead back to the queue: the running job outlived them");
        Box::pin(async move {
            let returns = jobs.iter().map(|job| async move {
                let lease = &job.lease;
                report(lease, || shared.broker.abandon(lease, AttemptEnd::Returned)).await;
                lock(&shared.leases).remove(&(slot, lease.job));
            });
            futures::future::join_all(returns).await;
        })
    }

    /// Hold newly leased jobs (their leases renewed from now on, if they were not already).
    fn hold(&mut self, jobs: Vec<LeasedJob>) {
        let mut leases = lock(&self.shared.leases);
        for job in jobs {
            Pace::note(&mut self.pace.payload, job.payload.len() as f64);
            leases.insert((self.slot, job.lease.job), job.lease.clone());
            self.ahead.push_back(job);
        }
    }
}

async fn serve_jobs(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker_id: &WorkerId,
    log: &UpdateLog,
    proc: &mut WorkerProc,
    cancel: &mut watch::Receiver<bool>,
) -> SlotExit {
    let mut flow = Flow {
        shared,
        info,
        slot,
        worker_id,
        ahead: VecDeque::new(),
        done: Vec::new(),
        pace: Pace::default(),
        gone: false,
    };
    let mut inflight: Option<futures::future::BoxFuture<'_, Exchange>> = None;
    let exit = serve_flow(&mut flow, &mut inflight, log, proc, cancel).await;
    // Whatever finished is reported before the slot lets go (its leases are still renewed);
    // jobs taken ahead and never started go back to the queue with `release_slot_leases`.
    if let Some(ex) = inflight.take() {
        let ex = ex.await;
        flow.finish(ex);
    }
    flow.gone = true;
    if let Some(ex) = flow.start(true) {
        let ex = ex.await;
        flow.finish(ex);
    }
    exit
}

async fn serve_flow<'a>(
    flow: &mut Flow<'a>,
    inflight: &mut Option<futures::future::BoxFuture<'a, Exchange>>,
    log: &UpdateLog,
    proc: &mut WorkerProc,
    cancel: &mut watch::Receiver<bool>,
) -> SlotExit {
    let (shared, info, slot, worker_id) = (flow.shared, flow.info, flow.slot, flow.worker_id);
    let broker = shared.broker.as_ref();
    let mut applied: UpdateSeq = 0;
    let mut failures = 0u32;
    // Jobs already sent to the worker behind the one it runs (pipelined tiny jobs). Their leases
    // stay in `shared.leases` until they are answered, so a slot that ends with some unanswered
    // hands them back, uncharged (`release_slot_leases`).
    let mut sent: VecDeque<LeasedJob> = VecDeque::new();
    // Whether jobs may be sent behind the next one: not after the worker waited on the broker.
    // The first job after a wait is run alone and timed, so a burst of long jobs that follows
    // tiny ones never has one of them sent to wait behind another.
    let mut pipe_ok = false;
    loop {
        // Catch up with every update this node knows of before the next job (never while a job
        // is in the worker's pipe: its answer comes first).
        if sent.is_empty()
            && log.known() > applied
            && let Err(end) = apply_updates(proc, log, &mut applied).await
        {
            tracing::warn!(worker = %worker_id, "worker died while applying updates: {end}");
            return SlotExit::Restart;
        }
        report_update_errors(shared, &info.id, worker_id, proc).await;
        if inflight.is_none() {
            *inflight = flow.start(sent.is_empty());
        }
        let was_sent = !sent.is_empty();
        let Some(job) = sent.pop_front().or_else(|| flow.ahead.pop_front()) else {
            if let Some(ex) = inflight.take() {
                // Nothing to run until the exchange in flight answers: report and take in one
                // round trip.
                let ex = tokio::select! {
                    biased;
                    _ = cancel.changed() => return SlotExit::Done,
                    ex = ex => ex,
                };
                flow.finish(ex);
                pipe_ok = false;
                if flow.gone {
                    return SlotExit::Done;
                }
                if flow.ahead.is_empty() {
                    shared.set_state(slot, Some(&info.id), WorkerState::Idle);
                }
                continue;
            }
            if flow.gone {
                return SlotExit::Done;
            }
            // Idle: wait for jobs, and take one: it runs now and is timed before any other is
            // held for this worker (the pool's jobs may be other than those measured so far).
            pipe_ok = false;
            let taken = tokio::select! {
                biased;
                _ = cancel.changed() => return SlotExit::Done,
                // An idle worker says nothing; a frame or a closed channel means it broke or died.
                frame = proc.frames.recv() => {
                    let what = match frame {
                        Some(Ok(Incoming::Msg(msg))) => format!("sent {} unprompted", describe(&msg)),
                        Some(Ok(Incoming::Output { job_id, .. })) => {
                            format!("sent a Result for job {job_id} unprompted")
                        }
                        Some(Err(e)) => e.to_string(),
                        None => "closed its channel".into(),
                    };
                    let end = proc.death().await;
                    tracing::warn!(worker = %worker_id, "idle worker {what}: {end}; restarting it");
                    return SlotExit::Restart;
                }
                r = broker.take_jobs(&info.id, &shared.config.node_id, worker_id, 1, shared.config.poll) => r,
            };
            match taken {
                Ok(jobs) if jobs.is_empty() => {
                    // Idle (or woken by an update): refresh the log so idle workers apply it now.
                    if let Err(e) = log.fetch(broker, None).await {
                        if matches!(e, BrokerError::SessionGone(_)) {
                            return SlotExit::Done;
                        }
                        tracing::debug!(error = %e, "update log refresh failed");
                    }
                }
                Ok(jobs) => {
                    failures = 0;
                    flow.hold(jobs);
                }
                Err(BrokerError::SessionGone(_)) => return SlotExit::Done,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(worker = %worker_id, error = %e, "cannot take a job; retrying");
                    tokio::time::sleep(backoff(failures)).await;
                }
            }
            continue;
        };
        shared.set_state(slot, Some(&info.id), WorkerState::Busy);
        let started = tokio::time::Instant::now();
        // Tiny jobs: keep a few more in the worker's channel, unless an update is due first
        // (this job's updates are applied before it runs; a later one waits for the pipe to
        // drain).
        let updated = applied.max(job.update_seq.max(job.log_len));
        let room = if pipe_ok {
            PIPE_AHEAD
                .min(flow.pace.depth(info.spec.auto_batching))
                .saturating_sub(sent.len())
        } else {
            0
        };
        pipe_ok = true;
        let mut next = Vec::new();
        if log.known() <= updated {
            while next.len() < room
                && flow
                    .ahead
                    .front()
                    .is_some_and(|n| n.update_seq.max(n.log_len) <= updated)
            {
                next.extend(flow.ahead.pop_front());
            }
        }
        // Run the job; meanwhile the exchange in flight (if any) reports and takes ahead.
        let written = AtomicUsize::new(0);
        let step = {
            let dispatch = Dispatch {
                job: &job,
                sent: was_sent,
                next: &next,
                written: &written,
            };
            let run = run_one(shared, proc, log, &mut applied, dispatch, cancel);
            tokio::pin!(run);
            // Jobs held ahead go back to the queue once this one outlives what they were taken
            // for (see `Pace`); jobs an exchange brings in after that go back as they arrive.
            let give_back_at = started + flow.pace.give_back_after();
            let mut returning: Option<futures::future::BoxFuture<'a, ()>> = None;
            let step = loop {
                tokio::select! {
                    biased;
                    step = &mut run => break step,
                    ex = some_or_pending(inflight.as_mut()) => {
                        *inflight = None;
                        flow.finish(ex);
                    }
                    () = some_or_pending(returning.as_mut()) => returning = None,
                    () = tokio::time::sleep_until(give_back_at),
                        if returning.is_none() && !flow.ahead.is_empty() =>
                    {
                        returning = Some(flow.give_back());
                    }
                }
            };
            if let Some(returning) = returning {
                returning.await;
            }
            step
        };
        // Jobs that could not be written are not in the worker's channel: back to the front.
        let unsent = next.split_off(written.load(Ordering::Relaxed).min(next.len()));
        sent.extend(next);
        for job in unsent.into_iter().rev() {
            flow.ahead.push_front(job);
        }
        match step {
            JobStep::Done(outcome) => {
                flow.pace.note_job(started.elapsed());
                flow.done.push((job.lease, outcome));
            }
            JobStep::Cancelled => {
                lock(&shared.leases).remove(&(slot, job.lease.job));
                return SlotExit::Abort;
            }
            JobStep::WorkerBroken => {
                lock(&shared.leases).remove(&(slot, job.lease.job));
                shared.set_state(slot, Some(&info.id), WorkerState::Idle);
                return SlotExit::Restart;
            }
        }
        if sent.is_empty() && flow.ahead.is_empty() && inflight.is_none() {
            shared.set_state(slot, Some(&info.id), WorkerState::Idle);
        }
    }
}

/// Await `f` if there is one; never finish otherwise (a `select!` branch that is off).
async fn some_or_pending<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

enum JobStep {
    /// The worker answered: the result (or its error) to report.
    Done(Outcome),
    Cancelled,
    WorkerBroken,
}

/// A job to run and what goes with it on the worker's channel.
struct Dispatch<'j> {
    job: &'j LeasedJob,
    /// Already sent (it went along behind the previous job).
    sent: bool,
    /// Jobs to send along behind this one (and behind those sent before).
    next: &'j [LeasedJob],
    /// How many of `next` were written.
    written: &'j AtomicUsize,
}

/// Run one leased job on the worker; a broken attempt is handed back to the broker here, a
/// finished one is returned for the caller to report.
async fn run_one(
    shared: &NodeShared,
    proc: &mut WorkerProc,
    log: &UpdateLog,
    applied: &mut UpdateSeq,
    dispatch: Dispatch<'_>,
    cancel: &mut watch::Receiver<bool>,
) -> JobStep {
    let Dispatch {
        job,
        sent,
        next,
        written,
    } = dispatch;
    let broker = shared.broker.as_ref();
    let lease = &job.lease;
    let need = job.update_seq.max(job.log_len);
    let run = async {
        if !sent {
            if need > *applied {
                if let Err(e) = log.fetch(broker, Some(need)).await {
                    tracing::warn!(job = %lease.job, error = %e, "cannot read the update log");
                }
                apply_updates(proc, log, applied).await?;
            }
            proc.send_job(job).await?;
        }
        for next in next {
            // Pipelined: the worker finds the next job waiting when it answers this one. A
            // failed send means the worker died, but not necessarily on this job: the replies,
            // read in order, tell which job it was running (the first one unanswered).
            if let Err(e) = proc.write_job(next).await {
                tracing::debug!(job = %next.lease.job, error = %e, "cannot send a job ahead");
                break;
            }
            written.fetch_add(1, Ordering::Relaxed);
        }
        proc.job_reply(job.lease.job.0).await
    };
    let reply = tokio::select! {
        biased;
        _ = cancel.changed() => return JobStep::Cancelled,
        r = run => r,
    };
    match reply {
        Ok(JobReply::Output(bytes)) => JobStep::Done(Ok(bytes)),
        Ok(JobReply::Failed {
            message,
            undecodable,
        }) => {
            let (kind, end) = if undecodable {
                (JobFailure::Codec, AttemptEnd::Undecodable(message))
            } else {
                (JobFailure::Worker, AttemptEnd::WorkerError(message))
            };
            JobStep::Done(Err((kind, end)))
        }
        Err(end) => {
            tracing::warn!(job = %lease.job, attempt = lease.attempt, worker = %lease.worker, "attempt failed: {end}");
            report(lease, || broker.abandon(lease, end.clone())).await;
            JobStep::WorkerBroken
        }
    }
}

/// How long a slot keeps retrying a report while the broker cannot be reached.
const REPORT_PATIENCE: Duration = Duration::from_secs(60);
/// Longest pause between two tries of a report: a slot hears that the broker is back (a link
/// healed, a server restarted) within this, instead of idling through a long back-off.
const REPORT_RETRY_MAX: Duration = Duration::from_secs(1);

/// Call the broker until it answers or the error is not transient; the lease stays renewed by
/// the heartbeat meanwhile, so retrying cannot lose the job.
async fn report<T, F, Fut>(lease: &Lease, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    let mut tries = 0u32;
    let deadline = tokio::time::Instant::now() + REPORT_PATIENCE;
    loop {
        match call().await {
            Ok(_) => return,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tries += 1;
                tokio::time::sleep(backoff(tries).min(REPORT_RETRY_MAX)).await;
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

async fn apply_updates(
    proc: &mut WorkerProc,
    log: &UpdateLog,
    applied: &mut UpdateSeq,
) -> Result<(), AttemptEnd> {
    for (seq, payload) in log.after(*applied).await {
        proc.apply_update(seq, &payload).await?;
        *applied = seq;
    }
    Ok(())
}

/// Tell the pool about updates a worker refused (once each), attributed to the worker.
async fn report_update_errors(
    shared: &NodeShared,
    session: &SessionId,
    worker: &WorkerId,
    proc: &mut WorkerProc,
) {
    for (seq, message) in std::mem::take(&mut proc.update_errors) {
        let problem = NodeProblem::UpdateFailed {
            node: shared.config.node_id.clone(),
            worker: worker.clone(),
            seq,
            message,
        };
        if let Err(e) = shared.broker.report_problem(session, problem).await {
            tracing::warn!(%worker, seq, error = %e, "cannot report the refused update");
        }
    }
}

/// A frame from a worker as the agent takes it in.
#[derive(Debug)]
enum Incoming {
    /// A job's output, sliced out of the frame as read (64 MiB results are not copied again).
    Output { job_id: u64, payload: Bytes },
    /// Any other message (or a `Result` in a layout this crate does not write).
    Msg(FromWorker),
}

fn incoming(body: Vec<u8>) -> Result<Incoming, FrameError> {
    match protocol::split_result(&body) {
        Some((job_id, at)) => Ok(Incoming::Output {
            job_id,
            payload: Bytes::from(body).slice(at..),
        }),
        None => protocol::decode_body(&body).map(Incoming::Msg),
    }
}

enum StartError {
    UnknownKind(Vec<String>),
    Init(String),
}

enum JobReply {
    Output(Bytes),
    Failed { message: String, undecodable: bool },
}

/// The agent's side of one worker process.
struct WorkerProc {
    child: tokio::process::Child,
    pid: u32,
    label: String,
    writer: OwnedWriteHalf,
    frames: mpsc::Receiver<Result<Incoming, FrameError>>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Updates this worker refused, not yet reported to the pool.
    update_errors: Vec<(UpdateSeq, String)>,
}

impl WorkerProc {
    async fn start(
        shared: &NodeShared,
        info: &SessionInfo,
        slot: usize,
        worker_id: &WorkerId,
    ) -> Result<Self, StartError> {
        let cfg = &shared.config;
        let kind = &info.spec.kind;
        let command = cfg
            .command_for(kind)
            .ok_or_else(|| StartError::UnknownKind(cfg.known_kinds()))?;
        let slot_spec = cfg.slots.get(slot).cloned().unwrap_or_default();
        let mut env = slot_spec.env.clone();
        env.push(("DC_NODE_ID".into(), cfg.node_id.to_string()));
        env.push(("DC_WORKER_ID".into(), worker_id.to_string()));
        let spawned = dc_gpu::proc::spawn_isolated(dc_gpu::proc::SpawnSpec {
            program: command.program.clone(),
            args: command.args.clone(),
            env,
        })
        .await
        .map_err(|e| {
            StartError::Init(format!(
                "cannot start worker program {}: {e}",
                command.program.display()
            ))
        })?;
        let mut child = spawned.child;
        let label = worker_id.to_string();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, label.clone(), tail.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, label.clone(), tail.clone(), true));
        }
        let channel = spawned
            .channel
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(spawned.channel));
        let mut proc = match channel {
            Ok(stream) => {
                let (mut read, writer) = stream.into_split();
                let (tx, frames) = mpsc::channel(4);
                tokio::spawn(async move {
                    loop {
                        let frame = protocol::read_body(&mut read).await.and_then(incoming);
                        let end = frame.is_err();
                        if tx.send(frame).await.is_err() || end {
                            return;
                        }
                    }
                });
                WorkerProc {
                    pid: spawned.pid,
                    child,
                    label,
                    writer,
                    frames,
                    tail,
                    update_errors: Vec::new(),
                }
            }
            Err(e) => {
                dc_gpu::proc::signal_group(spawned.pid, nix_kill());
                return Err(StartError::Init(format!("protocol channel: {e}")));
            }
        };
        proc.handshake(shared, info, slot, worker_id).await?;
        Ok(proc)
    }

    async fn handshake(
        &mut self,
        shared: &NodeShared,
        info: &SessionInfo,
        slot: usize,
        worker_id: &WorkerId,
    ) -> Result<(), StartError> {
        let cfg = &shared.config;
        let hello = match tokio::time::timeout(cfg.hello_timeout, self.next()).await {
            Ok(r) => r,
            Err(_) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "worker process sent no handshake within {:?} (is it a distributed-computing worker program?)",
                    cfg.hello_timeout
                )));
            }
        };
        match hello {
            Ok(FromWorker::Hello {
                protocol, version, ..
            }) if protocol == PROTOCOL_NAME && version == PROTOCOL_VERSION => {}
            Ok(FromWorker::Hello {
                protocol, version, ..
            }) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "worker speaks {protocol} version {version}; this node speaks {PROTOCOL_NAME} version {PROTOCOL_VERSION}: rebuild the worker program against the same release"
                )));
            }
            Ok(other) => {
                self.kill().await;
                return Err(StartError::Init(format!(
                    "expected the handshake, got {other:?}"
                )));
            }
            Err(end) => return Err(StartError::Init(end.to_string())),
        }
        let slot_spec = cfg.slots.get(slot).cloned().unwrap_or_default();
        let init = ToWorker::Init {
            kind: info.spec.kind.clone(),
            init: protocol::Payload::borrowed(&info.spec.init),
            node_id: cfg.node_id.to_string(),
            worker_id: worker_id.to_string(),
            slot: slot as u32,
            devices: slot_spec.devices,
        };
        if let Err(end) = self.send(&init).await {
            return Err(StartError::Init(end.to_string()));
        }
        match self.next().await {
            Ok(FromWorker::Ready) => Ok(()),
            Ok(FromWorker::InitError { message }) => {
                self.kill().await;
                Err(StartError::Init(message))
            }
            Ok(FromWorker::UnknownKind { known }) => {
                self.kill().await;
                Err(StartError::UnknownKind(known))
            }
            Ok(other) => {
                self.kill().await;
                Err(StartError::Init(format!("expected Ready, got {other:?}")))
            }
            Err(end) => Err(StartError::Init(end.to_string())),
        }
    }

    /// The next frame, or how the worker broke.
    async fn next(&mut self) -> Result<FromWorker, AttemptEnd> {
        Ok(match self.next_incoming().await? {
            Incoming::Msg(msg) => msg,
            Incoming::Output { job_id, payload } => FromWorker::Result {
                job_id,
                payload: payload.to_vec(),
            },
        })
    }

    /// The next frame, a job's output kept as the bytes read (no copy), or how the worker broke.
    async fn next_incoming(&mut self) -> Result<Incoming, AttemptEnd> {
        match self.frames.recv().await {
            Some(Ok(msg)) => Ok(msg),
            Some(Err(FrameError::Closed)) | None => Err(self.death().await),
            // A worker that dies with bytes unread (a job sent behind the one it ran) resets
            // the channel instead of closing it: a death all the same.
            Some(Err(FrameError::Io(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Err(self.death().await)
            }
            Some(Err(e)) => {
                tracing::warn!(worker = %self.label, error = %e, "worker broke the frame protocol; killing it");
                self.kill().await;
                Err(AttemptEnd::Protocol(e.to_string()))
            }
        }
    }

    async fn send(&mut self, msg: &ToWorker<'_>) -> Result<(), AttemptEnd> {
        match protocol::write_frame(&mut self.writer, msg).await {
            Ok(()) => Ok(()),
            Err(_) => Err(self.death().await),
        }
    }

    /// The channel ended: wait briefly for the process to exit and say how it did.
    async fn death(&mut self) -> AttemptEnd {
        let status = match tokio::time::timeout(Duration::from_secs(3), self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                // Closed its channel but lives on: it is of no use any more.
                self.kill().await;
                self.child.try_wait().ok().flatten()
            }
        };
        // Give the output forwarders a moment to drain the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let how = status
            .map(|s| dc_gpu::proc::describe_exit(&s))
            .unwrap_or_else(|| "closed its protocol channel".into());
        AttemptEnd::ProcessDied {
            how,
            last_lines: lock(&self.tail).iter().cloned().collect(),
        }
    }

    /// Send a job; a failure is the worker's death.
    async fn send_job(&mut self, job: &LeasedJob) -> Result<(), AttemptEnd> {
        match self.write_job(job).await {
            Ok(()) => Ok(()),
            Err(FrameError::Io(_)) => Err(self.death().await),
            Err(e) => Err(AttemptEnd::Protocol(e.to_string())),
        }
    }

    /// Write a job's frame: its head, then the payload as it is (no copy into a frame buffer).
    async fn write_job(&mut self, job: &LeasedJob) -> Result<(), FrameError> {
        use tokio::io::AsyncWriteExt;
        let msg = ToWorker::Job {
            job_id: job.lease.job.0,
            attempt: job.lease.attempt,
            payload: protocol::Payload::borrowed(&[]),
        };
        let head = protocol::encode_frame_head(&msg, job.payload.len())?;
        self.writer.write_all(&head).await?;
        self.writer.write_all(&job.payload).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The reply to job `id`, the oldest job sent and not yet answered.
    async fn job_reply(&mut self, id: u64) -> Result<JobReply, AttemptEnd> {
        let msg = match self.next_incoming().await? {
            Incoming::Output { job_id, payload } if job_id == id => {
                return Ok(JobReply::Output(payload));
            }
            Incoming::Output { job_id, payload } => FromWorker::Result {
                job_id,
                payload: payload.to_vec(),
            },
            Incoming::Msg(msg) => msg,
        };
        match msg {
            FromWorker::Result { job_id, payload } if job_id == id => {
                Ok(JobReply::Output(Bytes::from(payload)))
            }
            FromWorker::JobError {
                job_id,
                message,
                undecodable,
            } if job_id == id => Ok(JobReply::Failed {
                message,
                undecodable,
            }),
            other => {
                self.kill().await;
                Err(AttemptEnd::Protocol(format!(
                    "expected the result of job {id}, got {}",
                    describe(&other)
                )))
            }
        }
    }

    async fn apply_update(&mut self, seq: UpdateSeq, payload: &[u8]) -> Result<(), AttemptEnd> {
        self.send(&ToWorker::Update {
            seq,
            payload: protocol::Payload::borrowed(payload),
        })
        .await?;
        match self.next().await? {
            FromWorker::UpdateApplied { seq: s } if s == seq => Ok(()),
            FromWorker::UpdateError { seq: s, message } if s == seq => {
                tracing::error!(worker = %self.label, seq, %message, "worker could not apply update");
                self.update_errors.push((seq, message));
                Ok(())
            }
            other => {
                self.kill().await;
                Err(AttemptEnd::Protocol(format!(
                    "expected the answer to update {seq}, got {}",
                    describe(&other)
                )))
            }
        }
    }

    async fn kill(&mut self) {
        dc_gpu::proc::signal_group(self.pid, nix_kill());
        let _ = self.child.wait().await;
    }

    /// Ask the worker to exit; TERM then KILL its group if it does not.
    async fn stop(mut self, grace: Duration) {
        let _ = protocol::write_frame(&mut self.writer, &ToWorker::Shutdown).await;
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = dc_gpu::proc::stop_group(&mut self.child, grace).await;
        }
        // Grandchildren of a clean exit may linger in the group.
        dc_gpu::proc::signal_group(self.pid, nix_kill());
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        // Backstop for a cancelled task: never leave a worker (or its children) behind.
        if matches!(self.child.try_wait(), Ok(None)) {
            dc_gpu::proc::signal_group(self.pid, nix_kill());
        }
    }
}

fn nix_kill() -> dc_gpu::proc::Signal {
    dc_gpu::proc::Signal::SIGKILL
}

fn describe(msg: &FromWorker) -> String {
    match msg {
        FromWorker::Result { job_id, .. } => format!("a result for job {job_id}"),
        FromWorker::JobError { job_id, .. } => format!("an error for job {job_id}"),
        other => format!("{other:?}"),
    }
}

async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    label: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    is_stderr: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if is_stderr {
            eprintln!("[{label}] {line}");
        } else {
            println!("[{label}] {line}");
        }
        let mut tail = lock(&tail);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}
