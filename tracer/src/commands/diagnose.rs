//! `tracer diagnose`: watch for a while, then report.

use std::io::Write as _;

use anyhow::Context as _;
use tracer::sinks::{report, stream::Format};

use super::stream;
use crate::cli::{DiagnoseArgs, KernelArgs};

pub async fn run(kernel: &KernelArgs, args: &DiagnoseArgs) -> anyhow::Result<()> {
    let pipeline = stream::start(kernel, &args.filter, &args.diagnosis)?;
    let pipeline = stream::run(pipeline, Some(args.duration.into()), &mut []).await?;
    let report = pipeline.diagnoser().report(pipeline.elapsed());
    let mut stdout = std::io::stdout().lock();
    match args.format {
        Format::Text => stdout.write_all(report::text(&report).as_bytes()),
        Format::Json => {
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            stdout.write_all(b"\n")
        }
    }
    .context("writing the report")
}
