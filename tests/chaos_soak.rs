//! A chaos soak: a head (its pool server only) and three worker nodes of one CPU worker each,
//! a pool owner that streams short jobs and broadcasts an update every 100 results, and a
//! nemesis that every 2.5–6 s strikes at random: a node SIGKILLed (started again 1–3 s later),
//! a node SIGSTOPped for 0.5–3 s, the pool server SIGKILLed (the head restarts it), the pool
//! server SIGSTOPped for 0.3–1.8 s, every core busy for 3–8 s, or (as root, with `ip netns`)
//! the link of a fourth node, in a network namespace of its own, cut for 1–4 s.
//!
//! The checker: every job's result once and right; every worker's updates a gap-free prefix of
//! the broadcast order, holding at least those published before its job was submitted; no job
//! failed (`max_attempts(10)`); node and server memory bounded; no worker process left once
//! the nodes are gone.
//!
//! `DC_SOAK_SECS` sets how long the nemesis strikes (45 s by default); `DC_SOAK_SEED` replays a
//! run (each run prints its nemesis seed first).
//!
//! Custom harness: this executable is also the node binary (role `cli`) and the worker program.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{NodeProc, PASSWORD, free_port, rss_kib, start_worker_node};
use common::netns::{Netns, NsNode};
use common::{Burners, Probe, ProbeJob, TestResult, eventually, process_is_gone};
use distributed_computing::Pool;
use futures::StreamExt;
use nix::sys::signal::Signal;

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(soak_secs() + 600);
        a_pool_under_a_nemesis_delivers_every_result_once,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

fn soak_secs() -> u64 {
    std::env::var("DC_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45)
}

/// xorshift64: a replayable stream of choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A duration between `lo` and `hi` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

const FAULTS: [&str; 6] = [
    "node SIGKILL + restart",
    "node SIGSTOP",
    "pool server SIGKILL",
    "pool server SIGSTOP",
    "every core busy",
    "node partitioned",
];

/// What the owner saw.
#[derive(Debug, Default)]
struct Seen {
    results: usize,
    updates: i64,
    worker_pids: HashSet<u32>,
    longest_gap: Duration,
    /// The longest a job took from its submission to its result.
    slowest_job: Duration,
}

/// The pool owner: streams of 100 jobs (0–40 ms each) until told to stop, an update every 100
/// results; checks each result as it comes.
async fn owner(
    pool: Arc<Pool<Probe>>,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicI64>,
    seed: u64,
) -> Result<Seen, String> {
    let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut seen = Seen::default();
    let mut next = 0i64;
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        let first = next;
        let jobs: Vec<ProbeJob> = (0..100)
            .map(|i| ProbeJob::SleepEcho(rng.next() % 41, first + i))
            .collect();
        next += 100;
        let before = published.load(Ordering::Acquire);
        let submitted = Instant::now();
        let mut stream = pool.imap_unordered(jobs);
        let mut got = [false; 100];
        while let Some(item) = stream.next().await {
            let (i, out) = item.map_err(|e| format!("a job failed: {e}"))?;
            let now = Instant::now();
            seen.longest_gap = seen.longest_gap.max(now - last);
            seen.slowest_job = seen.slowest_job.max(now - submitted);
            last = now;
            if out.value != first + i as i64 {
                return Err(format!("job {} returned {}", first + i as i64, out.value));
            }
            if std::mem::replace(&mut got[i], true) {
                return Err(format!("job {} delivered twice", first + i as i64));
            }
            let m = out.updates.len() as i64;
            let after = published.load(Ordering::Acquire);
            if !out.updates.iter().copied().eq(1..=m) || m < before || m > after {
                return Err(format!(
                    "worker {} applied {:?}: not 1..=m with {before} <= m <= {after}",
                    out.worker_id, out.updates
                ));
            }
            seen.worker_pids.insert(out.pid);
            seen.results += 1;
            if seen.results % 100 == 0 {
                let k = published.load(Ordering::Acquire) + 1;
                pool.update_workers(k)
                    .await
                    .map_err(|e| format!("update_workers({k}): {e}"))?;
                published.store(k, Ordering::Release);
            }
        }
        if got.iter().any(|g| !g) {
            return Err(format!("a stream from job {first} ended short"));
        }
    }
    seen.updates = published.load(Ordering::Acquire);
    Ok(seen)
}

