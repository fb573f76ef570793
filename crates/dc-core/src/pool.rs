//! [`Pool`]: what a user's script or service holds to run jobs on the workers.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::{AgentConfig, AgentHandle, SlotSpec, WorkerCommand, host_name, spawn_agent};
use crate::backoff::Backoff;
use crate::broker::{
    Broker, JobId, JobOutcome, JobResult, NewJob, NodeId, NodeProblem, SessionId, SessionInfo,
    SessionSpec, SessionState, SessionStats, UpdateSeq,
};
use crate::error::{BrokerError, PoolError};
use crate::local::LocalBroker;
use crate::registry;
use crate::worker::Worker;

/// The port a head node's pool server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 8899;

/// Jobs per `submit` call.
const SUBMIT_BATCH: usize = 1024;

/// A pool's network address: a head node (`address:port` + password) or a broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkTarget {
    /// Head node host (default `localhost`).
    pub address: String,
    /// Head node pool port (default [`DEFAULT_PORT`]).
    pub port: u16,
    /// Whether `address` was given (with a join token, it overrides the token's addresses).
    pub address_set: bool,
    /// The pool password.
    pub password: Option<String>,
    /// A join token: the head's addresses, port, user, secret and CA hash.
    pub token: Option<String>,
    /// Whether to speak TLS to a head node (default true; false for a head started with
    /// `--no-tls`).
    pub tls: bool,
    /// The CA file that `rediss://` brokers' certificates are checked against (default: the
    /// system's roots).
    pub tls_ca: Option<PathBuf>,
    /// The known-heads file that pins a head reached with a password (default: the
    /// `DC_KNOWN_HEADS` file, else the user's config directory).
    pub known_heads: Option<PathBuf>,
    /// A broker URL, when given instead of a head node.
    pub url: Option<String>,
    /// How long to try before reporting [`PoolError::Unreachable`].
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for NetworkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkTarget")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("known_heads", &self.known_heads)
            .field("url", &self.url.as_ref().map(|u| redact_url(u)))
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A URL with its password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Turns a [`NetworkTarget`] into a broker: how a pool type reaches head nodes and broker URLs.
///
/// `dc-core` names no network backend; its default, [`LocalOnly`], refuses network targets.
/// The facade crate's `Pool` is `dc_core::Pool<W, Backends>`, whose connector knows Redis (and
/// RabbitMQ with its feature), chosen by URL scheme.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Connect to the broker named by `target`.
    ///
    /// # Errors
    /// [`PoolError::Auth`], [`PoolError::Unreachable`], or [`PoolError::Config`] for a URL
    /// scheme without a backend.
    async fn connect(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError>;
}

/// The connector of a pool built from `dc-core` alone: local pools and broker objects only.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalOnly;

#[async_trait::async_trait]
impl Connector for LocalOnly {
    async fn connect(target: &NetworkTarget) -> Result<Arc<dyn Broker>, PoolError> {
        Err(PoolError::Config(match &target.url {
            Some(url) => format!(
                "no broker backend for {:?} in this build: use the distributed-computing crate (Redis, RabbitMQ), .local() or .broker_instance(..)",
                redact_url(url)
            ),
            None => format!(
                "no network backend in this build to reach a head node at {}:{}: use the distributed-computing crate, .local() or .broker_instance(..)",
                target.address, target.port
            ),
        }))
    }
}

/// Where a pool's broker lives.
#[derive(Debug, Clone)]
enum Target {
    /// A head node at `address:port` (the default).
    Server,
    /// A broker URL.
    Url(String),
    /// Embedded: no server, worker processes on this machine.
    Local,
    /// A broker object the caller built.
    Instance(Arc<dyn Broker>),
}

/// Builds a [`Pool`]: say where the workers are, then `connect`.
///
/// # Examples
/// ```no_run
/// # use dc_core::{Pool, Worker, WorkerContext, BoxError};
/// # struct Sweep;
/// # impl Worker for Sweep {
/// #     const KIND: &'static str = "sweep";
/// #     type Init = (); type Job = u32; type Output = u32; type Update = ();
/// #     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Sweep) }
/// #     fn run(&mut self, j: u32) -> Result<u32, BoxError> { Ok(j) }
/// # }
/// # async fn demo() -> Result<(), dc_core::PoolError> {
/// let pool = Pool::<Sweep>::builder(()).local().cpu_workers(2).connect().await?;
/// assert_eq!(pool.map(vec![1, 2, 3]).await?, vec![1, 2, 3]);
/// pool.close().await?;
/// # Ok(()) }
/// ```
#[must_use = "a builder does nothing until `connect`"]
pub struct PoolBuilder<W: Worker, C: Connector = LocalOnly> {
    init: W::Init,
    target: Target,
    password: Option<String>,
    token: Option<String>,
    tls: bool,
    tls_ca: Option<PathBuf>,
    known_heads: Option<PathBuf>,
    address: String,
    address_set: bool,
    port: u16,
    max_attempts: u32,
    lease: Duration,
    auto_batching: bool,
    cpu_workers: Option<usize>,
    gpus: dc_gpu::GpuSelection,
    workers_per_gpu: usize,
    worker_program: Option<PathBuf>,
    connect_timeout: Duration,
    outage_timeout: Duration,
    _connector: PhantomData<fn() -> C>,
}

impl<W: Worker, C: Connector> std::fmt::Debug for PoolBuilder<W, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("kind", &W::KIND)
            .field("target", &self.target)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("max_attempts", &self.max_attempts)
            .field("lease", &self.lease)
            .field("auto_batching", &self.auto_batching)
            .finish_non_exhaustive()
    }
}

