//! Running the pipeline until Ctrl-C (or a deadline), writing what it produces:
//! `trace` writes events and findings, `agent` findings (and events on request),
//! `diagnose` nothing until its report.

use std::{
    io::{self, BufWriter},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer::{
    kernel::session::Stats,
    pipeline::{Batch, Pipeline},
    sinks::stream::{EventWriter, Format},
};

use crate::cli::{DiagnosisArgs, FilterArgs, KernelArgs};

/// What to write while running.
pub struct Show {
    pub format: Format,
    pub events: bool,
    pub findings: bool,
}

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

/// Starts the pipeline and runs it: see [`run_pipeline`].
pub async fn run(
    kernel: &KernelArgs,
    filter: &FilterArgs,
    diagnosis: &DiagnosisArgs,
    show: Show,
    duration: Option<Duration>,
) -> anyhow::Result<Pipeline> {
    let pipeline = start(kernel, filter, diagnosis)?;
    run_pipeline(pipeline, show, duration, |_, _| {}).await
}

/// Runs until SIGINT/SIGTERM or `duration`, handing every batch to `observe`
/// before writing it, then detaches, drains what the kernel had already
/// written, and prints the one-line summary on stderr. Returns the pipeline,
/// whose diagnosis the caller may report.
pub async fn run_pipeline(
    mut pipeline: Pipeline,
    show: Show,
    duration: Option<Duration>,
    mut observe: impl FnMut(&Pipeline, &Batch),
) -> anyhow::Result<Pipeline> {
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut writer = EventWriter::new(BufWriter::new(io::stdout().lock()), show.format);
    let mut batch = Batch::default();
    let mut lost_reported = 0;

    let outcome = loop {
        tokio::select! {
            result = pipeline.next(&mut batch) => {
                result?;
                observe(&pipeline, &batch);
                if let Err(e) = write(&mut writer, &show, &mut batch) {
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
    observe(&pipeline, &batch);
    let flushed = outcome.and_then(|()| write(&mut writer, &show, &mut batch));
    eprintln!("{}", summary(&pipeline.stats()));
    match flushed {
        // The reader went away (`tracer trace | head`): not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(pipeline),
        Err(e) => Err(e).context("writing to stdout"),
        Ok(()) => Ok(pipeline),
    }
}

fn write(
    writer: &mut EventWriter<impl io::Write>,
    show: &Show,
    batch: &mut Batch,
) -> io::Result<()> {
    if batch.is_empty() {
        batch.clear();
        return Ok(());
    }
    if show.events {
        for event in &batch.events {
            writer.write(event)?;
        }
    }
    if show.findings {
        for finding in &batch.findings {
            writer.write_finding(finding)?;
        }
    }
    batch.clear();
    writer.flush()
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
