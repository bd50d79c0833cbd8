//! `tracer probe`: what this kernel offers, and what the agent would use.

use anyhow::Context as _;
use tracer::{
    kernel::btf_offsets::{KernelBtf, VMLINUX_BTF},
    kernel::clock::Jiffies,
    kernel::loader::{self, MIN_KERNEL},
    kernel::tracefs::Tracefs,
};

use crate::cli::{FilterArgs, KernelArgs, ProbeArgs};

/// Hooks the agent uses, as (category, tracepoint).
const TRACEPOINTS: [(&str, &str); 8] = [
    ("sock", "sock_send_length"),
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_receive_reset"),
    ("tcp", "tcp_send_reset"),
    ("tcp", "tcp_retransmit_skb"),
    ("syscalls", "sys_enter_connect"),
    ("syscalls", "sys_exit_connect"),
    ("syscalls", "sys_exit_accept4"),
];

pub fn run(kernel: &KernelArgs, args: &ProbeArgs) -> anyhow::Result<()> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "kernel      {release} (minimum {}.{})",
        MIN_KERNEL.0, MIN_KERNEL.1
    );
    let jiffies = Jiffies::detect();
    match &jiffies {
        Ok(jiffies) => println!("HZ          {}", jiffies.hz),
        Err(e) => println!("HZ          unknown: {e}"),
    }

    let btf_path = kernel
        .btf
        .as_ref()
        .map_or(VMLINUX_BTF.to_string(), |p| p.display().to_string());
    let btf = KernelBtf::load(kernel.btf.as_deref());
    match &btf {
        Ok(btf) => match btf.kernel_offsets() {
            Ok(_) => println!("BTF         {btf_path}: all struct offsets resolved"),
            Err(e) => println!("BTF         {btf_path}: {e}"),
        },
        Err(e) => println!("BTF         {e}"),
    }

    let tracefs = Tracefs::find_or_mount();
    match &tracefs {
        Ok(tracefs) => println!("tracefs     {}", tracefs.root().display()),
        Err(e) => println!("tracefs     {e}"),
    }

    println!("hooks");
    for name in ["inet_sock_set_state", "sock_send_length"] {
        let present = btf.as_ref().is_ok_and(|btf| btf.has_btf_tracepoint(name));
        println!("  {:<40} {}", format!("tp_btf/{name}"), yes_no(present));
    }
    for (category, name) in TRACEPOINTS {
        let present = tracefs
            .as_ref()
            .is_ok_and(|t| t.has_tracepoint(category, name));
        println!(
            "  {:<40} {}",
            format!("tracepoint/{category}:{name}"),
            yes_no(present)
        );
    }

    // The real test: load and attach everything, as the agent would.
    let options = super::load_options(kernel, &FilterArgs::default());
    let mut loaded =
        loader::load(&options, jiffies?).context("loading the programs as the agent would")?;
    println!("mode        {}", loaded.report);
    for hook in &loaded.report.attached {
        println!("  attached  {hook}");
    }
    for hook in &loaded.report.degraded {
        println!("  degraded  {hook}");
    }
    // Not used unless asked for (--state-hook fentry|kprobe): are they offered?
    println!("alternatives for state changes (--state-hook)");
    for (hook, result) in loader::try_function_hooks(&mut loaded, &options) {
        match result {
            Ok(()) => println!("  {hook:<40} available"),
            Err(e) => println!("  {hook:<40} refused: {e}"),
        }
    }
    if args.broken_program {
        loader::load_broken_program(&mut loaded)
            .context("loading the deliberately broken program")?;
        anyhow::bail!("the kernel accepted a program that reads through an unresolved offset");
    }
    Ok(())
}

fn yes_no(present: bool) -> &'static str {
    if present { "available" } else { "missing" }
}
