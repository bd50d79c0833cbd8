//! Where the pipeline's batches go: the event stream for people and tools
//! ([`stream`]), the Prometheus metrics ([`metrics`]), and the `diagnose`
//! report's text ([`report`]).

pub mod metrics;
pub mod report;
pub mod stream;

use std::io;

use crate::pipeline::Batch;

/// Takes each batch the pipeline hands out, and whatever it needs from it.
pub trait Sink {
    fn take(&mut self, batch: &Batch) -> io::Result<()>;
}
