//! The in-process node agents of a run: CPU workers (real worker processes of this
//! executable) or simulated slots (W6), on a runtime of their own for W1–W4.

use std::sync::Arc;

use dc_core::agent::{AgentConfig, AgentHandle, SlotSpec, WorkerCommand, spawn_agent};
use dc_core::broker::NodeId;
use dc_core::{BoxError, Broker};

use super::WORKERS;
use super::server::{Server, redis_broker};
use super::worker::{BENCH_KIND, unix_ms};

pub(super) fn cpu_agent(
    broker: Arc<dyn Broker>,
    slots: usize,
    simulate: bool,
) -> Result<AgentHandle, BoxError> {
    let mut config = AgentConfig::new(
        NodeId(format!(
            "{}-bench-{}-{}",
            dc_core::agent::host_name(),
            std::process::id(),
            unix_ms()
        )),
        WorkerCommand::current_exe()?,
        vec![BENCH_KIND.to_string()],
        vec![SlotSpec::for_device(None); slots],
    );
    config.set_simulated(simulate);
    Ok(spawn_agent(broker, config))
}

/// W1–W4's node: an agent with 2 CPU workers on a tokio runtime of its own, as a node process
/// has, so that the pool's tasks and the node's never wait in one run queue (in a deployment
/// they are different processes, usually on different machines).
pub(super) struct NodeRuntime {
    pub(super) runtime: tokio::runtime::Runtime,
    pub(super) agent: AgentHandle,
}

impl NodeRuntime {
    pub(super) async fn start(server: &Server) -> Result<Self, BoxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dc-bench-node")
            .enable_all()
            .build()?;
        let server = server.clone();
        // The broker's connections are made on the node's runtime, so their tasks run there.
        let agent = runtime
            .spawn(async move { cpu_agent(redis_broker(&server).await?, WORKERS, false) })
            .await??;
        Ok(NodeRuntime { runtime, agent })
    }

    /// The same on RabbitMQ, in the run's namespace.
    pub(super) async fn start_amqp(target: &super::amqp::AmqpTarget) -> Result<Self, BoxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dc-bench-node")
            .enable_all()
            .build()?;
        let target = target.clone();
        let agent = runtime
            .spawn(async move { cpu_agent(target.broker().await?, WORKERS, false) })
            .await??;
        Ok(NodeRuntime { runtime, agent })
    }

    pub(super) async fn shutdown(self) {
        let NodeRuntime { runtime, agent } = self;
        let _ = runtime.spawn(agent.shutdown()).await;
        runtime.shutdown_background();
    }
}
