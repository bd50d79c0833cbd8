//! Loading the kernel programs and attaching them, with a fallback for each hook
//! the running kernel may refuse.

use std::{cell::OnceCell, fmt, path::PathBuf, time::Duration};

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, FEntry, FExit, KProbe, ProgramError, TracePoint},
};
use tracer_common::{
    COMM_LEN,
    config::{Config, FILTER_COMM, FILTER_PID, FILTER_PORT, STATE_FROM_FUNCTION},
    names::*,
};

use crate::{
    kernel::btf_offsets::{BtfError, KernelBtf, VMLINUX_BTF},
    kernel::clock::Jiffies,
    kernel::tracefs::{Tracefs, TracefsError},
};

/// The kernel programs, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// BPF ring buffers (the only event transport used) arrived in Linux 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "tracing needs root, or the CAP_BPF and CAP_PERFMON capabilities (CAP_SYS_ADMIN on \
         kernels before 5.8); run with sudo, or grant them: \
         `setcap cap_bpf,cap_perfmon,cap_sys_admin+ep <tracer binary>`"
    )]
    Privileges,
    #[error("kernel {release} is older than the minimum {}.{} (BPF ring buffer)", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { release: String },
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("cannot parse kernel BTF for the BTF tracepoints")]
    AyaBtf(#[source] aya::BtfError),
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("program {program} is missing from the eBPF object")]
    MissingProgram { program: &'static str },
    #[error("{hook}: the kernel refused the program")]
    Attach {
        hook: String,
        #[source]
        source: ProgramError,
    },
}

/// How the state-change hook is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateHook {
    /// `tp_btf/inet_sock_set_state` when the kernel offers it, else the classic tracepoint.
    Auto,
    /// `tp_btf/inet_sock_set_state` only.
    BtfTracepoint,
    /// `sock:inet_sock_set_state` only.
    Tracepoint,
    /// `fentry/tcp_set_state` (BPF trampoline), with the tracepoint for listen().
    Fentry,
    /// `kprobe/tcp_set_state`, with the tracepoint for listen().
    Kprobe,
}

impl StateHook {
    /// The [`AttachReport::state_mode`] this choice gives, when it is not `Auto`.
    pub fn mode(self) -> Option<&'static str> {
        match self {
            Self::Auto => None,
            Self::BtfTracepoint => Some("tp_btf"),
            Self::Tracepoint => Some("tracepoint"),
            Self::Fentry => Some("fentry"),
            Self::Kprobe => Some("kprobe"),
        }
    }
}

/// Which events the kernel emits. Filtering happens in the kernel, before the ring
/// buffer.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub port: Option<u16>,
}

impl Filter {
    fn config(&self) -> Config {
        let mut config = Config::default();
        if let Some(pid) = self.pid {
            config.filters |= FILTER_PID;
            config.filter_pid = pid;
        }
        if let Some(port) = self.port {
            config.filters |= FILTER_PORT;
            config.filter_port = port;
        }
        if let Some(comm) = &self.comm {
            config.filters |= FILTER_COMM;
            // The kernel keeps the first 15 bytes and a NUL.
            let bytes = comm.as_bytes();
            let len = bytes.len().min(COMM_LEN - 1);
            config.filter_comm[..len].copy_from_slice(&bytes[..len]);
        }
        config
    }
}

/// The programs wake the reader when the ring buffer is this fraction full
/// (1/8th: 1 MiB of the default 8 MiB, several thousand events); below that,
/// the reader polls (see [`crate::kernel::session::POLL_INTERVAL`]).
pub const WAKEUP_FRACTION: u32 = 8;

#[derive(Clone, Debug)]
pub struct Options {
    pub btf: Option<PathBuf>,
    /// Ring-buffer size in bytes: a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Connections tracked at once; the oldest are evicted beyond it.
    pub max_sockets: u32,
    pub filter: Filter,
    pub state_hook: StateHook,
    /// Sends after at least this much idleness are reported as reuses.
    pub min_idle: Duration,
    /// CONFIG_HZ when the operator knows it; detected otherwise.
    pub hz: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            btf: None,
            ring_buffer_bytes: 8 << 20,
            max_sockets: 262_144,
            filter: Filter::default(),
            state_hook: StateHook::Auto,
            min_idle: Duration::from_millis(250),
            hz: None,
        }
    }
}