impl<W: Worker, C: Connector> PoolBuilder<W, C> {
    fn new(init: W::Init) -> Self {
        PoolBuilder {
            init,
            target: Target::Server,
            password: None,
            token: None,
            tls: true,
            tls_ca: None,
            known_heads: None,
            address: "localhost".into(),
            address_set: false,
            port: DEFAULT_PORT,
            max_attempts: 3,
            lease: default_lease(),
            auto_batching: true,
            cpu_workers: None,
            gpus: dc_gpu::GpuSelection::Auto,
            workers_per_gpu: 1,
            worker_program: None,
            connect_timeout: Duration::from_secs(5),
            outage_timeout: DEFAULT_OUTAGE_TIMEOUT,
            _connector: PhantomData,
        }
    }

    /// How long `connect` tries to reach a head node or broker (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a call (`update_workers`, `workers_count`, `nodes_count`, `close`) rides out
    /// a broker it cannot reach (a head restarting its server, a network blip), retrying with
    /// jittered backoff, before it fails with [`PoolError::Unreachable`] saying how long the
    /// broker was gone (default 60 s). `map` and `imap_unordered` always wait.
    pub fn broker_outage_timeout(mut self, timeout: Duration) -> Self {
        self.outage_timeout = timeout;
        self
    }

    /// The pool password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// A join token, as a head writes it to `<state-dir>/join-token` (`dc1:…`): it names the
    /// head's addresses and port, the user and secret, and the SHA-256 of the head's TLS CA, so
    /// the pool checks it reached that head before it sends the secret. [`Self::address`]
    /// overrides the token's addresses.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.trim().to_string());
        self.target = Target::Server;
        self
    }

    /// The CA certificate file (PEM) that a `rediss://` broker's certificate must chain to
    /// (default: the system's root certificates), for a Redis behind a private CA.
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// The known-heads file that pins a head reached with a password (trust on first use;
    /// default: `DC_KNOWN_HEADS`, else `distributed-computing/known_heads` in the user's config
    /// directory).
    pub fn known_heads(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_heads = Some(path.into());
        self
    }

    /// Speak plain Redis to a head started with `--no-tls` (on a trusted network only: the
    /// password and every payload cross it in clear).
    pub fn no_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    /// The head node's address (default `localhost`).
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = address.into();
        self.address_set = true;
        self.target = Target::Server;
        self
    }

    /// The head node's pool port (default [`DEFAULT_PORT`]).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// An existing broker by URL (`redis://`, `rediss://`, `amqp://`).
    pub fn broker(mut self, url: impl Into<String>) -> Self {
        self.target = Target::Url(url.into());
        self
    }

    /// A broker object built by the caller (any [`Broker`] implementation).
    pub fn broker_instance(mut self, broker: Arc<dyn Broker>) -> Self {
        self.target = Target::Instance(broker);
        self
    }

    /// Embedded mode: no server; worker processes are spawned on this machine from this
    /// executable (whose `main` must call `Registry::serve_if_worker` first), one per GPU, or
    /// one per core without GPUs.
    pub fn local(mut self) -> Self {
        self.target = Target::Local;
        self
    }

    /// Failed attempts (worker process died, node vanished) before a job fails for good
    /// (default 3). A worker returning `Err` fails the job at once.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// How long a job's lease (and this pool's session) lives without renewal (default 5 s, or
    /// `DC_LEASE_MS`): a node silent this long loses its jobs to other nodes. Keep it several
    /// node heartbeats long (nodes beat every second by default, `--heartbeat-ms`).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(300));
        self
    }

    /// Automatic batching of tiny jobs (default on). When a worker finishes jobs much faster
    /// than a broker round trip, its node takes several jobs per round trip and reports their
    /// results together, and keeps a few taken ahead while one runs (jobs under a millisecond:
    /// one already in the worker's channel); the depth adapts to the measured job and
    /// round-trip times, and jobs that take long compared with a round trip are taken one at a
    /// time. Nothing is held back from an idle worker: jobs held ahead go back to the queue as
    /// soon as the running job outlives what they were taken for. Each job still has its own
    /// lease, attempts and outcome, and `map` keeps its order. Turn it off to have every job
    /// dispatched alone (each result is then reported the moment it is ready).
    pub fn auto_batching(mut self, on: bool) -> Self {
        self.auto_batching = on;
        self
    }

    /// Local mode: CPU worker processes when there is no GPU (default: the available cores).
    pub fn cpu_workers(mut self, n: usize) -> Self {
        self.cpu_workers = Some(n);
        self
    }

    /// Local mode: which GPUs to use (default: all visible).
    pub fn gpus(mut self, gpus: dc_gpu::GpuSelection) -> Self {
        self.gpus = gpus;
        self
    }

    /// Local mode: worker processes per GPU (default 1; more share the device, no isolation).
    pub fn workers_per_gpu(mut self, n: usize) -> Self {
        self.workers_per_gpu = n.max(1);
        self
    }

    /// Local mode: run workers from this program instead of the current executable: a Rust
    /// binary built with a `Registry`, or any executable speaking the frame protocol of
    /// `docs/worker-protocol.md` (it is run as `PROGRAM __dc-worker`).
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_program = Some(path.into());
        self
    }

    /// Connect: open a session (waiting while another pool is active) and, in local mode,
    /// start the worker processes.
    ///
    /// # Errors
    /// - [`PoolError::Config`] for a local pool whose program never called `serve_if_worker`,
    ///   or a target this build has no backend for;
    /// - [`PoolError::UnknownWorkerKind`] when the local program has no `W::KIND`;
    /// - [`PoolError::Codec`] when the init data does not encode;
    /// - [`PoolError::Broker`] when the broker fails.
    pub async fn connect(self) -> Result<Pool<W, C>, PoolError> {
        let init = to_cbor(&self.init).map_err(|e| PoolError::codec("init data", e))?;
        let spec = SessionSpec {
            kind: W::KIND.to_string(),
            init: init.to_vec(),
            max_attempts: self.max_attempts,
            lease: self.lease,
            owner: format!("{} pid {}", host_name(), std::process::id()),
            auto_batching: self.auto_batching,
        };
        match self.target.clone() {
            Target::Local => self.connect_local(spec).await,
            Target::Instance(broker) => {
                let info = open_session(broker.as_ref(), &spec).await?;
                Ok(Pool::start(broker, info, None, self.outage_timeout))
            }
            Target::Url(_) | Target::Server => {
                let target = NetworkTarget {
                    address: self.address.clone(),
                    address_set: self.address_set,
                    port: self.port,
                    password: self.password.clone(),
                    token: self.token.clone(),
                    tls: self.tls,
                    tls_ca: self.tls_ca.clone(),
                    known_heads: self.known_heads.clone(),
                    url: match &self.target {
                        Target::Url(url) => Some(url.clone()),
                        _ => None,
                    },
                    connect_timeout: self.connect_timeout,
                };
                let broker = C::connect(&target).await?;
                let info = open_session(broker.as_ref(), &spec).await?;
                Ok(Pool::start(broker, info, None, self.outage_timeout))
            }
        }
    }

    async fn connect_local(self, spec: SessionSpec) -> Result<Pool<W, C>, PoolError> {
        let (command, kinds) = match &self.worker_program {
            Some(path) => (WorkerCommand::program(path), vec![W::KIND.to_string()]),
            None => {
                let known = registry::local_kinds().ok_or_else(|| {
                    PoolError::Config(
                        "a local pool spawns this executable as its workers: call Registry::new().register::<YourWorker>().serve_if_worker() first thing in main".into(),
                    )
                })?;
                if !known.iter().any(|k| k == W::KIND) {
                    return Err(PoolError::UnknownWorkerKind {
                        kind: W::KIND.into(),
                        known: known.to_vec(),
                    });
                }
                let command = WorkerCommand::current_exe().map_err(|e| {
                    PoolError::Config(format!("cannot find the current executable: {e}"))
                })?;
                (command, known.to_vec())
            }
        };
        let slots = local_slots(&self.gpus, self.workers_per_gpu, self.cpu_workers);
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
        let info = open_session(broker.as_ref(), &spec).await?;
        let mut config = AgentConfig::new(
            NodeId(format!("local-{}", std::process::id())),
            command,
            kinds,
            slots,
        );
        config.heartbeat = (self.lease / 4).min(Duration::from_secs(1));
        let agent = spawn_agent(broker.clone(), config);
        Ok(Pool::start(broker, info, Some(agent), self.outage_timeout))
    }
}

