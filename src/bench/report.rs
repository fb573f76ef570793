//! The report: one row per figure, printed as JSON lines as they come or as a table at the
//! end, each with the baselines it is read against.

use serde_json::{Map, Value, json};

use super::baselines::Baselines;

/// One figure of the report.
#[derive(Debug)]
pub(super) struct Row {
    pub(super) workload: &'static str,
    pub(super) metric: String,
    pub(super) value: Option<f64>,
    pub(super) ratio: Option<f64>,
    pub(super) target: Option<String>,
    pub(super) met: Option<bool>,
    pub(super) note: Option<String>,
    /// Measured on the TLS server (`--tls`).
    pub(super) tls: bool,
}

impl Row {
    pub(super) fn new(workload: &'static str, metric: impl Into<String>, value: f64) -> Self {
        Row {
            workload,
            metric: metric.into(),
            value: Some(value),
            ratio: None,
            target: None,
            met: None,
            note: None,
            tls: false,
        }
    }

    /// A figure that was not measured, and why.
    pub(super) fn skipped(workload: &'static str, metric: &str, why: impl Into<String>) -> Self {
        Row {
            value: None,
            ..Row::new(workload, metric, 0.0)
        }
        .note(why)
    }

    pub(super) fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    pub(super) fn target(mut self, target: &str, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }

    pub(super) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Prints rows as they come (JSON lines) or as a table at the end.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) mode: String,
    pub(super) json: bool,
    pub(super) baselines: Option<Baselines>,
    /// The TLS server's baselines (`--tls`).
    pub(super) tls_baselines: Option<Baselines>,
    pub(super) rows: Vec<Row>,
}

impl Report {
    pub(super) fn push(&mut self, row: Row) {
        if self.json {
            println!("{}", self.json_line(&row));
        }
        self.rows.push(row);
    }

    pub(super) fn json_line(&self, row: &Row) -> Value {
        let mut obj = Map::new();
        obj.insert("workload".into(), json!(row.workload));
        obj.insert("mode".into(), json!(self.mode));
        obj.insert("metric".into(), json!(row.metric));
        obj.insert("value".into(), json!(row.value.map(round3)));
        if row.tls {
            obj.insert("tls".into(), json!(true));
        }
        let baselines = if row.tls {
            &self.tls_baselines
        } else {
            &self.baselines
        };
        if let Some(b) = baselines {
            obj.insert("ping_rtt_us".into(), json!(round3(b.ping_rtt_us)));
            obj.insert(
                "xadd_pipelined_per_s".into(),
                json!(round3(b.xadd_pipelined_per_s)),
            );
            obj.insert("cycle_k1_per_s".into(), json!(round3(b.cycle_k1_per_s)));
            obj.insert(
                "setget_64mib_mb_per_s".into(),
                json!(round3(b.setget_64mib_mb_per_s)),
            );
        }
        if let Some(r) = row.ratio {
            obj.insert("ratio".into(), json!(round3(r)));
        }
        if let Some(t) = &row.target {
            obj.insert("target".into(), json!(t));
        }
        if let Some(m) = row.met {
            obj.insert("met".into(), json!(m));
        }
        if let Some(n) = &row.note {
            obj.insert("note".into(), json!(n));
        }
        Value::Object(obj)
    }

    pub(super) fn print_table(&self) {
        println!("dc-cli bench, mode {}:", self.mode);
        println!(
            "{:<9} {:<34} {:>14} {:>9}  {:<30} {:<4}",
            "workload", "metric", "value", "ratio", "target", "met"
        );
        for row in &self.rows {
            let value = row.value.map(fmt_num).unwrap_or_else(|| "-".into());
            let ratio = row
                .ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "".into());
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "{:<9} {:<34} {:>14} {:>9}  {:<30} {:<4}",
                row.workload,
                row.metric,
                value,
                ratio,
                row.target.as_deref().unwrap_or(""),
                met
            );
            if let Some(note) = &row.note {
                println!("{:<9} ({note})", "");
            }
        }
    }
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(super) fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

pub(super) fn push_baselines(report: &mut Report, b: Baselines, source: &str) {
    report.baselines = Some(b);
    let note = |what: &str| format!("{what}; {source}");
    report.push(
        Row::new("baseline", "ping_rtt_us", b.ping_rtt_us)
            .note(note("p50 of 1,000 sequential PINGs")),
    );
    report.push(
        Row::new("baseline", "xadd_pipelined_per_s", b.xadd_pipelined_per_s)
            .note(note("50,000 XADDs in pipelines of 1,000")),
    );
    report.push(
        Row::new("baseline", "cycle_k1_per_s", b.cycle_k1_per_s).note(note(
            "bare stream cycle: XADD jobs, 2 consumers XREADGROUP COUNT 1 then XADD result + XACK",
        )),
    );
    report.push(
        Row::new("baseline", "setget_64mib_mb_per_s", b.setget_64mib_mb_per_s)
            .note(note("SET then GET of 64 MiB, median of 3")),
    );
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = dc_core::util::saturating_count(((sorted.len() - 1) as f64 * p).round());
    sorted[i.min(sorted.len() - 1)]
}

pub(super) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}
