//! `tracer diagnose`: watch for a while, then report.

use std::io::Write as _;

use anyhow::Context as _;
use tracer::sinks::stream::Format;

use super::stream::{self, Show};
use crate::cli::{DiagnoseArgs, KernelArgs};

pub async fn run(kernel: &KernelArgs, args: &DiagnoseArgs) -> anyhow::Result<()> {
    let show = Show {
        format: args.format,
        events: false,
        findings: false,
    };
    let pipeline = stream::run(
        kernel,
        &args.filter,
        &args.diagnosis,
        show,
        Some(args.duration.into()),
    )
    .await?;
    let report = pipeline.diagnoser().report(pipeline.elapsed());
    let mut stdout = std::io::stdout().lock();
    match args.format {
        Format::Text => stdout.write_all(report.to_text().as_bytes()),
        Format::Json => {
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            stdout.write_all(b"\n")
        }
    }
    .context("writing the report")
}