/// The lease of a pool that does not set one: `DC_LEASE_MS` when set, else 5 s.
fn default_lease() -> Duration {
    std::env::var("DC_LEASE_MS")
        .ok()
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms.max(300)))
        .unwrap_or(Duration::from_secs(5))
}

/// Worker slots of a local pool: one per GPU (times `per_gpu`), else CPU workers.
fn local_slots(
    gpus: &dc_gpu::GpuSelection,
    per_gpu: usize,
    cpu_workers: Option<usize>,
) -> Vec<SlotSpec> {
    let inventory = dc_gpu::discover(gpus);
    if !inventory.gpus.is_empty() {
        return inventory
            .gpus
            .iter()
            .flat_map(|gpu| std::iter::repeat_n(SlotSpec::for_device(Some(gpu)), per_gpu))
            .collect();
    }
    let n = cpu_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    vec![SlotSpec::for_device(None); n.max(1)]
}

async fn open_session(broker: &dyn Broker, spec: &SessionSpec) -> Result<SessionInfo, PoolError> {
    let mut waiting = false;
    loop {
        if let Some(info) = broker.try_open_session(spec).await? {
            if waiting {
                tracing::info!(session = %info.id, "the other pool closed; this one starts");
            }
            return Ok(info);
        }
        if !waiting {
            waiting = true;
            tracing::info!(kind = %spec.kind, "another pool is active on this server; waiting for it to close");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn to_cbor<T: Serialize>(value: &T) -> Result<Bytes, String> {
    let mut buf = Vec::new();
    ciborium::into_writer(value, &mut buf).map_err(|e| e.to_string())?;
    Ok(Bytes::from(buf))
}

/// A writer that refuses to grow past `limit` bytes.
struct Limited {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes offered in all, the refused ones included.
    offered: usize,
}

impl std::io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.offered = self.offered.saturating_add(data.len());
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other("over the payload limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// CBOR of `value` for a payload of at most `limit` bytes: a value over the limit is refused
/// as soon as its encoding passes it, not after all of it was encoded (`what` names it in a
/// codec error).
fn to_payload<T: Serialize>(value: &T, limit: usize, what: &str) -> Result<Bytes, PoolError> {
    let mut out = Limited {
        buf: Vec::new(),
        limit,
        offered: 0,
    };
    match ciborium::into_writer(value, &mut out) {
        Ok(()) => Ok(Bytes::from(out.buf)),
        Err(_) if out.offered > limit => Err(PoolError::PayloadTooLarge {
            size: out.offered,
            limit,
        }),
        Err(e) => Err(PoolError::codec(what, e)),
    }
}

/// Outputs at least this big are decoded on a blocking thread (see [`off_runtime`]).
const DECODE_OFF_RUNTIME: usize = 1 << 20;

/// Run CPU work that may take seconds (the CBOR of a big job, update or output) on a blocking
/// thread, so it never holds up the pool's keep-alive and result reader, nor the caller's
/// other tasks, on a small runtime. A panic in it (a user's `Serialize` impl) is resumed here.
///
/// # Errors
/// [`PoolError::Closed`] when the runtime is shutting down.
async fn off_runtime<R: Send + 'static>(
    work: impl FnOnce() -> R + Send + 'static,
) -> Result<R, PoolError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => Ok(r),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(PoolError::Closed),
        },
    }
}

