//! Across machines on Redis, with real processes: a head node (its own password-protected
//! redis-server on a free loopback port) and worker nodes started through the CLI, pools
//! opened over the network. The seed's flow end to end, and its edges.
//!
//! Custom harness: this executable is also the node binary (role `cli`, via `main_with_args`)
//! and the worker program (`__dc-worker`, via `serve_if_worker`).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Probe, ProbeInit, ProbeJob, TestResult, Unregistered, eventually};
use distributed_computing::{Pool, PoolError};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

const ROLE: &str = "DC_TEST_ROLE";
const PASSWORD: &str = "test-pool-pw";

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if std::env::var(ROLE).as_deref() == Ok("cli") {
        return distributed_computing::main_with_args(std::env::args_os().collect());
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(240);
        seed_flow_map_and_imap_over_head_and_node,
        late_node_replays_updates_and_a_stopped_node_does_not_stop_the_pool,
        wrong_password_is_an_auth_error_quickly,
        nothing_listening_is_unreachable_within_the_timeout,
        unknown_worker_kind_is_reported_to_the_pool,
        second_pool_waits_for_the_first_to_close,
        payloads_of_600_mib_round_trip_intact,
        fake_gpus_on_a_remote_node_give_distinct_devices,
        status_json_shows_the_cluster_and_second_start_is_peaceful,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// A node process started through the CLI; killed (group and all) when dropped.
struct NodeProc {
    child: tokio::process::Child,
    output: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl NodeProc {
    async fn start(
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = TempDir::new("node")?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.env(ROLE, "cli")
            .env("DC_LOG", "info")
            .env_remove("DC_FAKE_GPUS")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(args)
            .arg("--state-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().expect("output lock").push(line);
                }
            });
        }
        Ok(NodeProc {
            child,
            output,
            _dir: dir,
        })
    }

    fn state_dir(&self) -> &Path {
        self._dir.path()
    }

    fn output(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }

    async fn wait_for_output(&self, needle: &str, limit: Duration) -> bool {
        eventually(limit, || async { self.output().contains(needle) }).await
    }

    async fn stop(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => Err("node did not stop within 20 s of SIGTERM".into()),
        }
    }
}

/// A head node (`start-node --head`) on a free loopback port, with `cpu_workers` workers.
async fn start_head(cpu_workers: usize) -> Result<(NodeProc, u16), Box<dyn std::error::Error>> {
    let port = free_port()?;
    let head = NodeProc::start(
        &[
            "start-node",
            "--head",
            "--bind",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            &cpu_workers.to_string(),
            "--heartbeat-ms",
            "300",
        ],
        &[],
    )
    .await?;
    if !head
        .wait_for_output(
            &format!("start-node -p {port} -a "),
            Duration::from_secs(30),
        )
        .await
    {
        return Err(format!(
            "the head never printed the worker command:\n{}",
            head.output()
        )
        .into());
    }
    Ok((head, port))
}

async fn start_worker_node(
    port: u16,
    cpu_workers: usize,
    env: &[(&str, &str)],
) -> Result<NodeProc, Box<dyn std::error::Error>> {
    NodeProc::start(
        &[
            "start-node",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            &cpu_workers.to_string(),
            "--heartbeat-ms",
            "300",
        ],
        env,
    )
    .await
}

async fn pool(port: u16, tag: &str) -> Result<Pool<Probe>, PoolError> {
    Pool::<Probe>::builder(ProbeInit::tagged(tag))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .lease(Duration::from_secs(3))
        .connect()
        .await
}

async fn wait_workers(pool: &Pool<Probe>, workers: usize, nodes: usize) -> bool {
    eventually(Duration::from_secs(60), || async {
        pool.workers_count().await.unwrap_or(0) == workers
            && pool.nodes_count().await.unwrap_or(0) == nodes
    })
    .await
}

fn node_of(worker_id: &str) -> &str {
    worker_id
        .rsplit_once('/')
        .map(|(n, _)| n)
        .unwrap_or(worker_id)
}

