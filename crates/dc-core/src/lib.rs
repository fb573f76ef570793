//! Core of distributed-computing: the [`Worker`] and [`Broker`] traits, the worker-process
//! protocol, the [`Pool`], the node agent's job loop and the in-process [`LocalBroker`].
//!
//! Users depend on the facade crate `distributed-computing`, which re-exports all of this.
//! This crate names no network backend: those implement [`Broker`] in `dc-broker-*` crates.
//!
//! Cargo features:
//! - `testing`: the `testing` module, the broker conformance suite every backend runs (per
//!   capability), and the helpers shared by the tests and `dc-cli bench`; also the agent's hidden
//!   simulated-slot hook the benchmark uses.

pub mod agent;
pub mod backoff;
pub mod broker;
mod error;
mod local;
mod pool;
pub mod protocol;
mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[doc(hidden)]
pub mod util;
mod worker;

pub use broker::{Broker, Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
pub use error::{BrokerError, Cause, JobFailure, PoolError};
pub use local::LocalBroker;
pub use pool::{Connector, DEFAULT_PORT, LocalOnly, NetworkTarget, Pool, PoolBuilder, redact_url};
pub use registry::Registry;
pub use worker::{BoxError, Worker, WorkerContext};