/// What the dispatcher hands to a waiting call.
#[derive(Debug)]
enum Delivery {
    Result {
        index: usize,
        result: JobResult,
    },
    /// The pool cannot go on (closed, session lost, no worker can run it): ends the stream.
    Abort(PoolError),
}

/// A job waiting for its result: who wants it, and what to resubmit if the broker loses it.
#[derive(Debug)]
struct Route {
    index: usize,
    tx: mpsc::UnboundedSender<Delivery>,
    payload: Bytes,
    update_seq: UpdateSeq,
}

/// State shared by the pool handle, its streams and its background tasks.
#[derive(Debug)]
struct Shared {
    broker: Arc<dyn Broker>,
    spec: SessionSpec,
    /// The current session; replaced when the broker lost the old one.
    session: Mutex<SessionId>,
    next_job: AtomicU64,
    update_seq: AtomicU64,
    routes: Mutex<HashMap<JobId, Route>>,
    /// Every update published, in order: replayed into a new session after a broker loss.
    /// Held across a publish so updates and recovery never interleave.
    updates: tokio::sync::Mutex<Vec<Bytes>>,
    /// When the last result arrived or the last submission ended (or the pool opened).
    last_result: Mutex<tokio::time::Instant>,
    /// Submissions in progress: their jobs are routed but may not be in the broker yet.
    submitting: AtomicUsize,
    closed: AtomicBool,
    /// How long a call rides out a broker it cannot reach.
    outage_timeout: Duration,
}

