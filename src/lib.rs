//! # distributed-computing
//!
//! Distributed GPU computations made easy: write a [`Worker`] (heavy set-up once, then job after
//! job), and run many jobs on isolated worker processes, one per GPU, through a [`Pool`].
//!
//! This facade re-exports the public API of the workspace's crates and composes them: its
//! [`Pool`] reaches head nodes and brokers by URL ([`Backends`]), and it starts nodes, servers
//! and heads ([`start_node`], [`start_head_node`], [`start_server`], [`start_redis`]) and a
//! node binary's whole command line ([`main_with`]).
#![doc = include_str!("../README.md")]

mod backends;
mod bench;
mod cli;
mod node;
mod pool;

pub use backends::{Backends, broker_from_url, connect_target};
pub use cli::{main_with, main_with_args};
pub use node::{
    HeadHandle, HeadOptions, JOIN_TOKEN_FILE, NodeError, NodeHandle, NodeOptions, NodeProcess,
    ServerError, ServerHandle, ServerOptions, default_state_dir, is_node_running,
    is_node_running_in, is_server_running, node_pid, node_pid_checked, read_join_token,
    start_head_node, start_node, start_redis, start_server,
};
pub use pool::{Pool, PoolBuilder};

pub use dc_broker_redis::server::RedisProcess;
pub use dc_broker_redis::token::JoinToken;
pub use dc_broker_redis::{RedisBroker, RedisOptions, TlsTrust, redis_url_as};
pub use dc_core::agent;
pub use dc_core::broker;
pub use dc_core::protocol;
pub use dc_core::{
    BoxError, Broker, BrokerError, Connector, DEFAULT_PORT, JobFailure, LocalBroker, LocalOnly,
    NetworkTarget, PoolError, Registry, Worker, WorkerContext, redact_url,
};
pub use dc_gpu::{GpuDevice, GpuSelection};

/// GPU discovery and worker-process isolation.
pub mod gpu {
    pub use dc_gpu::*;
}
