//! The userspace pipeline micro-benchmark: `tracer/benches/pipeline.rs` run
//! by criterion, its estimates read back from criterion's JSON.

use std::{fs, path::Path};

use anyhow::Context as _;

use super::Plan;
use crate::exec;

pub(super) struct Pipeline {
    /// Events per second through decode + diagnosis + metrics (mean, and the
    /// 95% confidence interval).
    pub(super) full: (f64, f64, f64),
    pub(super) decode: Option<f64>,
    pub(super) events_per_iteration: u64,
}

pub(super) fn pipeline_benchmark(plan: &Plan) -> anyhow::Result<Pipeline> {
    let home = std::env::temp_dir().join(format!("tracer-bench-criterion-{}", std::process::id()));
    let _ = fs::remove_dir_all(&home);
    let mut cargo = exec::cargo();
    cargo
        .args(["bench", "--package", "tracer", "--bench", "pipeline", "--"])
        .env("CRITERION_HOME", &home);
    if plan.quick {
        cargo.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    let outcome = exec::run(&mut cargo).and_then(|()| {
        let full = criterion_throughput(&home, "decode_diagnose_metrics")?;
        let decode = criterion_throughput(&home, "decode")
            .ok()
            .map(|(mean, ..)| mean.0);
        Ok(Pipeline {
            full: full.0,
            decode,
            events_per_iteration: full.1,
        })
    });
    let _ = fs::remove_dir_all(&home);
    outcome
}

/// Elements per second (mean, low, high) of a criterion benchmark, and the
/// elements per iteration, from its `new/estimates.json` and `benchmark.json`.
fn criterion_throughput(home: &Path, bench: &str) -> anyhow::Result<((f64, f64, f64), u64)> {
    let dir = home.join("pipeline").join(bench).join("new");
    let read = |name: &str| -> anyhow::Result<serde_json::Value> {
        let path = dir.join(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let benchmark = read("benchmark.json")?;
    let elements = benchmark["throughput"]["Elements"]
        .as_u64()
        .context("no Elements throughput in benchmark.json")?;
    let estimates = read("estimates.json")?;
    let mean = &estimates["mean"];
    let ns = |value: &serde_json::Value| -> anyhow::Result<f64> {
        value.as_f64().context("estimate is not a number")
    };
    let per_sec = |ns_per_iter: f64| elements as f64 / (ns_per_iter / 1e9);
    let point = ns(&mean["point_estimate"])?;
    let low = ns(&mean["confidence_interval"]["upper_bound"])?;
    let high = ns(&mean["confidence_interval"]["lower_bound"])?;
    Ok(((per_sec(point), per_sec(low), per_sec(high)), elements))
}
