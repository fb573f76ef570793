//! The benchmark's no-op worker kind, served by every node binary built with the `bench`
//! feature: it echoes numbers and bytes, sleeps, and counts the updates it applied.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dc_core::{BoxError, Worker, WorkerContext};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The worker kind of the benchmark (reserved: a user's kind may not take this name).
pub(crate) const BENCH_KIND: &str = "__dc-bench";

/// One benchmark job.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum BenchJob {
    /// Return this number.
    Echo(u64),
    /// Return bytes of the same size (the argument itself).
    Bytes(ByteBuf),
    /// Write this worker's parent pid (its node) to `marker` when given, then sleep `ms`.
    Sleep {
        /// How long to sleep.
        ms: u64,
        /// A file to write the node's pid into before sleeping.
        marker: Option<String>,
    },
    /// Report this worker's id and how many updates it applied.
    Applied,
}

/// One benchmark result. `Echo` and `Bytes` have the same CBOR shape as the job's variants,
/// so simulated slots (which echo the job payload) decode as the same output.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum BenchOutput {
    /// The echoed number.
    Echo(u64),
    /// Bytes of the argument's size.
    Bytes(ByteBuf),
    /// When the sleep started (Unix time, ms).
    Slept {
        /// Unix time in ms when the job started on the worker that completed it.
        started_unix_ms: u64,
    },
    /// A worker's id and its count of applied updates.
    Applied {
        /// The worker id (`node/slot`).
        worker: String,
        /// Updates applied since the worker process started (replays included).
        updates: u64,
    },
}

/// The built-in no-op worker kind every `main_with` node serves, for `dc-cli bench`.
#[derive(Debug)]
pub(crate) struct BenchWorker {
    pub(super) worker: String,
    pub(super) updates: u64,
}

impl Worker for BenchWorker {
    const KIND: &'static str = BENCH_KIND;
    type Init = ();
    type Job = BenchJob;
    type Output = BenchOutput;
    type Update = u64;

    fn new(_init: (), ctx: &WorkerContext) -> Result<Self, BoxError> {
        Ok(BenchWorker {
            worker: ctx.worker_id().to_string(),
            updates: 0,
        })
    }

    fn run(&mut self, job: BenchJob) -> Result<BenchOutput, BoxError> {
        Ok(match job {
            BenchJob::Echo(n) => BenchOutput::Echo(n),
            BenchJob::Bytes(bytes) => BenchOutput::Bytes(bytes),
            BenchJob::Sleep { ms, marker } => {
                let started_unix_ms = unix_ms();
                if let Some(path) = marker {
                    let tmp = format!("{path}.tmp");
                    std::fs::write(&tmp, std::os::unix::process::parent_id().to_string())?;
                    std::fs::rename(&tmp, &path)?;
                }
                std::thread::sleep(Duration::from_millis(ms));
                BenchOutput::Slept { started_unix_ms }
            }
            BenchJob::Applied => BenchOutput::Applied {
                worker: self.worker.clone(),
                updates: self.updates,
            },
        })
    }

    fn handle_update(&mut self, _update: u64) -> Result<(), BoxError> {
        self.updates += 1;
        Ok(())
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}
