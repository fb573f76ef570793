//! Faults across machines, with real processes: worker nodes killed mid-job, a stalled and a
//! killed pool server, a pool owner killed, a large backlog, and bad input on the wire. Each
//! test checks what was delivered: every job's result exactly once (unique indices, right
//! values), nothing lost.
//!
//! Custom harness: this executable is also the node binary (role `cli`), the worker program
//! (`__dc-worker`), and a pool owner that the tests kill (role `pool-owner`). Tests run one at
//! a time (unless `--test-threads` says otherwise): they measure recovery times, and lines
//! starting with `MEASURE` report them (docs/reliability.md quotes them); `TIME` lines give
//! each test's duration.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cluster::{
    NodeProc, PASSWORD, ROLE, RedisServerProc, TempDir, free_port, pool, pool_with_lease,
    redis_cli, rss_kib, start_head, start_head_with, start_worker_node, start_worker_node_with,
    status_json, wait_workers,
};
use common::{Burners, Probe, ProbeInit, ProbeJob, ProbeOut, eventually, process_is_gone};
use distributed_computing::broker::Inspect;
use distributed_computing::{BoxError, JobFailure, Pool, PoolError, Worker, WorkerContext};
use futures::StreamExt;
use futures::stream::BoxStream;
use libtest_mimic::Failed;
use nix::sys::signal::Signal;
use tokio::io::AsyncBufReadExt;

/// The role in which this executable opens a pool on a head and runs jobs until killed.
const OWNER_ROLE: &str = "pool-owner";
/// The head's port, for the pool owner.
const OWNER_PORT: &str = "DC_TEST_OWNER_PORT";

/// One trial with its own time limit; prints how long it took.
macro_rules! trial {
    ($name:ident, $secs:expr) => {
        libtest_mimic::Trial::test(stringify!($name), || {
            let started = Instant::now();
            let result = common::run_async(Duration::from_secs($secs), $name);
            eprintln!(
                "TIME {} {:.1} s ({})",
                stringify!($name),
                started.elapsed().as_secs_f64(),
                if result.is_ok() { "ok" } else { "FAILED" }
            );
            result
        })
    };
}

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    if std::env::var(ROLE).as_deref() == Ok(OWNER_ROLE) {
        return pool_owner_role();
    }
    let mut args = libtest_mimic::Arguments::from_args();
    // Recovery times are measured: tests sharing two cores would measure each other.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let tests = vec![
        trial!(node_killed_mid_job_reruns_elsewhere_exactly_once, 150),
        trial!(
            node_killed_mid_job_reruns_elsewhere_exactly_once_short_lease,
            150
        ),
        trial!(node_killed_on_the_same_host_restarts_its_job_within_3s, 150),
        trial!(long_job_on_a_live_node_is_never_taken_away, 150),
        trial!(broker_stall_causes_no_false_deaths, 180),
        trial!(pool_owner_killed_session_expires_and_next_pool_starts, 180),
        trial!(
            head_redis_killed_is_restarted_and_the_pool_finishes_exactly_once,
            180
        ),
        trial!(
            head_redis_flushed_the_pool_resubmits_and_finishes_exactly_once,
            180
        ),
        trial!(
            backlog_of_200k_noop_jobs_completes_with_bounded_node_memory,
            900
        ),
        trial!(
            bad_input_on_the_wire_is_attributed_and_nothing_else_is_lost,
            240
        ),
        trial!(node_killed_holding_batched_jobs_every_job_once, 240),
        trial!(busy_node_keeps_its_big_and_long_jobs, 400),
        trial!(pool_calls_ride_through_broker_restarts, 180),
        trial!(pool_calls_fail_after_the_outage_timeout_saying_how_long, 60),
        trial!(hostile_broker_state_never_stops_a_node_or_the_pool, 600),
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

// ---------------------------------------------------------------------------------------------
// Helpers

type Item = Result<(usize, ProbeOut), PoolError>;

/// One run of a `CountRuns` / `Gate` job, as its worker recorded it.
#[derive(Debug, Clone)]
struct Run {
    value: i64,
    pid: u32,
    worker: String,
    at_ms: u64,
}