impl Shared {
    /// Call the broker until it answers, riding out connection trouble (a server restarting,
    /// a network blip) with jittered backoff for up to the outage timeout; then fail with
    /// [`PoolError::Unreachable`], saying how long the broker was gone. Any other error
    /// returns at once, as does a pool closed meanwhile (unless `closing`: the call closes it).
    async fn ride_out<T, F, Fut>(&self, closing: bool, mut call: F) -> Result<T, PoolError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let mut outage: Option<(tokio::time::Instant, Backoff)> = None;
        let mut said: Option<tokio::time::Instant> = None;
        loop {
            match call().await {
                Err(e) if e.is_transient() && (closing || !self.closed.load(Ordering::Acquire)) => {
                    let (since, backoff) = outage.get_or_insert_with(|| {
                        (
                            tokio::time::Instant::now(),
                            Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
                        )
                    });
                    let gone = since.elapsed();
                    if gone >= self.outage_timeout {
                        return Err(PoolError::Unreachable(format!(
                            "the broker could not be reached for {:.1} s (the outage timeout is {:?}): {e}",
                            gone.as_secs_f64(),
                            self.outage_timeout
                        )));
                    }
                    if said.is_none_or(|at| at.elapsed() >= OUTAGE_SAID_EVERY) {
                        said = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %e, gone_s = gone.as_secs(), "the broker cannot be reached; retrying");
                    }
                    let pause = backoff.next_pause().min(self.outage_timeout - gone);
                    tokio::time::sleep(pause).await;
                }
                other => return other.map_err(PoolError::from),
            }
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The jobs still awaited, in id order.
    fn awaited(&self) -> Vec<JobId> {
        let mut ids: Vec<JobId> = self.routes().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn id(&self) -> SessionId {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The broker lost session `lost` (restarted empty, or the session expired while this
    /// process stalled): open a new one, replay the update log, and resubmit every job still
    /// waiting for its result, under the same job ids. Results already delivered are not
    /// redone; a result that arrives twice is dropped. Retries until it works or the pool
    /// closes.
    async fn recover(&self, lost: &SessionId) {
        let updates = self.updates.lock().await;
        if self.id() != *lost || self.closed.load(Ordering::Acquire) {
            return; // Another task recovered already, or the pool closed.
        }
        tracing::warn!(session = %lost, "pool session lost by the broker; reopening it and resubmitting outstanding jobs");
        // What is left of it (a damaged session is not always deleted) is closed, so that nodes
        // still serving it leave it for the new one; every job it held is submitted again.
        if let Err(e) = self.broker.close_session(lost).await {
            tracing::debug!(session = %lost, error = %e, "closing the lost session failed");
        }
        let mut failures = 0u32;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match self.reopen(&updates).await {
                Ok(id) => {
                    tracing::info!(session = %id, "pool session recovered");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "recovering the pool session failed; retrying");
                    retry_pause(failures).await;
                }
            }
        }
    }

    async fn reopen(&self, updates: &[Bytes]) -> Result<SessionId, PoolError> {
        let info = open_session(self.broker.as_ref(), &self.spec).await?;
        for update in updates {
            self.broker.publish_update(&info.id, update.clone()).await?;
        }
        let resubmitted = self.submit_again(&info.id, &self.awaited()).await?;
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = info.id.clone();
        tracing::info!(session = %info.id, resubmitted, updates = updates.len(), "outstanding jobs resubmitted");
        Ok(info.id)
    }

    /// Ask the broker which outstanding jobs it no longer holds, and submit those again (with
    /// their payloads and update positions). Called after a long stretch without results, when
    /// the broker's counts cannot account for every job still awaited.
    async fn resubmit_lost(&self, session: &SessionId) -> Result<usize, BrokerError> {
        let lost = self.broker.lost_jobs(session, &self.awaited()).await?;
        self.submit_again(session, &lost).await
    }

    /// Submit the jobs `ids` (those still awaited) again to `session`, with the payloads and
    /// update positions they were first submitted with; returns how many.
    async fn submit_again(&self, session: &SessionId, ids: &[JobId]) -> Result<usize, BrokerError> {
        let jobs: Vec<NewJob> = {
            let routes = self.routes();
            ids.iter()
                .filter_map(|id| {
                    routes.get(id).map(|r| NewJob {
                        id: *id,
                        payload: r.payload.clone(),
                        update_seq: r.update_seq,
                    })
                })
                .collect()
        };
        for batch in jobs.chunks(SUBMIT_BATCH) {
            self.broker.submit(session, batch.to_vec()).await?;
        }
        Ok(jobs.len())
    }

    /// Hand a result to its caller; a second result for the same job finds no route.
    fn deliver(&self, result: JobResult) {
        *self.last_result.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        let route = self.routes().remove(&result.job);
        match route {
            Some(route) => {
                let _ = route.tx.send(Delivery::Result {
                    index: route.index,
                    result,
                });
            }
            None => {
                tracing::debug!(job = %result.job, "result for no waiting call (duplicate or dropped stream)")
            }
        }
    }

    fn abort_all(&self, err: &PoolError) {
        let routes: Vec<Route> = self.routes().drain().map(|(_, r)| r).collect();
        for route in routes {
            let _ = route.tx.send(Delivery::Abort(err.clone()));
        }
    }
}

/// A pool of workers of kind `W`: submit jobs, read results, broadcast updates.
///
/// `C` says how network targets are reached (see [`Connector`]); users of the facade crate
/// never name it.
///
/// `Pool` is `Send + Sync`: share it in an `Arc`; several `map` / `imap_unordered` calls may run
/// at once, each getting its own results.
pub struct Pool<W: Worker, C: Connector = LocalOnly> {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    agent: tokio::sync::Mutex<Option<AgentHandle>>,
    _worker: PhantomData<fn(W, C) -> W>,
}

impl<W: Worker, C: Connector> std::fmt::Debug for Pool<W, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("kind", &W::KIND)
            .field("session", &self.shared.id())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<W: Worker, C: Connector> Pool<W, C> {
    /// Start building a pool whose workers are built with `init`.
    pub fn builder(init: W::Init) -> PoolBuilder<W, C> {
        PoolBuilder::new(init)
    }

    fn start(
        broker: Arc<dyn Broker>,
        session: SessionInfo,
        agent: Option<AgentHandle>,
        outage_timeout: Duration,
    ) -> Self {
        tracing::info!(session = %session.id, kind = %session.spec.kind, "pool session open");
        let shared = Arc::new(Shared {
            broker,
            spec: session.spec,
            session: Mutex::new(session.id),
            updates: tokio::sync::Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            update_seq: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
            last_result: Mutex::new(tokio::time::Instant::now()),
            submitting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            outage_timeout,
        });
        let tasks = vec![
            tokio::spawn(dispatch_results(shared.clone())),
            tokio::spawn(keep_alive(shared.clone())),
        ];
        Pool {
            shared,
            tasks,
            agent: tokio::sync::Mutex::new(agent),
            _worker: PhantomData,
        }
    }

    /// The session id of this pool now (for logs and `dc-cli status`; it changes if the
    /// broker lost the session and the pool reopened it).
    pub fn session_id(&self) -> String {
        self.shared.id().0
    }

    fn check_open(&self) -> Result<(), PoolError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(PoolError::Closed)
        } else {
            Ok(())
        }
    }

    /// Run every job; outputs come back in input order.
    ///
    /// # Errors
    /// The first job that failed for good ([`PoolError::Job`] with its index), or a pool-wide
    /// error (closed, broker lost, no worker can run this kind).
    pub async fn map<I>(&self, jobs: I) -> Result<Vec<W::Output>, PoolError>
    where
        I: IntoIterator<Item = W::Job>,
        W::Output: Send,
    {
        let mut stream = self.imap_unordered(jobs);
        let mut slots: Vec<Option<W::Output>> = Vec::new();
        while let Some(item) = stream.next().await {
            let (index, output) = item?;
            if slots.len() <= index {
                slots.resize_with(index + 1, || None);
            }
            slots[index] = Some(output);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| {
                    PoolError::Broker(BrokerError::Protocol(format!("no result for job {i}")))
                })
            })
            .collect()
    }

    /// Run every job; yields `(index, output)` as results arrive, and a failed job as an
    /// `Err` item without stopping the rest.
    ///
    /// The jobs are taken from `jobs` now; when the stream is first polled they are encoded (on
    /// a blocking thread, as are big outputs decoded: a big payload's CPU time never holds up
    /// the runtime) and submitted. The stream is
    /// `Send + Unpin + 'static`: poll it with `next()` directly, store it, or move it into a
    /// spawned task. Dropping it stops listening; jobs already queued still run.
    pub fn imap_unordered<I>(
        &self,
        jobs: I,
    ) -> BoxStream<'static, Result<(usize, W::Output), PoolError>>
    where
        I: IntoIterator<Item = W::Job>,
        W::Output: Send,
    {
        let jobs: Vec<W::Job> = jobs.into_iter().collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Imap::<W> {
            shared: self.shared.clone(),
            jobs: Some(jobs),
            tx: Some(tx),
            rx,
            ready: VecDeque::new(),
            remaining: 0,
            ids: Vec::new(),
            _worker: PhantomData,
        };
        futures::stream::unfold(state, |mut st| async move {
            if let Some(jobs) = st.jobs.take() {
                let limit = st.shared.broker.max_payload();
                let encode = move || -> Vec<Result<Bytes, PoolError>> {
                    jobs.iter()
                        .enumerate()
                        .map(|(i, job)| to_payload(job, limit, &format!("job {i}")))
                        .collect()
                };
                match off_runtime(encode).await {
                    Ok(prepared) => st.submit(prepared).await,
                    Err(e) => st.ready.push_back(Err(e)),
                }
            }
            if let Some(item) = st.ready.pop_front() {
                return Some((item, st));
            }
            if st.remaining == 0 {
                return None;
            }
            let delivery = st.rx.recv().await?;
            st.remaining -= 1;
            let item = match delivery {
                Delivery::Result { index, result }
                    if matches!(&result.outcome, JobOutcome::Done(b) if b.len() >= DECODE_OFF_RUNTIME) =>
                {
                    off_runtime(move || decode_result::<W>(index, result))
                        .await
                        .unwrap_or_else(Err)
                }
                Delivery::Result { index, result } => decode_result::<W>(index, result),
                Delivery::Abort(err) => {
                    st.remaining = 0;
                    Err(err)
                }
            };
            Some((item, st))
        })
        .boxed()
    }

    /// Broadcast an update to every worker, in order: each applies it between jobs (at once
    /// when idle), and workers that start later replay it before their first job. Jobs
    /// submitted after this call run on workers that applied it.
    ///
    /// A broker that cannot be reached is waited for (see
    /// [`PoolBuilder::broker_outage_timeout`]); the update is published once all the same.
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::PayloadTooLarge`], [`PoolError::Unreachable`] after
    /// the outage timeout, or a broker error.
    pub async fn update_workers(&self, update: W::Update) -> Result<(), PoolError> {
        self.check_open()?;
        let limit = self.shared.broker.max_payload();
        let payload = off_runtime(move || to_payload(&update, limit, "update")).await??;
        let mut log = self.shared.updates.lock().await;
        let seq = loop {
            let session = self.shared.id();
            // Its place in the log: a retry after an answer lost on the way finds it there.
            let at = log.len() as UpdateSeq + 1;
            let published = self
                .shared
                .ride_out(false, || {
                    self.shared
                        .broker
                        .publish_update_at(&session, at, payload.clone())
                })
                .await;
            match published {
                Ok(seq) => break seq,
                Err(PoolError::Broker(BrokerError::SessionGone(_)))
                    if !self.shared.closed.load(Ordering::Acquire) =>
                {
                    // Recover here (the log lock is ours), then publish into the new session.
                    drop(log);
                    self.shared.recover(&session).await;
                    log = self.shared.updates.lock().await;
                }
                Err(e) => return Err(e),
            }
        };
        log.push(payload);
        self.shared.update_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Worker processes serving this pool now (ready or busy).
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::Unreachable`] after the outage timeout, or a broker
    /// error.
    pub async fn workers_count(&self) -> Result<usize, PoolError> {
        Ok(self.stats_now().await?.workers)
    }

    /// Nodes (machines) serving this pool now.
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::Unreachable`] after the outage timeout, or a broker
    /// error.
    pub async fn nodes_count(&self) -> Result<usize, PoolError> {
        Ok(self.stats_now().await?.nodes)
    }

    /// The session's counts, riding out a broker outage (and the loss of the session that
    /// may come with it: the pool reopens it, and the counts are those of the new one).
    async fn stats_now(&self) -> Result<SessionStats, PoolError> {
        self.check_open()?;
        loop {
            let session = self.shared.id();
            let stats = self
                .shared
                .ride_out(false, || self.shared.broker.session_stats(&session))
                .await;
            match stats {
                Err(PoolError::Broker(BrokerError::SessionGone(_)))
                    if !self.shared.closed.load(Ordering::Acquire) =>
                {
                    self.shared.recover(&session).await;
                }
                other => return other,
            }
        }
    }

    /// Close the pool: abort active jobs, release the workers (a local pool stops its worker
    /// processes). Calls still waiting get [`PoolError::Closed`]. Closing twice is fine.
    ///
    /// # Errors
    /// A broker error while closing the session, or [`PoolError::Unreachable`] when the broker
    /// stayed out of reach for the outage timeout (the pool is closed on this side anyway).
    pub async fn close(&self) -> Result<(), PoolError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for task in &self.tasks {
            task.abort();
        }
        self.shared.abort_all(&PoolError::Closed);
        let session = self.shared.id();
        let closed = self
            .shared
            .ride_out(true, || self.shared.broker.close_session(&session))
            .await;
        if let Some(agent) = self.agent.lock().await.take() {
            agent.shutdown().await;
        }
        tracing::info!(session = %self.shared.id(), "pool closed");
        closed
    }

    /// Pids of this local pool's worker processes (empty for a pool on a server).
    pub async fn local_worker_pids(&self) -> Vec<u32> {
        self.agent
            .lock()
            .await
            .as_ref()
            .map(AgentHandle::worker_pids)
            .unwrap_or_default()
    }
}

impl<W: Worker, C: Connector> Drop for Pool<W, C> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.abort_all(&PoolError::Closed);
        // Best effort: close the session so the next pool need not wait for it to expire.
        // A local agent stops by itself once its handle (dropped with us) is gone.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move {
                let _ = shared.broker.close_session(&shared.id()).await;
            });
        }
    }
}

fn decode_result<W: Worker>(
    index: usize,
    result: JobResult,
) -> Result<(usize, W::Output), PoolError> {
    match result.outcome {
        JobOutcome::Done(bytes) => ciborium::from_reader::<W::Output, _>(&bytes[..])
            .map(|out| (index, out))
            .map_err(|e| PoolError::codec(&format!("output of job {index}"), e)),
        JobOutcome::Failed {
            kind,
            message,
            history,
        } => Err(PoolError::Job {
            index,
            kind,
            message,
            attempts: result.attempts,
            history,
        }),
    }
}

/// The state of one `imap_unordered` stream.
struct Imap<W: Worker> {
    shared: Arc<Shared>,
    /// The jobs, until the stream's first poll encodes and submits them.
    jobs: Option<Vec<W::Job>>,
    tx: Option<mpsc::UnboundedSender<Delivery>>,
    rx: mpsc::UnboundedReceiver<Delivery>,
    ready: VecDeque<Result<(usize, W::Output), PoolError>>,
    remaining: usize,
    /// Jobs this stream waits for; their routes go when it is dropped.
    ids: Vec<JobId>,
    _worker: PhantomData<fn(W) -> W>,
}

impl<W: Worker> Imap<W> {
    async fn submit(&mut self, prepared: Vec<Result<Bytes, PoolError>>) {
        let Some(tx) = self.tx.take() else { return };
        if self.shared.closed.load(Ordering::Acquire) {
            self.ready.push_back(Err(PoolError::Closed));
            return;
        }
        let limit = self.shared.broker.max_payload();
        let update_seq = self.shared.update_seq.load(Ordering::Acquire);
        let mut batch = Vec::new();
        for (index, payload) in prepared.into_iter().enumerate() {
            let payload = match payload {
                Ok(p) if p.len() > limit => {
                    self.ready.push_back(Err(PoolError::PayloadTooLarge {
                        size: p.len(),
                        limit,
                    }));
                    continue;
                }
                Ok(p) => p,
                Err(e) => {
                    self.ready.push_back(Err(e));
                    continue;
                }
            };
            let id = JobId(self.shared.next_job.fetch_add(1, Ordering::Relaxed));
            self.shared.routes().insert(
                id,
                Route {
                    index,
                    tx: tx.clone(),
                    payload: payload.clone(),
                    update_seq,
                },
            );
            self.ids.push(id);
            batch.push(NewJob {
                id,
                payload,
                update_seq,
            });
        }
        let total = batch.len();
        self.remaining = total;
        // While this runs, the lost-job check leaves the pool alone (these jobs are routed but
        // not all in the broker yet); its quiet time counts from the end of the submission.
        struct Submitting<'s>(&'s Shared);
        impl Drop for Submitting<'_> {
            fn drop(&mut self) {
                *self.0.last_result.lock().unwrap_or_else(|p| p.into_inner()) =
                    tokio::time::Instant::now();
                self.0.submitting.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.shared.submitting.fetch_add(1, Ordering::AcqRel);
        let _submitting = Submitting(&self.shared);
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(SUBMIT_BATCH));
            let session = self.shared.id();
            match self.shared.broker.submit(&session, batch).await {
                Ok(()) => {}
                // The jobs are routed: recovery resubmits every routed job, these included.
                Err(BrokerError::SessionGone(_)) => self.shared.recover(&session).await,
                Err(e) => {
                    self.ready.push_back(Err(e.into()));
                    self.remaining = 0;
                    return;
                }
            }
            batch = rest;
        }
    }
}

impl<W: Worker> Drop for Imap<W> {
    fn drop(&mut self) {
        if self.remaining == 0 || self.ids.is_empty() {
            return;
        }
        let mut routes = self.shared.routes();
        for id in &self.ids {
            routes.remove(id);
        }
    }
}

/// Default of [`PoolBuilder::broker_outage_timeout`].
const DEFAULT_OUTAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a call waiting on an unreachable broker says so (and once at first).
const OUTAGE_SAID_EVERY: Duration = Duration::from_secs(10);

/// The pause before retrying after `failures` failures in a row: 200 ms doubling, at most 3 s.
async fn retry_pause(failures: u32) {
    tokio::time::sleep(Duration::from_millis(
        (100u64 << failures.min(5)).min(3_000),
    ))
    .await;
}

/// How long a pool goes without any result before it asks the broker which of its jobs were
/// lost (and at most how often it asks).
const LOST_CHECK_AFTER: Duration = Duration::from_secs(10);
/// After this long without any result the pool asks even when the broker's counts account for
/// every job (a damaged job record can leave them looking right), and again as often.
const LOST_CHECK_ANYWAY_AFTER: Duration = Duration::from_secs(30);
/// How long jobs wait with no worker for their kind before the pool says so…
const UNSERVED_WARN_AFTER: Duration = Duration::from_secs(10);
/// …and how often it says it again while that lasts.
const UNSERVED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Read results from the broker and hand each to the call waiting for it.
async fn dispatch_results(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        let session = shared.id();
        match shared
            .broker
            .take_results(&session, 4096, Duration::from_millis(500))
            .await
        {
            Ok(results) => {
                failures = 0;
                for result in results {
                    shared.deliver(result);
                }
            }
            Err(BrokerError::SessionGone(_)) => {
                shared.recover(&session).await;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "reading results failed; retrying");
                retry_pause(failures).await;
            }
        }
    }
}

/// Keep the session alive, reap expired leases (often: a dead node's jobs restart within a
/// tick of being noticed), recover a session the broker lost, and notice when no node can run
/// this pool.
async fn keep_alive(shared: Arc<Shared>) {
    let period = (shared.spec.lease / 4).min(Duration::from_millis(250));
    let mut problems_seen = 0;
    // Since when jobs wait with no worker for them, and when that was last said.
    let mut unserved: Option<(tokio::time::Instant, Option<tokio::time::Instant>)> = None;
    let mut last_lost_check: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(period).await;
        let session = shared.id();
        match shared.broker.keep_session_alive(&session).await {
            Ok(SessionState::Active) => {}
            Ok(SessionState::Gone) => {
                shared.recover(&session).await;
                problems_seen = 0;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "session keep-alive failed");
                continue;
            }
        }
        if let Err(e) = shared.broker.reap_expired().await {
            tracing::debug!(error = %e, "reaping expired leases failed");
        }
        let Ok(stats) = shared.broker.session_stats(&session).await else {
            continue;
        };
        for problem in stats.problems.iter().skip(problems_seen) {
            tracing::error!("{problem}");
        }
        problems_seen = stats.problems.len();
        let waiting = shared.routes().len();
        // No result for a long while, and either the broker's counts do not cover every job
        // still awaited, or jobs are counted queued while workers sit idle, or it has lasted
        // long enough to ask anyway: ask which jobs it lost (a damaged or restarted server),
        // and submit those again.
        let quiet = shared
            .last_result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if waiting > 0
            && quiet >= LOST_CHECK_AFTER
            && shared.submitting.load(Ordering::Acquire) == 0
            && ((stats.queued + stats.running < waiting
                || (stats.queued > 0 && stats.running < stats.workers))
                && last_lost_check.is_none_or(|at| at.elapsed() >= LOST_CHECK_AFTER)
                || quiet >= LOST_CHECK_ANYWAY_AFTER
                    && last_lost_check.is_none_or(|at| at.elapsed() >= LOST_CHECK_ANYWAY_AFTER))
        {
            last_lost_check = Some(tokio::time::Instant::now());
            match shared.resubmit_lost(&session).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        jobs = n,
                        "the broker had lost jobs this pool waits for; submitted them again"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "checking for lost jobs failed"),
            }
        }
        if waiting == 0 || stats.workers > 0 || stats.starting > 0 {
            unserved = None;
            continue;
        }
        // Jobs wait and no worker serves or starts: say so after a while, and now and then.
        let now = tokio::time::Instant::now();
        let (since, said) = unserved.get_or_insert((now, None));
        let due = match said {
            None => now.duration_since(*since) >= UNSERVED_WARN_AFTER,
            Some(at) => now.duration_since(*at) >= UNSERVED_WARN_EVERY,
        };
        if due {
            *said = Some(now);
            tracing::warn!(
                waiting,
                kind = %shared.spec.kind,
                for_s = now.duration_since(*since).as_secs(),
                "jobs wait, and no worker serves this pool's kind: start a node that serves it \
                 (`dc-cli start-node`), or check that the running nodes can reach the broker"
            );
        }
        if stats.problems.is_empty() {
            continue;
        }
        // Jobs wait, no worker serves or starts, and nodes said why: tell the callers.
        let kind = shared.spec.kind.clone();
        let err = stats
            .problems
            .iter()
            .find_map(|p| match p {
                NodeProblem::UnknownKind { known, .. } => Some(PoolError::UnknownWorkerKind {
                    kind: kind.clone(),
                    known: known.clone(),
                }),
                _ => None,
            })
            .or_else(|| {
                stats.problems.iter().find_map(|p| match p {
                    NodeProblem::InitFailed {
                        worker, message, ..
                    } => Some(PoolError::WorkerInit(format!("{worker}: {message}"))),
                    _ => None,
                })
            });
        if let Some(err) = err {
            tracing::error!("{err}");
            shared.abort_all(&err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{redact_url, to_payload};
    use crate::PoolError;

    #[test]
    fn a_payload_over_the_limit_is_refused_before_it_is_all_encoded() {
        // 100 MB as an array of integers: about 200 MB of CBOR if it were all encoded.
        let big = vec![200u8; 100_000_000];
        match to_payload(&big, 1 << 20, "job 0") {
            Err(PoolError::PayloadTooLarge { size, limit }) => {
                assert_eq!(limit, 1 << 20);
                assert!(
                    size > limit && size < limit + (64 << 10),
                    "encoding went on to {size} bytes"
                );
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        let small = to_payload(&vec![1u8, 2, 3], 1 << 20, "job 1").expect("under the limit");
        assert_eq!(small.as_ref(), [0x83, 1, 2, 3]);
    }

    #[test]
    fn urls_lose_their_password_in_logs() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("amqp://user:pw@h:5672/%2f"),
            "amqp://user:***@h:5672/%2f"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
    }
}
