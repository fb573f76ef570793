//! Quickstart: a hyper-parameter sweep on a local pool.
//!
//! What it shows:
//! - a [`Worker`] whose `new` does the heavy preparation once per worker process: it generates
//!   a synthetic regression data set, splits it into train / validation, standardizes the
//!   features with the training statistics, and fits a closed-form ridge baseline (normal
//!   equations solved by Cholesky);
//! - a `run` that trains and evaluates a small model for one hyper-parameter set: a one-hidden
//!   -layer tanh MLP trained by mini-batch SGD, scored by validation RMSE and R²;
//! - a `handle_update` that keeps a shared cache of the best result so far, which `run` uses to
//!   prune a trial early when, a third of the way in, it is clearly worse than the best;
//! - a client that opens an embedded pool (`.local()`: one worker process per GPU, else per
//!   core, spawned from this same executable), streams results with `imap_unordered`,
//!   broadcasts each new best with `update_workers`, and prints a results table.
//!
//! Run it with:
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! Lines prefixed with a worker id (`[local-…/0]`) are the worker processes' own stdout,
//! forwarded by the pool. The worker and the sweep live in `examples/mlp/mod.rs`, shared with
//! the `sweep_node` / `sweep_client` examples that run the same sweep across machines.

mod mlp;

use std::process::ExitCode;

use distributed_computing::{BoxError, Pool, Registry};
use mlp::{DatasetSpec, MlpSweep, sweep};

fn main() -> ExitCode {
    // First thing: a local pool spawns this same executable as its worker processes.
    Registry::new().register::<MlpSweep>().serve_if_worker();

    mlp::run_client("quickstart", client())
}

async fn client() -> Result<(), BoxError> {
    let pool = Pool::<MlpSweep>::builder(DatasetSpec::default())
        .local()
        .connect()
        .await?;
    let outcome = sweep(&pool).await;
    // Close in every case, so worker processes stop even when the sweep failed.
    let closed = pool.close().await;
    outcome?;
    closed?;
    Ok(())
}
