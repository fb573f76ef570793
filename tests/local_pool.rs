//! A local pool with real worker processes: results, order, updates, errors, devices.
//!
//! Custom harness (`harness = false`): worker processes are spawned from this same test
//! executable, so `main` must call `serve_if_worker` before anything else.

mod common;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Probe, ProbeInit, ProbeJob, ProbeOut, TestResult, Unregistered, distinct, eventually,
};
use distributed_computing::{JobFailure, Pool, PoolError};
use futures::StreamExt;

const ROLE: &str = "DC_TEST_ROLE";

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Ok(role) = std::env::var(ROLE) {
        return run_role(&role);
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(120);
        map_keeps_order_and_init_reaches_every_worker,
        imap_unordered_yields_every_index_once,
        updates_arrive_in_order_before_later_jobs,
        updates_reach_workers_between_jobs_of_one_stream,
        worker_error_fails_only_that_job,
        worker_init_failure_reaches_the_pool,
        unregistered_kind_is_refused_at_connect,
        fake_gpus_give_each_worker_one_distinct_device,
        concurrent_calls_on_a_shared_pool_get_their_own_results,
        closed_pool_refuses_work_and_stops_its_workers,
        panicking_job_fails_alone_and_the_worker_lives_on,
        close_aborts_running_jobs_promptly,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// Roles this executable plays when a test spawns it as a separate pool owner.
fn run_role(role: &str) -> ExitCode {
    common::run_role(role, Duration::from_secs(120), || async move {
        match role {
            "report-devices" => report_devices().await,
            other => Err(format!("unknown role {other}").into()),
        }
    })
}

/// Open a local pool (with whatever DC_FAKE_GPUS the parent gave) and print, per worker,
/// what it sees: `pid|CUDA_VISIBLE_DEVICES|CUDA_DEVICE_ORDER|devices`.
async fn report_devices() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("gpu"))
        .local()
        .connect()
        .await?;
    let workers = eventually(Duration::from_secs(30), || async {
        pool.workers_count().await.unwrap_or(0) >= 3
    })
    .await;
    check!(workers, "3 workers never became ready");
    let jobs = (0..30).map(|i| ProbeJob::SleepEcho(50, i));
    for out in pool.map(jobs).await? {
        println!(
            "WORKER {}|{}|{}|{}",
            out.pid,
            out.cuda_visible_devices.unwrap_or_else(|| "<unset>".into()),
            out.cuda_device_order.unwrap_or_else(|| "<unset>".into()),
            out.devices.join(",")
        );
    }
    pool.close().await?;
    Ok(())
}

async fn local_pool(tag: &str, workers: usize) -> Result<Pool<Probe>, PoolError> {
    Pool::<Probe>::builder(ProbeInit::tagged(tag))
        .local()
        .cpu_workers(workers)
        .connect()
        .await
}

async fn map_keeps_order_and_init_reaches_every_worker() -> TestResult {
    let pool = local_pool("init-tag-42", 2).await?;
    let ready = eventually(Duration::from_secs(30), || async {
        pool.workers_count().await.unwrap_or(0) == 2
    })
    .await;
    check!(ready, "2 workers never became ready");
    check!(pool.nodes_count().await? == 1, "a local pool is one node");
    let jobs: Vec<ProbeJob> = (0..40).map(|i| ProbeJob::SleepEcho(20, i)).collect();
    let outs: Vec<ProbeOut> = pool.map(jobs).await?;
    check!(outs.len() == 40, "got {} outputs", outs.len());
    for (i, out) in outs.iter().enumerate() {
        check!(
            out.value == i as i64,
            "output {i} holds {}: order lost",
            out.value
        );
        check!(out.tag == "init-tag-42", "worker saw init {:?}", out.tag);
        check!(
            out.cuda_visible_devices.as_deref() == Some(""),
            "a CPU worker must see no GPU, saw {:?}",
            out.cuda_visible_devices
        );
        check!(
            out.devices.is_empty(),
            "CPU worker got devices {:?}",
            out.devices
        );
    }
    let pids = distinct(outs.iter().map(|o| o.pid));
    check!(
        pids == 2,
        "jobs ran on {pids} worker processes, expected both"
    );
    check!(
        !outs.iter().any(|o| o.pid == std::process::id()),
        "a job ran in the pool's own process"
    );
    pool.close().await?;
    Ok(())
}

