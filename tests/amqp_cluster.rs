//! Nodes and pools on RabbitMQ (`DC_AMQP_ADMIN_URL`'s server, by default the local one at
//! 127.0.0.1:5672 as guest): real node processes joined with `--broker amqp://…`, each test in
//! a vhost of its own (made with `rabbitmqctl`, deleted afterwards). Checks what the Redis
//! cluster tests check: every result once, a killed node's job re-run elsewhere, a poison job
//! failing alone, a long job on a live node never taken away, updates replayed to a late
//! joiner, 600 MiB each way, and a RabbitMQ restart in the middle of a run with nothing lost.
//!
//! The tests run one at a time: one of them stops and starts RabbitMQ itself.
//! Custom harness: this executable is also the node binary (role `cli`) and the worker program.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::cluster::{NodeProc, node_of, serve_cli_role};
use common::{Probe, ProbeInit, ProbeJob, ProbeOut, TestResult, eventually, only_poison_jobs_fail};
use distributed_computing::{Pool, PoolError};
use futures::StreamExt;
use nix::sys::signal::Signal;

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = serve_cli_role() {
        return code;
    }
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let tests = trials![Duration::from_secs(300);
        amqp_nodes_serve_map_and_stream_and_replay_updates_to_a_late_joiner,
        amqp_killed_node_job_runs_elsewhere_once,
        amqp_poison_job_fails_alone_and_long_job_on_a_live_node_is_kept,
        amqp_600_mib_each_way,
        amqp_rabbitmq_restart_mid_run_loses_nothing,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A vhost of this test's own on the local RabbitMQ, deleted when dropped.
struct Vhost {
    name: String,
}

fn rabbitmqctl(args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Vhost {
    fn new(tag: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let name = format!("dct-{tag}-{}-{}", std::process::id(), common::unix_us());
        rabbitmqctl(&["add_vhost", &name])?;
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"])?;
        Ok(Vhost { name })
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("could not delete vhost {}: {e}", self.name);
        }
    }
}

async fn start_node(url: &str, cpu_workers: usize) -> Result<NodeProc, Box<dyn std::error::Error>> {
    let workers = cpu_workers.to_string();
    NodeProc::start(
        &[
            "start-node",
            "--broker",
            url,
            "--cpu-workers",
            &workers,
            "--heartbeat-ms",
            "300",
        ],
        &[],
    )
    .await
}

async fn pool(url: &str, tag: &str, lease: Duration) -> Result<Pool<Probe>, PoolError> {
    Pool::<Probe>::builder(ProbeInit::tagged(tag))
        .broker(url)
        .lease(lease)
        .connect()
        .await
}

async fn wait_workers(pool: &Pool<Probe>, workers: usize) -> bool {
    eventually(Duration::from_secs(60), || async {
        pool.workers_count().await.unwrap_or(0) >= workers
    })
    .await
}

/// Stop a node with SIGTERM; if it does not stop in time, the error shows what it printed.
async fn stop(node: &mut NodeProc) -> TestResult {
    node.stop()
        .await
        .map_err(|e| format!("{e}; the node's output:\n{}", node.output()).into())
}

/// Runs recorded by `CountRuns` jobs: value → workers it ran on.
fn runs(path: &Path) -> BTreeMap<i64, Vec<String>> {
    let mut out: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let mut f = line.split_whitespace();
        if let (Some(v), Some(_pid), Some(worker)) = (f.next(), f.next(), f.next())
            && let Ok(v) = v.parse()
        {
            out.entry(v).or_default().push(worker.to_string());
        }
    }
    out
}

fn runs_file(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "dc-amqp-{tag}-{}-{}",
        std::process::id(),
        common::unix_us()
    ))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Two nodes serve `map` (ordered) and `imap_unordered` (each result once); updates reach
