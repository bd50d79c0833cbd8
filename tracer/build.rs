//! Builds the kernel programs (`tracer-ebpf`) for the BPF target and leaves the
//! object in OUT_DIR, where `src/programs.rs` embeds it. So a plain `cargo build`
//! produces a self-contained agent.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // The eBPF crate needs `-Z build-std=core`. The stable toolchain accepts it
    // with RUSTC_BOOTSTRAP=1, which aya-build passes on to the inner cargo.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    println!("cargo:rerun-if-env-changed=RUSTUP_TOOLCHAIN");

    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|package| package.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    which_bpf_linker()?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// Fails early with the fix when bpf-linker is missing, instead of a linker error
/// buried in the inner cargo's output.
fn which_bpf_linker() -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("bpf-linker");
        if candidate.is_file() {
            println!("cargo:rerun-if-changed={}", candidate.display());
            return Ok(());
        }
    }
    Err(anyhow!(
        "bpf-linker not found in PATH; run `cargo xtask setup` (it builds bpf-linker \
         against the Rust toolchain's own LLVM)"
    ))
}
