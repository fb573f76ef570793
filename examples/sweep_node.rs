//! A node binary for the MLP sweep: the whole `dc-cli` command line (`start-node`, `status`,
//! `stop`, `devices`) with the sweep's worker kind built in.
//!
//! On the head machine:
//!
//! ```text
//! cargo run --release --example sweep_node -- start-node --head --password 123456 --cpu-workers 2
//! ```
//!
//! It prints the command for the other machines, e.g.
//! `sweep_node start-node -p 8899 -a 10.0.0.5 -r 123456` (add `--cpu-workers N` on machines
//! without a GPU). Then run the `sweep_client` example from anywhere.

mod mlp;

use std::process::ExitCode;

use distributed_computing::Registry;

fn main() -> ExitCode {
    distributed_computing::main_with(Registry::new().register::<mlp::MlpSweep>())
}
