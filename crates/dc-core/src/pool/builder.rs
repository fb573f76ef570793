//! [`PoolBuilder`]: where a pool's workers are (a head node, a broker URL, a broker object,
//! or this machine), the pool's options, and `connect`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::host_name;
use crate::broker::{Broker, SessionSpec};
use crate::error::PoolError;
use crate::worker::Worker;

use super::codec::to_cbor;
use super::connector::{Connector, LocalOnly, NetworkTarget};
use super::local::LocalOptions;
use super::session::{DEFAULT_OUTAGE_TIMEOUT, open_session};
use super::{DEFAULT_PORT, Pool};

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
pub struct PoolBuilder<W: Worker> {
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
    local: LocalOptions,
    connect_timeout: Duration,
    outage_timeout: Duration,
    connector: Arc<dyn Connector>,
}

impl<W: Worker> std::fmt::Debug for PoolBuilder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("kind", &W::KIND)
            .field("target", &self.target)
            .field("address", &self.address)
            .field("port", &self.port)
            .field("max_attempts", &self.max_attempts)
            .field("lease", &self.lease)
            .field("auto_batching", &self.auto_batching)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl<W: Worker> PoolBuilder<W> {
    /// A builder with every option at its default and the [`LocalOnly`] connector.
    pub(super) fn new(init: W::Init) -> Self {
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
            local: LocalOptions::default(),
            connect_timeout: Duration::from_secs(5),
            outage_timeout: DEFAULT_OUTAGE_TIMEOUT,
            connector: Arc::new(LocalOnly),
        }
    }

    /// How this pool reaches a head node or a broker URL (default [`LocalOnly`], which
    /// refuses both: a pool built from `dc-core` alone runs locally or on a broker object).
    /// The facade crate's `Pool` presets a connector that knows Redis; set another here to
    /// carry backend options, or to reach a backend of your own.
    ///
    /// # Examples
    /// ```
    /// # use std::sync::Arc;
    /// # use dc_core::{LocalOnly, Pool, Worker, WorkerContext, BoxError};
    /// # struct Sweep;
    /// # impl Worker for Sweep {
    /// #     const KIND: &'static str = "sweep";
    /// #     type Init = (); type Job = u32; type Output = u32; type Update = ();
    /// #     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Sweep) }
    /// #     fn run(&mut self, j: u32) -> Result<u32, BoxError> { Ok(j) }
    /// # }
    /// let builder = Pool::<Sweep>::builder(()).connector(Arc::new(LocalOnly));
    /// # let _ = builder;
    /// ```
    pub fn connector(mut self, connector: Arc<dyn Connector>) -> Self {
        self.connector = connector;
        self
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
        self.local.cpu_workers = Some(n);
        self
    }

    /// Local mode: which GPUs to use (default: all visible).
    pub fn gpus(mut self, gpus: dc_gpu::GpuSelection) -> Self {
        self.local.gpus = gpus;
        self
    }

    /// Local mode: worker processes per GPU (default 1; more share the device, no isolation).
    pub fn workers_per_gpu(mut self, n: usize) -> Self {
        self.local.workers_per_gpu = n.max(1);
        self
    }

    /// Local mode: run workers from this program instead of the current executable: a Rust
    /// binary built with a `Registry`, or any executable speaking the frame protocol of
    /// `docs/worker-protocol.md` (it is run as `PROGRAM __dc-worker`).
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.local.worker_program = Some(path.into());
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
    pub async fn connect(self) -> Result<Pool<W>, PoolError> {
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
            Target::Local => {
                let (broker, info, agent) =
                    super::local::start::<W>(&self.local, &spec, self.lease).await?;
                Ok(Pool::start(broker, info, Some(agent), self.outage_timeout))
            }
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
                let broker = self.connector.connect(&target).await?;
                let info = open_session(broker.as_ref(), &spec).await?;
                Ok(Pool::start(broker, info, None, self.outage_timeout))
            }
        }
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