/// What got attached, and what the kernel refused.
#[derive(Clone, Debug, Default)]
pub struct AttachReport {
    /// `tp_btf`, `tracepoint`, `fentry` or `kprobe`.
    pub state_mode: &'static str,
    pub attached: Vec<String>,
    /// Hooks that could not be attached, with the reason and what is lost.
    pub degraded: Vec<String>,
}

impl AttachReport {
    /// Whether state changes come with a typed socket (tp_btf, fentry), which
    /// is what lets them reach the socket storage of the send and read hooks:
    /// flag a peer's FIN, and release a request when its connection closes.
    pub fn typed_state_hook(&self) -> bool {
        matches!(self.state_mode, "tp_btf" | "fentry")
    }
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state changes via {}", self.state_mode)?;
        match self.degraded.len() {
            0 => Ok(()),
            n => write!(f, ", {n} optional hooks unavailable"),
        }
    }
}

pub struct Loaded {
    pub ebpf: Ebpf,
    pub report: AttachReport,
}

/// Checks privileges and kernel version, resolves offsets, loads the object and
/// attaches every program.
pub fn load(options: &Options, jiffies: Jiffies) -> Result<Loaded, LoadError> {
    check_privileges()?;
    check_kernel_version()?;
    raise_memlock_limit();
    let tracefs = Tracefs::find_or_mount()?;
    let kernel_btf = KernelBtf::load(options.btf.as_deref())?;
    let offsets = kernel_btf.kernel_offsets()?;
    let btf_hooks = BtfHooks::new(&kernel_btf);
    // Its types take tens of MB, and aya parses the same BTF next.
    drop(kernel_btf);
    let mut tp_offsets = tracefs.tracepoint_offsets()?;
    // Decided before loading, as the tracepoint's program is told by a frozen
    // global: only where the kprobes below can be placed.
    let reset_kprobes = if tp_offsets.send_reset_skbaddr != 0 && kprobes_available() {
        kernel_functions(&["tcp_v4_send_reset", "tcp_v6_send_reset"])
    } else {
        Vec::new()
    };
    if !reset_kprobes.contains(&"tcp_v4_send_reset") {
        tp_offsets.send_reset_skbaddr = 0;
    }
    let mut config = options.filter.config();
    config.min_idle_ns = u64::try_from(options.min_idle.as_nanos()).unwrap_or(u64::MAX);
    config.jiffy_ns = u32::try_from(jiffies.to_duration(1).as_nanos()).unwrap_or(u32::MAX);
    config.wakeup_bytes = options.ring_buffer_bytes / WAKEUP_FRACTION;
    if matches!(options.state_hook, StateHook::Fentry | StateHook::Kprobe) {
        config.state_source = STATE_FROM_FUNCTION;
    }

    // aya's own parse, for relocations and the BTF hooks: the loader parses
    // /sys/kernel/btf/vmlinux when created, which is dropped before the BTF the
    // hooks use (also --btf's) is parsed, so that two never live at once.
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    let btf = btf_hooks.btf()?;
    let mut ebpf = loader
        .btf(Some(btf))
        .map_max_entries(MAP_EVENTS, options.ring_buffer_bytes)
        .map_max_entries(MAP_SOCKS, options.max_sockets)
        .override_global(GLOBAL_CONFIG, &config, true)
        .override_global(GLOBAL_OFFSETS, &offsets, true)
        .override_global(GLOBAL_TP_OFFSETS, &tp_offsets, true)
        .load(EBPF_OBJECT)
        .map_err(LoadError::Load)?;

    let mut report = AttachReport::default();
    attach_state_hook(&mut ebpf, options, &btf_hooks, &tracefs, &mut report)?;
    // Without these the lifecycle still works; what each one adds is named when it
    // is missing.
    // Sends and reads: the BTF tracepoints (6.3+), else trampolines on the TCP
    // functions (socket storage in tracing programs needs 5.11+).
    match attach_first(
        &mut ebpf,
        &btf_hooks,
        [
            (PROG_SEND_BTF, Hook::BtfTracepoint("sock_send_length")),
            (PROG_SEND_FEXIT, Hook::Fexit("tcp_sendmsg")),
        ],
    ) {
        Ok(hook) => {
            report.attached.push(hook);
            if !report.typed_state_hook() {
                report.degraded.push(format!(
                    "state changes via {}: sends after the peer's FIN are reported as \
                     reuses but not flagged peer_closed; request accounting is off (a \
                     connection closed mid-request could not be released): no \
                     pool_saturation or keepalive_worker_starvation findings",
                    report.state_mode
                ));
            }
        }
        Err(e) => report
            .degraded
            .push(format!("{e}: no reuse events, no stale_reuse findings")),
    }
    match attach_first(
        &mut ebpf,
        &btf_hooks,
        [
            (PROG_RECV_BTF, Hook::BtfTracepoint("sock_recv_length")),
            (PROG_RECV_FENTRY, Hook::Fentry("tcp_cleanup_rbuf")),
        ],
    ) {
        Ok(hook) => {
            if hook.starts_with("fentry/") {
                log::info!("reads via {hook}: MSG_PEEK reads count as reads of the response");
            }
            report.attached.push(hook);
        }
        Err(e) => report.degraded.push(format!(
            "{e}: no request accounting, no pool_saturation findings"
        )),
    }
    let optional: [(&str, &str, &str, &str); 6] = [
        (
            PROG_RECEIVE_RESET,
            "tcp",
            "tcp_receive_reset",
            "closed_by=reset_peer and reset events",
        ),
        (
            PROG_SEND_RESET,
            "tcp",
            "tcp_send_reset",
            "outgoing reset events",
        ),
        (
            PROG_RETRANSMIT,
            "tcp",
            "tcp_retransmit_skb",
            "retransmit events",
        ),
        (
            PROG_CONNECT_ENTER,
            "syscalls",
            "sys_enter_connect",
            "connect errors before SYN",
        ),
        (
            PROG_CONNECT_EXIT,
            "syscalls",
            "sys_exit_connect",
            "connect errors before SYN",
        ),
        (
            PROG_ACCEPT_EXIT,
            "syscalls",
            "sys_exit_accept4",
            "accepting process of server connections",
        ),
    ];
    for (program, category, name, loses) in optional {
        if let Err(e) = attach_tracepoint(&mut ebpf, program, category, name, &tracefs) {
            report
                .degraded
                .push(format!("{category}:{name} ({e:#}): no {loses}"));
        } else {
            report
                .attached
                .push(format!("tracepoint/{category}:{name}"));
        }
    }
    if tp_offsets.send_reset_skbaddr != 0 {
        for function in reset_kprobes {
            let family = if function.contains("v6") {
                "IPv6"
            } else {
                "IPv4"
            };
            match attach_kprobe(&mut ebpf, PROG_SEND_RESET_KPROBE, function) {
                Ok(()) => report.attached.push(format!("kprobe/{function}")),
                Err(e) => report.degraded.push(format!(
                    "{e:#}: no {family} reset events for resets answering a segment \
                     (before 6.10), no late_request_reset findings on {family}"
                )),
            }
        }
    }
    // accept() and accept4() are separate syscalls sharing one program.
    if tracefs.has_tracepoint("syscalls", "sys_exit_accept") {
        let program: &mut TracePoint = program_mut(&mut ebpf, PROG_ACCEPT_EXIT)?;
        match program.attach("syscalls", "sys_exit_accept") {
            Ok(_) => report
                .attached
                .push("tracepoint/syscalls:sys_exit_accept".into()),
            Err(e) => report.degraded.push(format!(
                "syscalls:sys_exit_accept ({e}): accept() callers unknown"
            )),
        }
    }
    drop(btf_hooks);
    release_freed_memory();
    Ok(Loaded { ebpf, report })
}

