//! Work spreads over idle workers: automatic batching never keeps a job waiting on one worker
//! while another worker of the pool sits idle, whatever kind of job ran before (tiny jobs make
//! a node take jobs ahead; the longer jobs that follow must not stay behind).
//!
//! Every job reports when its run began and ended (one machine, one clock). The check reads
//! those records: whenever a worker sat idle for longer than a slack (a broker round trip plus
//! scheduling on a busy machine), no job may still have been waiting to start. In a stream
//! that mixes tiny and long jobs with no pause, a job may also wait behind the one job it was
//! sent along with (its worker had measured tiny jobs just before): the mixed rounds allow that
//! one job and no more.
//!
//! Custom harness: this executable is also the node binary (role `cli`) and the worker program.

mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{pool, start_head, start_worker_node, wait_workers};
use common::{Probe, ProbeInit, ProbeJob, ProbeOut, TestResult, eventually, unix_us};
use distributed_computing::Pool;

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(300);
        two_nodes_spread_medium_long_and_mixed_jobs_after_tiny_ones,
        local_pool_of_two_spreads_medium_and_mixed_jobs_after_tiny_ones,
        node_of_four_fed_one_job_at_a_time_never_queues_one_behind_another,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

const MEDIUM_MS: u64 = 200;
const LONG_MS: u64 = 2000;
/// How long a worker may sit idle while a job waits: a round trip and a busy machine's
/// scheduling, far below a medium job.
const SLACK: Duration = Duration::from_millis(100);
/// The same for rounds of long jobs (their processes start and stop sleeping less promptly on
/// a loaded machine, and a wait behind one of them is 2 s).
const LONG_SLACK: Duration = Duration::from_millis(500);

/// One job's run, as its worker recorded it.
#[derive(Debug, Clone)]
struct Run {
    index: usize,
    /// Whether it sleeps `MEDIUM_MS` or longer.
    long: bool,
    worker: String,
    start: u64,
    end: u64,
}

fn runs(outs: &[ProbeOut]) -> Vec<Run> {
    outs.iter()
        .enumerate()
        .map(|(index, o)| Run {
            index,
            long: o.ended_us.saturating_sub(o.started_us) >= MEDIUM_MS * 1000,
            worker: o.worker_id.clone(),
            start: o.started_us,
            end: o.ended_us,
        })
        .collect()
}

/// Whether a job may wait in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allow {
    /// Never while a worker is idle.
    None,
    /// Behind the one job of its worker that was already running (sent along with it).
    OneBehind,
}

/// The longest a worker sat idle while a job still waited to start, in a round: `idle`, and
/// for a job sent along behind another (allowed in mixed rounds), `behind`.
#[derive(Debug, Default, Clone, Copy)]
struct Waits {
    idle: Duration,
    behind: Duration,
}

/// No job of `runs` (submitted together) that takes `MEDIUM_MS` or longer waited to start
/// while one of `workers` sat idle for longer than `slack`, except as `allow` says. The round
/// begins when its first job starts (the submission itself takes a moment). Tiny jobs are not
/// judged: on a starved machine they wait on the scheduler, not on batching, and a wait
/// behind them is short anyway.
fn check_spread(
    label: &str,
    runs: &[Run],
    workers: &[String],
    slack: Duration,
    allow: Allow,
) -> Result<Waits, libtest_mimic::Failed> {
    let mut waits = Waits::default();
    let slack = u64::try_from(slack.as_micros()).unwrap_or(u64::MAX);
    let first = runs.iter().map(|r| r.start).min().unwrap_or(0);
    let mut by_worker: Vec<Vec<&Run>> = workers
        .iter()
        .map(|w| runs.iter().filter(|r| &r.worker == w).collect())
        .collect();
    for (w, list) in workers.iter().zip(&mut by_worker) {
        list.sort_by_key(|r| r.start);
        // Idle stretches: from the submission to the first run, between runs, after the last.
        let mut idle_from = first;
        let mut gaps = Vec::new();
        for r in list.iter() {
            gaps.push((idle_from, r.start));
            idle_from = idle_from.max(r.end);
        }
        gaps.push((idle_from, u64::MAX));
        for (a, b) in gaps {
            for j in runs.iter().filter(|j| j.start > a && j.long) {
                let waited = Duration::from_micros(j.start.min(b) - a);
                if allow == Allow::OneBehind && sent_behind(runs, j, a + slack, slack) {
                    waits.behind = waits.behind.max(waited);
                    continue;
                }
                waits.idle = waits.idle.max(waited);
                if j.start <= a + slack || b <= a + slack {
                    continue;
                }
                let ms = |t: u64| t.saturating_sub(first) as f64 / 1e3;
                let mut timeline: Vec<_> = runs
                    .iter()
                    .map(|r| (r.worker.as_str(), r.index, ms(r.start), ms(r.end)))
                    .collect();
                timeline.sort_by(|x, y| x.2.total_cmp(&y.2));
                return Err(format!(
                    "{label}: worker {w} sat idle from {:.1} ms to {} while job {} waited until \
                     {:.1} ms (on {}); runs (worker, job, start ms, end ms): {timeline:?}",
                    ms(a),
                    if b == u64::MAX {
                        "the end".to_string()
                    } else {
                        format!("{:.1} ms", ms(b))
                    },
                    j.index,
                    ms(j.start),
                    j.worker,
                )
                .into());
            }
        }
    }
    Ok(waits)
}

