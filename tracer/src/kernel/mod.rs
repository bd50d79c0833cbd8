//! What comes from the kernel. [`loader`] resolves the offsets the programs
//! read ([`btf_offsets`], [`tracefs`]) and attaches the programs, with a
//! fallback for each hook the running kernel may refuse; [`session`] reads the
//! ring buffer and the kernel's tables, and [`decode`]s records into events,
//! on the time bases of [`clock`].

pub mod btf_offsets;
pub mod clock;
pub mod decode;
pub mod loader;
pub mod session;
pub mod tables;
pub mod tracefs;