async fn a_pool_under_a_nemesis_delivers_every_result_once() -> TestResult {
    let seed = std::env::var("DC_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() ^ u64::from(d.subsec_nanos()))
                .unwrap_or(1)
        })
        | 1;
    let secs = soak_secs();
    eprintln!("SOAK seed {seed} ({secs} s): replay with DC_SOAK_SEED={seed} DC_SOAK_SECS={secs}");
    let mut rng = Rng(seed);
    // A fourth node behind a link the nemesis can cut, where a namespace can be made.
    let net = match Netns::create() {
        Ok(net) => Some(net),
        Err(e) => {
            eprintln!("SOAK: no partition faults in this run: {e}");
            None
        }
    };
    let port = free_port()?;
    let bind = match &net {
        Some(net) => format!("127.0.0.1,{}", net.host_ip),
        None => "127.0.0.1".into(),
    };
    let head = NodeProc::start(
        &[
            "start-node",
            "--head",
            "--bind",
            &bind,
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            "0",
            "--heartbeat-ms",
            "300",
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
    let mut nodes: Vec<NodeProc> = Vec::new();
    for _ in 0..3 {
        nodes.push(start_worker_node(port, 1, &[]).await?);
    }
    let cut_off = match &net {
        Some(net) => Some(NsNode::start(net, port)?),
        None => None,
    };
    let all = 3 + usize::from(cut_off.is_some());
    let pool = Arc::new(
        Pool::<Probe>::builder(common::ProbeInit::tagged("soak"))
            .address("127.0.0.1")
            .port(port)
            .password(PASSWORD)
            .known_heads(common::cluster::known_heads())
            .lease(Duration::from_secs(2))
            .max_attempts(10)
            .connect()
            .await?,
    );
    check!(
        common::cluster::wait_workers(&pool, all, all).await,
        "expected {all} workers on {all} nodes"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicI64::new(0));
    let owner_task = tokio::spawn(owner(pool.clone(), stop.clone(), published.clone(), seed));

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let (mut node_rss, mut server_rss) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) && !owner_task.is_finished() {
        tokio::time::sleep(rng.ms(2500, 6000)).await;
        let pids = nodes
            .iter()
            .filter_map(NodeProc::pid)
            .chain(cut_off.as_ref().and_then(|n| n.child.id()));
        for pid in pids {
            node_rss = node_rss.max(rss_kib(pid).unwrap_or(0));
        }
        if let Some(pid) = head.redis_server_pid(port) {
            server_rss = server_rss.max(rss_kib(pid).unwrap_or(0));
        }
        let kinds = if net.is_some() { 6 } else { 5 };
        let kind = usize::try_from(rng.next() % kinds).expect("below the kind count");
        *counts.entry(FAULTS[kind]).or_default() += 1;
        match kind {
            0 => {
                let victim =
                    usize::try_from(rng.next() % nodes.len() as u64).expect("below the node count");
                if let Some(pid) = nodes[victim].pid() {
                    signal(pid, Signal::SIGKILL);
                }
                tokio::time::sleep(rng.ms(1000, 3000)).await;
                nodes[victim] = start_worker_node(port, 1, &[]).await?;
            }
            1 => {
                let victim =
                    usize::try_from(rng.next() % nodes.len() as u64).expect("below the node count");
                if let Some(pid) = nodes[victim].pid() {
                    signal(pid, Signal::SIGSTOP);
                    tokio::time::sleep(rng.ms(500, 3000)).await;
                    signal(pid, Signal::SIGCONT);
                }
            }
            2 => {
                if let Some(pid) = head.redis_server_pid(port) {
                    signal(pid, Signal::SIGKILL);
                }
            }
            3 => {
                if let Some(pid) = head.redis_server_pid(port) {
                    signal(pid, Signal::SIGSTOP);
                    tokio::time::sleep(rng.ms(300, 1800)).await;
                    signal(pid, Signal::SIGCONT);
                }
            }
            4 => {
                let burners = Burners::start(3)?;
                tokio::time::sleep(rng.ms(3000, 8000)).await;
                drop(burners);
            }
            _ => {
                if let Some(net) = &net {
                    net.cut()?;
                    tokio::time::sleep(rng.ms(1000, 4000)).await;
                    net.restore()?;
                }
            }
        }
    }
    stop.store(true, Ordering::Release);
    let seen = tokio::time::timeout(Duration::from_secs(300), owner_task)
        .await
        .map_err(|_| "the owner's last stream did not end within 300 s")?
        .map_err(|e| format!("owner task: {e}"))??;
    pool.close().await?;
    let faults: usize = counts.values().sum();
    check!(faults > 0, "no fault struck");
    check!(node_rss < 256 << 10, "a node agent grew to {node_rss} KiB");
    check!(
        server_rss < 512 << 10,
        "the pool server grew to {server_rss} KiB"
    );
    // No worker process outlives its node.
    drop(nodes);
    drop(cut_off);
    drop(head);
    drop(net);
    let pids: Vec<u32> = seen.worker_pids.iter().copied().collect();
    let gone = eventually(Duration::from_secs(15), || async {
        pids.iter().all(|p| process_is_gone(*p))
    })
    .await;
    check!(
        gone,
        "worker processes outlived their nodes: {:?}",
        pids.iter()
            .filter(|p| !process_is_gone(**p))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "MEASURE soak: seed {seed}, {:.0} s, {faults} faults {counts:?}: {} results each once, {} updates in order on every worker, no failed job; slowest job {:.2} s from submission to result (a batch of 100 on 4 workers), longest wait between two results {:.2} s; node agent RSS at most {} KiB, pool server {} KiB; {} worker processes, none left",
        started.elapsed().as_secs_f64(),
        seen.results,
        seen.updates,
        seen.slowest_job.as_secs_f64(),
        seen.longest_gap.as_secs_f64(),
        node_rss,
        server_rss,
        pids.len()
    );
    Ok(())
}