/// Whether `j` started right after the run before it on its worker, and that run had started
/// by `by`: `j` waited behind that one job only.
fn sent_behind(runs: &[Run], j: &Run, by: u64, slack: u64) -> bool {
    runs.iter()
        .filter(|k| k.worker == j.worker && k.end <= j.start)
        .max_by_key(|k| k.end)
        .is_some_and(|k| k.start <= by && j.start.saturating_sub(k.end) <= slack)
}

/// Run `jobs` through one `map`; check values and order, then the spread (with `slack` and
/// `allow`, unless `None`: a round of tiny jobs only sets the workers' pace). Returns the
/// wall time and the waits seen.
async fn round(
    pool: &Pool<Probe>,
    label: &str,
    jobs: Vec<ProbeJob>,
    workers: &[String],
    spread: Option<(Duration, Allow)>,
) -> Result<(Duration, Waits), libtest_mimic::Failed> {
    let n = jobs.len();
    let started = Instant::now();
    let outs = pool.map(jobs).await?;
    let wall = started.elapsed();
    let values: Vec<i64> = outs.iter().map(|o| o.value).collect();
    check!(
        values == (0..n as i64).collect::<Vec<_>>(),
        "{label}: values out of order or lost: {values:?}"
    );
    let mut waits = Waits::default();
    if let Some((slack, allow)) = spread {
        waits = check_spread(label, &runs(&outs), workers, slack, allow)?;
    }
    Ok((wall, waits))
}

fn tiny(n: usize) -> Vec<ProbeJob> {
    (0..n as i64).map(ProbeJob::Echo).collect()
}

fn sleeping(n: usize, ms: u64) -> Vec<ProbeJob> {
    (0..n as i64).map(|i| ProbeJob::SleepEcho(ms, i)).collect()
}

/// Tiny jobs with medium and long ones among them, in one stream.
fn mixed() -> Vec<ProbeJob> {
    (0..80i64)
        .map(|i| match i {
            25 | 60 => ProbeJob::SleepEcho(1000, i),
            i if i % 8 == 3 => ProbeJob::SleepEcho(MEDIUM_MS, i),
            i => ProbeJob::Echo(i),
        })
        .collect()
}

/// Long runs of tiny jobs, each followed by a run of medium ones, in one stream: the workers
/// are in full tiny-job stride (jobs taken ahead, sent along behind the running one) when the
/// medium jobs come.
fn bursts(workers: usize) -> Vec<ProbeJob> {
    (0..3 * (400 + 3 * workers as i64))
        .map(|i| {
            if i % (400 + 3 * workers as i64) >= 400 {
                ProbeJob::SleepEcho(MEDIUM_MS, i)
            } else {
                ProbeJob::Echo(i)
            }
        })
        .collect()
}

/// The worker ids of a pool with `n` workers, from a warm-up that keeps each busy a while.
async fn worker_ids(pool: &Pool<Probe>, n: usize) -> Result<Vec<String>, libtest_mimic::Failed> {
    let outs = pool.map(sleeping(4 * n, 100)).await?;
    let mut ids: Vec<String> = outs.iter().map(|o| o.worker_id.clone()).collect();
    ids.sort();
    ids.dedup();
    check!(
        ids.len() == n,
        "the warm-up ran on workers {ids:?}, expected {n}"
    );
    Ok(ids)
}

