//! The userspace side of the TCP connection tracer: loading the kernel programs,
//! reading their events, and presenting them.
//!
//! Pipeline: [`loader`] resolves offsets ([`btf_offsets`], [`tracefs`]) and attaches
//! the programs; [`session`] reads the ring buffer and [`decode`]s records into
//! [`event::Event`]s; [`output`] writes them for people or tools.

pub mod btf_offsets;
pub mod clock;
pub mod comm;
pub mod containers;
pub mod decode;
pub mod diagnosis;
pub mod endpoint;
pub mod event;
pub mod listen_queue;
pub mod loader;
pub mod metrics;
pub mod output;
pub mod owners;
pub mod pipeline;
pub mod session;
pub mod sock_diag;
pub mod tracefs;
