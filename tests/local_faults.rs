//! Faults in a local pool, with real worker processes: crashes, poison jobs, garbage on the
//! protocol channel, and the pool's owner killed. Each test checks what was delivered.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use common::{Probe, ProbeInit, ProbeJob, TestResult, distinct, eventually, process_is_gone};
use distributed_computing::broker::{AttemptEnd, NodeId, SessionId};
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
        aborting_job_is_retried_then_fails_with_attempts,
        restarted_worker_replays_updates_before_its_next_job,
        killed_worker_process_job_runs_again_exactly_once,
        garbage_on_the_channel_fails_only_that_job,
        sigkill_of_pool_owner_leaves_no_worker_alive,
        pool_resubmits_what_a_broker_lost_and_delivers_each_result_once,
        tiny_jobs_with_poison_jobs_charge_only_the_poison,
        jobs_taken_while_a_slow_report_runs_keep_their_leases,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

fn run_role(role: &str) -> ExitCode {
    common::run_role(role, Duration::from_secs(300), || async move {
        match role {
            "owner" => owner().await,
            other => Err(format!("unknown role {other}").into()),
        }
    })
}

/// A pool owner: opens a local pool with 2 workers, prints their pids, and keeps them busy
/// until it is killed.
async fn owner() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("owner"))
        .local()
        .cpu_workers(2)
        .connect()
        .await?;
    let outs = pool.map((0..8).map(|i| ProbeJob::SleepEcho(30, i))).await?;
    let pids: HashSet<u32> = outs.iter().map(|o| o.pid).collect();
    let listed: HashSet<u32> = pool.local_worker_pids().await.into_iter().collect();
    check!(
        pids == listed,
        "job pids {pids:?} != worker pids {listed:?}"
    );
    let line: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("PIDS {}", line.join(" "));
    // Busy until killed.
    let _ = pool
        .map((0..10_000).map(|i| ProbeJob::SleepEcho(200, i)))
        .await;
    Ok(())
}

async fn aborting_job_is_retried_then_fails_with_attempts() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("poison"))
        .local()
        .cpu_workers(2)
        .max_attempts(3)
        .connect()
        .await?;
    let mut jobs = vec![ProbeJob::Abort];
    jobs.extend((1..20).map(|i| ProbeJob::SleepEcho(10, i)));
    let mut stream = pool.imap_unordered(jobs);
    let mut ok = HashSet::new();
    let mut failures = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok((i, out)) => {
                check!(out.value == i as i64, "job {i} returned {}", out.value);
                check!(ok.insert(i), "job {i} delivered twice");
            }
            Err(e) => failures.push(e),
        }
    }
    check!(
        ok == (1..20).collect::<HashSet<usize>>(),
        "healthy jobs delivered: {ok:?}"
    );
    match &failures[..] {
        [
            PoolError::Job {
                index: 0,
                kind: JobFailure::Exhausted,
                message,
                attempts: 3,
                history,
            },
        ] => {
            check!(
                message.contains("SIGABRT"),
                "the error says how it died: {message}"
            );
            check!(
                message.contains("about to abort"),
                "the error shows its last output: {message}"
            );
            check!(history.len() == 3, "history {history:?}");
            for (n, record) in history.iter().enumerate() {
                check!(
                    u64::from(record.attempt) == n as u64 + 1,
                    "attempt numbers {history:?}"
                );
                check!(
                    matches!(&record.end, AttemptEnd::ProcessDied { how, .. } if how.contains("signal 6")),
                    "attempt {} ended {:?}",
                    record.attempt,
                    record.end
                );
            }
        }
        other => {
            return Err(format!("expected job 0 to fail after 3 attempts, got {other:?}").into());
        }
    }
    // Later jobs still run on restarted workers.
    let outs = pool.map((0..6).map(ProbeJob::Echo)).await?;
    check!(
        outs.iter().map(|o| o.value).collect::<Vec<_>>() == (0..6).collect::<Vec<_>>(),
        "later jobs"
    );
    pool.close().await?;
    Ok(())
}

async fn restarted_worker_replays_updates_before_its_next_job() -> TestResult {
    let dir = tempdir("replay")?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("replay"))
        .local()
        .cpu_workers(1)
        .connect()
        .await?;
    pool.update_workers(10).await?;
    pool.update_workers(20).await?;
    let before = pool.map(vec![ProbeJob::Echo(0)]).await?;
    check!(
        before[0].updates == vec![10, 20],
        "before the crash: {:?}",
        before[0].updates
    );
    let after = pool
        .map(vec![ProbeJob::AbortOnce(dir.join("marker"), 7)])
        .await?;
    check!(after[0].value == 7, "the crashed job's retry result");
    check!(
        after[0].pid != before[0].pid,
        "the job was retried on a new worker process"
    );
    check!(
        after[0].updates == vec![10, 20],
        "the restarted worker replayed {:?}, expected [10, 20]",
        after[0].updates
    );
    pool.close().await?;
    Ok(())
}

