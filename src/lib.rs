//! # distributed-computing
//!
//! Distributed GPU computations made easy: write a [`Worker`] (heavy set-up once, then job after
//! job), and run many jobs on isolated worker processes, one per GPU, through a [`Pool`].
//!
//! This facade re-exports the public API of the workspace's crates and composes them: its
//! [`Pool`] reaches head nodes and brokers by URL ([`Backends`]), and it starts nodes, servers
//! and heads (`start_node`, `start_head_node`, `start_server`, `start_redis`) and a node
//! binary's whole command line (`main_with`).
//!
//! ## Features
//!
//! - `redis` (default): the Redis backend: `redis://` and `rediss://` URLs, head nodes reached
//!   by join token or password, and nodes, pool servers and heads started from code.
//! - `amqp` (default): the RabbitMQ backend: `amqp://` and `amqps://` URLs (the pool that
//!   opens a session coordinates it; nodes reach it through RabbitMQ).
//! - `cli` (default, turns on `redis`): `main_with` and `main_with_args`, the command line of
//!   `dc-cli` and of a user's own node binary.
//! - `bench` (off): `dc-cli bench` and its no-op worker kind `__dc-bench`; the `dc-cli` binary
//!   turns it on.
//!
//! Without default features the crate is the core library: local pools
//! (`Pool::builder(..).local()`), with no Redis client and no command-line parser.
#![doc = include_str!("../README.md")]

mod backends;
#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "cli")]
mod cli;
#[cfg(feature = "redis")]
mod node;
mod pool;

pub use backends::{Backends, broker_from_url, connect_target};
#[cfg(feature = "cli")]
pub use cli::{main_with, main_with_args};
#[cfg(feature = "redis")]
pub use node::{
    HeadHandle, HeadOptions, JOIN_TOKEN_FILE, NodeError, NodeHandle, NodeOptions, NodeProcess,
    ServerError, ServerHandle, ServerOptions, default_state_dir, is_node_running,
    is_node_running_in, is_server_running, node_pid, node_pid_checked, read_join_token,
    start_head_node, start_node, start_redis, start_server,
};
pub use pool::{Pool, PoolBuilder};

#[cfg(feature = "amqp")]
pub use dc_broker_amqp::{AmqpBroker, AmqpOptions};
#[cfg(feature = "redis")]
pub use dc_broker_redis::server::RedisProcess;
#[cfg(feature = "redis")]
pub use dc_broker_redis::token::JoinToken;
#[cfg(feature = "redis")]
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