/// every worker in order, and a node that joins later replays them all before its first job.
async fn amqp_nodes_serve_map_and_stream_and_replay_updates_to_a_late_joiner() -> TestResult {
    let vhost = Vhost::new("map")?;
    let url = vhost.url();
    let mut a = start_node(&url, 1).await?;
    let mut b = start_node(&url, 1).await?;
    let pool = pool(&url, "map", Duration::from_secs(3)).await?;
    check!(
        wait_workers(&pool, 2).await,
        "two workers never came: {}",
        a.output()
    );

    let outs = pool.map((0..200).map(ProbeJob::Echo)).await?;
    check!(outs.len() == 200, "{} results", outs.len());
    for (i, out) in outs.iter().enumerate() {
        check!(out.value == i as i64, "map result {i} is {}", out.value);
    }
    let used: HashSet<&str> = outs.iter().map(|o| node_of(&o.worker_id)).collect();
    check!(used.len() == 2, "one node ran everything: {used:?}");

    for u in 1..=3 {
        pool.update_workers(u).await?;
    }
    let mut seen = HashSet::new();
    let mut stream = pool.imap_unordered((0..100).map(|i| ProbeJob::SleepEcho(2, i)));
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(out.value == i as i64, "job {i} returned {}", out.value);
        check!(seen.insert(i), "job {i} delivered twice");
        check!(
            out.updates == vec![1, 2, 3],
            "worker {} saw updates {:?}",
            out.worker_id,
            out.updates
        );
    }
    drop(stream);
    check!(seen.len() == 100, "{} of 100 results", seen.len());

    let mut late = start_node(&url, 1).await?;
    check!(
        wait_workers(&pool, 3).await,
        "the late node never served: {}",
        late.output()
    );
    let jobs = (0..60).map(|i| ProbeJob::SleepEcho(20, i));
    let outs = pool.map(jobs).await?;
    let late_outs: Vec<&ProbeOut> = outs
        .iter()
        .filter(|o| Some(node_of(&o.worker_id).to_string()) == late.node_id())
        .collect();
    check!(!late_outs.is_empty(), "the late node ran none of 60 jobs");
    for out in late_outs {
        check!(
            out.updates == vec![1, 2, 3],
            "the late worker replayed {:?}",
            out.updates
        );
    }
    pool.close().await?;
    for n in [&mut a, &mut b, &mut late] {
        stop(n).await?;
    }
    Ok(())
}

/// A node killed with SIGKILL while it runs a job: the pool hears its connection close, the
/// job runs on the other node, and its result comes once.
async fn amqp_killed_node_job_runs_elsewhere_once() -> TestResult {
    let vhost = Vhost::new("kill")?;
    let url = vhost.url();
    let file = runs_file("kill");
    let mut a = start_node(&url, 1).await?;
    let mut b = start_node(&url, 1).await?;
    let pool = pool(&url, "kill", Duration::from_secs(20)).await?;
    check!(wait_workers(&pool, 2).await, "two workers never came");
    let jobs = vec![
        ProbeJob::CountRuns(file.clone(), 3_000, 1),
        ProbeJob::CountRuns(file.clone(), 3_000, 2),
    ];
    // The stream submits as it is polled: a task drains it while the test watches the runs.
    let stream = pool.imap_unordered(jobs);
    let collector = tokio::spawn(async move {
        let mut stream = stream;
        let mut got = BTreeMap::new();
        while let Some(item) = stream.next().await {
            let (i, out) = item.map_err(|e| e.to_string())?;
            if got.insert(i, out.worker_id.clone()).is_some() {
                return Err(format!("job {i} delivered twice"));
            }
        }
        Ok::<_, String>(got)
    });
    check!(
        eventually(Duration::from_secs(30), || async { runs(&file).len() == 2 }).await,
        "both jobs never started: {:?}",
        runs(&file)
    );
    let victim = if a
        .node_id()
        .is_some_and(|id| node_of(&runs(&file)[&1][0]) == id)
    {
        &mut a
    } else {
        &mut b
    };
    let victim_id = victim.node_id().unwrap_or_default();
    victim.signal(Signal::SIGKILL)?;
    let killed = Instant::now();
    let got = collector.await??;
    let took = killed.elapsed();
    check!(got.len() == 2, "{} of 2 results", got.len());
    // The lease is 20 s: a re-run well before that came from the connection closing.
    check!(
        took < Duration::from_secs(15),
        "the killed node's job came back after {took:?}"
    );
    for (i, worker) in &got {
        check!(
            node_of(worker) != victim_id,
            "job {i}'s result came from the killed node"
        );
    }
    eprintln!("killed node's job finished {took:?} after the kill (a 3 s job)");
    let _ = std::fs::remove_file(&file);
    pool.close().await?;
    a.stop().await.ok();
    b.stop().await.ok();
    Ok(())
}