/// Rounds of tiny, medium, long and mixed jobs on `pool`, whose workers are `workers`.
async fn rounds(
    pool: &Pool<Probe>,
    workers: &[String],
    with_long: bool,
    rounds: usize,
) -> TestResult {
    let n = workers.len();
    for r in 0..rounds {
        round(pool, &format!("round {r}, tiny"), tiny(2000), workers, None).await?;
        let medium = round(
            pool,
            &format!("round {r}, medium after tiny"),
            sleeping(6 * n, MEDIUM_MS),
            workers,
            Some((SLACK, Allow::None)),
        )
        .await?;
        let mut long = None;
        if with_long {
            long = Some(
                round(
                    pool,
                    &format!("round {r}, long after medium"),
                    sleeping(2 * n, LONG_MS),
                    workers,
                    Some((LONG_SLACK, Allow::None)),
                )
                .await?,
            );
            round(
                pool,
                &format!("round {r}, tiny after long"),
                tiny(1000),
                workers,
                None,
            )
            .await?;
        }
        let mix = round(
            pool,
            &format!("round {r}, mixed"),
            mixed(),
            workers,
            Some((SLACK, Allow::OneBehind)),
        )
        .await?;
        let burst = round(
            pool,
            &format!("round {r}, bursts"),
            bursts(n),
            workers,
            Some((SLACK, Allow::OneBehind)),
        )
        .await?;
        eprintln!(
            "round {r}: medium {medium:?} (ideal {:?}), long {long:?} (ideal {:?}), mixed {mix:?} \
             (ideal {:?}), bursts {burst:?} (ideal {:?})",
            Duration::from_millis(6 * MEDIUM_MS),
            Duration::from_millis(2 * LONG_MS),
            Duration::from_millis(2000),
            Duration::from_millis(9 * MEDIUM_MS),
        );
    }
    Ok(())
}

async fn two_nodes_spread_medium_long_and_mixed_jobs_after_tiny_ones() -> TestResult {
    let (_head, port) = start_head(1).await?;
    let _node = start_worker_node(port, 1, &[]).await?;
    let pool = pool(port, "spread").await?;
    check!(
        wait_workers(&pool, 2, 2).await,
        "expected 2 workers on 2 nodes"
    );
    let workers = worker_ids(&pool, 2).await?;
    rounds(&pool, &workers, true, 3).await?;
    pool.close().await?;
    Ok(())
}

async fn local_pool_of_two_spreads_medium_and_mixed_jobs_after_tiny_ones() -> TestResult {
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("local-spread"))
        .local()
        .cpu_workers(2)
        .connect()
        .await?;
    let up = eventually(Duration::from_secs(30), || async {
        pool.workers_count().await.unwrap_or(0) == 2
    })
    .await;
    check!(up, "the local pool's 2 workers never became ready");
    let workers = worker_ids(&pool, 2).await?;
    rounds(&pool, &workers, false, 3).await?;
    pool.close().await?;
    Ok(())
}

/// Four callers each keep one job in flight on a node of four workers: no job ever waits, in a
/// phase of tiny jobs, then medium ones, then long ones, then tiny ones again.
async fn node_of_four_fed_one_job_at_a_time_never_queues_one_behind_another() -> TestResult {
    let (_head, port) = start_head(4).await?;
    let pool = Arc::new(pool(port, "fed").await?);
    check!(wait_workers(&pool, 4, 1).await, "expected 4 workers");
    let phases: [(&str, usize, Option<u64>, Duration); 4] = [
        ("tiny", 300, None, SLACK),
        ("medium", 5, Some(MEDIUM_MS), SLACK),
        ("long", 2, Some(LONG_MS), LONG_SLACK),
        ("tiny again", 300, None, SLACK),
    ];
    for (phase, per_caller, ms, slack) in phases {
        let callers: Vec<_> = (0..4i64)
            .map(|caller| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut waits = Vec::new();
                    for i in 0..per_caller as i64 {
                        let value = caller * 1000 + i;
                        let job = match ms {
                            Some(ms) => ProbeJob::SleepEcho(ms, value),
                            None => ProbeJob::Echo(value),
                        };
                        let submitted = unix_us();
                        let out = pool.map(vec![job]).await?;
                        let [out] = <[ProbeOut; 1]>::try_from(out)
                            .map_err(|o| format!("one job gave {} results", o.len()))?;
                        if out.value != value {
                            return Err(format!("job {value} returned {}", out.value).into());
                        }
                        waits.push((
                            value,
                            out.started_us.saturating_sub(submitted),
                            out.worker_id,
                        ));
                    }
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(waits)
                })
            })
            .collect();
        let mut waits = Vec::new();
        for caller in callers {
            waits.extend(
                caller
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?,
            );
        }
        check!(
            waits.len() == 4 * per_caller,
            "{phase}: {} of {} jobs came back",
            waits.len(),
            4 * per_caller
        );
        let worst = waits.iter().max_by_key(|(_, wait, _)| *wait).cloned();
        if let Some((value, wait, worker)) = &worst {
            check!(
                u128::from(*wait) <= slack.as_micros(),
                "{phase}: job {value} started {:.1} ms after it was submitted (on {worker}), with \
                 at most 4 jobs in flight on 4 workers",
                *wait as f64 / 1e3
            );
        }
        eprintln!(
            "{phase}: worst wait to start {:?}",
            worst.map(|(_, w, _)| Duration::from_micros(w))
        );
    }
    Ok(())
}
