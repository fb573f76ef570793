//! Network partition, with real processes and a real (virtual) network: a worker node in a
//! network namespace of its own, joined to the head by a veth pair that the test cuts while the
//! node runs a job, then restores.
//!
//! The guarantee: the job that was on the cut-off node re-runs elsewhere (its lease expires);
//! when the link comes back the cut-off node's late result is discarded (fenced by attempt), the
//! node rejoins cleanly and takes new jobs.
//!
//! Only addresses this test makes are used: a private /30 on a veth pair between the root
//! namespace and a namespace the test creates (plus loopback, which the head's own node uses);
//! no route to anything else is added, and the namespace and the veth pair are always deleted.
//! Needs root and `ip netns` (CI runs as root): without them the test fails, it never passes
//! silently.
//!
//! Custom harness: this executable is also the node binary (role `cli`) and the worker program.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{NodeProc, PASSWORD, ROLE, free_port, node_of};
use common::netns::{Netns, NsNode};
use common::{Probe, ProbeInit, ProbeJob, ProbeOut, TestResult, eventually};
use distributed_computing::Pool;
use futures::StreamExt;

/// How long the cut-off node's job sleeps.
const LONG_MS: u64 = 8000;
/// How long the head's own job sleeps when the cut-off node took job 0.
const HEAD_MS: u64 = 4000;
/// The pool's lease: a cut-off node's job goes back to the queue this long after its last
/// renewal.
const LEASE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(180);
        a_node_cut_off_mid_job_is_fenced_and_rejoins,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

type BoxError = Box<dyn std::error::Error>;

/// The last `n` lines of a process's output, for failure messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `dc-cli status --json` against the head, through this executable in role `cli`.
async fn status(host: &str, port: u16) -> Result<serde_json::Value, BoxError> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE, "cli")
        .env("DC_PASSWORD", PASSWORD)
        .env("DC_KNOWN_HEADS", common::cluster::known_heads())
        .args(["status", "-a", host, "-p", &port.to_string(), "--json"])
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!("status failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A node's entry in a status report.
fn node_entry<'a>(report: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    report["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"] == node)
}

/// What the test saw of one long job: the job (0 or 1), its index in its stream, its output
/// and when it arrived.
type Arrival = (i64, usize, ProbeOut, Instant);

/// Submit `SleepEcho(ms, job)` alone and record what comes back.
fn collect(
    pool: &Pool<Probe>,
    job: i64,
    ms: u64,
    arrivals: &Arc<Mutex<Vec<Arrival>>>,
    errors: &Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    let mut stream = pool.imap_unordered([ProbeJob::SleepEcho(ms, job)]);
    let arrivals = arrivals.clone();
    let errors = errors.clone();
    tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            match item {
                Ok((i, out)) => {
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .push((job, i, out, Instant::now()));
                }
                Err(e) => errors
                    .lock()
                    .expect("errors")
                    .push(format!("job {job}: {e}")),
            }
        }
    })
}

/// Wait (up to 5 s) until the pool has `running` jobs, none queued, and as many of `nodes`
/// report a busy worker; returns those nodes.
async fn wait_busy(
    host: &str,
    port: u16,
    nodes: &[&str],
    running: usize,
) -> Result<Vec<String>, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        last = status(host, port).await?;
        let busy: Vec<String> = nodes
            .iter()
            .filter(|id| node_entry(&last, id).is_some_and(|n| n["busy"] == 1))
            .map(|id| id.to_string())
            .collect();
        if busy.len() == running
            && last["pool"]["running"] == running
            && last["pool"]["queued"] == 0
        {
            return Ok(busy);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{running} long job(s) were not running within 5 s: {last}").into())
}

