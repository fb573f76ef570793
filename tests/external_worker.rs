//! A local pool whose worker processes are a Python program, `tests/fixtures/python_worker.py`,
//! written from `docs/worker-protocol.md` alone (standard library only, its own CBOR codec).
//!
//! The Rust side only mirrors the worker's types: `PyDouble` is never built here.

use std::time::Duration;

use distributed_computing::{BoxError, JobFailure, Pool, PoolError, Worker, WorkerContext};
use futures::StreamExt;

/// The Python worker program.
const PROGRAM: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/python_worker.py"
);

/// How long any one test may take.
const LIMIT: Duration = Duration::from_secs(60);

/// The Rust mirror of the Python kind "py-double": output = n * factor + sum of updates.
#[derive(Debug)]
struct PyDouble;

impl Worker for PyDouble {
    const KIND: &'static str = "py-double";
    type Init = i64;
    type Job = i64;
    type Output = i64;
    type Update = i64;

    fn new(_factor: i64, _ctx: &WorkerContext) -> Result<Self, BoxError> {
        Err("py-double runs in Python".into())
    }

    fn run(&mut self, _n: i64) -> Result<i64, BoxError> {
        Err("py-double runs in Python".into())
    }
}

/// A local pool of two Python workers with factor 3.
async fn pool(max_attempts: u32) -> Pool<PyDouble> {
    Pool::<PyDouble>::builder(3)
        .local()
        .cpu_workers(2)
        .max_attempts(max_attempts)
        .worker_program(PROGRAM)
        .connect()
        .await
        .expect("connect a pool of Python workers")
}

/// Every item of an `imap_unordered` run, sorted by input index.
async fn run_unordered(pool: &Pool<PyDouble>, jobs: Vec<i64>) -> Vec<Result<i64, PoolError>> {
    let count = jobs.len();
    let mut slots: Vec<Option<Result<i64, PoolError>>> = (0..count).map(|_| None).collect();
    let mut stream = Box::pin(pool.imap_unordered(jobs));
    while let Some(item) = stream.next().await {
        let (index, result) = match item {
            Ok((index, output)) => (index, Ok(output)),
            Err(err @ PoolError::Job { index, .. }) => (index, Err(err)),
            Err(other) => panic!("pool-wide error: {other}"),
        };
        assert!(slots[index].is_none(), "index {index} came twice");
        slots[index] = Some(result);
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, slot)| slot.unwrap_or_else(|| panic!("no item for index {i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_serves_map_in_order() {
    tokio::time::timeout(LIMIT, async {
        let pool = pool(3).await;
        let outputs = pool.map(0..20).await.expect("map");
        assert_eq!(outputs, (0..20).map(|n| n * 3).collect::<Vec<i64>>());
        while pool.workers_count().await.expect("workers_count") != 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await.expect("close");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_applies_updates_in_order() {
    tokio::time::timeout(LIMIT, async {
        let pool = pool(3).await;
        pool.update_workers(100).await.expect("first update");
        pool.update_workers(1000).await.expect("second update");
        let outputs = pool.map(0..20).await.expect("map");
        assert_eq!(outputs, (0..20).map(|n| n * 3 + 1100).collect::<Vec<i64>>());
        pool.close().await.expect("close");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_errors_fail_only_their_job() {
    tokio::time::timeout(LIMIT, async {
        let pool = pool(3).await;
        let results = run_unordered(&pool, vec![1, -5, 2]).await;
        assert_eq!(results[0].as_ref().expect("job 0"), &3);
        assert_eq!(results[2].as_ref().expect("job 2"), &6);
        match &results[1] {
            Err(PoolError::Job {
                index: 1,
                kind,
                message,
                attempts: 1,
                ..
            }) => {
                assert_eq!(*kind, JobFailure::Worker);
                assert_eq!(message, "negative job: -5");
            }
            other => panic!("job 1: {other:?}"),
        }
        pool.close().await.expect("close");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_crash_is_retried_then_fails() {
    tokio::time::timeout(LIMIT, async {
        let pool = pool(2).await;
        let results = run_unordered(&pool, vec![666, 4]).await;
        assert_eq!(results[1].as_ref().expect("job 1"), &12);
        match &results[0] {
            Err(PoolError::Job {
                index: 0,
                kind,
                message,
                attempts: 2,
                ..
            }) => {
                assert_eq!(*kind, JobFailure::Exhausted);
                assert!(message.contains("SIGKILL"), "message: {message}");
            }
            other => panic!("job 0: {other:?}"),
        }
        pool.close().await.expect("close");
    })
    .await
    .expect("test timed out");
}
