//! `cargo xtask setup`: everything a fresh Debian-like machine needs to build the
//! kernel programs and run the tests, installed only when missing.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::exec::{self, cargo_bin_dir};

/// Debian packages the integration tests drive, with what each is for.
pub const TEST_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces and veth pairs"),
    (
        "nginx",
        "the keep-alive server and reverse proxy under test",
    ),
    ("iptables", "routers that drop or reset idle flows"),
    ("conntrack", "routers that forget idle flows"),
    ("python3", "small servers inside test namespaces"),
    (
        "prometheus",
        "scrapes the agent in tests; promtool checks metrics and rules",
    ),
];

/// Debian packages `cargo xtask bench` drives (not installed by `setup` or
/// `test`), with what each is for.
pub const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "the server every benchmark workload talks to"),
    ("wrk", "the HTTP load generator of the throughput benchmark"),
    (
        "bpftrace",
        "the peer tracer (bench/peer.bt) the agent is compared with",
    ),
];

/// Installs the benchmark's Debian packages that are missing.
pub fn bench_packages() -> anyhow::Result<()> {
    debian_packages(BENCH_PACKAGES)
}

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages(TEST_PACKAGES)?;
    Ok(())
}

/// Whether the build prerequisites are in place, without installing anything.
pub fn build_ready() -> bool {
    rust_src_installed().unwrap_or(false) && bpf_linker_works()
}

fn rust_src_installed() -> anyhow::Result<bool> {
    let out = exec::output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src")))
}

fn rust_src() -> anyhow::Result<()> {
    if rust_src_installed()? {
        println!("setup: rust-src already installed");
        return Ok(());
    }
    println!("setup: adding rust-src (the eBPF build compiles core from source)");
    exec::run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker_works() -> bool {
    Command::new(cargo_bin_dir().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// The Rust toolchain's sysroot and its LLVM: the shared library file and the
/// major version bpf-linker must be built for.
struct ToolchainLlvm {
    library: PathBuf,
    major: u32,
    version: String,
}

fn toolchain_llvm() -> anyhow::Result<ToolchainLlvm> {
    let out = exec::output(Command::new("rustc").arg("-vV"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("rustc -vV does not state its LLVM version")?
        .trim()
        .to_string();
    let major = version
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("unexpected LLVM version {version}"))?;
    let out = exec::output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let library = fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("reading {}/lib", sysroot.display()))?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    Ok(ToolchainLlvm {
        library,
        major,
        version,
    })
}

/// bpf-linker from the crate registry, linked against the toolchain's own
/// libLLVM: no system LLVM and no prebuilt download. Its build script only checks
/// that `$LLVM_PREFIX/bin/llvm-config` exists; the library is found through
/// `$LLVM_PREFIX/lib`, which also becomes the binary's RUNPATH, so the prefix is
/// kept (beside cargo's bin directory) rather than made in a temporary place.
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_works() {
        println!("setup: bpf-linker already installed");
        return Ok(());
    }
    let llvm = toolchain_llvm()?;
    let prefix = cargo_bin_dir()
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("bpf-linker-llvm-{}", llvm.version));
    make_llvm_prefix(&prefix, &llvm.library)?;
    println!(
        "setup: building bpf-linker against the toolchain's LLVM {} (about a minute)",
        llvm.version
    );
    exec::run(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .args(["--features", &format!("llvm-{}", llvm.major)])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run; check {}",
            cargo_bin_dir().join("bpf-linker").display()
        );
    }
    Ok(())
}

fn make_llvm_prefix(prefix: &Path, library: &Path) -> anyhow::Result<()> {
    let bin = prefix.join("bin");
    let lib = prefix.join("lib");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let llvm_config = bin.join("llvm-config");
    fs::write(
        &llvm_config,
        "#!/bin/sh\necho 'placeholder: bpf-linker links the Rust toolchain LLVM' >&2\nexit 1\n",
    )?;
    set_executable(&llvm_config)?;
    let soname = library
        .file_name()
        .context("library path has a file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(library, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Installs the missing packages with apt-get (through sudo when not root).
fn debian_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(package, _)| !package_installed(package))
        .map(|(package, _)| *package)
        .collect();
    for (package, why) in packages {
        if !missing.contains(package) {
            println!("setup: {package} already installed ({why})");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "missing packages {missing:?} and no apt-get on this machine: install them with \
             the system's package manager"
        );
    }
    println!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> Command {
        let mut cmd = if exec::is_root() {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    if exec::run(&mut install).is_err() {
        // A fresh machine may have no package lists yet.
        exec::run(&mut apt(&["update"]))?;
        let mut install = apt(&["install", "-y", "--no-install-recommends"]);
        install.args(&missing);
        exec::run(&mut install)?;
    }
    Ok(())
}