async fn imap_unordered_yields_every_index_once() -> TestResult {
    let pool = local_pool("imap", 2).await?;
    let mut stream = pool.imap_unordered((0..150).map(ProbeJob::Echo));
    let mut seen = HashSet::new();
    while let Some(item) = stream.next().await {
        let (index, out) = item?;
        check!(
            out.value == index as i64,
            "index {index} carries output {}",
            out.value
        );
        check!(seen.insert(index), "index {index} yielded twice");
    }
    check!(seen.len() == 150, "{} of 150 indices yielded", seen.len());
    pool.close().await?;
    Ok(())
}

async fn updates_arrive_in_order_before_later_jobs() -> TestResult {
    let pool = local_pool("updates", 2).await?;
    for u in [1, 2, 3] {
        pool.update_workers(u).await?;
    }
    let outs = pool
        .map((0..20).map(|i| ProbeJob::SleepEcho(10, i)))
        .await?;
    for out in &outs {
        check!(
            out.updates == vec![1, 2, 3],
            "worker {} saw updates {:?} before a later job",
            out.worker_id,
            out.updates
        );
    }
    pool.update_workers(4).await?;
    let outs = pool.map((0..10).map(ProbeJob::Echo)).await?;
    for out in &outs {
        check!(out.updates == vec![1, 2, 3, 4], "saw {:?}", out.updates);
    }
    pool.close().await?;
    Ok(())
}

/// The classic pattern: broadcast each result while the same stream runs. Every job sees an
/// in-order prefix of the updates, and later jobs see the updates sent before they started.
async fn updates_reach_workers_between_jobs_of_one_stream() -> TestResult {
    let pool = local_pool("stream-updates", 2).await?;
    let mut stream = pool.imap_unordered((0..30).map(|i| ProbeJob::SleepEcho(40, i)));
    let mut sent: Vec<i64> = Vec::new();
    let mut max_seen = 0;
    while let Some(item) = stream.next().await {
        let (_, out) = item?;
        let n = out.updates.len();
        check!(
            out.updates == (1..=n as i64).collect::<Vec<_>>(),
            "updates out of order or with gaps: {:?}",
            out.updates
        );
        check!(n <= sent.len(), "worker saw an update never sent");
        max_seen = max_seen.max(n);
        let next = sent.len() as i64 + 1;
        pool.update_workers(next).await?;
        sent.push(next);
    }
    check!(
        max_seen >= 10,
        "updates did not reach busy workers between jobs (max seen {max_seen} of {})",
        sent.len()
    );
    pool.close().await?;
    Ok(())
}

async fn worker_error_fails_only_that_job() -> TestResult {
    let pool = local_pool("errors", 2).await?;
    let jobs = vec![
        ProbeJob::Echo(0),
        ProbeJob::Fail("bad input 7".into()),
        ProbeJob::Echo(2),
        ProbeJob::Echo(3),
    ];
    let mut stream = pool.imap_unordered(jobs.clone());
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok((i, out)) => ok.push((i, out.value)),
            Err(e) => errors.push(e),
        }
    }
    ok.sort();
    check!(ok == vec![(0, 0), (2, 2), (3, 3)], "the other jobs: {ok:?}");
    match &errors[..] {
        [
            PoolError::Job {
                index: 1,
                kind: JobFailure::Worker,
                message,
                attempts: 1,
                ..
            },
        ] => {
            check!(message == "bad input 7", "message: {message}");
        }
        other => return Err(format!("expected one worker error for job 1, got {other:?}").into()),
    }
    match pool.map(jobs).await {
        Err(PoolError::Job { index: 1, .. }) => {}
        other => return Err(format!("map should fail on job 1: {other:?}").into()),
    }
    // The pool keeps working.
    let outs = pool.map((0..4).map(ProbeJob::Echo)).await?;
    check!(outs.len() == 4, "pool broken after an error");
    pool.close().await?;
    Ok(())
}

async fn worker_init_failure_reaches_the_pool() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit {
        tag: "broken-model".into(),
        fail_init: true,
    })
    .local()
    .cpu_workers(1)
    .connect()
    .await?;
    match pool.map(vec![ProbeJob::Echo(1)]).await {
        Err(PoolError::WorkerInit(message)) => check!(
            message.contains("cannot load the model for broken-model"),
            "message: {message}"
        ),
        other => return Err(format!("expected WorkerInit, got {other:?}").into()),
    }
    pool.close().await?;
    Ok(())
}

async fn unregistered_kind_is_refused_at_connect() -> TestResult {
    match Pool::<Unregistered>::builder(()).local().connect().await {
        Err(PoolError::UnknownWorkerKind { kind, known }) => {
            check!(kind == "unregistered", "kind {kind}");
            check!(known == vec!["probe".to_string()], "known {known:?}");
            Ok(())
        }
        other => Err(format!("expected UnknownWorkerKind, got {other:?}").into()),
    }
}

