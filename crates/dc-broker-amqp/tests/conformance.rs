//! The broker conformance suite against the local RabbitMQ (`DC_AMQP_URL`, by default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), twice: once on one connection (a pool that is
//! also its own node), once with the pool's calls on one connection and the nodes' calls on
//! another, so every node call travels as a request to the hosting pool and back. Each case
//! runs in a namespace of its own, deleted afterwards.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dc_broker_amqp::{AmqpBroker, AmqpOptions};
use dc_core::broker::*;
use dc_core::{Broker, BrokerError};
use futures::FutureExt;

fn url() -> String {
    std::env::var("DC_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn namespace(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("dct-{tag}-{}-{nanos}", std::process::id())
}

async fn connect(ns: &str) -> AmqpBroker {
    AmqpBroker::connect(&url(), &AmqpOptions::default().namespace(ns))
        .await
        .expect("RabbitMQ at DC_AMQP_URL (or 127.0.0.1:5672, guest/guest)")
}

/// A pool on one connection, its nodes on another.
#[derive(Debug)]
struct Split {
    pool: AmqpBroker,
    node: AmqpBroker,
}

impl Broker for Split {
    fn max_payload(&self) -> usize {
        self.pool.max_payload()
    }
}

#[async_trait]
impl SessionControl for Split {
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError> {
        self.pool.try_open_session(spec).await
    }
    async fn keep_session_alive(&self, session: &SessionId) -> Result<SessionState, BrokerError> {
        self.pool.keep_session_alive(session).await
    }
    async fn close_session(&self, session: &SessionId) -> Result<(), BrokerError> {
        self.pool.close_session(session).await
    }
    async fn active_session(&self, wait: Duration) -> Result<Option<SessionInfo>, BrokerError> {
        self.node.active_session(wait).await
    }
}

#[async_trait]
impl JobQueue for Split {
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError> {
        self.pool.submit(session, jobs).await
    }
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        self.node.take_jobs(session, node, worker, max, wait).await
    }
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Completion, BrokerError> {
        self.node.complete(lease, outcome).await
    }
    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        self.node.complete_many(outcomes).await
    }
    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> Result<Abandoned, BrokerError> {
        self.node.abandon(lease, end).await
    }
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        self.pool.take_results(session, max, wait).await
    }
    async fn lost_jobs(
        &self,
        session: &SessionId,
        jobs: &[JobId],
    ) -> Result<Vec<JobId>, BrokerError> {
        self.pool.lost_jobs(session, jobs).await
    }
}

#[async_trait]
impl UpdateLog for Split {
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.pool.publish_update(session, payload).await
    }
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.pool.publish_update_at(session, seq, payload).await
    }
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> Result<Vec<(UpdateSeq, Bytes)>, BrokerError> {
        self.node.read_updates(session, after, max).await
    }
}

#[async_trait]
impl NodeRegistry for Split {
    async fn heartbeat(&self, status: &NodeStatus) -> Result<(), BrokerError> {
        self.node.heartbeat(status).await
    }
    async fn leave(&self, node: &NodeId) -> Result<(), BrokerError> {
        self.node.leave(node).await
    }
    async fn report_problem(
        &self,
        session: &SessionId,
        problem: NodeProblem,
    ) -> Result<(), BrokerError> {
        self.node.report_problem(session, problem).await
    }
    async fn reap_expired(&self) -> Result<usize, BrokerError> {
        self.node.reap_expired().await
    }
}

#[async_trait]
impl Inspect for Split {
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError> {
        // What a `status` in another process sees.
        self.node.session_stats(session).await
    }
    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError> {
        self.node.nodes(within).await
    }
}

/// Every case on one connection, then every case split over two; each in its own namespace,
/// removed after it (also when it fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_one_connection_and_split_over_two() {
    let mut failed = Vec::new();
    for split in [false, true] {
        for case in dc_core::testing::all_cases() {
            let ns = namespace(if split { "split" } else { "one" });
            let pool = connect(&ns).await;
            let broker: Arc<dyn Broker> = if split {
                Arc::new(Split {
                    pool: pool.clone(),
                    node: connect(&ns).await,
                })
            } else {
                Arc::new(pool.clone())
            };
            let run = (case.run)(broker.clone());
            let outcome = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .map_err(|panic| {
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                });
            drop(broker);
            pool.remove_namespace().await.expect("remove the namespace");
            pool.close().await;
            let name = format!(
                "{}{}::{}",
                if split { "split/" } else { "" },
                case.capability,
                case.name
            );
            match outcome {
                Ok(()) => eprintln!("ok   {name}"),
                Err(why) => {
                    eprintln!("FAIL {name}: {why}");
                    failed.push(name);
                }
            }
        }
    }
    assert!(failed.is_empty(), "conformance cases failed: {failed:?}");
}
