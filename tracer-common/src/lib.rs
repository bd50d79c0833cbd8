//! Types shared by the kernel programs (`tracer-ebpf`) and the userspace agent
//! (`tracer`). Everything that crosses the kernel/user boundary — ring-buffer
//! events, load-time globals, map keys and values — is defined here once,
//! `#[repr(C)]`, without padding holes, with its size pinned by a const assertion.
#![no_std]

pub mod config;
pub mod event;
pub mod names;
pub mod state;
pub mod tcp;

/// `TASK_COMM_LEN`: a process command name as the kernel stores it.
pub const COMM_LEN: usize = 16;

/// Implements `aya::Pod` for types that travel through maps and globals.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($ty:ty),* $(,)?) => {
        // SAFETY: every listed type is `#[repr(C)]`, `Copy`, made only of integers and
        // integer arrays, and has no padding (checked by the size assertions).
        $(unsafe impl aya::Pod for $ty {})*
    };
}
#[cfg(feature = "user")]
pub(crate) use impl_pod;
