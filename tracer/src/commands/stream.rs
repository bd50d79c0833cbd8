//! Running the pipeline until Ctrl-C (or a deadline), handing every batch to
//! the command's sinks: `trace` streams events and findings, `agent` findings
//! (and events on request) and metrics, `diagnose` nothing until its report.

use std::{io, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer::{
    kernel::session::Stats,
    pipeline::{Batch, Pipeline},
    sinks::Sink,
};

use crate::cli::{DiagnosisArgs, FilterArgs, KernelArgs};

/// Loads the programs and says so on stderr.
pub fn start(
    kernel: &KernelArgs,
    filter: &FilterArgs,
    diagnosis: &DiagnosisArgs,
) -> anyhow::Result<Pipeline> {
    let options = super::load_options(kernel, filter);
    let pipeline = Pipeline::start(&options, super::diagnosis_config(diagnosis))
        .context("cannot start tracing")?;
    eprintln!(
        "tracer: tracing TCP connections ({}); Ctrl-C to stop",
        pipeline.session().report()
    );
    for degraded in &pipeline.session().report().degraded {
        log::warn!("{degraded}");
    }
    Ok(pipeline)
}

/// Runs until SIGINT/SIGTERM or `duration`, handing every batch to `sinks`,
/// then detaches, drains what the kernel had already written, and prints the
/// one-line summary on stderr. Returns the pipeline, whose diagnosis the
/// caller may report.
pub async fn run(
    mut pipeline: Pipeline,
    duration: Option<Duration>,
    sinks: &mut [&mut dyn Sink],
) -> anyhow::Result<Pipeline> {
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut batch = Batch::default();
    let mut lost_reported = 0;

    let outcome = loop {
        tokio::select! {
            result = pipeline.next(&mut batch) => {
                result?;
                if let Err(e) = hand(sinks, &mut batch) {
                    break Err(e);
                }
            }
            _ = lost_check.tick() => {
                let lost = pipeline.stats().lost;
                if lost > lost_reported {
                    log::warn!(
                        "{} events lost in the kernel (ring buffer full); raise --ring-buffer-size",
                        lost - lost_reported
                    );
                    lost_reported = lost;
                }
            }
            _ = &mut deadline => break Ok(()),
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };

    pipeline.finish(&mut batch);
    let flushed = outcome.and_then(|()| hand(sinks, &mut batch));
    eprintln!("{}", summary(&pipeline.stats()));
    match flushed {
        // The reader went away (`tracer trace | head`): not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(pipeline),
        Err(e) => Err(e).context("writing to stdout"),
        Ok(()) => Ok(pipeline),
    }
}

/// Hands `batch` to every sink, then empties it for the next step.
fn hand(sinks: &mut [&mut dyn Sink], batch: &mut Batch) -> io::Result<()> {
    let handed = sinks.iter_mut().try_for_each(|sink| sink.take(batch));
    batch.clear();
    handed
}

fn summary(stats: &Stats) -> String {
    let mut line = format!(
        "tracer: {} events, {} lost in the kernel",
        stats.events, stats.lost
    );
    if stats.undecodable != 0 {
        line.push_str(&format!(", {} undecodable", stats.undecodable));
    }
    if stats.untracked != 0 {
        line.push_str(&format!(
            ", {} connections not tracked (table full)",
            stats.untracked
        ));
    }
    line
}
