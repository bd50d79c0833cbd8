//! Where the pipeline's batches go: the event stream for people and tools
//! ([`stream`]) and the Prometheus metrics ([`metrics`]).

pub mod metrics;
pub mod stream;
