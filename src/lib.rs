//! # distributed-computing
//!
//! Distributed GPU computations made easy: write a [`Worker`] (heavy set-up once, then job after
//! job), and run many jobs on isolated worker processes, one per GPU, through a [`Pool`].
//!
//! This facade re-exports the public API of the workspace's crates.
#![doc = include_str!("../README.md")]

pub use dc_core::agent;
pub use dc_core::broker;
pub use dc_core::protocol;
pub use dc_core::{
    BoxError, Broker, BrokerError, DEFAULT_PORT, JobFailure, LocalBroker, Pool, PoolBuilder,
    PoolError, Registry, Worker, WorkerContext,
};
pub use dc_gpu::{GpuDevice, GpuSelection};

/// GPU discovery and worker-process isolation.
pub mod gpu {
    pub use dc_gpu::*;
}
