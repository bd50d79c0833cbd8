//! `tracer trace`: stream events to stdout until interrupted.

use std::{
    io::{self, BufWriter},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer::{
    loader::Filter,
    output::EventWriter,
    session::{Session, Stats},
};

use crate::cli::{KernelArgs, TraceArgs};

pub async fn run(kernel: &KernelArgs, args: &TraceArgs) -> anyhow::Result<()> {
    let filter = Filter {
        pid: args.pid,
        comm: args.comm.clone(),
        port: args.port,
    };
    let mut session =
        Session::start(&super::load_options(kernel, filter)).context("cannot start tracing")?;
    eprintln!(
        "tracer: tracing TCP connections ({}); Ctrl-C to stop",
        session.report()
    );
    for degraded in &session.report().degraded {
        log::warn!("{degraded}");
    }

    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut lost_check = tokio::time::interval(Duration::from_secs(1));
    let mut writer = EventWriter::new(BufWriter::new(io::stdout().lock()), args.format);
    let mut batch = Vec::new();
    let mut lost_reported = 0;

    let outcome = loop {
        tokio::select! {
            result = session.next_batch(&mut batch) => {
                result?;
                if let Err(e) = write_all(&mut writer, &mut batch) {
                    break Err(e);
                }
            }
            _ = lost_check.tick() => {
                let lost = session.stats().lost;
                if lost > lost_reported {
                    log::warn!(
                        "{} events lost in the kernel (ring buffer full); raise --ring-buffer-size",
                        lost - lost_reported
                    );
                    lost_reported = lost;
                }
            }
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };

    // Stop the programs first, then write out what they had already produced.
    session.detach();
    session.drain(&mut batch);
    let flushed = outcome.and_then(|()| write_all(&mut writer, &mut batch));
    eprintln!("{}", summary(&session.stats()));
    match flushed {
        // The reader went away (`tracer trace | head`): not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing events to stdout"),
    }
}

fn write_all(
    writer: &mut EventWriter<impl io::Write>,
    batch: &mut Vec<tracer::event::Event>,
) -> io::Result<()> {
    for event in batch.drain(..) {
        writer.write(&event)?;
    }
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