fn read_runs(path: &Path) -> Vec<Run> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some(Run {
                value: f.next()?.parse().ok()?,
                pid: f.next()?.parse().ok()?,
                worker: f.next()?.to_string(),
                at_ms: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn runs_of(path: &Path, value: i64) -> Vec<Run> {
    read_runs(path)
        .into_iter()
        .filter(|r| r.value == value)
        .collect()
}

/// Values that ran more than once, with how often.
fn run_more_than_once(path: &Path) -> BTreeMap<i64, usize> {
    let mut counts = BTreeMap::new();
    for run in read_runs(path) {
        *counts.entry(run.value).or_insert(0usize) += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn kill_pid(pid: u32, signal: Signal) -> Result<(), Failed> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .map_err(|e| format!("kill -{signal} {pid}: {e}"))?;
    Ok(())
}

/// A result stream consumed by a task of its own, each item stamped with its arrival time.
struct Collector {
    items: Arc<Mutex<Vec<(Item, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn new(stream: BoxStream<'static, Item>) -> Self {
        let items = Arc::new(Mutex::new(Vec::new()));
        let sink = items.clone();
        let task = tokio::spawn(async move {
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                sink.lock()
                    .expect("collector lock")
                    .push((item, Instant::now()));
            }
        });
        Collector { items, task }
    }

    fn len(&self) -> usize {
        self.items.lock().expect("collector lock").len()
    }

    fn snapshot(&self) -> Vec<(Item, Instant)> {
        self.items.lock().expect("collector lock").clone()
    }

    /// Wait for the stream to end (within `limit`), and return everything it yielded.
    async fn finish(mut self, limit: Duration) -> Result<Vec<(Item, Instant)>, Failed> {
        match tokio::time::timeout(limit, &mut self.task).await {
            Ok(joined) => {
                joined.map_err(|e| format!("collector task: {e}"))?;
                Ok(self.snapshot())
            }
            Err(_) => {
                self.task.abort();
                let got = self.snapshot();
                let ok: Vec<usize> = got
                    .iter()
                    .filter_map(|(i, _)| i.as_ref().ok().map(|(idx, _)| *idx))
                    .collect();
                let errors: Vec<String> = got
                    .iter()
                    .filter_map(|(i, _)| i.as_ref().err().map(|e| e.to_string()))
                    .collect();
                Err(format!(
                    "the result stream did not end within {limit:?}: {} items so far, {} results (indices {:?}), errors {:?}",
                    got.len(),
                    ok.len(),
                    abbreviate(&ok),
                    errors
                )
                .into())
            }
        }
    }
}

/// At most 40 numbers, for messages.
fn abbreviate(v: &[usize]) -> String {
    let mut sorted = v.to_vec();
    sorted.sort_unstable();
    if sorted.len() <= 40 {
        format!("{sorted:?}")
    } else {
        format!("{:?}… ({} in all)", &sorted[..40], sorted.len())
    }
}

/// Every one of `n` jobs delivered exactly once, without error, with value `expected(index)`.
/// Returns the outputs by index with their arrival times.
fn exactly_once(
    items: &[(Item, Instant)],
    n: usize,
    expected: impl Fn(usize) -> i64,
) -> Result<Vec<(ProbeOut, Instant)>, Failed> {
    let mut slots: Vec<Option<(ProbeOut, Instant)>> = vec![None; n];
    let mut twice = Vec::new();
    let mut wrong = Vec::new();
    let mut errors = Vec::new();
    for (item, at) in items {
        match item {
            Ok((i, out)) if *i < n => {
                if out.value != expected(*i) {
                    wrong.push(format!("job {i} returned {}", out.value));
                }
                if slots[*i].is_some() {
                    twice.push(*i);
                }
                slots[*i] = Some((out.clone(), *at));
            }
            Ok((i, _)) => wrong.push(format!("index {i} out of range (n = {n})")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let missing: Vec<usize> = (0..n).filter(|i| slots[*i].is_none()).collect();
    if !twice.is_empty() || !wrong.is_empty() || !errors.is_empty() || !missing.is_empty() {
        return Err(format!(
            "not exactly once: delivered twice {twice:?}; wrong {wrong:?}; errors {errors:?}; missing {}",
            abbreviate(&missing)
        )
        .into());
    }
    Ok(slots.into_iter().flatten().collect())
}

fn worker_prefix(node: &NodeProc) -> Result<String, Failed> {
    Ok(format!(
        "{}/",
        node.node_id().ok_or("the node process is gone")?
    ))
}

/// Lines of a node's output that mention a panic.
fn panics(node: &NodeProc) -> Vec<String> {
    node.output()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_string)
        .collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// 1. A worker node killed (SIGKILL) mid-job.

#[derive(Debug, Clone, Copy)]
struct KillMeasure {
    /// From the kill until the head's worker started the killed job again.
    restart_after: Duration,
    /// From the kill until the killed job's result reached the pool.
    result_after: Duration,
}

/// With the default settings, measured once and shared with the same-host fast-path test.
static DEFAULT_KILL: OnceLock<KillMeasure> = OnceLock::new();

const LONG_JOB_MS: u64 = 3000;

/// A head whose only worker is held by a gate job, then a worker node: the next job submitted
/// lands on the worker node, and the head's worker is free once the gate opens.
struct GatedPair {
    head: NodeProc,
    head_workers: String,
    pool: Pool<Probe>,
    node: NodeProc,
    node_workers: String,
    /// Where `CountRuns` and `Gate` jobs record their runs.
    runs: PathBuf,
    /// Written to release the gate job.
    gate: PathBuf,
    gated: Collector,
    _dir: TempDir,
}

async fn gated_pair(
    tag: &str,
    heartbeat_ms: Option<u64>,
    lease: Option<Duration>,
) -> Result<GatedPair, Failed> {
    let (head, port) = start_head_with(1, heartbeat_ms).await?;
    let head_workers = worker_prefix(&head)?;
    let pool = pool_with_lease(port, tag, lease).await?;
    check!(
        wait_workers(&pool, 1, 1).await,
        "the head's worker never came up"
    );
    let dir = TempDir::new(&format!("faults-{tag}"))?;
    let runs = dir.path().join("runs");
    let gate = dir.path().join("gate");
    let gated =
        Collector::new(pool.imap_unordered(vec![ProbeJob::Gate(runs.clone(), gate.clone(), -1)]));
    check!(
        eventually(Duration::from_secs(30), || async {
            !runs_of(&runs, -1).is_empty()
        })
        .await,
        "the gate job never started on the head"
    );
    let node = start_worker_node_with(port, 1, heartbeat_ms, &[]).await?;
    let node_workers = worker_prefix(&node)?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "the worker node's worker never came up"
    );
    Ok(GatedPair {
        head,
        head_workers,
        pool,
        node,
        node_workers,
        runs,
        gate,
        gated,
        _dir: dir,
    })
}

/// Wait until job `value` started, and check it started on the worker node; its first run.
async fn started_on_node(runs: &Path, node_workers: &str, value: i64) -> Result<Run, Failed> {
    check!(
        eventually(Duration::from_secs(30), || async {
            !runs_of(runs, value).is_empty()
        })
        .await,
        "the long job never started"
    );
    let first = runs_of(runs, value)[0].clone();
    check!(
        first.worker.starts_with(node_workers),
        "the long job started on {}, not on the worker node {node_workers}",
        first.worker
    );
    Ok(first)
}

/// Head (1 CPU worker) + worker node (1 CPU worker). The head's worker is held by a gate job
/// while the node's worker takes a 3 s job; the gate opens, short jobs flow, and 1 s into the
/// long job the worker node is SIGKILLed. Every result must arrive once; the killed job must
/// be re-run by the head's worker.
async fn kill_node_mid_job(
    settings: &str,
    heartbeat_ms: Option<u64>,
    lease: Option<Duration>,
) -> Result<KillMeasure, Failed> {
    let GatedPair {
        head,
        head_workers,
        pool,
        mut node,
        node_workers,
        runs,
        gate,
        gated,
        _dir,
    } = gated_pair("kill", heartbeat_ms, lease).await?;
    let mut jobs = vec![ProbeJob::CountRuns(runs.clone(), LONG_JOB_MS, 0)];
    jobs.extend((1..=4).map(|i| ProbeJob::CountRuns(runs.clone(), 50, i)));
    let n = jobs.len();
    let main = Collector::new(pool.imap_unordered(jobs));
    let first = started_on_node(&runs, &node_workers, 0).await?;
    std::fs::write(&gate, b"open")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    node.signal(Signal::SIGKILL)?;
    let killed_at = Instant::now();
    let killed_ms = unix_ms();
    let _ = node.child.wait().await;

    let items = main.finish(Duration::from_secs(90)).await?;
    let outs = exactly_once(&items, n, |i| i as i64)?;
    exactly_once(&gated.finish(Duration::from_secs(10)).await?, 1, |_| -1)?;
    let (out0, arrived) = &outs[0];
    check!(
        out0.worker_id.starts_with(&head_workers),
        "the killed job's result came from {}, not from the head's worker",
        out0.worker_id
    );
    let runs0 = runs_of(&runs, 0);
    check!(
        runs0.len() == 2,
        "the killed job ran {} times (expected: once on the node, once on the head): {runs0:?}",
        runs0.len()
    );
    check!(
        runs0[1].worker.starts_with(&head_workers) && runs0[1].pid == out0.pid,
        "the re-run {:?} is not the one whose result arrived ({} pid {})",
        runs0[1],
        out0.worker_id,
        out0.pid
    );
    check!(
        eventually(Duration::from_secs(5), || async {
            process_is_gone(first.pid)
        })
        .await,
        "the killed node's worker process {} outlived it",
        first.pid
    );
    let measure = KillMeasure {
        restart_after: Duration::from_millis(runs0[1].at_ms.saturating_sub(killed_ms)),
        result_after: arrived.saturating_duration_since(killed_at),
    };
    eprintln!(
        "MEASURE node SIGKILL mid-job ({settings}): the job restarted on the head {:.2} s after the kill; its result arrived {:.2} s after the kill (job length {:.1} s)",
        secs(measure.restart_after),
        secs(measure.result_after),
        LONG_JOB_MS as f64 / 1000.0
    );
    check!(
        measure.result_after < Duration::from_secs(10) + Duration::from_millis(LONG_JOB_MS),
        "recovery took {:.2} s (limit: 10 s + the job's {} ms)",
        secs(measure.result_after),
        LONG_JOB_MS
    );

    // The pool goes on with the head alone.
    let more = pool.map((0..6).map(ProbeJob::Echo)).await?;
    check!(
        more.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "jobs after the kill returned {:?}",
        more.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    pool.close().await?;
    drop(head);
    Ok(measure)
}

/// The default settings (pool lease 5 s, node heartbeat 1 s), spelled out so that `DC_LEASE_MS`
/// or `DC_HEARTBEAT_MS` in the environment cannot change them.
async fn kill_node_mid_job_with_defaults() -> Result<KillMeasure, Failed> {
    kill_node_mid_job(
        "default: lease 5 s, heartbeat 1 s",
        Some(1000),
        Some(Duration::from_secs(5)),
    )
    .await
}

async fn node_killed_mid_job_reruns_elsewhere_exactly_once() -> Result<(), Failed> {
    let measure = kill_node_mid_job_with_defaults().await?;
    let _ = DEFAULT_KILL.set(measure);
    Ok(())
}

async fn node_killed_mid_job_reruns_elsewhere_exactly_once_short_lease() -> Result<(), Failed> {
    kill_node_mid_job(
        "short: lease 1.5 s, heartbeat 200 ms",
        Some(200),
        Some(Duration::from_millis(1500)),
    )
    .await?;
    Ok(())
}

/// Same-host fast path: a node process that dies on the head's machine is noticed at once
/// (its Redis connections close), not when its lease expires, with the default settings.
async fn node_killed_on_the_same_host_restarts_its_job_within_3s() -> Result<(), Failed> {
    let measure = match DEFAULT_KILL.get() {
        Some(m) => *m,
        None => {
            let m = kill_node_mid_job_with_defaults().await?;
            let _ = DEFAULT_KILL.set(m);
            m
        }
    };
    check!(
        measure.restart_after < Duration::from_secs(3),
        "with default settings the killed node's job restarted {:.2} s after the SIGKILL (limit 3 s): its death was noticed only when its lease expired",
        secs(measure.restart_after)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. A job longer than several leases, on a live node.

async fn long_job_on_a_live_node_is_never_taken_away() -> Result<(), Failed> {
    let lease = Duration::from_secs(1);
    let job_ms = 3500;
    let GatedPair {
        head: _head,
        head_workers,
        pool,
        node: _node,
        node_workers,
        runs,
        gate,
        gated,
        _dir,
    } = gated_pair("long", Some(200), Some(lease)).await?;

    let submitted = Instant::now();
    let long =
        Collector::new(pool.imap_unordered(vec![ProbeJob::CountRuns(runs.clone(), job_ms, 7)]));
    let first = started_on_node(&runs, &node_workers, 7).await?;
    // The head's worker is free from now on: a job taken away would go to it.
    std::fs::write(&gate, b"open")?;
    exactly_once(&gated.finish(Duration::from_secs(10)).await?, 1, |_| -1)?;

    let items = long.finish(Duration::from_secs(60)).await?;
    let took = submitted.elapsed();
    let outs = exactly_once(&items, 1, |_| 7)?;
    let out = &outs[0].0;
    let all = runs_of(&runs, 7);
    check!(
        all.len() == 1,
        "the {job_ms} ms job ran {} times with a {lease:?} lease: {all:?}",
        all.len()
    );
    check!(
        out.worker_id == first.worker && out.pid == first.pid,
        "the result came from {} (pid {}), not from the worker that took the job ({} pid {})",
        out.worker_id,
        out.pid,
        first.worker,
        first.pid
    );
    check!(
        !out.worker_id.starts_with(&head_workers),
        "the head's worker delivered the job"
    );
    check!(
        took >= Duration::from_millis(job_ms),
        "the result came after {took:?}, before the job could have finished"
    );
    eprintln!(
        "MEASURE long job on a live node: {:.1} s job ({:.1}x the {:?} lease, heartbeat 200 ms) ran once, result after {:.2} s",
        job_ms as f64 / 1000.0,
        job_ms as f64 / lease.as_millis() as f64,
        lease,
        secs(took)
    );
    pool.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. The pool server stalls (SIGSTOP) for less than a lease.

async fn broker_stall_causes_no_false_deaths() -> Result<(), Failed> {
    let (mut head, port) = start_head(1).await?;
    let mut node = start_worker_node(port, 2, &[]).await?;
    let pool = pool_with_lease(port, "stall", Some(Duration::from_secs(5))).await?;
    check!(
        wait_workers(&pool, 3, 2).await,
        "expected 3 workers on 2 nodes"
    );
    let redis = head
        .redis_server_pid(port)
        .ok_or("cannot find the head's redis-server")?;
    let dir = TempDir::new("faults-stall")?;
    let runs = dir.path().join("runs");
    let n = 30;
    let started = Instant::now();
    let c = Collector::new(
        pool.imap_unordered((0..n).map(|i| ProbeJob::CountRuns(runs.clone(), 400, i as i64))),
    );
    check!(
        eventually(Duration::from_secs(30), || async { c.len() >= 3 }).await,
        "no results before the stall"
    );
    kill_pid(redis, Signal::SIGSTOP)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Always resume, whatever happened meanwhile.
    kill_pid(redis, Signal::SIGCONT)?;
    let resumed = Instant::now();

    let items = c.finish(Duration::from_secs(120)).await?;
    let outs = exactly_once(&items, n, |i| i as i64)?;
    let twice = run_more_than_once(&runs);
    check!(
        twice.is_empty(),
        "jobs ran more than once after a 3 s stall (lease 5 s): {twice:?}"
    );
    let mut pids_of: BTreeMap<&str, HashSet<u32>> = BTreeMap::new();
    for (out, _) in &outs {
        pids_of.entry(&out.worker_id).or_default().insert(out.pid);
    }
    check!(
        pids_of.len() <= 3 && pids_of.values().all(|p| p.len() == 1),
        "a worker process was replaced during the stall (worker → pids): {pids_of:?}"
    );
    check!(
        !head.has_exited() && !node.has_exited(),
        "a node exited during the stall"
    );
    eprintln!(
        "MEASURE broker stall: {n} jobs of 0.4 s on 3 workers with a 3 s SIGSTOP of redis-server: {:.2} s in all, {:.2} s after SIGCONT; no job re-run",
        secs(started.elapsed()),
        secs(resumed.elapsed())
    );
    pool.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. The process that owns the pool is killed.

/// Role `pool-owner`: open a pool on the head at `$DC_TEST_OWNER_PORT`, run a long stream of
/// 1 s jobs, print `OWNER READY pid=… session=… workers=…` once both workers have delivered,
/// then keep running until killed.
fn pool_owner_role() -> ExitCode {
    let body = async {
        let port: u16 = std::env::var(OWNER_PORT)?.parse()?;
        let pool = pool_with_lease(port, "owner", Some(Duration::from_secs(5))).await?;
        if !wait_workers(&pool, 2, 2).await {
            return Err::<(), BoxError>("the owner's pool never saw 2 workers".into());
        }
        let mut stream = pool.imap_unordered((0..1000).map(|i| ProbeJob::SleepEcho(1000, i)));
        let mut pids = HashSet::new();
        while let Some(item) = stream.next().await {
            let (_, out) = item?;
            pids.insert(out.pid);
            if pids.len() == 2 {
                break;
            }
        }
        let workers: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!(
            "OWNER READY pid={} session={} workers={}",
            std::process::id(),
            pool.session_id(),
            workers.join(",")
        );
        std::io::stdout().flush()?;
        // Keep the session alive and the workers busy until killed.
        while stream.next().await.is_some() {}
        std::future::pending::<()>().await;
        Ok(())
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pool owner: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(body) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pool owner: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn pool_owner_killed_session_expires_and_next_pool_starts() -> Result<(), Failed> {
    let lease = Duration::from_secs(5); // the pool default, which the owner sets explicitly
    let (_head, port) = start_head(1).await?;
    let _node = start_worker_node(port, 1, &[]).await?;
    let mut owner = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE, OWNER_ROLE)
        .env(OWNER_PORT, port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = owner.stdout.take().ok_or("no stdout of the pool owner")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("OWNER READY") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or("the pool owner never got going")?;
    let field = |name: &str| {
        ready
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_string)
            .ok_or_else(|| format!("no {name} in {ready:?}"))
    };
    let old_session = field("session=")?;
    let old_workers: Vec<u32> = field("workers=")?
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect();
    check!(
        old_workers.len() == 2,
        "the owner reported workers {old_workers:?}"
    );

    owner.start_kill()?;
    let killed_at = Instant::now();
    let _ = owner.wait().await;
    let next = tokio::spawn(async move {
        let pool = pool(port, "next").await;
        (pool, Instant::now())
    });

    let stopped = eventually(lease + Duration::from_secs(5), || async {
        old_workers.iter().all(|p| process_is_gone(*p))
    })
    .await;
    let workers_stopped_after = killed_at.elapsed();
    check!(
        stopped,
        "the dead owner's workers {old_workers:?} still run {:.1} s after it was killed (lease {lease:?})",
        secs(workers_stopped_after)
    );
    let mut last_status = serde_json::Value::Null;
    let mut status_changed = false;
    let limit = lease + Duration::from_secs(5);
    while killed_at.elapsed() < limit {
        last_status = status_json(port).await?;
        if last_status["pool"]["session"].as_str() != Some(old_session.as_str()) {
            status_changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let session_gone_after = killed_at.elapsed();
    check!(
        status_changed,
        "status still shows the dead owner's session {old_session} after {limit:?}: {last_status}"
    );

    let (pool, opened_at) = tokio::time::timeout(
        (lease + Duration::from_secs(5)).saturating_sub(killed_at.elapsed()),
        next,
    )
    .await
    .map_err(|_| format!("no new pool could open within {lease:?} + 5 s of the owner's death"))??;
    let pool = pool?;
    let opened_after = opened_at.saturating_duration_since(killed_at);
    check!(
        pool.session_id() != old_session,
        "the new pool got the old session"
    );
    let outs = pool.map((0..10).map(ProbeJob::Echo)).await?;
    check!(
        outs.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "the new pool's jobs returned {:?}",
        outs.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    check!(
        outs.iter().all(|o| o.tag == "next"),
        "the new pool's jobs ran on workers built for another pool"
    );
    check!(
        outs.iter().all(|o| !old_workers.contains(&o.pid)),
        "the new pool's jobs ran on the dead owner's worker processes"
    );
    eprintln!(
        "MEASURE pool owner SIGKILL (lease {:.0} s): its workers stopped within {:.2} s, status dropped its session after {:.2} s, the next pool opened after {:.2} s",
        secs(lease),
        secs(workers_stopped_after),
        secs(session_gone_after),
        secs(opened_after)
    );
    pool.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. The head's redis-server is SIGKILLed mid-stream.

async fn head_redis_killed_is_restarted_and_the_pool_finishes_exactly_once() -> Result<(), Failed> {
    broker_loses_state(StateLoss::KillRedis).await
}

/// (c) alone: the server stays up but forgets everything (`FLUSHALL`).
async fn head_redis_flushed_the_pool_resubmits_and_finishes_exactly_once() -> Result<(), Failed> {
    broker_loses_state(StateLoss::Flush).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateLoss {
    /// SIGKILL the head's redis-server: the head must restart it (same port and password).
    KillRedis,
    /// `FLUSHALL` on the live server.
    Flush,
}

/// Head (1 worker) + node (1 worker), two updates published, then a stream of 30 jobs; after 5
/// results the broker loses its state. The pool must notice, reopen, replay its updates and
/// resubmit what is outstanding: every result exactly once, and later jobs see both updates.
async fn broker_loses_state(how: StateLoss) -> Result<(), Failed> {
    let (mut head, port) = start_head(1).await?;
    let mut node = start_worker_node(port, 1, &[]).await?;
    let pool = pool_with_lease(port, "state-loss", Some(Duration::from_secs(5))).await?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "expected 2 workers on 2 nodes"
    );
    pool.update_workers(1).await?;
    pool.update_workers(2).await?;
    let old = head
        .redis_server_pid(port)
        .ok_or("cannot find the head's redis-server")?;
    let dir = TempDir::new("faults-redis")?;
    let runs = dir.path().join("runs");
    let n = 30;
    let c = Collector::new(
        pool.imap_unordered((0..n).map(|i| ProbeJob::CountRuns(runs.clone(), 300, i as i64))),
    );
    check!(
        eventually(Duration::from_secs(30), || async { c.len() >= 5 }).await,
        "no results before the state loss"
    );
    let lost_at = Instant::now();
    match how {
        StateLoss::KillRedis => kill_pid(old, Signal::SIGKILL)?,
        StateLoss::Flush => {
            let reply = redis_cli(port, &["FLUSHALL"]).await?;
            check!(reply.trim() == "OK", "FLUSHALL answered {reply:?}");
        }
    }

    // (b) The head restarts its redis-server on the same port, with the same password.
    let mut restarted_after = None;
    if how == StateLoss::KillRedis {
        let deadline = lost_at + Duration::from_secs(20);
        while Instant::now() < deadline {
            if head.redis_server_pid(port).is_some_and(|p| p != old)
                && redis_cli(port, &["PING"])
                    .await
                    .is_ok_and(|r| r.trim() == "PONG")
            {
                restarted_after = Some(lost_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let head_alive = !head.has_exited();
        check!(
            restarted_after.is_some(),
            "the head did not restart its redis-server within 20 s of its SIGKILL (old pid {old}; head process alive: {head_alive}; {} of {n} results delivered). Head output:\n{}",
            c.len(),
            tail(&head.output(), 15)
        );
    }

    // (c) The pool notices the lost state, resubmits what is outstanding, and finishes.
    let items = c.finish(Duration::from_secs(90)).await?;
    let finished_after = lost_at.elapsed();
    exactly_once(&items, n, |i| i as i64)?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "the nodes did not come back to the pool after the state loss"
    );
    check!(
        !head.has_exited() && !node.has_exited(),
        "a node exited after the state loss"
    );
    let again = pool
        .map((0..6).map(|i| ProbeJob::SleepEcho(100, i)))
        .await?;
    check!(
        again.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "jobs after the state loss returned {:?}",
        again.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    check!(
        again.iter().all(|o| o.updates == vec![1, 2]),
        "jobs after the state loss saw updates {:?} (expected [1, 2] everywhere)",
        again
            .iter()
            .map(|o| (&o.worker_id, &o.updates))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "MEASURE broker state loss ({}): {}the pool's {n} jobs all delivered {:.2} s after it ({} runs recorded for {n} jobs)",
        match how {
            StateLoss::KillRedis => "redis-server SIGKILL",
            StateLoss::Flush => "FLUSHALL",
        },
        restarted_after
            .map(|d| format!("redis-server back after {:.2} s; ", secs(d)))
            .unwrap_or_default(),
        secs(finished_after),
        read_runs(&runs).len()
    );
    pool.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. A backlog of 200 000 no-op jobs.

async fn backlog_of_200k_noop_jobs_completes_with_bounded_node_memory() -> Result<(), Failed> {
    const N: usize = 200_000;
    const MAX_RSS_KIB: u64 = 150 * 1024;
    const GROWTH_SLACK_KIB: u64 = 32 * 1024;
    let (head, port) = start_head(2).await?;
    let node = start_worker_node(port, 2, &[]).await?;
    let pool = pool(port, "backlog").await?;
    check!(
        wait_workers(&pool, 4, 2).await,
        "expected 4 workers on 2 nodes"
    );
    let head_pid = head.pid().ok_or("head gone")?;
    let node_pid = node.pid().ok_or("node gone")?;

    let progress = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Arc<Mutex<Vec<(usize, u64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (progress, stop, samples) = (progress.clone(), stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let sample = (
                    progress.load(Ordering::Acquire),
                    rss_kib(head_pid).unwrap_or(0),
                    rss_kib(node_pid).unwrap_or(0),
                );
                samples.lock().expect("samples lock").push(sample);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    let started = Instant::now();
    let mut stream = pool.imap_unordered((0..N).map(|i| ProbeJob::Echo(i as i64)));
    let mut seen = vec![false; N];
    let (mut count, mut twice, mut wrong, mut errors) = (0usize, 0usize, 0usize, Vec::new());
    let mut stalled = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Err(_) => {
                stalled = true;
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok((i, out)))) => {
                if i >= N || out.value != i as i64 {
                    wrong += 1;
                } else if std::mem::replace(&mut seen[i], true) {
                    twice += 1;
                } else {
                    count += 1;
                }
                progress.store(count, Ordering::Release);
                if count > 0 && count % 50_000 == 0 {
                    eprintln!(
                        "  backlog: {count} of {N} after {:.1} s",
                        secs(started.elapsed())
                    );
                }
            }
            Ok(Some(Err(e))) => {
                if errors.len() < 10 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Release);
    let _ = sampler.await;
    let samples = samples.lock().expect("samples lock").clone();
    let rate = count as f64 / secs(elapsed).max(1e-9);
    eprintln!(
        "MEASURE backlog: {count} of {N} no-op jobs in {:.1} s = {rate:.0} jobs/s (head 2 + node 2 CPU workers, debug build)",
        secs(elapsed)
    );
    let at = |fraction: f64| {
        samples
            .iter()
            .find(|s| s.0 as f64 >= fraction * N as f64)
            .copied()
    };
    let max_head = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let max_node = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let (first, p25, p90) = (samples.first().copied(), at(0.25), at(0.90));
    eprintln!(
        "MEASURE backlog node RSS (KiB; head agent, worker-node agent): start {:?}, at 25% {:?}, at 90% {:?}, max ({max_head}, {max_node})",
        first.map(|s| (s.1, s.2)),
        p25.map(|s| (s.1, s.2)),
        p90.map(|s| (s.1, s.2))
    );
    if let Some(redis) = head.redis_server_pid(port) {
        eprintln!(
            "MEASURE backlog redis-server RSS at the end: {:?} KiB",
            rss_kib(redis)
        );
    }
    check!(
        !stalled,
        "no result for 60 s: {count} of {N} delivered after {:.1} s",
        secs(elapsed)
    );
    check!(
        count == N && twice == 0 && wrong == 0 && errors.is_empty(),
        "{count} of {N} delivered once; {twice} twice; {wrong} wrong; errors {errors:?}"
    );
    check!(
        max_head < MAX_RSS_KIB && max_node < MAX_RSS_KIB,
        "node RSS reached head {max_head} KiB / node {max_node} KiB (limit {MAX_RSS_KIB} KiB)"
    );
    let (p25, p90) = (
        p25.ok_or("no RSS sample at 25%")?,
        p90.ok_or("no RSS sample at 90%")?,
    );
    check!(
        p90.1 <= p25.1 + GROWTH_SLACK_KIB && p90.2 <= p25.2 + GROWTH_SLACK_KIB,
        "node RSS grows with the jobs done: at 25% ({}, {}) KiB, at 90% ({}, {}) KiB",
        p25.1,
        p25.2,
        p90.1,
        p90.2
    );
    pool.close().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. Bad input on the wire.

/// The probe's kind with another job type: its payloads do not decode as `ProbeJob`.
struct ProbeWithStringJobs;

impl Worker for ProbeWithStringJobs {
    const KIND: &'static str = "probe";
    type Init = ProbeInit;
    type Job = String;
    type Output = ProbeOut;
    type Update = i64;
    fn new(_: ProbeInit, _: &WorkerContext) -> Result<Self, BoxError> {
        Err("a mirror of the probe's kind, for the pool side only".into())
    }
    fn run(&mut self, _: String) -> Result<ProbeOut, BoxError> {
        Err("never run".into())
    }
}

/// The probe's kind with another update type: its updates do not decode as `i64`.
struct ProbeWithStringUpdates;

impl Worker for ProbeWithStringUpdates {
    const KIND: &'static str = "probe";
    type Init = ProbeInit;
    type Job = ProbeJob;
    type Output = ProbeOut;
    type Update = String;
    fn new(_: ProbeInit, _: &WorkerContext) -> Result<Self, BoxError> {
        Err("a mirror of the probe's kind, for the pool side only".into())
    }
    fn run(&mut self, _: ProbeJob) -> Result<ProbeOut, BoxError> {
        Err("never run".into())
    }
}

async fn bad_input_on_the_wire_is_attributed_and_nothing_else_is_lost() -> Result<(), Failed> {
    let (mut head, port) = start_head(1).await?;
    let mut node = start_worker_node(port, 1, &[]).await?;
    let mut failures = Vec::new();
    for (part, result) in [
        ("(i) job of the wrong type", wrong_job_type(port).await),
        (
            "(ii) update of the wrong type",
            wrong_update_type(&head, port).await,
        ),
        (
            "(iii) garbage in the session's streams",
            garbage_in_redis(&head, port).await,
        ),
    ] {
        match result {
            Ok(()) => eprintln!("  {part}: ok"),
            Err(e) => failures.push(format!("{part}: {}", e.message().unwrap_or("failed"))),
        }
    }
    for (name, proc) in [("head", &mut head), ("node", &mut node)] {
        let panicked = panics(proc);
        if !panicked.is_empty() {
            failures.push(format!("the {name} logged panics: {panicked:?}"));
        }
        if proc.has_exited() {
            failures.push(format!("the {name} exited:\n{}", tail(&proc.output(), 15)));
        }
    }
    check!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// (i) Jobs that do not decode as the workers' job type fail alone, as `Codec`, naming the
/// problem; a proper pool on the same head works afterwards.
async fn wrong_job_type(port: u16) -> Result<(), Failed> {
    let pool = Pool::<ProbeWithStringJobs>::builder(ProbeInit::tagged("strings"))
        .address("127.0.0.1")
        .port(port)
        .password(common::cluster::PASSWORD)
        .known_heads(common::cluster::known_heads())
        .connect()
        .await?;
    let n = 5;
    let items: Vec<_> = tokio::time::timeout(
        Duration::from_secs(60),
        pool.imap_unordered((0..n).map(|i| format!("not a probe job {i}")))
            .collect::<Vec<_>>(),
    )
    .await
    .map_err(|_| "the undecodable jobs never came back")?;
    let mut indices = HashSet::new();
    for item in &items {
        match item {
            Err(PoolError::Job {
                index,
                kind: JobFailure::Codec,
                message,
                attempts,
                ..
            }) => {
                check!(indices.insert(*index), "job {index} reported twice");
                check!(
                    message.contains("does not decode") && message.contains("ProbeJob"),
                    "job {index}'s message does not name the decode problem: {message}"
                );
                check!(
                    *attempts == 1,
                    "undecodable job {index} was tried {attempts} times"
                );
            }
            other => {
                return Err(format!("expected a Codec job failure, got {other:?}").into());
            }
        }
    }
    check!(
        indices.len() == n,
        "{} of {n} undecodable jobs reported",
        indices.len()
    );
    pool.close().await?;

    let pool = pool_with_lease(port, "after-strings", None).await?;
    let outs = pool.map((0..10).map(ProbeJob::Echo)).await?;
    check!(
        outs.iter()
            .enumerate()
            .all(|(i, o)| o.value == i as i64 && o.tag == "after-strings"),
        "a proper pool after the bad one got {:?}",
        outs.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    pool.close().await?;
    Ok(())
}

/// (ii) An update that does not decode as the workers' update type: the pool goes on, and the
/// node logs an error naming the worker and the update's sequence number.
async fn wrong_update_type(head: &NodeProc, port: u16) -> Result<(), Failed> {
    let head_workers = worker_prefix(head)?;
    let pool = Pool::<ProbeWithStringUpdates>::builder(ProbeInit::tagged("bad-update"))
        .address("127.0.0.1")
        .port(port)
        .password(common::cluster::PASSWORD)
        .known_heads(common::cluster::known_heads())
        .connect()
        .await?;
    let before = pool.map((0..4).map(ProbeJob::Echo)).await?;
    check!(
        before.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "jobs before the bad update"
    );
    pool.update_workers("not an i64".to_string()).await?;
    let after = tokio::time::timeout(
        Duration::from_secs(60),
        pool.map((0..10).map(|i| ProbeJob::SleepEcho(20, 100 + i))),
    )
    .await
    .map_err(|_| "jobs after the bad update never completed")??;
    check!(
        after
            .iter()
            .enumerate()
            .all(|(i, o)| o.value == 100 + i as i64),
        "jobs after the bad update returned {:?}",
        after.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    let logged = eventually(Duration::from_secs(10), || async {
        head.output().lines().any(|l| {
            l.contains("could not apply update") && l.contains(&head_workers) && l.contains("seq=1")
        })
    })
    .await;
    let lines: Vec<String> = head
        .output()
        .lines()
        .filter(|l| l.contains("update"))
        .map(str::to_string)
        .collect();
    check!(
        logged,
        "the head did not log an error naming its worker {head_workers}… and seq=1; its lines about updates: {lines:?}"
    );
    pool.close().await?;
    Ok(())
}

/// (iii) Garbage entries planted in the active session's job and result streams: every real
/// job still completes exactly once, and the dropped job entries are named in the server log.
async fn garbage_in_redis(head: &NodeProc, port: u16) -> Result<(), Failed> {
    let pool = pool_with_lease(port, "garbage", None).await?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "expected 2 workers on 2 nodes"
    );
    let session = pool.session_id().to_string();
    let jobs_key = format!("dc:{{{session}}}:jobs");
    let results_key = format!("dc:{{{session}}}:results");
    let n = 40;
    let c = Collector::new(pool.imap_unordered((0..n).map(|i| ProbeJob::SleepEcho(50, i as i64))));
    check!(
        eventually(Duration::from_secs(30), || async { c.len() >= 3 }).await,
        "no results before the garbage"
    );
    let binary: std::ffi::OsString =
        std::os::unix::ffi::OsStringExt::from_vec(vec![0xff, 0xfe, 0x80, 0x01]);
    let plant: Vec<Vec<std::ffi::OsString>> = vec![
        vec![
            "XADD".into(),
            jobs_key.clone().into(),
            "*".into(),
            "j".into(),
            "garbage".into(),
        ],
        vec![
            "XADD".into(),
            jobs_key.clone().into(),
            "*".into(),
            "x".into(),
            "no job field".into(),
        ],
        vec![
            "XADD".into(),
            jobs_key.clone().into(),
            "*".into(),
            "j".into(),
            "999999999".into(),
        ],
        vec![
            "XADD".into(),
            jobs_key.clone().into(),
            "*".into(),
            "j".into(),
            binary.clone(),
        ],
        vec![
            "XADD".into(),
            results_key.clone().into(),
            "*".into(),
            "j".into(),
            "garbage".into(),
        ],
        vec![
            "XADD".into(),
            results_key.clone().into(),
            "*".into(),
            "j".into(),
            "999999999".into(),
        ],
        vec![
            "XADD".into(),
            results_key.clone().into(),
            "*".into(),
            "x".into(),
            binary,
        ],
    ];
    let mut planted_jobs = Vec::new();
    for args in &plant {
        let id = redis_cli(port, args).await?.trim().to_string();
        if args[1].to_string_lossy() == jobs_key {
            planted_jobs.push(id);
        }
    }
    let items = c.finish(Duration::from_secs(60)).await?;
    exactly_once(&items, n, |i| i as i64)?;
    let more = tokio::time::timeout(
        Duration::from_secs(60),
        pool.map((0..10).map(ProbeJob::Echo)),
    )
    .await
    .map_err(|_| "jobs after the garbage never completed")??;
    check!(
        more.iter().enumerate().all(|(i, o)| o.value == i as i64),
        "jobs after the garbage returned {:?}",
        more.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    let left = redis_cli(port, &["XRANGE", jobs_key.as_str(), "-", "+"]).await?;
    let still_queued: Vec<&String> = planted_jobs
        .iter()
        .filter(|id| left.contains(id.as_str()))
        .collect();
    check!(
        still_queued.is_empty(),
        "planted job entries {still_queued:?} are still in the job stream"
    );
    let log_path = head
        .state_dir()
        .join(format!("redis-{port}"))
        .join("redis.log");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let unlogged: Vec<&String> = planted_jobs
        .iter()
        .filter(|id| !log.contains(id.as_str()))
        .collect();
    check!(
        unlogged.is_empty(),
        "the server log {} does not name the dropped job entries {unlogged:?}",
        log_path.display()
    );
    pool.close().await?;
    Ok(())
}

/// A node killed (SIGKILL) while its slots hold tiny jobs taken ahead (automatic batching:
/// more jobs leased than workers run) loses none of them: they go back to the queue and the
/// other node runs them; every job's result arrives once, with its own value.
async fn node_killed_holding_batched_jobs_every_job_once() -> Result<(), Failed> {
    const N: usize = 20_000;
    let (_head, port) = start_head(2).await?;
    let node = start_worker_node(port, 2, &[]).await?;
    let pool = pool(port, "ahead").await?;
    check!(
        wait_workers(&pool, 4, 2).await,
        "expected 4 workers on 2 nodes"
    );
    let broker = common::cluster::head_broker(port)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let session = distributed_computing::broker::SessionId(pool.session_id());

    let mut stream = pool.imap_unordered((0..N).map(|i| ProbeJob::Echo(i as i64)));
    let mut seen = vec![false; N];
    let (mut count, mut twice, mut errors) = (0usize, 0usize, Vec::new());
    let mut most_leased = 0usize;
    let mut killed = false;
    while let Some(item) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .map_err(|_| format!("stalled after {count} of {N} results"))?
    {
        match item {
            Ok((i, out)) => {
                check!(out.value == i as i64, "job {i} returned {}", out.value);
                if std::mem::replace(&mut seen[i], true) {
                    twice += 1;
                } else {
                    count += 1;
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        if !killed && count >= N / 4 && count % 100 == 0 {
            // Kill the worker node at a moment when more jobs are leased than 4 workers run.
            let running = broker
                .session_stats(&session)
                .await
                .map_err(|e| format!("stats: {e}"))?
                .running;
            most_leased = most_leased.max(running);
            if running > 4 || count >= N / 2 {
                node.signal(Signal::SIGKILL)?;
                killed = true;
                eprintln!("  killed the node with {running} jobs leased, {count} results in");
            }
        }
    }
    check!(killed, "the node was never killed");
    check!(
        most_leased > 4,
        "never more jobs leased than workers ({most_leased}): nothing was taken ahead"
    );
    check!(errors.is_empty(), "errors: {errors:?}");
    check!(twice == 0, "{twice} results delivered twice");
    check!(count == N, "{count} of {N} results");
    pool.close().await?;
    Ok(())
}

/// Every core busy (three busy loops on this 2-core machine, as data loaders peg a GPU host's
/// CPUs): a 600 MiB job and two 12 s jobs on a head with 2 workers and a 2 s lease all succeed,
/// each run exactly once. The lease holds from the take through the payload's arrival, the
/// run and the result's upload.
async fn busy_node_keeps_its_big_and_long_jobs() -> Result<(), Failed> {
    // `DC_BUSY_MIB`: the big job's size in MiB (600 by default; 1000 to time a 1 GiB job).
    let big_mib: usize = std::env::var("DC_BUSY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let big_len: usize = big_mib << 20;
    let lease = Duration::from_secs(2);
    let dir = TempDir::new("busy")?;
    let runs = dir.path().join("runs");
    let (_head, port) = start_head(2).await?;
    let pool = pool_with_lease(port, "busy", Some(lease)).await?;
    check!(wait_workers(&pool, 2, 1).await, "expected 2 workers");
    let big: Vec<u8> = (0..big_len).map(|i| (i % 251).to_le_bytes()[0]).collect();
    let burners = Burners::start(3)?;
    let started = Instant::now();
    // The lease clock: each leased job's idle time in the broker (reset by every renewal),
    // sampled every 100 ms: per lease, when it was first and last seen, the largest idle time,
    // and how many renewals the samples show.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let jobs_key = format!("dc:{{{}}}:jobs", pool.session_id());
        tokio::spawn(async move {
            let mut seen: BTreeMap<String, LeaseClock> = BTreeMap::new();
            while sampling.load(Ordering::Acquire) {
                let out = redis_cli(port, &["XPENDING", &jobs_key, "w", "-", "+", "10"])
                    .await
                    .ok();
                let at = started.elapsed();
                if let Some(out) = out {
                    let lines: Vec<&str> = out.lines().map(str::trim).collect();
                    for entry in lines.chunks(4) {
                        if let [id, _, ms, _] = entry
                            && let Ok(ms) = ms.parse::<u64>()
                        {
                            let clock = seen.entry(id.to_string()).or_insert(LeaseClock {
                                first: at,
                                last: at,
                                idle: ms,
                                longest: ms,
                                renewals: 0,
                            });
                            if ms < clock.idle {
                                clock.renewals += 1;
                            }
                            clock.last = at;
                            clock.idle = ms;
                            clock.longest = clock.longest.max(ms);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let jobs = vec![
        ProbeJob::ReverseCounted(runs.clone(), 0, serde_bytes::ByteBuf::from(big)),
        ProbeJob::CountRuns(runs.clone(), 12_000, 1),
        ProbeJob::CountRuns(runs.clone(), 12_000, 2),
    ];
    let items = Collector::new(pool.imap_unordered(jobs))
        .finish(Duration::from_secs(360))
        .await?;
    let took = started.elapsed();
    drop(burners);
    sampling.store(false, Ordering::Release);
    let clocks = sampler.await.map_err(|e| format!("sampler: {e}"))?;
    let longest = clocks.values().map(|c| c.longest).max().unwrap_or(0);
    let outs = exactly_once(
        &items,
        3,
        |i| if i == 0 { big_len as i64 } else { i as i64 },
    )?;
    let reversed = outs[0]
        .0
        .bytes
        .as_ref()
        .ok_or("the big job returned no bytes")?;
    check!(
        reversed.len() == big_len
            && reversed
                .iter()
                .enumerate()
                .all(|(i, b)| *b == ((big_len - 1 - i) % 251).to_le_bytes()[0]),
        "the big job's output is not its input reversed"
    );
    for value in 0..3 {
        let all = runs_of(&runs, value);
        check!(
            all.len() == 1,
            "job {value} ran {} times on a busy live node: {all:?}",
            all.len()
        );
    }
    check!(
        u128::from(longest) < lease.as_millis(),
        "a lease went {longest} ms without renewal (lease {lease:?}): {clocks:?}"
    );
    eprintln!(
        "MEASURE busy node: a {} MiB job and two 12 s jobs, 3 busy loops on 2 cores, lease {lease:?}: each ran once, all done after {:.1} s; longest a lease went unrenewed: {longest} ms",
        big_len >> 20,
        secs(took),
    );
    for clock in clocks.values() {
        eprintln!(
            "MEASURE busy node lease: held from {:.1} s to {:.1} s after the submit, {} renewals seen, longest unrenewed {} ms",
            secs(clock.first),
            secs(clock.last),
            clock.renewals,
            clock.longest
        );
    }
    pool.close().await?;
    Ok(())
}

/// The head's redis-server SIGKILLed three times (the head restarts it each time, empty) while
/// the pool owner loops on `update_workers`, `workers_count` and `nodes_count`: every call
/// returns `Ok`, and afterwards every worker has applied each update once, in order.
async fn pool_calls_ride_through_broker_restarts() -> Result<(), Failed> {
    // `DC_LOG=warn` shows the pool riding out each outage.
    if let Ok(filter) = std::env::var("DC_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let (head, port) = start_head(1).await?;
    let pool = pool_with_lease(port, "ride", Some(Duration::from_secs(3))).await?;
    check!(wait_workers(&pool, 1, 1).await, "expected 1 worker");
    let killing = Arc::new(AtomicBool::new(true));
    let killer = {
        let killing = killing.clone();
        async move {
            let mut outages = Vec::new();
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let old = head
                    .redis_server_pid(port)
                    .ok_or("cannot find the head's redis-server")?;
                kill_pid(old, Signal::SIGKILL)?;
                let killed = Instant::now();
                let back = eventually(Duration::from_secs(20), || async {
                    head.redis_server_pid(port).is_some_and(|p| p != old)
                        && redis_cli(port, &["PING"])
                            .await
                            .is_ok_and(|r| r.trim() == "PONG")
                })
                .await;
                check!(back, "the head did not restart its redis-server");
                outages.push(killed.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            killing.store(false, Ordering::Release);
            Ok::<_, Failed>((head, outages))
        }
    };
    let caller = async {
        let mut published = 0i64;
        while killing.load(Ordering::Acquire) {
            published += 1;
            pool.update_workers(published)
                .await
                .map_err(|e| format!("update_workers({published}): {e}"))?;
            pool.workers_count()
                .await
                .map_err(|e| format!("workers_count: {e}"))?;
            pool.nodes_count()
                .await
                .map_err(|e| format!("nodes_count: {e}"))?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, Failed>(published)
    };
    let (killed, published) = tokio::join!(killer, caller);
    let (_head, outages) = killed?;
    let published = published?;
    let outs = pool.map((0..4).map(ProbeJob::Echo)).await?;
    let want: Vec<i64> = (1..=published).collect();
    for out in &outs {
        check!(
            out.updates == want,
            "worker {} applied {:?}, expected 1..={published} once each, in order",
            out.worker_id,
            out.updates
        );
    }
    eprintln!(
        "MEASURE ride-through: 3 restarts of the pool server (back after {:?}), {published} updates, every call Ok, every worker applied each update once, in order",
        outages
    );
    pool.close().await?;
    Ok(())
}

/// A broker that goes away for good: after the outage timeout, `update_workers`,
/// `workers_count` and `nodes_count` fail with `PoolError::Unreachable`, saying how long the
/// broker was gone.
async fn pool_calls_fail_after_the_outage_timeout_saying_how_long() -> Result<(), Failed> {
    let port = free_port()?;
    let mut server = RedisServerProc::start(port, PASSWORD).await?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("outage"))
        .broker(format!("redis://:{PASSWORD}@127.0.0.1:{port}"))
        .broker_outage_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    pool.update_workers(1).await?;
    server.child.kill().await?;
    let calls: [(&str, futures::future::BoxFuture<'_, Result<(), PoolError>>); 3] = [
        ("update_workers", Box::pin(pool.update_workers(2))),
        (
            "workers_count",
            Box::pin(async { pool.workers_count().await.map(drop) }),
        ),
        (
            "nodes_count",
            Box::pin(async { pool.nodes_count().await.map(drop) }),
        ),
    ];
    for (name, call) in calls {
        let started = Instant::now();
        let answer = call.await;
        let took = started.elapsed();
        match answer {
            Err(PoolError::Unreachable(message)) => check!(
                message.contains("could not be reached for") && message.contains("2s"),
                "{name}: the message does not say how long: {message}"
            ),
            other => return Err(format!("{name}: expected Unreachable, got {other:?}").into()),
        }
        check!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(20),
            "{name} gave up after {took:?} (outage timeout 2 s)"
        );
    }
    Ok(())
}

/// One lease's clock in the broker, as sampled.
#[derive(Debug)]
struct LeaseClock {
    first: Duration,
    last: Duration,
    idle: u64,
    longest: u64,
    renewals: usize,
}

/// What a planted value may cost: nothing, or the one job it was planted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    Nothing,
    TheVictim,
}

/// During a live run on two nodes, values planted in the broker's keys (a huge length, a
/// non-number, a negative count, another type, a deleted key), in a queued job, the session's
/// counters and limits, its job stream, results and update log: each time both nodes stay up,
/// the pool's stream ends with every job once (a result, or an error for the damaged job
/// alone), and the pool goes on.
async fn hostile_broker_state_never_stops_a_node_or_the_pool() -> Result<(), Failed> {
    let (mut head, port) = start_head(1).await?;
    let mut node = start_worker_node(port, 1, &[]).await?;
    let pool = pool(port, "hostile").await?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "expected 2 workers on 2 nodes"
    );
    type Plant = fn(&str, &str) -> Vec<String>;
    let cases: Vec<(&str, Cost, Plant)> = vec![
        (
            "a job's length of 999999999999 bytes",
            Cost::TheVictim,
            |_, job| {
                vec![
                    "HSET".into(),
                    job.into(),
                    "len".into(),
                    "999999999999".into(),
                ]
            },
        ),
        ("a job's chunk count of -5", Cost::TheVictim, |_, job| {
            vec!["HSET".into(), job.into(), "n".into(), "-5".into()]
        }),
        (
            "a job's attempt number not a number",
            Cost::Nothing,
            |_, job| vec!["HSET".into(), job.into(), "att".into(), "x".into()],
        ),
        (
            "a job's record turned into a string",
            Cost::TheVictim,
            |_, job| vec!["SET".into(), job.into(), "garbage".into()],
        ),
        ("a job's record deleted", Cost::Nothing, |_, job| {
            vec!["DEL".into(), job.into()]
        }),
        (
            "the session's queued counter not a number",
            Cost::Nothing,
            |base, _| {
                vec![
                    "HSET".into(),
                    format!("{base}meta"),
                    "q".into(),
                    "zz".into(),
                ]
            },
        ),
        (
            "the session's attempt limit emptied",
            Cost::Nothing,
            |base, _| {
                vec![
                    "HSET".into(),
                    format!("{base}meta"),
                    "max".into(),
                    "".into(),
                ]
            },
        ),
        (
            "the results stream turned into a string",
            Cost::Nothing,
            |base, _| vec!["SET".into(), format!("{base}results"), "garbage".into()],
        ),
        (
            "the job stream turned into a string",
            Cost::Nothing,
            |base, _| vec!["SET".into(), format!("{base}jobs"), "garbage".into()],
        ),
        (
            "the update log turned into a hash",
            Cost::Nothing,
            |base, _| vec!["HSET".into(), format!("{base}upd"), "x".into(), "y".into()],
        ),
    ];
    for (name, cost, plant) in cases {
        let session = pool.session_id();
        // 12 jobs of 300 ms on 2 workers: the last one is still queued when the value is
        // planted in it.
        let started = Instant::now();
        let stream =
            Collector::new(pool.imap_unordered((0..12).map(|i| ProbeJob::SleepEcho(300, i))));
        let mut victim = None;
        while victim.is_none() && started.elapsed() < Duration::from_secs(10) {
            let keys = redis_cli(port, &["KEYS", &format!("*:{{{session}}}:job:*")]).await?;
            let ids: Vec<u64> = keys
                .lines()
                .filter_map(|k| k.rsplit(':').next()?.parse().ok())
                .collect();
            if ids.len() >= 12 {
                victim = ids.iter().max().copied();
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let victim = victim.ok_or_else(|| format!("{name}: the jobs never reached the broker"))?;
        let base = format!("dc:{{{session}}}:");
        let meta = redis_cli(port, &["EXISTS", &format!("{base}meta")]).await?;
        check!(meta.trim() == "1", "{name}: no session meta under {base}");
        let args = plant(&base, &format!("{base}job:{victim}"));
        redis_cli(port, &args).await?;
        let items = stream.finish(Duration::from_secs(120)).await?;
        let took = started.elapsed();
        let mut seen = vec![0usize; 12];
        let mut failed = Vec::new();
        for (item, _) in &items {
            match item {
                Ok((i, out)) => {
                    check!(
                        *i < 12 && out.value == *i as i64,
                        "{name}: job {i} returned {}",
                        out.value
                    );
                    seen[*i] += 1;
                }
                Err(PoolError::Job { index, message, .. }) => {
                    check!(*index < 12, "{name}: an error for index {index}");
                    seen[*index] += 1;
                    failed.push((*index, message.clone()));
                }
                Err(e) => return Err(format!("{name}: the stream failed: {e}").into()),
            }
        }
        check!(
            seen.iter().all(|n| *n == 1),
            "{name}: each job once expected, got counts {seen:?} (failed {failed:?})"
        );
        match cost {
            Cost::Nothing => check!(failed.is_empty(), "{name}: jobs failed: {failed:?}"),
            Cost::TheVictim => check!(
                failed.len() <= 1 && failed.iter().all(|(i, _)| *i == 11),
                "{name}: only the damaged job may fail, got {failed:?}"
            ),
        }
        check!(
            !head.has_exited(),
            "{name}: the head died:\n{}",
            head.output()
        );
        check!(
            !node.has_exited(),
            "{name}: the worker node died:\n{}",
            node.output()
        );
        eprintln!(
            "MEASURE hostile state: {name}: stream ended after {:.1} s, failed {:?}",
            secs(took),
            failed
                .iter()
                .map(|(i, m)| format!("{i}: {m}"))
                .collect::<Vec<_>>()
        );
    }
    // The pool goes on, on both nodes.
    check!(
        wait_workers(&pool, 2, 2).await,
        "the workers did not come back"
    );
    let last = pool
        .map((0..8).map(|i| ProbeJob::SleepEcho(100, i)))
        .await?;
    check!(
        last.iter().map(|o| o.value).eq(0..8),
        "after the damage: {:?}",
        last.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    pool.close().await?;
    Ok(())
}
