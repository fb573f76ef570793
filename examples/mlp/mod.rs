//! The worker and the sweep shared by the examples: `quickstart` (local pool), `sweep_node`
//! (a node binary serving this worker) and `sweep_client` (a sweep on a head node).
//!
//! The worker builds a synthetic regression data set once per worker process (`new`), trains
//! and scores a small MLP per hyper-parameter set (`run`), and keeps the best score broadcast
//! by the pool owner (`handle_update`) to prune hopeless trials early.
#![allow(
    clippy::cast_possible_truncation,
    reason = "float-to-count conversions of small, checked values; `as` saturates"
)]
#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use distributed_computing::{BoxError, Pool, Worker, WorkerContext};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Input features of the synthetic data set (the target uses five; three are distractors).
pub(crate) const FEATURES: usize = 8;
/// Mini-batch size for SGD.
pub(crate) const BATCH: usize = 32;
/// A trial is pruned when, after this fraction of its epochs, its validation RMSE exceeds the
/// shared best by this factor.
pub(crate) const PRUNE_AFTER: f64 = 1.0 / 3.0;
pub(crate) const PRUNE_RATIO: f64 = 1.5;

// ---------------------------------------------------------------------------------------------
// Messages between the pool owner and the workers (all cross process boundaries as CBOR).
// ---------------------------------------------------------------------------------------------

/// Init data: how to build the data set. Every worker builds the same one from the same seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DatasetSpec {
    pub(crate) samples: usize,
    pub(crate) noise: f64,
    pub(crate) seed: u64,
    pub(crate) validation_fraction: f64,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            samples: 8_000,
            noise: 0.1,
            seed: 42,
            validation_fraction: 0.25,
        }
    }
}

/// One job: a hyper-parameter set for the MLP.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Params {
    hidden: usize,
    learning_rate: f64,
    weight_decay: f64,
    epochs: u32,
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Status {
    Completed,
    /// Stopped early: clearly worse than the shared best.
    Pruned,
    /// The loss became non-finite (learning rate too high).
    Diverged,
}

/// One job's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Trial {
    params: Params,
    val_rmse: f64,
    val_r2: f64,
    epochs_run: u32,
    status: Status,
    /// The shared best this worker knew when the trial started (from `handle_update`).
    shared_best_seen: Option<f64>,
    baseline_rmse: f64,
    worker: String,
    train_ms: f64,
}

/// The update the pool owner broadcasts whenever a trial improves on the best so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BestSoFar {
    val_rmse: f64,
    params: Params,
}

// ---------------------------------------------------------------------------------------------
// The worker.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct MlpSweep {
    worker_id: String,
    train: Split,
    val: Split,
    baseline_rmse: f64,
    /// The shared cache: best validation result any worker reported so far.
    best: Option<BestSoFar>,
}

impl Worker for MlpSweep {
    const KIND: &'static str = "quickstart-mlp-sweep";
    type Init = DatasetSpec;
    type Job = Params;
    type Output = Trial;
    type Update = BestSoFar;

