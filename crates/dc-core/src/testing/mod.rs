//! The broker conformance suite: the contract of [`Broker`], as tests any backend runs.
//!
//! A backend runs every case with one macro call in its tests, giving an expression that
//! evaluates to a fresh `Arc<dyn Broker>` future per case (a new key prefix, a new vhost…):
//!
//! ```ignore
//! dc_core::broker_conformance_tests!(async {
//!     std::sync::Arc::new(dc_core::LocalBroker::new()) as std::sync::Arc<dyn dc_core::Broker>
//! });
//! ```
//!
//! Each case is also a public async function in the module of its capability
//! ([`job_queue`], [`session_control`], [`update_log`], [`node_registry`], [`inspect`]), so a
//! backend can run one alone while debugging.

pub mod inspect;
pub mod job_queue;
pub mod node_registry;
pub mod session_control;
pub mod support;
pub mod update_log;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;

use bytes::Bytes;

use crate::broker::{
    Broker, JobId, JobResult, Lease, NewJob, NodeId, NodeStatus, SessionId, SessionInfo,
    SessionSpec, WorkerId,
};

/// Generate one `#[tokio::test]` per conformance case, each on a fresh broker from `$make`:
/// every case with `broker_conformance_tests!(make)`, or the cases of one capability with
/// `broker_conformance_tests!(job_queue: make)` (also `session_control`, `update_log`,
/// `node_registry`, `inspect`).
#[macro_export]
macro_rules! broker_conformance_tests {
    (session_control: $make:expr) => {
        $crate::broker_conformance_tests!(@cases session_control, $make;
            one_session_at_a_time,
            session_expires_without_keep_alive,
            closed_session_is_gone_for_nodes,
        );
    };
    (job_queue: $make:expr) => {
        $crate::broker_conformance_tests!(@cases job_queue, $make;
            jobs_are_leased_once_each,
            take_job_waits_then_gives_none,
            take_job_wakes_on_submit,
            results_first_writer_wins,
            abandon_requeues_until_max_attempts,
            worker_error_fails_at_once,
            resubmitted_job_ids_are_ignored,
            results_are_handed_out_once,
            take_jobs_leases_a_batch_once_each,
            complete_many_records_each_outcome,
            returned_jobs_queue_again_unstarted,
        );
    };
    (update_log: $make:expr) => {
        $crate::broker_conformance_tests!(@cases update_log, $make;
            update_log_is_ordered_and_replayable,
            jobs_carry_update_positions,
        );
    };
    (node_registry: $make:expr) => {
        $crate::broker_conformance_tests!(@cases node_registry, $make;
            heartbeat_keeps_leases,
            silent_node_loses_its_lease_and_late_result_is_fenced,
            node_leaving_requeues_without_counting,
            problems_reach_the_pool,
        );
    };
    (inspect: $make:expr) => {
        $crate::broker_conformance_tests!(@cases inspect, $make;
            stats_count_workers_and_nodes,
            nodes_are_listed_with_their_last_status,
        );
    };
    ($make:expr) => {
        $crate::broker_conformance_tests!(session_control: $make);
        $crate::broker_conformance_tests!(job_queue: $make);
        $crate::broker_conformance_tests!(update_log: $make);
        $crate::broker_conformance_tests!(node_registry: $make);
        $crate::broker_conformance_tests!(inspect: $make);
    };
    (@cases $group:ident, $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let broker: ::std::sync::Arc<dyn $crate::Broker> = $make.await;
                $crate::testing::$group::$case(broker).await;
            }
        )*
    };
}

/// One conformance case: the capability it checks, its name, and the case itself.
#[derive(Debug, Clone, Copy)]
pub struct ConformanceCase {
    /// The capability's module: `session_control`, `job_queue`, `update_log`,
    /// `node_registry` or `inspect`.
    pub capability: &'static str,
    /// The case's function name (the test name the macro gives it).
    pub name: &'static str,
    /// Runs the case on a fresh broker; panics when the broker breaks the contract.
    pub run: fn(Arc<dyn Broker>) -> LocalBoxFuture<'static, ()>,
}

