//! `dc-cli bench`: the pool's speed measured against the broker's own limit.
//!
//! Every run first measures its baselines with the `redis` crate against the same server
//! (PING round trip, pipelined XADD, a bare one-job-per-take stream cycle, SET+GET of 64 MiB),
//! then runs the workloads W1–W6 on the built-in no-op worker kind [`BenchWorker`] and prints
//! each figure with its ratio to the matching baseline and the target it is held to.
//!
//! 1. W6 runs first, on a heap nothing has grown yet (its memory figure), and is reported last.
//! 2. The baselines are measured on the same server, a moment before the pool workloads.
//! 3. W1–W4 run on pools of 2 CPU workers served by an in-process node agent.
//! 4. W5 kills a node process mid-job (dedicated server only).
//! 5. With `--tls`, the baselines and W1–W4 run again on a second server whose port speaks TLS.
//!
//! - this file: the modes (`local`, a dedicated `redis`, an existing server by URL) and `run`;
//! - `worker`: the no-op worker kind and its jobs;
//! - `report`: rows, the table and the JSON lines;
//! - `server`: the Redis servers a run uses; `agent`: the in-process node agents;
//! - `baselines`: the raw-Redis baselines; `workloads`: W1–W4; `failover`: W5; `scale`: W6.

mod agent;
mod amqp;
mod baselines;
mod failover;
mod report;
mod scale;
mod server;
mod worker;
mod workloads;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use dc_core::testing::support::TempDir;
use dc_core::{BoxError, Broker, LocalBroker};

use agent::NodeRuntime;
use amqp::{AmqpTarget, measure_amqp_baselines, push_amqp_baselines};
use baselines::{connect, delete_prefix, measure_baselines};
use failover::{Failover, failover_workloads};
use report::{Report, Row, fmt_num, push_baselines};
use scale::scale_workloads;
use server::{Server, dedicated_redis, redis_broker};
use worker::unix_ms;
use workloads::{PoolTarget, pool_workloads};

pub(crate) use worker::BenchWorker;

/// How big each workload is.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    w1_jobs: u64,
    w2_trips: usize,
    w3_jobs: usize,
    w4_tries: usize,
    w6_jobs: u64,
    cycle_jobs: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                w1_jobs: 5_000,
                w2_trips: 200,
                w3_jobs: 4,
                w4_tries: 5,
                w6_jobs: 5_000,
                cycle_jobs: 5_000,
            }
        } else {
            Sizes {
                w1_jobs: 20_000,
                w2_trips: 1_000,
                w3_jobs: 16,
                w4_tries: 20,
                w6_jobs: 20_000,
                cycle_jobs: 20_000,
            }
        }
    }
}

const MIB64: usize = 64 << 20;
const WORKERS: usize = 2;