async fn seed_flow_map_and_imap_over_head_and_node() -> TestResult {
    let (_head, port) = start_head(1).await?;
    let _node = start_worker_node(port, 2, &[]).await?;
    let pool = pool(port, "seed").await?;
    check!(
        wait_workers(&pool, 3, 2).await,
        "expected 3 workers on 2 nodes"
    );

    let outs = pool
        .map((0..40).map(|i| ProbeJob::SleepEcho(30, i)))
        .await?;
    let values: Vec<i64> = outs.iter().map(|o| o.value).collect();
    check!(
        values == (0..40).collect::<Vec<_>>(),
        "map lost the order: {values:?}"
    );
    check!(
        outs.iter().all(|o| o.tag == "seed"),
        "init data did not reach every worker"
    );
    let nodes: HashSet<&str> = outs.iter().map(|o| node_of(&o.worker_id)).collect();
    check!(
        nodes.len() == 2,
        "jobs ran on nodes {nodes:?}, expected both"
    );

    let mut stream = pool.imap_unordered((0..30).map(|i| ProbeJob::SleepEcho(40, i)));
    let mut seen = HashSet::new();
    let mut sent = 0i64;
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(seen.insert(i), "index {i} twice");
        let n = out.updates.len() as i64;
        check!(
            out.updates == (1..=n).collect::<Vec<_>>(),
            "updates out of order: {:?}",
            out.updates
        );
        check!(n <= sent, "an update arrived before it was sent");
        sent += 1;
        pool.update_workers(sent).await?;
    }
    check!(seen.len() == 30, "{} of 30 delivered", seen.len());
    let last = pool.map((0..6).map(ProbeJob::Echo)).await?;
    for out in &last {
        check!(
            out.updates == (1..=sent).collect::<Vec<_>>(),
            "a job after all updates saw {:?}",
            out.updates
        );
    }
    pool.close().await?;
    Ok(())
}

async fn late_node_replays_updates_and_a_stopped_node_does_not_stop_the_pool() -> TestResult {
    let (_head, port) = start_head(1).await?;
    let pool = pool(port, "late").await?;
    check!(
        wait_workers(&pool, 1, 1).await,
        "the head's worker never came up"
    );
    for u in [10, 20, 30] {
        pool.update_workers(u).await?;
    }
    pool.map((0..3).map(ProbeJob::Echo)).await?;

    let mut late = start_worker_node(port, 2, &[]).await?;
    check!(
        wait_workers(&pool, 3, 2).await,
        "the late node's workers never came up"
    );
    let outs = pool
        .map((0..24).map(|i| ProbeJob::SleepEcho(50, i)))
        .await?;
    let head_node = node_of(&outs[0].worker_id).to_string();
    let on_late: Vec<_> = outs
        .iter()
        .filter(|o| node_of(&o.worker_id) != head_node)
        .collect();
    check!(!on_late.is_empty(), "the late node ran no job");
    for out in &on_late {
        check!(
            out.updates == vec![10, 20, 30],
            "the late node's worker {} replayed {:?}",
            out.worker_id,
            out.updates
        );
    }

    // Stop the late node while jobs run: the pool carries on, every job arrives once.
    let mut stream = pool.imap_unordered((0..30).map(|i| ProbeJob::SleepEcho(100, i)));
    let mut seen = HashSet::new();
    let mut stopped = false;
    while let Some(item) = stream.next().await {
        let (i, out) = item?;
        check!(out.value == i as i64, "job {i} returned {}", out.value);
        check!(seen.insert(i), "job {i} delivered twice");
        if !stopped && seen.len() >= 5 {
            late.stop().await?;
            stopped = true;
        }
    }
    check!(
        seen.len() == 30,
        "{} of 30 delivered after a node stopped",
        seen.len()
    );
    check!(
        eventually(Duration::from_secs(10), || async {
            pool.nodes_count().await.unwrap_or(0) == 1
        })
        .await,
        "the stopped node is still counted"
    );
    pool.close().await?;
    Ok(())
}

