//! The broker's own limits, measured with the `redis` crate on the server the workloads use:
//! PING round trip, pipelined XADD, the bare stream job cycle, SET+GET of 64 MiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dc_broker_redis::connect_raw;
use dc_core::BoxError;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;

use super::report::{percentile, sorted};
use super::server::Server;
use super::{MIB64, Sizes};

/// The broker's own limits, measured a moment before the workloads.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Baselines {
    pub(super) ping_rtt_us: f64,
    pub(super) xadd_pipelined_per_s: f64,
    pub(super) cycle_k1_per_s: f64,
    pub(super) setget_64mib_mb_per_s: f64,
}

/// A connection with a response timeout long enough for blocking reads and 64 MiB values.
pub(super) async fn connect(server: &Server) -> Result<MultiplexedConnection, BoxError> {
    Ok(connect_raw(&server.url, &server.options(Duration::from_secs(120))).await?)
}

pub(super) async fn measure_baselines(
    server: &Server,
    prefix: &str,
    sizes: Sizes,
) -> Result<Baselines, BoxError> {
    let mut conn = connect(server).await?;

    // PING round trip.
    for _ in 0..50 {
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
    }
    let mut rtts = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let ping_rtt_us = percentile(&sorted(rtts), 0.5);

    // Pipelined XADD.
    let key = format!("{prefix}:xadd");
    let t = Instant::now();
    for _ in 0..50 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("XADD").arg(&key).arg("*").arg("j").arg(i).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    let xadd_pipelined_per_s = 50_000.0 / t.elapsed().as_secs_f64();
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await?;

    let cycle_k1_per_s = stream_cycle(server, prefix, sizes.cycle_jobs).await?;

    // SET then GET of 64 MiB.
    let key = format!("{prefix}:blob");
    let value = vec![0x5Au8; MIB64];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async::<()>(&mut conn)
            .await?;
        let back: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let secs = t.elapsed().as_secs_f64();
        if back.len() != MIB64 {
            return Err("baseline: GET returned the wrong size".into());
        }
        rates.push((2 * MIB64) as f64 / 1e6 / secs);
    }
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await?;
    let setget_64mib_mb_per_s = percentile(&sorted(rates), 0.5);
    Ok(Baselines {
        ping_rtt_us,
        xadd_pipelined_per_s,
        cycle_k1_per_s,
        setget_64mib_mb_per_s,
    })
}

/// The bare stream job cycle: the producer XADDs `n` jobs; 2 consumers, each on its own
/// connection, XREADGROUP COUNT 1 BLOCK, then XADD a result and XACK (one pipeline); the
/// producer reads the `n` results. Jobs per second.
pub(super) async fn stream_cycle(server: &Server, prefix: &str, n: usize) -> Result<f64, BoxError> {
    let jobs = format!("{prefix}:cycle-jobs");
    let results = format!("{prefix}:cycle-results");
    let mut conn = connect(server).await?;
    redis::cmd("DEL")
        .arg(&jobs)
        .arg(&results)
        .query_async::<()>(&mut conn)
        .await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&jobs)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for c in 0..2 {
        let mut cconn = connect(server).await?;
        let (jobs, results, stop, taken) =
            (jobs.clone(), results.clone(), stop.clone(), taken.clone());
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{c}"))
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&jobs)
                    .arg(">")
                    .query_async(&mut cconn)
                    .await?;
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in key.ids {
                        let mut pipe = redis::pipe();
                        pipe.cmd("XADD")
                            .arg(&results)
                            .arg("*")
                            .arg("r")
                            .arg(&entry.id)
                            .ignore()
                            .cmd("XACK")
                            .arg(&jobs)
                            .arg("g")
                            .arg(&entry.id)
                            .ignore();
                        pipe.query_async::<()>(&mut cconn).await?;
                        taken.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<(), redis::RedisError>(())
        }));
    }
    let t = Instant::now();
    let outcome = async {
        for start in (0..n).step_by(1000) {
            let mut pipe = redis::pipe();
            for i in start..(start + 1000).min(n) {
                pipe.cmd("XADD")
                    .arg(&jobs)
                    .arg("*")
                    .arg("j")
                    .arg(i)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        let mut seen = 0;
        let mut last = "0".to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < n {
            if Instant::now() > deadline {
                return Err::<f64, BoxError>("baseline cycle: results missing after 120 s".into());
            }
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&results)
                .arg(&last)
                .query_async(&mut conn)
                .await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    seen += 1;
                    last = entry.id;
                }
            }
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        if let Ok(Err(e)) = consumer.await {
            return Err(format!("baseline cycle consumer: {e}").into());
        }
    }
    let _ = redis::cmd("DEL")
        .arg(&jobs)
        .arg(&results)
        .query_async::<()>(&mut conn)
        .await;
    outcome
}

pub(super) async fn delete_prefix(
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> redis::RedisResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
