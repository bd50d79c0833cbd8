pub mod probe;
pub mod trace;

use tracer::loader::{Filter, Options};

use crate::cli::KernelArgs;

/// Loader options from the command line.
pub fn load_options(kernel: &KernelArgs, filter: Filter) -> Options {
    Options {
        btf: kernel.btf.clone(),
        ring_buffer_bytes: kernel.ring_buffer_size,
        max_sockets: kernel.max_connections,
        filter,
        state_hook: kernel.state_hook,
        min_idle: kernel.min_idle.into(),
    }
}
