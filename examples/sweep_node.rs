//! A node binary for the MLP sweep: the whole `dc-cli` command line (`start-node`, `status`,
//! `stop`, `devices`) with the sweep's worker kind built in.
//!
//! On the head machine:
//!
//! ```text
//! cargo run --release --example sweep_node -- start-node --head --cpu-workers 2
//! ```
//!
//! It writes its join token to `<state-dir>/join-token` and prints the command for the other
//! machines, e.g. `sweep_node start-node -p 8899 -a 10.0.0.5 --token-file join-token` (copy the
//! file there first; add `--cpu-workers N` on machines without a GPU). Then run the
//! `sweep_client` example from anywhere with the same token.

mod mlp;

use std::process::ExitCode;

use distributed_computing::Registry;

fn main() -> ExitCode {
    distributed_computing::main_with(Registry::new().register::<mlp::MlpSweep>())
}