async fn a_node_cut_off_mid_job_is_fenced_and_rejoins() -> TestResult {
    let net = Netns::create()?;
    let port = free_port()?;
    // The head listens on loopback (its own node connects there) and on the host end of the
    // veth pair, nowhere else.
    let head = NodeProc::start(
        &[
            "start-node",
            "--head",
            "--bind",
            &format!("127.0.0.1,{}", net.host_ip),
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            "1",
            "--heartbeat-ms",
            "200",
        ],
        &[],
    )
    .await?;
    check!(
        head.wait_for_output(
            &format!("start-node -p {port} -a "),
            Duration::from_secs(30)
        )
        .await,
        "the head never started:\n{}",
        head.output()
    );
    let node = NsNode::start(&net, port)?;
    let logs = |node: &NsNode| {
        format!(
            "\n--- head output ---\n{}\n--- cut-off node output ---\n{}",
            tail(&head.output(), 60),
            tail(&node.output(), 60)
        )
    };
    let head_id = format!(
        "{}-{}",
        distributed_computing::agent::host_name(),
        head.child.id().ok_or("the head exited")?
    );
    let node_id = format!(
        "{}-{}",
        distributed_computing::agent::host_name(),
        node.child.id().ok_or("the namespaced node exited")?
    );

    let pool = Pool::<Probe>::builder(ProbeInit::tagged("partition"))
        .address(net.host_ip.clone())
        .port(port)
        .password(PASSWORD)
        .known_heads(common::cluster::known_heads())
        .lease(LEASE)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let both_up = || async {
        pool.workers_count().await.unwrap_or(0) == 2 && pool.nodes_count().await.unwrap_or(0) == 2
    };
    check!(
        eventually(Duration::from_secs(60), both_up).await,
        "expected 2 workers on 2 nodes (the head's and the namespaced one){}",
        logs(&node)
    );

    // Warm-up: both nodes run jobs, under the node ids expected.
    let warm = pool
        .map((0..8).map(|i| ProbeJob::SleepEcho(100, i)))
        .await?;
    check!(
        warm.iter().map(|o| o.value).eq(0..8),
        "warm-up values {:?}",
        warm.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    let warm_nodes: HashSet<&str> = warm.iter().map(|o| node_of(&o.worker_id)).collect();
    check!(
        warm_nodes == HashSet::from([head_id.as_str(), node_id.as_str()]),
        "warm-up ran on nodes {warm_nodes:?}, expected {head_id} and {node_id}{}",
        logs(&node)
    );
    let node_worker_pid = warm
        .iter()
        .find(|o| node_of(&o.worker_id) == node_id)
        .map(|o| o.pid);

    // Two long jobs, placed one at a time so that the test knows which one the namespaced node
    // runs: job 0 goes to whichever worker takes it, job 1 then to the other. The cut-off
    // node's job is LONG_MS long and starts no earlier than the head's, so the head takes over
    // its copy about when it ends (or well before, when the head's own job is the short one):
    // the late result meets a job leased again under a new attempt, not only a finished job.
    let idle = eventually(Duration::from_secs(10), || async {
        let Ok(report) = status(&net.host_ip, port).await else {
            return false;
        };
        let idle_on =
            |id: &str| node_entry(&report, id).is_some_and(|n| n["busy"] == 0 && n["idle"] == 1);
        idle_on(&node_id) && idle_on(&head_id) && report["pool"]["running"] == 0
    })
    .await;
    check!(
        idle,
        "the workers did not report idle after the warm-up{}",
        logs(&node)
    );
    let started = Instant::now();
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let first = collect(&pool, 0, LONG_MS, &arrivals, &errors);
    let first_on = wait_busy(&net.host_ip, port, &[&node_id, &head_id], 1).await?;
    let (cut_job, second_ms) = if first_on.first() == Some(&node_id) {
        (0, HEAD_MS)
    } else {
        // The head runs job 0; job 1 goes to the namespaced node, started a little later so
        // that it ends after the head took over the copy of it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        (1, LONG_MS)
    };
    let second = collect(&pool, 1, second_ms, &arrivals, &errors);
    let both = wait_busy(&net.host_ip, port, &[&node_id, &head_id], 2).await?;
    check!(
        both.len() == 2,
        "the long jobs are not running one on each node: busy {both:?}{}",
        logs(&node)
    );
    // The cut-off node's job started before this (an upper bound).
    let cut_job_seen = started.elapsed();
    net.cut()?;
    let cut_at = started.elapsed();

    // Until the cut-off node's job is over, watch the pool: the silent node stops being counted
    // (its heartbeats stop), and its job goes back to the queue when its lease expires.
    let restore_at = cut_job_seen + Duration::from_millis(LONG_MS + 1000);
    let mut dropped_at = None;
    let mut requeued_at = None;
    while started.elapsed() < restore_at {
        if dropped_at.is_none() && pool.nodes_count().await.unwrap_or(0) == 1 {
            dropped_at = Some(started.elapsed());
        }
        if requeued_at.is_none()
            && let Ok(report) = status(&net.host_ip, port).await
            && report["pool"]["queued"] == 1
        {
            requeued_at = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    check!(
        dropped_at.is_some_and(|t| t <= cut_at + LEASE + Duration::from_secs(5)),
        "the cut-off node was still counted {:?} after the cut (dropped at {dropped_at:?}){}",
        LEASE + Duration::from_secs(5),
        logs(&node)
    );
    net.restore()?;
    let restored_at = started.elapsed();

    // Both jobs arrive, once each, both from the head: the cut-off node's one re-ran there.
    let limit = Duration::from_millis(2 * LONG_MS) + LEASE + Duration::from_secs(20);
    let finished = tokio::time::timeout(limit.saturating_sub(started.elapsed()), async {
        let _ = first.await;
        let _ = second.await;
    })
    .await;
    let long: Vec<Arrival> = arrivals.lock().expect("arrivals").clone();
    let summary: Vec<_> = long
        .iter()
        .map(|(job, i, o, t)| (*job, *i, o.worker_id.clone(), t.duration_since(started)))
        .collect();
    check!(
        finished.is_ok(),
        "the long jobs did not all arrive within {limit:?} (got {summary:?}){}",
        logs(&node)
    );
    let errors = errors.lock().expect("errors").clone();
    check!(
        errors.is_empty(),
        "long jobs failed: {errors:?}{}",
        logs(&node)
    );
    let mut jobs: Vec<i64> = long.iter().map(|(job, _, _, _)| *job).collect();
    jobs.sort_unstable();
    check!(
        jobs == [0, 1] && long.iter().all(|(_, i, _, _)| *i == 0),
        "the long jobs arrived as {summary:?}: expected each once"
    );
    for (job, _, out, at) in &long {
        check!(out.value == *job, "job {job} returned {}", out.value);
        check!(
            node_of(&out.worker_id) == head_id,
            "job {job} came from {} ({:?} after the start), expected the head {head_id}: the \
             cut-off node's late result reached the pool{}",
            out.worker_id,
            at.duration_since(started),
            logs(&node)
        );
    }
    let rerun_at = long
        .iter()
        .find(|(job, _, _, _)| *job == cut_job)
        .map(|(_, _, _, t)| t.duration_since(started))
        .unwrap_or_default();
    // The re-run starts once the lease expired and the head's worker is free again (after at
    // most one long job of its own), plus scheduling on a busy machine.
    check!(
        rerun_at <= Duration::from_millis(2 * LONG_MS) + LEASE + Duration::from_secs(10),
        "the cut-off node's job arrived only {rerun_at:?} after the start"
    );

    // The link is back: the node rejoins the pool.
    let rejoin_limit = Duration::from_secs(40);
    check!(
        eventually(rejoin_limit, both_up).await,
        "the cut-off node did not rejoin within {rejoin_limit:?} of the link coming back \
         (workers {:?}, nodes {:?}){}",
        pool.workers_count().await,
        pool.nodes_count().await,
        logs(&node)
    );
    let rejoined_at = started.elapsed();

    // Its old job is over (its late result was offered and refused, not still pending), and
    // the broker counted each job done once: 8 warm-up jobs and 2 long ones.
    let mut report = serde_json::Value::Null;
    let mut settled = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = status(&net.host_ip, port).await {
            report = r;
            if node_entry(&report, &node_id).and_then(|n| n["busy"].as_u64()) == Some(0) {
                settled = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check!(
        settled,
        "the cut-off node still holds its old job 30 s after rejoining: {report}{}",
        logs(&node)
    );
    let node_out = node.output();
    check!(
        !node_out.contains("could not report the job's outcome"),
        "the cut-off node gave up reporting its late result instead of having it refused{}",
        logs(&node)
    );
    let pool_report = &report["pool"];
    check!(
        pool_report["done"] == 10
            && pool_report["running"] == 0
            && pool_report["queued"] == 0
            && pool_report["failed"] == 0,
        "after the partition the broker counts {pool_report} (expected done 10, running 0, \
         queued 0, failed 0): a late result was accepted or a job is stuck{}",
        logs(&node)
    );

    // And it serves again: rounds of new jobs until it has run some of them. A node whose link
    // just came back may still be in a retry pause on one of its connections (TCP and the
    // agent back off while the link is down), so one round is no proof either way; every
    // round's results arrive once each, in order.
    let serve_limit = Duration::from_secs(60);
    let serving_since = Instant::now();
    let mut per_node: HashMap<String, usize> = HashMap::new();
    let mut rounds = 0;
    let mut fresh_pid = None;
    while fresh_pid.is_none() && serving_since.elapsed() < serve_limit {
        let base = 100 + 12 * rounds;
        let fresh = pool
            .map((0..12).map(|i| ProbeJob::SleepEcho(200, base + i)))
            .await?;
        check!(
            fresh.iter().map(|o| o.value).eq(base..base + 12),
            "fresh values {:?}",
            fresh.iter().map(|o| o.value).collect::<Vec<_>>()
        );
        for out in &fresh {
            *per_node
                .entry(node_of(&out.worker_id).to_string())
                .or_default() += 1;
        }
        fresh_pid = fresh
            .iter()
            .find(|o| node_of(&o.worker_id) == node_id)
            .map(|o| o.pid);
        rounds += 1;
    }
    check!(
        fresh_pid.is_some(),
        "the rejoined node took none of {} new jobs in {serve_limit:?}: {per_node:?}{}",
        12 * rounds,
        logs(&node)
    );
    pool.close().await?;

    eprintln!(
        "partition timeline: job {cut_job} on the cut-off node; cut at {cut_at:?}, node dropped \
         at {dropped_at:?}, job requeued at {requeued_at:?}, restored at {restored_at:?}, long \
         jobs {summary:?}, rejoined at {rejoined_at:?}; new jobs per node {per_node:?} in {rounds} \
         round(s) of 12; the \
         node's worker pid before/after {node_worker_pid:?}/{fresh_pid:?}; node logged \
         heartbeat failed: {}, heartbeat restored: {}",
        node_out.contains("heartbeat failed"),
        node_out.contains("heartbeat restored"),
    );
    drop(node);
    drop(head);
    drop(net);
    Ok(())
}