/// A job whose worker process dies every time fails alone after its attempts, with its
/// history; a job longer than many leases on a live node runs once.
async fn amqp_poison_job_fails_alone_and_long_job_on_a_live_node_is_kept() -> TestResult {
    let vhost = Vhost::new("poison")?;
    let url = vhost.url();
    let mut node = start_node(&url, 2).await?;
    let poisoned = Pool::<Probe>::builder(ProbeInit::tagged("poison"))
        .broker(&url)
        .max_attempts(1)
        .connect()
        .await?;
    check!(wait_workers(&poisoned, 2).await, "workers never came");
    only_poison_jobs_fail(&poisoned, 40, &[7, 23]).await?;
    poisoned.close().await?;

    let file = runs_file("long");
    let pool = pool(&url, "long", Duration::from_millis(1500)).await?;
    check!(wait_workers(&pool, 2).await, "workers never came back");
    let outs = pool
        .map(vec![ProbeJob::CountRuns(file.clone(), 6_000, 1)])
        .await?;
    check!(outs.len() == 1 && outs[0].value == 1, "{outs:?}");
    let runs = runs(&file);
    check!(
        runs[&1].len() == 1,
        "a 6 s job on a live node ran {} times (lease 1.5 s)",
        runs[&1].len()
    );
    let _ = std::fs::remove_file(&file);
    pool.close().await?;
    stop(&mut node).await?;
    Ok(())
}

/// 600 MiB in and 600 MiB out, through RabbitMQ in parts, on a 5 s lease: heartbeats travel
/// on a connection of their own, so moving the payload never lets the lease run out (the job
/// runs once).
async fn amqp_600_mib_each_way() -> TestResult {
    let vhost = Vhost::new("big")?;
    let url = vhost.url();
    let mut node = start_node(&url, 1).await?;
    let pool = pool(&url, "big", Duration::from_secs(5)).await?;
    check!(wait_workers(&pool, 1).await, "no worker came");
    let n = 600 << 20;
    let data: Vec<u8> = (0..n).map(|i: usize| (i % 251).to_le_bytes()[0]).collect();
    let started = Instant::now();
    let file = runs_file("big");
    let outs = match pool
        .map(vec![ProbeJob::ReverseCounted(
            file.clone(),
            1,
            serde_bytes::ByteBuf::from(data),
        )])
        .await
    {
        Ok(outs) => outs,
        Err(e) => return Err(format!("{e}; the node's output:\n{}", node.output()).into()),
    };
    let took = started.elapsed();
    let ran = runs(&file).get(&1).map_or(0, Vec::len);
    let _ = std::fs::remove_file(&file);
    check!(ran == 1, "the 600 MiB job ran {ran} times");
    let bytes = outs[0].bytes.as_ref().ok_or("no bytes came back")?;
    check!(bytes.len() == n, "{} bytes came back", bytes.len());
    check!(
        bytes
            .iter()
            .rev()
            .enumerate()
            .all(|(i, b)| *b == (i % 251).to_le_bytes()[0]),
        "the bytes came back damaged"
    );
    eprintln!("600 MiB each way in {took:?}");
    pool.close().await?;
    stop(&mut node).await?;
    Ok(())
}

/// RabbitMQ stops and starts (`rabbitmqctl stop_app` / `start_app`) while jobs run: the pool
/// and the nodes reconnect, the pool takes its session back, and every job's result comes
/// once.
async fn amqp_rabbitmq_restart_mid_run_loses_nothing() -> TestResult {
    let vhost = Vhost::new("restart")?;
    let url = vhost.url();
    let mut a = start_node(&url, 1).await?;
    let mut b = start_node(&url, 1).await?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("restart"))
        .broker(&url)
        .lease(Duration::from_secs(5))
        .broker_outage_timeout(Duration::from_secs(120))
        .connect()
        .await?;
    check!(wait_workers(&pool, 2).await, "two workers never came");
    let n = 60;
    let mut stream = pool.imap_unordered((0..n).map(|i| ProbeJob::SleepEcho(100, i as i64)));
    let mut got = HashSet::new();
    let mut restarted = false;
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(out.value == i as i64, "job {i} returned {}", out.value);
        check!(got.insert(i), "job {i} delivered twice");
        if got.len() == 10 && !restarted {
            restarted = true;
            let stop = tokio::task::spawn_blocking(|| {
                rabbitmqctl(&["stop_app"]).map_err(|e| e.to_string())?;
                std::thread::sleep(Duration::from_secs(2));
                rabbitmqctl(&["start_app"]).map_err(|e| e.to_string())
            });
            stop.await??;
        }
    }
    check!(restarted, "RabbitMQ was never restarted");
    check!(
        got.len() == n,
        "{} of {n} results after the restart",
        got.len()
    );
    // The nodes serve the next map too.
    let outs = pool.map((0..20).map(ProbeJob::Echo)).await?;
    check!(outs.len() == 20, "{} results after the restart", outs.len());
    pool.close().await?;
    a.stop().await.ok();
    b.stop().await.ok();
    Ok(())
}
