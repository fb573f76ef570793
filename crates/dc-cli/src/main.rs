//! `dc-cli`: the command line of distributed-computing.
//!
//! `dc-cli start-node --head --password …` starts a head node; `dc-cli start-node -a HEAD -r
//! PASSWORD` a worker node; `dc-cli status` and `dc-cli stop` see and stop them; `dc-cli bench`
//! measures the pool against the broker's own limits. The generic binary has no user worker
//! kinds (only the benchmark's no-op kind): its nodes serve the external worker programs named
//! in `dc.toml` (`[external_workers]`). A user's own node binary gets the same command line,
//! with its kinds built in, from `distributed_computing::main_with(registry)`.

use std::process::ExitCode;

fn main() -> ExitCode {
    distributed_computing::main_with(distributed_computing::Registry::new())
}