/// Hands the BTF parses' freed pages back to the kernel: glibc keeps freed heap
/// for reuse, and the agent would otherwise hold ~10 MB it never needs again.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { program: name })?;
    program.try_into().map_err(|source| LoadError::Attach {
        hook: name.to_string(),
        source,
    })
}

fn attach_state_hook(
    ebpf: &mut Ebpf,
    options: &Options,
    btf_hooks: &BtfHooks,
    tracefs: &Tracefs,
    report: &mut AttachReport,
) -> Result<(), LoadError> {
    let function_hook = match options.state_hook {
        StateHook::Fentry => {
            Some(btf_hooks.attach_hook(ebpf, PROG_SET_STATE_FENTRY, Hook::Fentry("tcp_set_state")))
        }
        StateHook::Kprobe => Some(attach_kprobe(ebpf, PROG_SET_STATE_KPROBE, "tcp_set_state")),
        _ => None,
    };
    if let Some(result) = function_hook {
        result?;
        let mode = options.state_hook.mode().expect("a function hook");
        report.attached.push(format!("{mode}/tcp_set_state"));
        // listen() moves a socket to LISTEN without tcp_set_state: the
        // tracepoint reports those (and, by the loaded configuration, only those).
        attach_tracepoint_flavour(ebpf, StateHook::Auto, btf_hooks, tracefs, report)?;
        report
            .attached
            .last_mut()
            .expect("just attached")
            .push_str(" (listen only)");
        report.state_mode = mode;
        return Ok(());
    }
    report.state_mode =
        attach_tracepoint_flavour(ebpf, options.state_hook, btf_hooks, tracefs, report)?;
    Ok(())
}