async fn wrong_password_is_an_auth_error_quickly() -> TestResult {
    let (_head, port) = start_head(0).await?;
    let started = Instant::now();
    let result = Pool::<Probe>::builder(ProbeInit::tagged("x"))
        .address("127.0.0.1")
        .port(port)
        .password("not-the-password")
        .connect()
        .await;
    check!(
        matches!(result, Err(PoolError::Auth(_))),
        "expected Auth, got {result:?}"
    );
    check!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn nothing_listening_is_unreachable_within_the_timeout() -> TestResult {
    let port = free_port()?;
    let started = Instant::now();
    let result = Pool::<Probe>::builder(ProbeInit::tagged("x"))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    check!(
        matches!(result, Err(PoolError::Unreachable(_))),
        "expected Unreachable, got {result:?}"
    );
    check!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

async fn unknown_worker_kind_is_reported_to_the_pool() -> TestResult {
    let (head, port) = start_head(1).await?;
    let pool = Pool::<Unregistered>::builder(())
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .connect()
        .await?;
    let started = Instant::now();
    match pool.map(vec![()]).await {
        Err(PoolError::UnknownWorkerKind { kind, known }) => {
            check!(kind == "unregistered", "kind {kind}");
            check!(known.contains(&"probe".to_string()), "known {known:?}");
        }
        other => return Err(format!("expected UnknownWorkerKind, got {other:?}").into()),
    }
    check!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    check!(
        head.wait_for_output("does not have", Duration::from_secs(5))
            .await,
        "the node did not log the unknown kind:\n{}",
        head.output()
    );
    pool.close().await?;
    Ok(())
}

async fn second_pool_waits_for_the_first_to_close() -> TestResult {
    let (_head, port) = start_head(1).await?;
    let first = pool(port, "first").await?;
    let second = tokio::spawn(async move { pool(port, "second").await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    check!(
        !second.is_finished(),
        "the second pool opened while the first was active"
    );
    let out = first.map(vec![ProbeJob::Echo(1)]).await?;
    check!(out[0].tag == "first", "the first pool's workers");
    first.close().await?;
    let second = tokio::time::timeout(Duration::from_secs(15), second)
        .await
        .map_err(|_| "the second pool never opened after the first closed")???;
    let out = second.map(vec![ProbeJob::Echo(2)]).await?;
    check!(
        out[0].tag == "second",
        "the second pool's workers built with its init data"
    );
    second.close().await?;
    Ok(())
}

async fn payloads_of_600_mib_round_trip_intact() -> TestResult {
    let (_head, port) = start_head(1).await?;
    let pool = pool(port, "big").await?;
    let size = 600 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let outs = pool
        .map(vec![ProbeJob::Reverse(serde_bytes::ByteBuf::from(
            data.clone(),
        ))])
        .await?;
    let back = outs[0].bytes.as_ref().ok_or("no bytes came back")?;
    check!(back.len() == size, "got {} bytes back", back.len());
    check!(
        back.iter().rev().eq(data.iter()),
        "the 600 MiB result is not the reversed argument"
    );
    pool.close().await?;
    Ok(())
}

async fn fake_gpus_on_a_remote_node_give_distinct_devices() -> TestResult {
    let (_head, port) = start_head(0).await?;
    let _gpu_node = start_worker_node(port, 0, &[("DC_FAKE_GPUS", "2")]).await?;
    let pool = pool(port, "gpus").await?;
    check!(
        wait_workers(&pool, 2, 1).await,
        "expected 2 GPU workers on the remote node"
    );
    let outs = pool
        .map((0..20).map(|i| ProbeJob::SleepEcho(50, i)))
        .await?;
    let mut by_worker: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for out in outs {
        by_worker.insert(
            out.worker_id.clone(),
            (out.cuda_visible_devices.unwrap_or_default(), out.devices),
        );
    }
    check!(
        by_worker.len() == 2,
        "jobs ran on {} workers",
        by_worker.len()
    );
    let devices: HashSet<&String> = by_worker.values().map(|(cvd, _)| cvd).collect();
    check!(
        devices.len() == 2,
        "the workers share a device: {by_worker:?}"
    );
    for (cvd, ctx) in by_worker.values() {
        check!(cvd.starts_with("GPU-"), "CUDA_VISIBLE_DEVICES={cvd}");
        check!(ctx == &vec![cvd.clone()], "WorkerContext devices {ctx:?}");
    }
    pool.close().await?;
    Ok(())
}

async fn status_json_shows_the_cluster_and_second_start_is_peaceful() -> TestResult {
    let (head, port) = start_head(1).await?;
    let _node = start_worker_node(port, 2, &[]).await?;
    let pool = pool(port, "status").await?;
    check!(wait_workers(&pool, 3, 2).await, "3 workers on 2 nodes");
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(&exe)
        .env(ROLE, "cli")
        .env("DC_PASSWORD", PASSWORD)
        .args([
            "status",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--json",
        ])
        .output()
        .await?;
    check!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nodes = json["nodes"].as_array().ok_or("no nodes array")?;
    check!(
        nodes.len() == 2,
        "status lists {} nodes: {json}",
        nodes.len()
    );
    let slots: u64 = nodes.iter().filter_map(|n| n["slots"].as_u64()).sum();
    check!(slots == 3, "status counts {slots} slots: {json}");
    check!(json["pool"]["kind"] == "probe", "status pool: {json}");
    check!(json["pool"]["workers"] == 3, "status pool workers: {json}");
    check!(
        !json.to_string().contains(PASSWORD),
        "status output leaks the password"
    );

    // A second start-node in the head's state dir exits peacefully, at once.
    let started = Instant::now();
    let second = tokio::process::Command::new(&exe)
        .env(ROLE, "cli")
        .args([
            "start-node",
            "--head",
            "--bind",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
        ])
        .arg("--state-dir")
        .arg(head.state_dir())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&second.stdout);
    check!(
        second.status.success(),
        "second start exited {:?}",
        second.status
    );
    check!(
        stdout.contains("already running"),
        "second start said: {stdout}"
    );
    check!(
        started.elapsed() < Duration::from_secs(10),
        "second start took {:?}",
        started.elapsed()
    );
    check!(
        pool.workers_count().await? == 3,
        "the second start disturbed the cluster"
    );
    pool.close().await?;
    Ok(())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dc-cluster-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