    fn new(spec: DatasetSpec, ctx: &WorkerContext) -> Result<Self, BoxError> {
        let started = Instant::now();
        if spec.samples < 100 || !(0.05..=0.5).contains(&spec.validation_fraction) {
            return Err(format!("data set spec out of range: {spec:?}").into());
        }
        let data = generate(&spec);
        let n_val = (spec.samples as f64 * spec.validation_fraction).round() as usize;
        let (mut train, mut val) = data.split_at(spec.samples - n_val);
        let (mean, std) = train.feature_stats();
        train.standardize(&mean, &std);
        val.standardize(&mean, &std);
        let baseline = fit_ridge(&train, 1e-3 * train.len() as f64)?;
        let baseline_rmse = evaluate(&val, |x| baseline.predict(x)).0;
        println!(
            "prepared {} train / {} validation samples, linear baseline RMSE {baseline_rmse:.4}, in {:.0} ms",
            train.len(),
            val.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(MlpSweep {
            worker_id: ctx.worker_id().to_string(),
            train,
            val,
            baseline_rmse,
            best: None,
        })
    }

    fn run(&mut self, params: Params) -> Result<Trial, BoxError> {
        if params.hidden == 0
            || params.epochs == 0
            || !params.learning_rate.is_finite()
            || params.learning_rate <= 0.0
        {
            return Err(format!("invalid hyper-parameters: {params:?}").into());
        }
        let started = Instant::now();
        let shared_best = self.best.as_ref().map(|b| b.val_rmse);
        let prune_epoch = ((f64::from(params.epochs) * PRUNE_AFTER).ceil() as u32).max(1);
        let mut mlp = Mlp::new(params.hidden, FEATURES, 0x5EED ^ params.hidden as u64);
        let mut rng = SplitMix64::new(0xC0FFEE);
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let mut status = Status::Completed;
        let mut epochs_run = 0;
        for epoch in 1..=params.epochs {
            rng.shuffle(&mut order);
            mlp.train_epoch(&self.train, &order, &params);
            epochs_run = epoch;
            if !mlp.is_finite() {
                status = Status::Diverged;
                break;
            }
            if epoch == prune_epoch && epoch < params.epochs {
                if let Some(best) = shared_best {
                    let (rmse, _) = evaluate(&self.val, |x| mlp.predict(x));
                    if rmse > best * PRUNE_RATIO {
                        status = Status::Pruned;
                        break;
                    }
                }
            }
        }
        let (val_rmse, val_r2) = if status == Status::Diverged {
            (f64::INFINITY, f64::NEG_INFINITY)
        } else {
            evaluate(&self.val, |x| mlp.predict(x))
        };
        Ok(Trial {
            params,
            val_rmse,
            val_r2,
            epochs_run,
            status,
            shared_best_seen: shared_best,
            baseline_rmse: self.baseline_rmse,
            worker: self.worker_id.clone(),
            train_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    fn handle_update(&mut self, update: BestSoFar) -> Result<(), BoxError> {
        // Updates are applied in broadcast order, but keep the minimum anyway: cheap and robust.
        if self
            .best
            .as_ref()
            .is_none_or(|b| update.val_rmse < b.val_rmse)
        {
            self.best = Some(update);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Data: a deterministic PRNG, the synthetic data set, standardization.
// ---------------------------------------------------------------------------------------------

/// splitmix64: tiny, fast, and good enough for synthetic data and shuffling.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln stays finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Samples in row-major order: `x` is `len() × FEATURES`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Split {
    x: Vec<f64>,
    y: Vec<f64>,
}

impl Split {
    fn len(&self) -> usize {
        self.y.len()
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.x[i * FEATURES..(i + 1) * FEATURES]
    }

    fn split_at(mut self, n: usize) -> (Split, Split) {
        let x = self.x.split_off(n * FEATURES);
        let y = self.y.split_off(n);
        (self, Split { x, y })
    }

    fn feature_stats(&self) -> ([f64; FEATURES], [f64; FEATURES]) {
        let n = self.len() as f64;
        let mut mean = [0.0; FEATURES];
        let mut var = [0.0; FEATURES];
        for i in 0..self.len() {
            for (m, v) in mean.iter_mut().zip(self.row(i)) {
                *m += v / n;
            }
        }
        for i in 0..self.len() {
            for ((s, v), m) in var.iter_mut().zip(self.row(i)).zip(&mean) {
                *s += (v - m) * (v - m) / n;
            }
        }
        (mean, var.map(|v| v.sqrt().max(1e-12)))
    }

    fn standardize(&mut self, mean: &[f64; FEATURES], std: &[f64; FEATURES]) {
        for row in self.x.chunks_exact_mut(FEATURES) {
            for ((v, m), s) in row.iter_mut().zip(mean).zip(std) {
                *v = (*v - m) / s;
            }
        }
    }
}

/// A nonlinear target on raw features of different scales, plus noise and distractors.
pub(crate) fn generate(spec: &DatasetSpec) -> Split {
    let mut rng = SplitMix64::new(spec.seed);
    let mut data = Split {
        x: Vec::with_capacity(spec.samples * FEATURES),
        y: Vec::with_capacity(spec.samples),
    };
    for _ in 0..spec.samples {
        let mut f = [0.0; FEATURES];
        for (j, v) in f.iter_mut().enumerate() {
            // Different scales and offsets, so standardization matters.
            *v = 10.0 * j as f64 + (1.0 + j as f64) * rng.normal();
        }
        f[6] = 0.7 * f[0] + 0.3 * rng.normal(); // correlated distractor
        let z: Vec<f64> = (0..5)
            .map(|j| (f[j] - 10.0 * j as f64) / (1.0 + j as f64))
            .collect();
        let y = (1.5 * z[0]).sin() + 0.5 * z[1] * z[1] - 0.8 * z[2] * z[3]
            + 0.3 * z[4]
            + spec.noise * rng.normal();
        data.x.extend_from_slice(&f);
        data.y.push(y);
    }
    data
}

/// `(RMSE, R²)` of `predict` on a split.
pub(crate) fn evaluate(split: &Split, mut predict: impl FnMut(&[f64]) -> f64) -> (f64, f64) {
    let n = split.len() as f64;
    let mean = split.y.iter().sum::<f64>() / n;
    let (mut sse, mut sst) = (0.0, 0.0);
    for i in 0..split.len() {
        let y = split.y[i];
        let e = predict(split.row(i)) - y;
        sse += e * e;
        sst += (y - mean) * (y - mean);
    }
    ((sse / n).sqrt(), 1.0 - sse / sst)
}

// ---------------------------------------------------------------------------------------------
// Models: a closed-form ridge baseline and a one-hidden-layer MLP.
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct Linear {
    /// `FEATURES` weights, then the intercept.
    w: Vec<f64>,
}

impl Linear {
    fn predict(&self, x: &[f64]) -> f64 {
        self.w[FEATURES] + x.iter().zip(&self.w).map(|(a, b)| a * b).sum::<f64>()
    }
}

/// Ridge regression by the normal equations `(XᵀX + λI) w = Xᵀy` (intercept unpenalized).
pub(crate) fn fit_ridge(train: &Split, lambda: f64) -> Result<Linear, BoxError> {
    let d = FEATURES + 1;
    let mut a = vec![0.0; d * d];
    let mut b = vec![0.0; d];
    let mut xi = vec![1.0; d];
    for i in 0..train.len() {
        xi[..FEATURES].copy_from_slice(train.row(i));
        for r in 0..d {
            b[r] += xi[r] * train.y[i];
            for c in 0..=r {
                a[r * d + c] += xi[r] * xi[c];
            }
        }
    }
    for r in 0..d {
        for c in 0..r {
            a[c * d + r] = a[r * d + c];
        }
        if r < FEATURES {
            a[r * d + r] += lambda;
        }
    }
    cholesky_solve(&mut a, &mut b, d)?;
    Ok(Linear { w: b })
}

/// Solve `A x = b` in place for symmetric positive definite `A` (`n × n`, row-major).
pub(crate) fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) -> Result<(), BoxError> {
    // A = L Lᵀ, L stored in the lower triangle of `a`.
    for j in 0..n {
        let diag = a[j * n + j] - (0..j).map(|k| a[j * n + k] * a[j * n + k]).sum::<f64>();
        if diag <= 0.0 || !diag.is_finite() {
            return Err(format!("normal equations not positive definite at column {j}").into());
        }
        let l_jj = diag.sqrt();
        a[j * n + j] = l_jj;
        for i in j + 1..n {
            let s = a[i * n + j] - (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>();
            a[i * n + j] = s / l_jj;
        }
    }
    for i in 0..n {
        let s = b[i] - (0..i).map(|k| a[i * n + k] * b[k]).sum::<f64>();
        b[i] = s / a[i * n + i];
    }
    for i in (0..n).rev() {
        let s = b[i] - (i + 1..n).map(|k| a[k * n + i] * b[k]).sum::<f64>();
        b[i] = s / a[i * n + i];
    }
    Ok(())
}

/// `y = w2 · tanh(W1 x + b1) + b2`.
#[derive(Debug)]
pub(crate) struct Mlp {
    inputs: usize,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: f64,
    /// Scratch: hidden activations of the sample in flight.
    h: Vec<f64>,
}

impl Mlp {
    fn new(hidden: usize, inputs: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let s1 = (1.0 / inputs as f64).sqrt();
        let s2 = (1.0 / hidden as f64).sqrt();
        Mlp {
            inputs,
            w1: (0..hidden * inputs).map(|_| s1 * rng.normal()).collect(),
            b1: vec![0.0; hidden],
            w2: (0..hidden).map(|_| s2 * rng.normal()).collect(),
            b2: 0.0,
            h: vec![0.0; hidden],
        }
    }

    fn forward(&mut self, x: &[f64]) -> f64 {
        let mut out = self.b2;
        for (j, h) in self.h.iter_mut().enumerate() {
            let w = &self.w1[j * self.inputs..(j + 1) * self.inputs];
            let pre = self.b1[j] + w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
            *h = pre.tanh();
            out += self.w2[j] * *h;
        }
        out
    }

    fn predict(&mut self, x: &[f64]) -> f64 {
        self.forward(x)
    }

    /// One pass of mini-batch SGD with L2 weight decay over `order`.
    fn train_epoch(&mut self, train: &Split, order: &[usize], p: &Params) {
        let hidden = self.h.len();
        let mut g_w1 = vec![0.0; self.w1.len()];
        let mut g_b1 = vec![0.0; hidden];
        let mut g_w2 = vec![0.0; hidden];
        for batch in order.chunks(BATCH) {
            g_w1.fill(0.0);
            g_b1.fill(0.0);
            g_w2.fill(0.0);
            let mut g_b2 = 0.0;
            for &i in batch {
                let x = train.row(i);
                let err = self.forward(x) - train.y[i];
                g_b2 += err;
                for j in 0..hidden {
                    let h = self.h[j];
                    g_w2[j] += err * h;
                    let dpre = err * self.w2[j] * (1.0 - h * h);
                    g_b1[j] += dpre;
                    let g = &mut g_w1[j * self.inputs..(j + 1) * self.inputs];
                    for (g, xv) in g.iter_mut().zip(x) {
                        *g += dpre * xv;
                    }
                }
            }
            let step = p.learning_rate / batch.len() as f64;
            let shrink = 1.0 - p.learning_rate * p.weight_decay;
            for (w, g) in self.w1.iter_mut().zip(&g_w1) {
                *w = shrink * *w - step * g;
            }
            for (w, g) in self.w2.iter_mut().zip(&g_w2) {
                *w = shrink * *w - step * g;
            }
            for (b, g) in self.b1.iter_mut().zip(&g_b1) {
                *b -= step * g;
            }
            self.b2 -= step * g_b2;
        }
    }

    fn is_finite(&self) -> bool {
        self.b2.is_finite() && self.w2.iter().chain(&self.w1).all(|w| w.is_finite())
    }
}

/// Run an example's async client on a fresh tokio runtime; its error becomes the exit code.
pub(crate) fn run_client<F>(name: &str, client: F) -> ExitCode
where
    F: Future<Output = Result<(), BoxError>>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One row of the results table.
#[derive(Debug)]
pub(crate) struct Row {
    index: usize,
    trial: Trial,
    /// This result improved the best when it arrived (and was broadcast).
    new_best: bool,
}

pub(crate) async fn sweep(pool: &Pool<MlpSweep>) -> Result<(), BoxError> {
    let workers = wait_for_workers(pool, Duration::from_secs(60)).await?;
    println!("pool ready: {workers} worker process(es)");

    let grid: Vec<Params> = [8, 24, 48]
        .into_iter()
        .flat_map(|hidden| {
            [0.01, 0.03, 0.1, 0.3].into_iter().flat_map(move |lr| {
                [0.0, 1e-3].into_iter().map(move |wd| Params {
                    hidden,
                    learning_rate: lr,
                    weight_decay: wd,
                    epochs: 40,
                })
            })
        })
        .collect();
    let total = grid.len();
    println!("sweeping {total} hyper-parameter sets...");

    let started = Instant::now();
    let mut best: Option<BestSoFar> = None;
    let mut rows = Vec::with_capacity(total);
    let mut failures = 0;
    let mut results = pin!(pool.imap_unordered(grid));
    while let Some(item) = results.next().await {
        let (index, trial) = match item {
            Ok(ok) => ok,
            Err(e) => {
                // A failed job is one item; the stream goes on with the rest.
                eprintln!("job failed: {e}");
                failures += 1;
                continue;
            }
        };
        let new_best = trial.status == Status::Completed
            && best.as_ref().is_none_or(|b| trial.val_rmse < b.val_rmse);
        if new_best {
            let update = BestSoFar {
                val_rmse: trial.val_rmse,
                params: trial.params,
            };
            pool.update_workers(update.clone()).await?;
            best = Some(update);
        }
        println!(
            "  [{:>2}/{total}] job {index:>2} on {}: {:<9} val RMSE {:.4}{}",
            rows.len() + 1,
            trial.worker,
            format!("{:?}", trial.status).to_lowercase(),
            trial.val_rmse,
            if new_best {
                "  -> new best, sent to workers"
            } else {
                ""
            }
        );
        rows.push(Row {
            index,
            trial,
            new_best,
        });
    }
    let wall = started.elapsed();

    rows.sort_by(|a, b| a.trial.val_rmse.total_cmp(&b.trial.val_rmse));
    print_table(&rows);

    let busy: f64 = rows.iter().map(|r| r.trial.train_ms).sum::<f64>() / 1e3;
    let pruned = rows
        .iter()
        .filter(|r| r.trial.status == Status::Pruned)
        .count();
    println!(
        "{} jobs in {:.2} s wall ({busy:.2} s of training on {workers} workers); {pruned} pruned early by the shared best, {failures} failed",
        rows.len(),
        wall.as_secs_f64()
    );
    let best_row = rows
        .iter()
        .find(|r| r.trial.status == Status::Completed)
        .ok_or("no trial completed")?;
    let t = &best_row.trial;
    println!(
        "best parameters: hidden={} learning_rate={} weight_decay={} epochs={}  ->  val RMSE {:.4}, R² {:.3} (linear baseline RMSE {:.4})",
        t.params.hidden,
        t.params.learning_rate,
        t.params.weight_decay,
        t.params.epochs,
        t.val_rmse,
        t.val_r2,
        t.baseline_rmse
    );
    if failures > 0 {
        return Err(format!("{failures} job(s) failed").into());
    }
    Ok(())
}

/// Local workers start in the background (each runs `new` first): wait until they serve.
pub(crate) async fn wait_for_workers(
    pool: &Pool<MlpSweep>,
    timeout: Duration,
) -> Result<usize, BoxError> {
    let expected = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    loop {
        let n = pool.workers_count().await?;
        // With GPUs the count is one per GPU, not per core: settle for what came up in a while.
        if n >= expected || (n > 0 && started.elapsed() > Duration::from_secs(5)) {
            return Ok(n);
        }
        if started.elapsed() > timeout {
            return Err(format!("no worker came up within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:>4}  {:>3}  {:>6}  {:>6}  {:>6}  {:>6}  {:>8}  {:>8}  {:>7}  {:<16}  note",
        "rank", "job", "hidden", "lr", "decay", "epochs", "val RMSE", "val R²", "ms", "worker"
    );
    for (rank, row) in rows.iter().enumerate() {
        let t = &row.trial;
        let note = match t.status {
            Status::Pruned => format!(
                "pruned: > {PRUNE_RATIO}x shared best {:.4}",
                t.shared_best_seen.unwrap_or(f64::NAN)
            ),
            Status::Diverged => "diverged".to_string(),
            Status::Completed if row.new_best => "new best when it arrived".to_string(),
            Status::Completed => String::new(),
        };
        println!(
            "{:>4}  {:>3}  {:>6}  {:>6}  {:>6}  {:>3}/{:<2}  {:>8.4}  {:>8.3}  {:>7.1}  {:<16}  {note}",
            rank + 1,
            row.index,
            t.params.hidden,
            t.params.learning_rate,
            t.params.weight_decay,
            t.epochs_run,
            t.params.epochs,
            t.val_rmse,
            t.val_r2,
            t.train_ms,
            t.worker,
        );
    }
    println!();
}