/// The BTF flavour of the state-change tracepoint, or the classic one: as
/// `choice` allows and the kernel accepts. Returns the mode attached.
fn attach_tracepoint_flavour(
    ebpf: &mut Ebpf,
    choice: StateHook,
    btf_hooks: &BtfHooks,
    tracefs: &Tracefs,
    report: &mut AttachReport,
) -> Result<&'static str, LoadError> {
    if choice != StateHook::Tracepoint {
        match btf_hooks.attach(ebpf, PROG_SET_STATE_BTF, "inet_sock_set_state") {
            Ok(()) => {
                report.attached.push("tp_btf/inet_sock_set_state".into());
                return Ok("tp_btf");
            }
            Err(e) if choice == StateHook::Auto => {
                log::info!(
                    "tp_btf/inet_sock_set_state unavailable ({e:#}); using the classic tracepoint"
                );
                report
                    .degraded
                    .push(format!("tp_btf/inet_sock_set_state unavailable: {e}"));
            }
            Err(e) => return Err(e),
        }
    }
    attach_tracepoint(
        ebpf,
        PROG_SET_STATE_TP,
        "sock",
        "inet_sock_set_state",
        tracefs,
    )?;
    report
        .attached
        .push("tracepoint/sock:inet_sock_set_state".into());
    Ok("tracepoint")
}

/// Whether fentry and kprobes on tcp_set_state would attach on this kernel
/// (`tracer probe`): they are tried on the object `load` returned, which is
/// dropped afterwards, detaching them.
pub fn try_function_hooks(
    loaded: &mut Loaded,
    options: &Options,
) -> Vec<(String, Result<(), String>)> {
    let btf_hooks = BtfHooks {
        path: options.btf.clone().unwrap_or_else(|| VMLINUX_BTF.into()),
        // fentry needs no tracepoint.
        btf_tracepoints: Vec::new(),
        parsed: OnceCell::new(),
    };
    let describe = |result: Result<(), LoadError>| {
        result.map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        })
    };
    // The one in use (--state-hook) is attached already.
    let in_use = options.state_hook;
    vec![
        (
            "fentry/tcp_set_state".into(),
            if in_use == StateHook::Fentry {
                Ok(())
            } else {
                describe(btf_hooks.attach_hook(
                    &mut loaded.ebpf,
                    PROG_SET_STATE_FENTRY,
                    Hook::Fentry("tcp_set_state"),
                ))
            },
        ),
        (
            "kprobe/tcp_set_state".into(),
            if in_use == StateHook::Kprobe {
                Ok(())
            } else {
                describe(attach_kprobe(
                    &mut loaded.ebpf,
                    PROG_SET_STATE_KPROBE,
                    "tcp_set_state",
                ))
            },
        ),
    ]
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &'static str, function: &str) -> Result<(), LoadError> {
    let attach_error = |source| LoadError::Attach {
        hook: format!("kprobe/{function}"),
        source,
    };
    let kprobe: &mut KProbe = program_mut(ebpf, program)?;
    // One program may probe several functions.
    if kprobe.fd().is_err() {
        kprobe.load().map_err(attach_error)?;
    }
    kprobe.attach(function, 0).map_err(attach_error)?;
    Ok(())
}

