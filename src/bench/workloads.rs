//! W1–W4 on pools of 2 workers: throughput one job per dispatch and batched (W1), sequential
//! round trips (W2), 64 MiB in and out (W3), an update broadcast until every worker applied it
//! (W4).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use dc_core::BoxError;
use serde_bytes::ByteBuf;

use super::report::{Report, Row, percentile, sorted};
use super::server::{Server, redis_broker};
use super::worker::{BenchJob, BenchOutput, BenchWorker};
use super::{MIB64, Sizes, WORKERS};
use crate::Pool;

/// Where W1–W4 open their pools.
pub(super) enum PoolTarget<'a> {
    /// A `local()` pool with 2 CPU workers.
    Local,
    /// A pool on this Redis, served by the bench's own agent.
    Redis(&'a Server),
    /// A pool on RabbitMQ, served by the bench's own agent.
    Amqp(&'a super::amqp::AmqpTarget),
}

/// Open a pool with automatic batching on or off, wait for its 2 workers and warm it up
/// (workers built, connections open).
pub(super) async fn open_pool(
    target: &PoolTarget<'_>,
    batching: bool,
) -> Result<Pool<BenchWorker>, BoxError> {
    let builder = Pool::<BenchWorker>::builder(()).auto_batching(batching);
    let pool = match target {
        PoolTarget::Local => builder.local().cpu_workers(WORKERS).connect().await?,
        PoolTarget::Redis(server) => {
            builder
                .broker_instance(redis_broker(server).await?)
                .connect()
                .await?
        }
        PoolTarget::Amqp(target) => {
            builder
                .broker_instance(target.broker().await?)
                .connect()
                .await?
        }
    };
    wait_workers(&pool, WORKERS, Duration::from_secs(60)).await?;
    pool.map((0..200).map(BenchJob::Echo)).await?;
    Ok(pool)
}

pub(super) async fn wait_workers(
    pool: &Pool<BenchWorker>,
    n: usize,
    limit: Duration,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        let count = pool.workers_count().await?;
        if count >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {count} of {n} workers joined within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// W1: `n` Echo jobs through one `map`; jobs/s.
pub(super) async fn echo_rate(pool: &Pool<BenchWorker>, n: u64) -> Result<f64, BoxError> {
    let t = Instant::now();
    let out = pool.map((0..n).map(BenchJob::Echo)).await?;
    let secs = t.elapsed().as_secs_f64();
    let ok = u64::try_from(out.len()) == Ok(n)
        && out
            .iter()
            .enumerate()
            .all(|(i, o)| matches!(o, BenchOutput::Echo(v) if *v == i as u64));
    if !ok {
        return Err("W1: wrong echo results".into());
    }
    Ok(n as f64 / secs)
}

/// W1–W4 on pools of 2 workers: W1 one job per dispatch on a pool with automatic batching
/// off, then the rest on a default pool (batching on).
pub(super) async fn pool_workloads(
    report: &mut Report,
    sizes: Sizes,
    target: &PoolTarget<'_>,
) -> Result<(), BoxError> {
    let base = report.baselines.unwrap_or_default();
    let n = sizes.w1_jobs;

    // W1: throughput, one job per dispatch.
    let pool = open_pool(target, false).await?;
    let rate = echo_rate(&pool, n).await;
    let _ = pool.close().await;
    let rate = rate?;
    let ratio = rate / base.cycle_k1_per_s;
    report.push(
        Row::new("W1", "jobs_per_s", rate)
            .ratio(ratio)
            .target(">= 5000 and ratio >= 0.5", rate >= 5000.0 && ratio >= 0.5)
            .note(format!(
                "{n} Echo jobs, one job per dispatch (auto_batching off); ratio = value / cycle_k1_per_s"
            )),
    );

    let pool = open_pool(target, true).await?;
    let result = default_pool_workloads(report, sizes, &pool).await;
    let _ = pool.close().await;
    result
}

/// W1 batched and W2–W4 on a default pool.
pub(super) async fn default_pool_workloads(
    report: &mut Report,
    sizes: Sizes,
    pool: &Pool<BenchWorker>,
) -> Result<(), BoxError> {
    let base = report.baselines.unwrap_or_default();
    let n = sizes.w1_jobs;

    // W1 with automatic batching.
    let rate = echo_rate(pool, n).await?;
    report.push(
        Row::new("W1", "jobs_per_s_batched", rate)
            .ratio(rate / base.cycle_k1_per_s)
            .target(">= 30000", rate >= 30000.0)
            .note(format!(
                "{n} Echo jobs, automatic batching (the default); ratio = value / cycle_k1_per_s"
            )),
    );

    // W2: sequential round trips.
    let mut trips = Vec::with_capacity(sizes.w2_trips);
    for i in 0..sizes.w2_trips {
        let t = Instant::now();
        let out = pool.map([BenchJob::Echo(i as u64)]).await?;
        trips.push(t.elapsed().as_secs_f64() * 1e6);
        if !matches!(out.as_slice(), [BenchOutput::Echo(v)] if *v == i as u64) {
            return Err("W2: wrong echo result".into());
        }
    }
    let trips = sorted(trips);
    let p50 = percentile(&trips, 0.5);
    let p99 = percentile(&trips, 0.99);
    let ratio = p50 / base.ping_rtt_us;
    report.push(
        Row::new("W2", "p50_us", p50)
            .ratio(ratio)
            .target("ratio <= 6", ratio <= 6.0)
            .note(format!(
                "{} sequential single-job round trips; ratio = p50 / ping_rtt_us",
                sizes.w2_trips
            )),
    );
    report.push(Row::new("W2", "p99_us", p99));

    // W3: 64 MiB in, 64 MiB out.
    let data = ByteBuf::from(vec![0xA5u8; MIB64]);
    // A sliding window: `in_flight` callers, each sending its next job as soon as its last
    // result is back (several `map` calls may run at once on one pool).
    let in_flight = 2 * WORKERS;
    let t = Instant::now();
    let callers = (0..in_flight).map(|c| {
        let data = &data;
        async move {
            for _ in (c..sizes.w3_jobs).step_by(in_flight) {
                let out = pool.map([BenchJob::Bytes(data.clone())]).await?;
                if !matches!(out.as_slice(), [BenchOutput::Bytes(b)] if b.len() == MIB64) {
                    return Err::<(), BoxError>("W3: wrong result size".into());
                }
            }
            Ok(())
        }
    });
    futures::future::try_join_all(callers).await?;
    let secs = t.elapsed().as_secs_f64();
    drop(data);
    let mbps = (sizes.w3_jobs * 2 * MIB64) as f64 / 1e6 / secs;
    let ratio = mbps / base.setget_64mib_mb_per_s;
    report.push(
        Row::new("W3", "mb_per_s", mbps)
            .ratio(ratio)
            .target(">= 200 and ratio >= 0.4", mbps >= 200.0 && ratio >= 0.4)
            .note(format!(
                "{} jobs of 64 MiB in + 64 MiB out, {in_flight} in flight; ratio = value / setget_64mib_mb_per_s",
                sizes.w3_jobs
            )),
    );

    // W4: update broadcast until every worker has applied it.
    let workers = pool.workers_count().await?.max(1);
    let mut times = Vec::with_capacity(sizes.w4_tries);
    for seq in 1..=sizes.w4_tries as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        pool.update_workers(seq).await?;
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < workers {
            if Instant::now() > deadline {
                return Err(format!(
                    "W4: only {} of {workers} workers applied update {seq}",
                    seen.len()
                )
                .into());
            }
            for out in pool.map((0..workers).map(|_| BenchJob::Applied)).await? {
                if let BenchOutput::Applied { worker, updates } = out
                    && updates >= seq
                {
                    seen.insert(worker);
                }
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let p50 = percentile(&sorted(times), 0.5);
    report.push(
        Row::new("W4", "p50_ms", p50)
            .target("<= 5", p50 <= 5.0)
            .note(format!(
                "update_workers, then Applied jobs until each of {workers} workers reports it; {} tries",
                sizes.w4_tries
            )),
    );
    Ok(())
}
