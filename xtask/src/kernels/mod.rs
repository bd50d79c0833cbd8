//! `cargo xtask test --kernels 5.10,6.1,6.12`: the kernel test matrix.
//!
//! For each kernel series, the newest Debian cloud kernel of that series is
//! fetched with `apt-get download` against a private sources list (never the
//! machine's own) and cached under `<target>/kernels/<series>/`. Each kernel
//! boots under QEMU (TCG: KVM does not run standard guests on the development
//! machines) with a small initramfs: busybox-static, the few modules needed to
//! reach the host, and an `/init` that mounts the host's root filesystem
//! read-only over virtio-fs under a tmpfs overlay, so the guest runs the very
//! binaries built on the host — the agent, the unit-test and integration-test
//! binaries, nginx, python3, prometheus, ip, iptables — without copying them.
//! A second, writable virtio-fs share carries the results back. Inside, as
//! root: `tracer probe`, the `btf_offsets` unit tests, then the integration
//! test binaries, one test per process, each with a timeout. A guest that stops
//! making progress is killed and its remaining tests are reported as such.
//!
//! The outcome is a table per kernel on stdout, a report in
//! `<target>/kernels/report.md`, and — when the whole default matrix ran
//! without a test filter — `docs/kernels.md`.

mod build;
mod fetch;
mod guest;
mod initramfs;
mod report;

use std::{
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{exec, setup};

/// Every series the matrix knows: bullseye, bookworm and bookworm-backports
/// cloud kernels.
pub const ALL_SERIES: &[&str] = &["5.10", "6.1", "6.12"];

/// What runs inside each guest unless told otherwise, and what CI runs: every
/// program loaded and every hook mode exercised on each kernel that has it.
/// The lifecycle suite runs in every state-hook mode the kernel offers (`auto`
/// is the BTF tracepoint, or the classic one where that is refused); the
/// keep-alive suite, which exercises the send and read hooks and socket
/// storage, in the default one; and the verifier must refuse a broken program.
const DEFAULT_SUITES: &[&str] = &[
    "probe",
    "btf_offsets",
    "verifier",
    "lifecycle",
    "lifecycle@fentry",
    "lifecycle@kprobe",
    "keepalive",
];

/// `--full-matrix`: the complete cross product, which adds the keep-alive
/// suite in every state-hook mode (the `peer_closed` flag and request
/// accounting depend on it).
const FULL_SUITES: &[&str] = &[
    "probe",
    "btf_offsets",
    "verifier",
    "lifecycle",
    "lifecycle@fentry",
    "lifecycle@kprobe",
    "keepalive",
    "keepalive@fentry",
    "keepalive@kprobe",
];

#[derive(clap::Args, Debug, Default)]
pub struct KernelOptions {
    /// Run the tests inside these kernels under QEMU instead of on the running
    /// kernel: Debian cloud kernel series, comma-separated (5.10, 6.1, 6.12),
    /// or `all`.
    #[arg(long, value_delimiter = ',', value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// With --kernels: what runs in each guest, comma-separated: `probe`
    /// (`tracer probe`), `btf_offsets` (the unit tests of the offsets resolved
    /// from BTF), and integration-test binaries by name (`lifecycle`,
    /// `keepalive`, ...), or `all` for every one of them. `NAME@HOOK` runs a
    /// suite with `TRACER_STATE_HOOK=HOOK` (fentry, kprobe or tracepoint),
    /// where the kernel offers that hook.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SUITES",
        default_values_t = DEFAULT_SUITES.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    )]
    pub kernel_suites: Vec<String>,
    /// With --kernels: run the complete cross product instead of the default
    /// suites (adds the keep-alive suite in the fentry and kprobe state-hook
    /// modes).
    #[arg(long, conflicts_with = "kernel_suites")]
    pub full_matrix: bool,
    /// With --kernels: seconds one test may take inside a guest (emulation is
    /// 10-30 times slower than the host) before it is killed and reported as
    /// timed out.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub kernel_test_timeout: u64,
    /// With --kernels: how many guests run at once (default: one per host CPU;
    /// each guest runs on one host thread).
    #[arg(long, value_name = "N")]
    pub kernel_jobs: Option<std::num::NonZeroUsize>,
    /// With --kernels: guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 3072)]
    pub kernel_memory: u32,
}

impl KernelOptions {
    pub fn enabled(&self) -> bool {
        !self.kernels.is_empty()
    }
}