async fn fake_gpus_give_each_worker_one_distinct_device() -> TestResult {
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .env(ROLE, "report-devices")
        .env("DC_FAKE_GPUS", "3")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    check!(
        out.status.success(),
        "role failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut by_pid = std::collections::HashMap::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix("WORKER ")) {
        let parts: Vec<&str> = line.split('|').collect();
        check!(parts.len() == 4, "bad line {line}");
        by_pid.insert(
            parts[0].to_string(),
            (
                parts[1].to_string(),
                parts[2].to_string(),
                parts[3].to_string(),
            ),
        );
    }
    check!(
        by_pid.len() == 3,
        "expected 3 worker processes, saw {}: {stdout}",
        by_pid.len()
    );
    let devices: HashSet<&String> = by_pid.values().map(|(cvd, _, _)| cvd).collect();
    check!(devices.len() == 3, "workers share devices: {by_pid:?}");
    for (cvd, order, ctx_devices) in by_pid.values() {
        check!(
            cvd.starts_with("GPU-") && !cvd.contains(','),
            "CUDA_VISIBLE_DEVICES={cvd}"
        );
        check!(order == "PCI_BUS_ID", "CUDA_DEVICE_ORDER={order}");
        check!(
            ctx_devices == cvd,
            "WorkerContext::devices {ctx_devices} != {cvd}"
        );
    }
    Ok(())
}

async fn concurrent_calls_on_a_shared_pool_get_their_own_results() -> TestResult {
    let pool = Arc::new(local_pool("shared", 2).await?);
    let mut tasks = Vec::new();
    for t in 0..4i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let jobs = (0..25).map(move |i| ProbeJob::Echo(t * 1000 + i));
            pool.map(jobs).await.map(|outs| (t, outs))
        }));
    }
    for task in tasks {
        let (t, outs) = task.await??;
        let values: Vec<i64> = outs.iter().map(|o| o.value).collect();
        let want: Vec<i64> = (0..25).map(|i| t * 1000 + i).collect();
        check!(values == want, "task {t} got {values:?}");
    }
    pool.close().await?;
    Ok(())
}

async fn closed_pool_refuses_work_and_stops_its_workers() -> TestResult {
    let pool = local_pool("closing", 2).await?;
    let outs = pool.map((0..6).map(ProbeJob::Echo)).await?;
    let pids: Vec<u32> = outs.iter().map(|o| o.pid).collect();
    pool.close().await?;
    pool.close().await?;
    check!(
        matches!(
            pool.map(vec![ProbeJob::Echo(1)]).await,
            Err(PoolError::Closed)
        ),
        "map on a closed pool must fail with Closed"
    );
    check!(
        matches!(pool.update_workers(1).await, Err(PoolError::Closed)),
        "update on a closed pool must fail with Closed"
    );
    let gone = eventually(Duration::from_secs(10), || async {
        pids.iter().all(|&p| common::process_is_gone(p))
    })
    .await;
    check!(gone, "worker processes {pids:?} outlived close()");
    Ok(())
}

async fn panicking_job_fails_alone_and_the_worker_lives_on() -> TestResult {
    let pool = local_pool("panics", 1).await?;
    let before = pool.map(vec![ProbeJob::Echo(1)]).await?;
    match pool
        .map(vec![ProbeJob::Panic("index out of range: 9".into())])
        .await
    {
        Err(PoolError::Job {
            kind: JobFailure::Worker,
            message,
            attempts: 1,
            ..
        }) => check!(
            message.contains("worker panicked: index out of range: 9"),
            "message: {message}"
        ),
        other => return Err(format!("expected a worker error, got {other:?}").into()),
    }
    let after = pool.map(vec![ProbeJob::Echo(2)]).await?;
    check!(after[0].value == 2, "the next job ran");
    check!(
        after[0].pid == before[0].pid,
        "a panic must not cost the worker process"
    );
    pool.close().await?;
    Ok(())
}

async fn close_aborts_running_jobs_promptly() -> TestResult {
    let pool = Arc::new(local_pool("abort", 1).await?);
    let warm = pool.map(vec![ProbeJob::Echo(0)]).await?;
    let pid = warm[0].pid;
    let running = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.map(vec![ProbeJob::SleepEcho(60_000, 1)]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    pool.close().await?;
    let took = started.elapsed();
    check!(
        took < Duration::from_secs(3),
        "close took {took:?} with a job running"
    );
    check!(
        matches!(running.await?, Err(PoolError::Closed)),
        "the waiting map must end with Closed"
    );
    check!(
        common::process_is_gone(pid),
        "the busy worker {pid} outlived close()"
    );
    Ok(())
}
