//! The user's code: the [`Worker`] trait and what a worker knows about itself.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The error type user code returns: anything that is an error, sendable between threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A worker type: built once per worker process, then runs job after job.
///
/// Every associated type crosses a process (and often a machine) boundary as CBOR, so it must be
/// serde-serialisable. Byte buffers go fastest as `serde_bytes::ByteBuf`.
///
/// # Examples
/// ```
/// use dc_core::{BoxError, Worker, WorkerContext};
///
/// struct Doubler { factor: i64 }
///
/// impl Worker for Doubler {
///     const KIND: &'static str = "doubler";
///     type Init = i64;
///     type Job = i64;
///     type Output = i64;
///     type Update = ();
///
///     fn new(init: i64, _ctx: &WorkerContext) -> Result<Self, BoxError> {
///         Ok(Doubler { factor: init })
///     }
///     fn run(&mut self, job: i64) -> Result<i64, BoxError> {
///         Ok(job * self.factor)
///     }
/// }
/// # let ctx = WorkerContext::new("node", "node/0", 0, vec![]);
/// # let mut w = Doubler::new(2, &ctx).unwrap();
/// # assert_eq!(w.run(21).unwrap(), 42);
/// ```
pub trait Worker: Sized + 'static {
    /// Name under which nodes find this worker type, e.g. "sweep". Unique per registry.
    const KIND: &'static str;
    /// Data given to [`Worker::new`] on every worker process of a pool.
    type Init: Serialize + DeserializeOwned + Send + 'static;
    /// One job's input.
    type Job: Serialize + DeserializeOwned + Send + 'static;
    /// One job's result.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// What the pool owner broadcasts with `update_workers`; `()` when unused.
    type Update: Serialize + DeserializeOwned + Send + 'static;

    /// Heavy preparation, once per worker process (download, preprocess, load the model).
    ///
    /// # Errors
    /// A failed preparation: the node retries it, then reports it to the pool.
    fn new(init: Self::Init, ctx: &WorkerContext) -> Result<Self, BoxError>;

    /// One job. Runs in the worker's own process; blocking is expected.
    ///
    /// # Errors
    /// The job failed: the pool gets `PoolError::Job` with this error's message.
    fn run(&mut self, job: Self::Job) -> Result<Self::Output, BoxError>;

    /// Called between jobs for each update broadcast by the pool owner, in order.
    ///
    /// # Errors
    /// The update could not be applied; it is logged with the worker's name and the pool goes on.
    fn handle_update(&mut self, update: Self::Update) -> Result<(), BoxError> {
        let _ = update;
        Ok(())
    }
}

/// Who a worker process is: its node, its id, its slot on the node and its devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerContext {
    node_id: String,
    worker_id: String,
    slot: usize,
    devices: Vec<String>,
}

impl WorkerContext {
    /// A context with the given identity (nodes build these; tests may too).
    pub fn new(
        node_id: impl Into<String>,
        worker_id: impl Into<String>,
        slot: usize,
        devices: Vec<String>,
    ) -> Self {
        WorkerContext {
            node_id: node_id.into(),
            worker_id: worker_id.into(),
            slot,
            devices,
        }
    }

    /// The node (machine agent) this worker belongs to.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This worker's id, unique in the pool: `<node>/<slot>`.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// 0-based index of this worker on its node.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// UUIDs of the GPUs this worker was given; empty for a CPU worker.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }
}
