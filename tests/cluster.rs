//! Across machines on Redis, with real processes: a head node (its own password-protected
//! redis-server on a free loopback port) and worker nodes started through the CLI, pools
//! opened over the network. The whole flow end to end, and its edges.
//!
//! Custom harness: this executable is also the node binary (role `cli`, via `main_with_args`)
//! and the worker program (`__dc-worker`, via `serve_if_worker`).

mod common;

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::cluster::{
    PASSWORD, ROLE, free_port, node_of, pool, pool_with_lease, start_head, start_worker_node,
    wait_workers,
};
use common::{Probe, ProbeInit, ProbeJob, TestResult, Unregistered, eventually};
use distributed_computing::{Pool, PoolError};
use futures::StreamExt;

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
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
        tiny_jobs_in_batches_each_once_in_order_and_only_a_poison_job_is_charged,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// A node process started through the CLI; killed (group and all) when dropped.
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
        .known_heads(common::cluster::known_heads())
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
        .known_heads(common::cluster::known_heads())
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
        .known_heads(common::cluster::known_heads())
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
    let data: Vec<u8> = (0..size)
        .map(|i: usize| (i % 251).to_le_bytes()[0])
        .collect();
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
    let json = common::cluster::status_json(port).await?;
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

/// Automatic batching at work: thousands of tiny jobs (taken several per round trip, sent to
/// workers one behind the other) come back each once and in order; a job that kills its worker
/// is charged, while the job sent to the worker behind it runs again uncharged (with one
/// attempt allowed, charging it would fail it); jobs submitted after an update run on workers
/// that applied it.
async fn tiny_jobs_in_batches_each_once_in_order_and_only_a_poison_job_is_charged() -> TestResult {
    let (_head, port) = start_head(2).await?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("tiny"))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .known_heads(common::cluster::known_heads())
        .lease(Duration::from_secs(3))
        .max_attempts(1)
        .connect()
        .await?;
    check!(wait_workers(&pool, 2, 1).await, "expected 2 workers");
    common::only_poison_jobs_fail(&pool, 4000, &[1500, 2600, 3700]).await?;
    pool.close().await?;

    // Ordered results, and an update between two batches of tiny jobs.
    let pool = pool_with_lease(port, "tiny", Some(Duration::from_secs(3))).await?;
    check!(wait_workers(&pool, 2, 1).await, "expected 2 workers");
    let before = pool.map((0..3000).map(ProbeJob::Echo)).await?;
    check!(
        before.iter().map(|o| o.value).eq(0..3000),
        "map lost the order"
    );
    pool.update_workers(7).await?;
    let after = pool.map((0..3000).map(ProbeJob::Echo)).await?;
    check!(
        after.iter().map(|o| o.value).eq(0..3000),
        "map lost the order"
    );
    let stale: Vec<&common::ProbeOut> = after.iter().filter(|o| o.updates != [7]).collect();
    check!(
        stale.is_empty(),
        "{} jobs submitted after the update ran without it, e.g. {:?}",
        stale.len(),
        stale.first()
    );
    pool.close().await?;
    Ok(())
}
