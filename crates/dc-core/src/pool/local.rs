//! Local pools (`PoolBuilder::local`): no server; an in-process [`LocalBroker`] and an
//! in-process node agent that spawns the worker processes on this machine, one per GPU (times
//! the workers per GPU), else CPU workers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{AgentConfig, AgentHandle, SlotSpec, WorkerCommand, spawn_agent};
use crate::broker::{Broker, NodeId, SessionInfo, SessionSpec};
use crate::error::PoolError;
use crate::local::LocalBroker;
use crate::registry;
use crate::worker::Worker;

use super::session::open_session;

/// The options of a local pool, as the builder collects them.
#[derive(Debug, Clone)]
pub(super) struct LocalOptions {
    /// CPU worker processes when there is no GPU (default: the available cores).
    pub(super) cpu_workers: Option<usize>,
    /// Which GPUs to use (default: all visible).
    pub(super) gpus: dc_gpu::GpuSelection,
    /// Worker processes per GPU (default 1).
    pub(super) workers_per_gpu: usize,
    /// The program the workers run (default: the current executable).
    pub(super) worker_program: Option<PathBuf>,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            cpu_workers: None,
            gpus: dc_gpu::GpuSelection::Auto,
            workers_per_gpu: 1,
            worker_program: None,
        }
    }
}

/// Start a local pool's broker and agent: check that the worker program serves `W::KIND`,
/// open the session `spec` on a new [`LocalBroker`], and spawn the agent that runs the worker
/// processes (heartbeat a quarter of `lease`, at most 1 s).
///
/// # Errors
/// [`PoolError::Config`] when this executable never called `serve_if_worker` (or cannot be
/// found), [`PoolError::UnknownWorkerKind`] when it does not register `W::KIND`.
pub(super) async fn start<W: Worker>(
    options: &LocalOptions,
    spec: &SessionSpec,
    lease: Duration,
) -> Result<(Arc<dyn Broker>, SessionInfo, AgentHandle), PoolError> {
    let (command, kinds) = match &options.worker_program {
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
    let slots = local_slots(&options.gpus, options.workers_per_gpu, options.cpu_workers);
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
    let info = open_session(broker.as_ref(), spec).await?;
    let mut config = AgentConfig::new(
        NodeId(format!("local-{}", std::process::id())),
        command,
        kinds,
        slots,
    );
    config.heartbeat = (lease / 4).min(Duration::from_secs(1));
    let agent = spawn_agent(broker.clone(), config);
    Ok((broker, info, agent))
}

/// Worker slots of a local pool: one per GPU (times `per_gpu`), else CPU workers.
fn local_slots(
    gpus: &dc_gpu::GpuSelection,
    per_gpu: usize,
    cpu_workers: Option<usize>,
) -> Vec<SlotSpec> {
    let cpu_workers = cpu_workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    SlotSpec::plan(gpus, per_gpu, cpu_workers.max(1))
}
