pub mod agent;
pub mod diagnose;
pub mod probe;
pub mod stream;

use tracer::{
    diagnosis,
    kernel::loader::{Filter, Options},
};

use crate::cli::{DiagnosisArgs, FilterArgs, KernelArgs};

/// Loader options from the command line.
pub fn load_options(kernel: &KernelArgs, filter: &FilterArgs) -> Options {
    Options {
        btf: kernel.btf.clone(),
        ring_buffer_bytes: kernel.ring_buffer_size,
        max_sockets: kernel.max_connections,
        filter: Filter {
            pid: filter.pid,
            comm: filter.comm.clone(),
            port: filter.port,
        },
        state_hook: kernel.state_hook,
        min_idle: kernel.min_idle.into(),
        hz: kernel.hz,
    }
}

/// Diagnosis settings from the command line.
pub fn diagnosis_config(args: &DiagnosisArgs) -> diagnosis::Config {
    diagnosis::Config {
        close_wait_threshold: args.close_wait_threshold.into(),
        ..diagnosis::Config::default()
    }
}