/// Run `dc-cli bench`.
pub(crate) async fn run(
    broker: &str,
    quick: bool,
    json: bool,
    tls: bool,
) -> Result<ExitCode, String> {
    let sizes = Sizes::new(quick);
    let mode = match broker {
        "local" | "redis" => broker.to_string(),
        url if url.starts_with("redis://") || url.starts_with("rediss://") => "url".to_string(),
        url if dc_broker_amqp::is_amqp_url(url) => "amqp".to_string(),
        other => {
            return Err(format!(
                "--broker {other:?}: expected local, redis, a redis:// URL or an amqp:// URL"
            ));
        }
    };
    if tls && mode != "redis" {
        return Err(
            "--tls runs with --broker redis (it starts a TLS server of its own); an existing \
             server is measured over TLS through its rediss:// URL"
                .into(),
        );
    }
    let mut report = Report {
        mode: mode.clone(),
        json,
        baselines: None,
        tls_baselines: None,
        rows: Vec::new(),
    };
    let started = Instant::now();
    let result = match mode.as_str() {
        "local" => run_local(&mut report, sizes).await,
        "redis" => run_dedicated(&mut report, sizes, tls).await,
        "amqp" => run_amqp(&mut report, sizes, broker).await,
        _ => run_url(&mut report, sizes, broker).await,
    };
    if !json {
        report.print_table();
        println!(
            "({} run, {:.1} s)",
            if quick { "quick" } else { "full" },
            started.elapsed().as_secs_f64()
        );
    }
    result.map_err(|e| format!("bench: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

async fn run_dedicated(report: &mut Report, sizes: Sizes, tls: bool) -> Result<(), BoxError> {
    let dir = TempDir::new("bench-redis")?;
    let (mut redis, server, port, password) = dedicated_redis(&dir, false).await?;
    let result = run_redis_workloads(
        report,
        sizes,
        &server,
        Some(Failover {
            port,
            password: &password,
        }),
    )
    .await;
    let _ = redis.terminate().await;
    result?;
    if tls {
        let dir = TempDir::new("bench-redis-tls")?;
        let (mut redis, server, _, _) = dedicated_redis(&dir, true).await?;
        let result = tls_workloads(report, sizes, &server).await;
        let _ = redis.terminate().await;
        result?;
    }
    Ok(())
}

/// `--tls`: the baselines and W1–W4 again, on a second dedicated server whose port speaks TLS
/// (as a head's does by default). Their rows carry `_tls` metrics, each ratio to the TLS
/// server's own baseline, and a note with the figure's ratio to the plain run's.
async fn tls_workloads(report: &mut Report, sizes: Sizes, server: &Server) -> Result<(), BoxError> {
    let baselines =
        measure_baselines(server, &format!("{}:bench-baseline", server.prefix), sizes).await?;
    report.tls_baselines = Some(baselines);
    let mut runs = Report {
        mode: report.mode.clone(),
        json: false,
        baselines: Some(baselines),
        tls_baselines: None,
        rows: Vec::new(),
    };
    push_baselines(&mut runs, baselines, "the TLS server, redis-rs over rustls");
    let agent = NodeRuntime::start(server).await?;
    let result = pool_workloads(&mut runs, sizes, &PoolTarget::Redis(server)).await;
    agent.shutdown().await;
    result?;
    for mut row in runs.rows {
        let plain_value = report
            .rows
            .iter()
            .find(|r| !r.tls && r.workload == row.workload && r.metric == row.metric)
            .and_then(|r| r.value);
        if let (Some(v), Some(p)) = (row.value, plain_value) {
            let vs = format!("over TLS; plain {} (TLS/plain {:.2})", fmt_num(p), v / p);
            row.note = Some(match row.note {
                Some(note) => format!("{note}; {vs}"),
                None => vs,
            });
        }
        row.metric.push_str("_tls");
        row.tls = true;
        report.push(row);
    }
    Ok(())
}

async fn run_url(report: &mut Report, sizes: Sizes, url: &str) -> Result<(), BoxError> {
    // Under `dc:`, where a head's node user may write.
    let server = Server {
        url: url.to_string(),
        prefix: format!("dc:bench-{}-{}", std::process::id(), unix_ms()),
        tls: None,
    };
    let result = run_redis_workloads(report, sizes, &server, None).await;
    // Remove what the run left under its prefix.
    if let Ok(mut conn) = connect(&server).await {
        let _ = delete_prefix(&mut conn, &server.prefix).await;
    }
    result
}

async fn run_amqp(report: &mut Report, sizes: Sizes, url: &str) -> Result<(), BoxError> {
    let target = AmqpTarget::new(url);
    let result = async {
        match measure_amqp_baselines(url, sizes).await {
            Ok(b) => push_amqp_baselines(report, b),
            Err(e) => report.push(Row::skipped(
                "baseline",
                "none",
                format!("no baselines: bare messages failed ({e})"),
            )),
        }
        let agent = NodeRuntime::start_amqp(&target).await?;
        let result = pool_workloads(report, sizes, &PoolTarget::Amqp(&target)).await;
        agent.shutdown().await;
        result?;
        report.push(Row::skipped(
            "W5",
            "failover_s",
            "not run on RabbitMQ (the AMQP cluster tests time a killed node's failover)",
        ));
        report.push(Row::skipped(
            "W6",
            "jobs_per_s",
            "not run on RabbitMQ: simulated slots measure the agent and the Redis broker",
        ));
        Ok::<(), BoxError>(())
    }
    .await;
    target.clean_up().await;
    result
}

async fn run_local(report: &mut Report, sizes: Sizes) -> Result<(), BoxError> {
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
    let scale = scale_workloads(sizes, || async { Ok::<_, BoxError>(broker.clone()) }).await?;
    // Baselines from a throwaway dedicated redis-server: the local pool uses no Redis, but
    // its figures still read against the same machine's broker limits.
    let dir = TempDir::new("bench-redis")?;
    match dedicated_redis(&dir, false).await {
        Ok((mut redis, server, _, _)) => {
            let baselines = measure_baselines(&server, "dc:bench-baseline", sizes).await;
            let _ = redis.terminate().await;
            push_baselines(report, baselines?, "throwaway dedicated redis-server");
        }
        Err(e) => report.push(Row::skipped(
            "baseline",
            "none",
            format!("no baselines: cannot start a redis-server ({e})"),
        )),
    }
    pool_workloads(report, sizes, &PoolTarget::Local).await?;
    report.push(Row::skipped(
        "W5",
        "failover_s",
        "not run in local mode: needs node processes on a Redis (use --broker redis)",
    ));
    for row in scale {
        report.push(row);
    }
    Ok(())
}

async fn run_redis_workloads(
    report: &mut Report,
    sizes: Sizes,
    server: &Server,
    failover: Option<Failover<'_>>,
) -> Result<(), BoxError> {
    // W6 first, on a heap nothing has grown yet (its memory figure); reported last.
    let scale = scale_workloads(sizes, || redis_broker(server)).await?;
    let baselines =
        measure_baselines(server, &format!("{}:bench-baseline", server.prefix), sizes).await?;
    push_baselines(report, baselines, "same server, redis-rs");

    // W1–W4: one node agent (in this process) with 2 CPU worker processes.
    let agent = NodeRuntime::start(server).await?;
    let target = PoolTarget::Redis(server);
    let result = pool_workloads(report, sizes, &target).await;
    agent.shutdown().await;
    result?;

    match failover {
        Some(f) => failover_workloads(report, f).await?,
        None => report.push(
            Row::skipped("W5", "failover_s", "not run against an existing Redis: node processes use the default key prefix (use --broker redis)"),
        ),
    }
    for row in scale {
        report.push(row);
    }
    Ok(())
}