/// SIGKILL (what the OOM killer sends) of a worker process mid-job: restarted, job retried,
/// every job delivered once.
async fn killed_worker_process_job_runs_again_exactly_once() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("oom"))
        .local()
        .cpu_workers(2)
        .connect()
        .await?;
    let warm = pool.map((0..4).map(ProbeJob::Echo)).await?;
    let first_pids: HashSet<u32> = warm.iter().map(|o| o.pid).collect();
    let mut stream = pool.imap_unordered((0..30).map(|i| ProbeJob::SleepEcho(100, i)));
    let mut seen = HashSet::new();
    let mut killed = None;
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(out.value == i as i64, "job {i} returned {}", out.value);
        check!(seen.insert(i), "job {i} delivered twice");
        if killed.is_none() {
            let victim = out.pid;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(victim as i32),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            killed = Some(victim);
        }
    }
    check!(seen.len() == 30, "{} of 30 jobs delivered", seen.len());
    let now: HashSet<u32> = pool.local_worker_pids().await.into_iter().collect();
    let victim = killed.ok_or("nothing was killed")?;
    check!(
        !now.contains(&victim),
        "the killed worker {victim} is still listed"
    );
    check!(
        now.len() == 2,
        "the slot was refilled: {now:?} (before: {first_pids:?})"
    );
    pool.close().await?;
    Ok(())
}

async fn garbage_on_the_channel_fails_only_that_job() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("garbage"))
        .local()
        .cpu_workers(2)
        .max_attempts(2)
        .connect()
        .await?;
    let mut jobs = vec![ProbeJob::GarbageFrame, ProbeJob::BadCbor];
    jobs.extend((2..22).map(ProbeJob::Echo));
    let mut stream = pool.imap_unordered(jobs);
    let mut ok = HashSet::new();
    let mut failed = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok((i, _)) => check!(ok.insert(i), "job {i} twice"),
            Err(PoolError::Job {
                index,
                kind,
                message,
                attempts,
                ..
            }) => {
                check!(kind == JobFailure::Exhausted, "kind {kind}");
                check!(attempts == 2, "attempts {attempts}");
                check!(message.contains("protocol error"), "job {index}: {message}");
                failed.push((index, message));
            }
            Err(other) => return Err(format!("unexpected {other:?}").into()),
        }
    }
    failed.sort();
    check!(
        ok == (2..22).collect::<HashSet<usize>>(),
        "healthy jobs: {ok:?}"
    );
    check!(
        failed.len() == 2 && failed[0].0 == 0 && failed[1].0 == 1,
        "failed: {failed:?}"
    );
    check!(
        failed[0].1.contains("exceeds"),
        "a huge length prefix is named: {}",
        failed[0].1
    );
    check!(
        failed[1].1.contains("undecodable"),
        "bad CBOR is named: {}",
        failed[1].1
    );
    pool.close().await?;
    Ok(())
}

async fn sigkill_of_pool_owner_leaves_no_worker_alive() -> TestResult {
    let exe = std::env::current_exe()?;
    let mut owner = std::process::Command::new(exe)
        .env(ROLE, "owner")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = owner.stdout.take().ok_or("no stdout")?;
    let pids = tokio::task::spawn_blocking(move || -> Option<Vec<u32>> {
        for line in BufReader::new(stdout).lines() {
            let line = line.ok()?;
            if let Some(rest) = line.strip_prefix("PIDS ") {
                return Some(rest.split(' ').filter_map(|p| p.parse().ok()).collect());
            }
        }
        None
    })
    .await?
    .ok_or("the owner never printed its worker pids")?;
    check!(
        pids.len() == 2 && distinct(pids.iter()) == 2,
        "worker pids {pids:?}"
    );
    check!(
        pids.iter().all(|&p| !process_is_gone(p)),
        "workers alive before the kill"
    );
    owner.kill()?; // SIGKILL
    owner.wait()?;
    let gone = eventually(Duration::from_secs(5), || async {
        pids.iter().all(|&p| process_is_gone(p))
    })
    .await;
    check!(
        gone,
        "worker processes {pids:?} survived SIGKILL of their pool's owner"
    );
    Ok(())
}

