//! The userspace side of the TCP connection tracer, in the order an event
//! travels (ARCHITECTURE.md follows one through):
//!
//! - [`kernel`]: what comes from the kernel: offsets resolved from BTF and
//!   tracefs, the programs loaded and attached with the per-kernel fallbacks,
//!   the ring buffer read and decoded into [`event::Event`]s, and the kernel's
//!   tables read back;
//! - [`host`]: what is read from the host beside it: /proc, network
//!   namespaces, sock_diag, containers;
//! - [`diagnosis`]: the rules that turn events and samples into findings;
//! - [`pipeline`]: the loop that runs them together and hands out batches;
//! - [`sinks`]: where batches go: the event stream and the Prometheus
//!   metrics, which [`endpoint`] serves.

pub mod comm;
pub mod diagnosis;
pub mod endpoint;
pub mod event;
pub mod host;
pub mod kernel;
pub mod pipeline;
pub mod sinks;