/// One kernel series to test, resolved to a package.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub series: String,
    /// Debian package name and version.
    pub package: String,
    pub version: String,
    /// `uname -r` inside the guest.
    pub release: String,
    /// The cache directory of this series.
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The base directory holding `lib/modules/<release>` (what `depmod -b`
    /// takes).
    pub fn modules_base(&self) -> PathBuf {
        self.dir.join("root")
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.modules_base().join("lib/modules").join(&self.release)
    }
}

/// Where kernels, initramfs images and guest results are kept.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                exec::workspace_root().join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| exec::workspace_root().join("target"))
        .join("kernels")
}

fn series_list(requested: &[String]) -> anyhow::Result<Vec<String>> {
    let mut series = Vec::new();
    for name in requested {
        let name = name.trim();
        if name == "all" {
            series.extend(ALL_SERIES.iter().map(|s| s.to_string()));
        } else if name
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            && name.contains('.')
        {
            series.push(name.to_string());
        } else {
            bail!(
                "--kernels: {name:?} is not a kernel series such as 5.10, 6.1 or 6.12 \
                 (or `all`)"
            );
        }
    }
    series.dedup();
    Ok(series)
}

/// The host's CPUs: each guest's vCPUs run on one host thread (see
/// guest.rs), so this many guests run side by side.
fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Boots every kernel, `jobs` at a time, and returns their results in the
/// order given.
fn run_guests(
    kernels: &[Kernel],
    binaries: &build::Binaries,
    limits: &guest::Limits,
    jobs: usize,
) -> anyhow::Result<Vec<guest::GuestResult>> {
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<anyhow::Result<guest::GuestResult>>> =
        kernels.iter().map(|_| None).collect();
    let slots = Mutex::new(&mut results);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(kernels.len()) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(kernel) = kernels.get(index) else {
                        break;
                    };
                    println!(
                        "kernels: {} ({} {}): booting under QEMU",
                        kernel.release, kernel.package, kernel.version
                    );
                    let result = guest::run(kernel, binaries, limits)
                        .with_context(|| format!("running the guest of {}", kernel.release));
                    slots.lock().expect("no worker panics holding it")[index] = Some(result);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|result| result.expect("every kernel was run"))
        .collect()
}

/// Runs the matrix. `filter` (the test command's own filter) narrows the
/// integration tests run in each guest.
pub fn run(options: &KernelOptions, filter: Option<&str>) -> anyhow::Result<()> {
    let series = series_list(&options.kernels)?;
    let requested = if options.full_matrix {
        FULL_SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        options.kernel_suites.clone()
    };
    let suites = build::suites(&requested)?;
    setup::run()?;
    guest::host_packages()?;

    let cache = cache_dir();
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    println!("kernels: cache in {}", cache.display());
    let kernels = fetch::kernels(&cache, &series)?;

    println!("kernels: building the agent and the test binaries (release)");
    let binaries = build::binaries(&suites, filter)?;

    let limits = guest::Limits {
        test_timeout: Duration::from_secs(options.kernel_test_timeout),
        memory_mib: options.kernel_memory,
    };
    let jobs = options.kernel_jobs.map_or_else(host_cpus, usize::from);
    let results = run_guests(&kernels, &binaries, &limits, jobs)?;

    let matrix = report::Matrix {
        // As typed, for the report's first line.
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
        results,
        suites: suites.clone(),
        filter: filter.map(str::to_string),
        test_timeout: limits.test_timeout,
        memory_mib: limits.memory_mib,
    };
    print!("{}", matrix.table());
    let report_path = cache.join("report.md");
    std::fs::write(&report_path, matrix.markdown())
        .with_context(|| format!("writing {}", report_path.display()))?;
    println!("kernels: report in {}", report_path.display());
    let whole = filter.is_none()
        && ALL_SERIES.iter().all(|s| series.iter().any(|r| r == s))
        && DEFAULT_SUITES.iter().all(|s| suites.iter().any(|r| r == s));
    if whole {
        let docs = exec::workspace_root().join("docs/kernels.md");
        std::fs::write(&docs, matrix.markdown())
            .with_context(|| format!("writing {}", docs.display()))?;
        println!("kernels: wrote {}", docs.display());
    } else {
        println!(
            "kernels: docs/kernels.md left as it is (it records a run of every series with at \
             least the default suites and no test filter)"
        );
    }
    let failed = matrix.failures();
    if failed > 0 {
        bail!("{failed} test(s) failed, timed out or did not run in the kernel matrix");
    }
    Ok(())
}