fn tempdir(name: &str) -> Result<std::path::PathBuf, std::io::Error> {
    let dir = std::env::temp_dir().join(format!(
        "dc-test-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The broker forgets the session mid-stream (as a restarted, empty Redis would): the pool
/// reopens it, replays its updates, resubmits what it has not received, and every job's
/// result arrives exactly once.
async fn pool_resubmits_what_a_broker_lost_and_delivers_each_result_once() -> TestResult {
    use distributed_computing::agent::{AgentConfig, SlotSpec, WorkerCommand, spawn_agent};
    use distributed_computing::broker::SessionControl;
    let broker = std::sync::Arc::new(distributed_computing::LocalBroker::new());
    let mut config = AgentConfig::new(
        NodeId("lossy-node".into()),
        WorkerCommand::current_exe()?,
        vec!["probe".into()],
        vec![SlotSpec::for_device(None); 2],
    );
    config.heartbeat = Duration::from_millis(200);
    config.poll = Duration::from_millis(200);
    let agent = spawn_agent(broker.clone(), config);
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("lossy"))
        .broker_instance(broker.clone())
        .connect()
        .await?;
    pool.update_workers(7).await?;
    let first = pool.session_id();
    let mut stream = pool.imap_unordered((0..40).map(|i| ProbeJob::SleepEcho(50, i)));
    let mut seen = HashSet::new();
    let mut lost = false;
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(out.value == i as i64, "job {i} returned {}", out.value);
        check!(seen.insert(i), "job {i} delivered twice");
        check!(
            out.updates == vec![7],
            "job {i} ran without the replayed update: {:?}",
            out.updates
        );
        if !lost && seen.len() == 10 {
            // Everything the broker held for this session is gone.
            broker.close_session(&SessionId(first.clone())).await?;
            lost = true;
        }
    }
    check!(
        seen.len() == 40,
        "{} of 40 delivered after the loss",
        seen.len()
    );
    check!(
        pool.session_id() != first,
        "the pool did not reopen its session"
    );
    pool.update_workers(8).await?;
    let after = pool.map((0..4).map(ProbeJob::Echo)).await?;
    check!(
        after.iter().all(|o| o.updates == vec![7, 8]),
        "updates after recovery: {after:?}"
    );
    pool.close().await?;
    agent.shutdown().await;
    Ok(())
}

/// Tiny jobs on a local pool (taken several at a time, a few waiting in each worker's channel)
/// with poison jobs among them: with one attempt allowed, only the poison jobs fail (a mutant
/// that charges the jobs waiting behind a poison job fails this test).
async fn tiny_jobs_with_poison_jobs_charge_only_the_poison() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("tiny"))
        .local()
        .cpu_workers(2)
        .max_attempts(1)
        .connect()
        .await?;
    common::only_poison_jobs_fail(&pool, 3000, &[1000, 1001, 2500]).await?;
    pool.close().await?;
    Ok(())
}

/// Result reports that each take `0` (a big result on a busy machine).
#[derive(Debug)]
struct SlowReports(Duration);

#[async_trait::async_trait]
impl common::hooked::Hooks for SlowReports {
    async fn report(&self) -> Box<dyn std::any::Any + Send> {
        tokio::time::sleep(self.0).await;
        Box::new(())
    }
}

/// Each result report takes three leases (as a big result does on a busy machine) while the
/// slot takes its next job in the same exchange: that job's lease is renewed from the moment
/// it is taken, so it never expires on the live node, and every job runs once.
async fn jobs_taken_while_a_slow_report_runs_keep_their_leases() -> TestResult {
    use distributed_computing::agent::{AgentConfig, SlotSpec, WorkerCommand, spawn_agent};
    let lease = Duration::from_millis(800);
    let dir = common::TempDir::new("slow-report")?;
    let runs = dir.path().join("runs");
    let broker = std::sync::Arc::new(common::hooked::Hooked {
        inner: std::sync::Arc::new(distributed_computing::LocalBroker::new()),
        hooks: SlowReports(lease * 3),
    });
    let mut config = AgentConfig::new(
        NodeId("slow-report-node".into()),
        WorkerCommand::current_exe()?,
        vec!["probe".into()],
        vec![SlotSpec::for_device(None); 2],
    );
    config.heartbeat = Duration::from_millis(100);
    config.poll = Duration::from_millis(100);
    let agent = spawn_agent(broker.clone(), config);
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("slow-report"))
        .broker_instance(broker.clone())
        .lease(lease)
        .connect()
        .await?;
    let jobs: Vec<ProbeJob> = (0..6)
        .map(|i| ProbeJob::CountRuns(runs.clone(), 100, i))
        .collect();
    let outs = pool.map(jobs).await?;
    check!(
        outs.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "results out of order or wrong: {:?}",
        outs.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    let recorded = std::fs::read_to_string(&runs)?;
    let mut counts = std::collections::BTreeMap::new();
    for line in recorded.lines() {
        let value: i64 = line.split_whitespace().next().unwrap_or("").parse()?;
        *counts.entry(value).or_insert(0usize) += 1;
    }
    check!(
        counts.len() == 6 && counts.values().all(|n| *n == 1),
        "runs per job on a live node (each once expected): {counts:?}"
    );
    pool.close().await?;
    agent.shutdown().await;
    Ok(())
}