/// Every case [`broker_conformance_tests!`](crate::broker_conformance_tests) generates, for a
/// backend that runs the suite its own way (several cases at once, under a user of its own…).
pub fn all_cases() -> Vec<ConformanceCase> {
    macro_rules! case {
        ($group:ident, $case:ident) => {
            ConformanceCase {
                capability: stringify!($group),
                name: stringify!($case),
                run: |broker| Box::pin($group::$case(broker)),
            }
        };
    }
    vec![
        case!(session_control, one_session_at_a_time),
        case!(session_control, session_expires_without_keep_alive),
        case!(session_control, closed_session_is_gone_for_nodes),
        case!(job_queue, jobs_are_leased_once_each),
        case!(job_queue, take_job_waits_then_gives_none),
        case!(job_queue, take_job_wakes_on_submit),
        case!(job_queue, results_first_writer_wins),
        case!(job_queue, abandon_requeues_until_max_attempts),
        case!(job_queue, worker_error_fails_at_once),
        case!(job_queue, resubmitted_job_ids_are_ignored),
        case!(job_queue, results_are_handed_out_once),
        case!(job_queue, take_jobs_leases_a_batch_once_each),
        case!(job_queue, complete_many_records_each_outcome),
        case!(job_queue, returned_jobs_queue_again_unstarted),
        case!(update_log, update_log_is_ordered_and_replayable),
        case!(update_log, jobs_carry_update_positions),
        case!(node_registry, heartbeat_keeps_leases),
        case!(
            node_registry,
            silent_node_loses_its_lease_and_late_result_is_fenced
        ),
        case!(node_registry, node_leaving_requeues_without_counting),
        case!(node_registry, problems_reach_the_pool),
        case!(inspect, stats_count_workers_and_nodes),
        case!(inspect, nodes_are_listed_with_their_last_status),
    ]
}

/// A session spec for tests: kind "conformance", the given lease and attempts.
pub fn spec(lease: Duration, max_attempts: u32) -> SessionSpec {
    SessionSpec {
        kind: "conformance".into(),
        init: vec![1, 2, 3],
        max_attempts,
        lease,
        owner: "conformance suite".into(),
        auto_batching: true,
    }
}

pub(crate) async fn open(broker: &dyn Broker, lease: Duration, max_attempts: u32) -> SessionInfo {
    broker
        .try_open_session(&spec(lease, max_attempts))
        .await
        .expect("try_open_session")
        .expect("no other session is active")
}

pub(crate) fn jobs(range: std::ops::Range<u64>) -> Vec<NewJob> {
    range
        .map(|i| NewJob {
            id: JobId(i),
            payload: Bytes::from(i.to_le_bytes().to_vec()),
            update_seq: 0,
        })
        .collect()
}

pub(crate) fn node(name: &str) -> NodeId {
    NodeId(name.into())
}

pub(crate) fn worker(node: &str, slot: usize) -> WorkerId {
    WorkerId(format!("{node}/{slot}"))
}

pub(crate) fn status(node_name: &str, leases: Vec<Lease>) -> NodeStatus {
    NodeStatus {
        node: node(node_name),
        host: "test-host".into(),
        kinds: vec!["conformance".into()],
        workers: vec![],
        leases,
    }
}

pub(crate) const SHORT: Duration = Duration::from_millis(50);

pub(crate) async fn take(
    broker: &dyn Broker,
    s: &SessionId,
    n: &str,
) -> Option<crate::broker::LeasedJob> {
    broker
        .take_job(s, &node(n), &worker(n, 0), SHORT)
        .await
        .expect("take_job")
}

/// Results of session `s` until `want` have come (or 10 s have passed).
pub async fn all_results(broker: &dyn Broker, s: &SessionId, want: usize) -> Vec<JobResult> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            broker
                .take_results(s, 1000, Duration::from_millis(200))
                .await
                .expect("take_results"),
        );
    }
    got
}

#[cfg(test)]
mod tests {
    /// `all_cases` lists exactly the cases the macro generates, each under its capability.
    #[test]
    fn all_cases_match_the_macro() {
        let source = include_str!("mod.rs");
        // The macro, not this test's own text.
        let source = &source[..source.find("#[cfg(test)]").expect("the test module")];
        let mut from_macro = std::collections::BTreeSet::new();
        for block in source
            .split("$crate::broker_conformance_tests!(@cases ")
            .skip(1)
        {
            let (group, rest) = block.split_once(", $make;").expect("a case list");
            let list = &rest[..rest.find(')').expect("the list's end")];
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                from_macro.insert((group.to_string(), name.to_string()));
            }
        }
        let listed: std::collections::BTreeSet<_> = super::all_cases()
            .iter()
            .map(|c| (c.capability.to_string(), c.name.to_string()))
            .collect();
        assert_eq!(from_macro.len(), 22);
        assert_eq!(listed, from_macro);
    }
}
