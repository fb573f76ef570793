//! W6: one in-process node agent with 10, 100 and 1,000 simulated slots: throughput per slot
//! count, and the agent's memory per slot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dc_core::testing::support::rss_kib;
use dc_core::{BoxError, Broker};

use super::Sizes;
use super::agent::cpu_agent;
use super::report::Row;
use super::worker::{BenchJob, BenchWorker};
use super::workloads::wait_workers;
use crate::Pool;

/// Resident memory of this process, in bytes.
fn rss_bytes() -> Option<u64> {
    rss_kib(std::process::id()).map(|kib| kib * 1024)
}

/// W6: one in-process node agent with 10, 100 and 1,000 simulated slots. Runs before the other
/// workloads and baselines, 1,000 slots first, so that its memory figure is taken on a heap that
/// nothing else has grown (freed memory would be reused and hide the agent's). Returns the
/// rows, to be reported after the other workloads.
pub(super) async fn scale_workloads<F, Fut>(sizes: Sizes, broker: F) -> Result<Vec<Row>, BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Arc<dyn Broker>, BoxError>>,
{
    let mut measured = Vec::new();
    for slots in [1000usize, 100, 10] {
        let pool = Pool::<BenchWorker>::builder(())
            .broker_instance(broker().await?)
            .connect()
            .await?;
        let rss_before = rss_bytes();
        let agent = cpu_agent(broker().await?, slots, true)?;
        let result = async {
            wait_workers(&pool, slots, Duration::from_secs(120)).await?;
            pool.map((0..200).map(BenchJob::Echo)).await?;
            let rss_after = rss_bytes();
            let n = sizes.w6_jobs;
            let t = Instant::now();
            let out = pool.map((0..n).map(BenchJob::Echo)).await?;
            let secs = t.elapsed().as_secs_f64();
            if out.len() as u64 != n {
                return Err::<_, BoxError>("W6: missing results".into());
            }
            let per_slot = match (rss_before, rss_after) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / slots as f64),
                _ => None,
            };
            Ok((n as f64 / secs, per_slot))
        }
        .await;
        let _ = pool.close().await;
        agent.shutdown().await;
        let (rate, per_slot) = result?;
        measured.push((slots, rate, per_slot));
    }
    measured.reverse();
    let at_10 = measured.first().map(|m| m.1).unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for (slots, rate, per_slot) in measured {
        let mut row = Row::new("W6", format!("jobs_per_s_{slots}_slots"), rate).note(format!(
            "{} Echo jobs on simulated slots (no process)",
            sizes.w6_jobs
        ));
        if slots == 1000 {
            let ratio = rate / at_10;
            row = row
                .ratio(ratio)
                .target("ratio to 10 slots >= 0.8", ratio >= 0.8);
        } else if slots != 10 {
            row = row.ratio(rate / at_10);
        }
        rows.push(row);
        if slots == 1000
            && let Some(bytes) = per_slot
        {
            let kib = bytes / 1024.0;
            rows.push(
                Row::new("W6", "agent_kib_per_slot_1000_slots", kib)
                    .target("<= 64", kib <= 64.0)
                    .note("approximate: RSS delta of this process (agent + pool session) / 1,000 slots, idle after 200 jobs, measured first"),
            );
        }
    }
    Ok(rows)
}
