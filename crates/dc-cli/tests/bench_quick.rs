//! `dc-cli bench --quick --json` runs end to end on a dedicated redis-server and reports every
//! workload with its baselines. Checks the shape and sanity of the figures, not speed: speed is
//! the benchmark's business, never a test's.

use std::collections::HashSet;
use std::process::Command;

#[test]
fn bench_quick_json_reports_every_workload_with_baselines() {
    let out = Command::new(env!("CARGO_BIN_EXE_dc-cli"))
        .args(["bench", "--quick", "--json"])
        .output()
        .expect("run dc-cli bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut workloads = HashSet::new();
    for line in stdout.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        let workload = v["workload"].as_str().expect("workload").to_string();
        assert_eq!(v["mode"], "redis", "{line}");
        assert!(v["metric"].is_string(), "{line}");
        for baseline in [
            "ping_rtt_us",
            "xadd_pipelined_per_s",
            "cycle_k1_per_s",
            "setget_64mib_mb_per_s",
        ] {
            let b = v[baseline].as_f64().unwrap_or(-1.0);
            assert!(b > 0.0, "{baseline} missing or not positive in {line}");
        }
        let batched = v["metric"] == "jobs_per_s_batched";
        if !batched {
            let value = v["value"].as_f64().unwrap_or(-1.0);
            assert!(value > 0.0, "a measured figure must be positive: {line}");
        }
        workloads.insert(workload);
    }
    for w in ["baseline", "W1", "W2", "W3", "W4", "W5", "W6"] {
        assert!(workloads.contains(w), "no {w} line in:\n{stdout}");
    }
}