/// A hook that needs the kernel's BTF.
#[derive(Clone, Copy)]
enum Hook {
    BtfTracepoint(&'static str),
    Fentry(&'static str),
    Fexit(&'static str),
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BtfTracepoint(name) => write!(f, "tp_btf/{name}"),
            Self::Fentry(name) => write!(f, "fentry/{name}"),
            Self::Fexit(name) => write!(f, "fexit/{name}"),
        }
    }
}

/// Attaches the first of `choices` the kernel accepts; returns its name, or
/// every refusal.
fn attach_first<const N: usize>(
    ebpf: &mut Ebpf,
    btf_hooks: &BtfHooks,
    choices: [(&'static str, Hook); N],
) -> Result<String, String> {
    let mut refusals = Vec::new();
    for (program, hook) in choices {
        match btf_hooks.attach_hook(ebpf, program, hook) {
            Ok(()) => {
                if !refusals.is_empty() {
                    log::info!("using {hook}: {}", refusals.join(", "));
                }
                return Ok(hook.to_string());
            }
            Err(e) => refusals.push(format!("{hook} ({e:#})")),
        }
    }
    Err(refusals.join(", "))
}

/// BTF tracepoints, with the kernel BTF parsed for aya once, when first needed.
struct BtfHooks {
    path: PathBuf,
    /// Those of [`BTF_TRACEPOINTS`] the kernel has.
    btf_tracepoints: Vec<&'static str>,
    parsed: OnceCell<Btf>,
}

/// The tracepoints hooked in their BTF flavour.
const BTF_TRACEPOINTS: [&str; 3] = [
    "inet_sock_set_state",
    "sock_send_length",
    "sock_recv_length",
];

impl BtfHooks {
    fn new(kernel_btf: &KernelBtf) -> Self {
        Self {
            path: kernel_btf.path().to_owned(),
            btf_tracepoints: BTF_TRACEPOINTS
                .into_iter()
                .filter(|name| kernel_btf.has_btf_tracepoint(name))
                .collect(),
            parsed: OnceCell::new(),
        }
    }

    fn attach(
        &self,
        ebpf: &mut Ebpf,
        program: &'static str,
        tracepoint: &str,
    ) -> Result<(), LoadError> {
        let attach_error = |source| LoadError::Attach {
            hook: format!("tp_btf/{tracepoint}"),
            source,
        };
        if !self.btf_tracepoints.contains(&tracepoint) {
            return Err(attach_error(ProgramError::UnexpectedProgramType));
        }
        let btf = self.btf()?;
        let program: &mut BtfTracePoint = program_mut(ebpf, program)?;
        program.load(tracepoint, btf).map_err(attach_error)?;
        program.attach().map_err(attach_error)?;
        Ok(())
    }

    /// A BTF tracepoint, or an fentry or fexit program on a kernel function.
    fn attach_hook(
        &self,
        ebpf: &mut Ebpf,
        program: &'static str,
        hook: Hook,
    ) -> Result<(), LoadError> {
        let attach_error = |source| LoadError::Attach {
            hook: hook.to_string(),
            source,
        };
        match hook {
            Hook::BtfTracepoint(tracepoint) => self.attach(ebpf, program, tracepoint)?,
            Hook::Fentry(function) => {
                let btf = self.btf()?;
                let program: &mut FEntry = program_mut(ebpf, program)?;
                program.load(function, btf).map_err(attach_error)?;
                program.attach().map_err(attach_error)?;
            }
            Hook::Fexit(function) => {
                let btf = self.btf()?;
                let program: &mut FExit = program_mut(ebpf, program)?;
                program.load(function, btf).map_err(attach_error)?;
                program.attach().map_err(attach_error)?;
            }
        }
        Ok(())
    }

    fn btf(&self) -> Result<&Btf, LoadError> {
        if let Some(btf) = self.parsed.get() {
            return Ok(btf);
        }
        let btf =
            Btf::parse_file(&self.path, aya::Endianness::default()).map_err(LoadError::AyaBtf)?;
        Ok(self.parsed.get_or_init(|| btf))
    }
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    name: &str,
    tracefs: &Tracefs,
) -> Result<(), LoadError> {
    let hook = || format!("tracepoint/{category}:{name}");
    if !tracefs.has_tracepoint(category, name) {
        return Err(LoadError::Tracefs(TracefsError::NoTracepoint(format!(
            "{category}:{name}"
        ))));
    }
    let tracepoint: &mut TracePoint = program_mut(ebpf, program)?;
    tracepoint.load().map_err(|source| LoadError::Attach {
        hook: hook(),
        source,
    })?;
    tracepoint
        .attach(category, name)
        .map_err(|source| LoadError::Attach {
            hook: hook(),
            source,
        })?;
    Ok(())
}

/// Loads [`PROG_BROKEN`], which reads through an offset no BTF resolved: the
/// kernel must refuse it with the verifier's explanation. `Ok` means the
/// verifier let a wild read through.
pub fn load_broken_program(loaded: &mut Loaded) -> Result<(), LoadError> {
    let program: &mut TracePoint = program_mut(&mut loaded.ebpf, PROG_BROKEN)?;
    program.load().map_err(|source| LoadError::Attach {
        hook: format!("{PROG_BROKEN} (deliberately broken, never attached)"),
        source,
    })
}

/// Whether the kernel has the kprobe PMU aya attaches kprobes through.
fn kprobes_available() -> bool {
    std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
}

/// Those of `names` the kernel has as functions (`/proc/kallsyms`): a module
/// not loaded (ipv6) or a function inlined away has no symbol to probe.
fn kernel_functions(names: &[&'static str]) -> Vec<&'static str> {
    let Ok(symbols) = std::fs::read_to_string("/proc/kallsyms") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in symbols.lines() {
        // "address type name [module]"
        if let Some(name) = line.split_whitespace().nth(2)
            && let Some(wanted) = names.iter().find(|n| **n == name)
            && !found.contains(wanted)
        {
            found.push(*wanted);
        }
    }
    found
}

/// Root, or CAP_BPF with CAP_PERFMON, or CAP_SYS_ADMIN.
fn check_privileges() -> Result<(), LoadError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(LoadError::Privileges)
    }
}

fn check_kernel_version() -> Result<(), LoadError> {
    let Ok(uname) = nix::sys::utsname::uname() else {
        return Ok(());
    };
    let release = uname.release().to_string_lossy().into_owned();
    match parse_release(&release) {
        Some(version) if version < MIN_KERNEL => Err(LoadError::KernelTooOld { release }),
        _ => Ok(()),
    }
}

/// The running kernel's (major, minor).
pub fn running_kernel() -> Option<(u32, u32)> {
    let uname = nix::sys::utsname::uname().ok()?;
    parse_release(&uname.release().to_string_lossy())
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones to the
/// memory cgroup. Raising the limit helps the former and is harmless (or refused,
/// which is fine) on the latter.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels that account BPF memory to cgroups",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_versions() {
        assert_eq!(parse_release("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-33-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_release("4.19.0"), Some((4, 19)));
        assert!(parse_release("4.19.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn filter_becomes_kernel_config() {
        let filter = Filter {
            pid: Some(7),
            comm: Some("a-very-long-command-name".into()),
            port: Some(8080),
        };
        let config = filter.config();
        assert_eq!(config.filters, FILTER_PID | FILTER_PORT | FILTER_COMM);
        assert_eq!(config.filter_pid, 7);
        assert_eq!(config.filter_port, 8080);
        // Truncated like the kernel's own comm, NUL-terminated.
        assert_eq!(&config.filter_comm[..15], b"a-very-long-com");
        assert_eq!(config.filter_comm[15], 0);
        assert_eq!(Filter::default().config().filters, 0);
    }
}
