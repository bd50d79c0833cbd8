//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use tracer::{kernel::loader::StateHook, sinks::stream::Format};

/// Watches every TCP connection from inside the kernel (eBPF) and reports, per
/// process and remote endpoint, how connections open, idle and close.
///
/// Needs root, or CAP_BPF and CAP_PERFMON. Linux 5.8 or newer with BTF
/// (/sys/kernel/btf/vmlinux, or --btf).
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub kernel: KernelArgs,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do; without one, `agent` (whose options can be given directly).
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as an agent (the default): diagnose continuously and log findings as
    /// they happen; with --events, stream every event too.
    Agent(AgentArgs),
    /// Stream connection events and findings to stdout, one per line, until
    /// Ctrl-C.
    ///
    /// Event types: open, close, reset, retransmit, connect_error, reuse, and
    /// finding (docs/events.md, docs/diagnosis.md).
    Trace(TraceArgs),
    /// Watch for a while, then report per process and destination: who closed
    /// connections and at what idle time, the inferred idle timeouts, and the
    /// findings with what to change. Ctrl-C ends it early and still reports.
    Diagnose(DiagnoseArgs),
    /// Show which kernel hooks this kernel offers and which ones the agent uses.
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Also load a deliberately broken program (a read through an offset no
    /// BTF resolved) and fail with the kernel verifier's refusal: a check of
    /// that error path, run by the kernel test matrix on every kernel.
    #[arg(long, hide = true)]
    pub broken_program: bool,
}

/// Which connections to watch. Filtering happens in the kernel.
#[derive(Debug, Args, Default)]
pub struct FilterArgs {
    /// Only connections owned by this process id.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Only connections owned by processes with this command name (names longer
    /// than 15 bytes are truncated like the kernel's).
    #[arg(long)]
    pub comm: Option<String>,

    /// Only connections with this port at either end.
    #[arg(long)]
    pub port: Option<u16>,
}

#[derive(Debug, Args)]
pub struct DiagnosisArgs {
    /// A connection whose peer closed it and whose process has not closed it for
    /// this long is a CLOSE_WAIT leak.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub close_wait_threshold: humantime::Duration,
}

impl Default for DiagnosisArgs {
    fn default() -> Self {
        Self {
            close_wait_threshold: Duration::from_secs(10).into(),
        }
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Output format of findings (and events).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Stream every event to stdout too, not only findings.
    #[arg(long)]
    pub events: bool,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub diagnosis: DiagnosisArgs,

    /// Where to serve Prometheus metrics (/metrics) and the health check
    /// (/healthz). Loopback by default; 19436 lies outside 9100-9999, the range
    /// the Prometheus exporter port registry has handed out completely.
    #[arg(long, default_value = "127.0.0.1:19436", value_name = "ADDR:PORT")]
    pub metrics_addr: std::net::SocketAddr,

    /// A web configuration file in the format of Prometheus's exporter-toolkit,
    /// enabling TLS (tls_server_config) and basic auth (basic_auth_users).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,

    /// Destinations (and listening ports) per process with series of their own;
    /// the rest are counted under remote="other" (port="other").
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub metrics_max_destinations: usize,

    /// Processes with series of their own; the rest are counted under
    /// comm="other".
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub metrics_max_processes: usize,
}

/// How the programs are loaded.
#[derive(Debug, Args)]
pub struct KernelArgs {
    /// Kernel BTF to resolve struct offsets from [default: /sys/kernel/btf/vmlinux].
    #[arg(long, global = true, value_name = "FILE")]
    pub btf: Option<PathBuf>,

    /// Ring buffer size: a power of two of at least 4 KiB (e.g. 8M, 64M). Events
    /// that do not fit are counted as lost and reported. The agent reads it
    /// every 25 ms, and at once when it is an eighth full.
    #[arg(long, global = true, default_value = "8M", value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// Connections tracked at once. Memory is bounded by this; beyond it the
    /// oldest entries are evicted.
    #[arg(long, global = true, default_value_t = 262_144)]
    pub max_connections: u32,

    /// A send after at least this much idleness is a connection reuse (reported
    /// as a `reuse` event, and checked against the peer's idle timeout). Busy
    /// connections cost nothing beyond the check.
    #[arg(long, global = true, default_value = "250ms", value_name = "DURATION")]
    pub min_idle: humantime::Duration,

    /// How state changes are hooked; `auto` prefers the BTF tracepoint and falls
    /// back to the classic one. `tracer probe` lists what this kernel accepts.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = StateHook::Auto,
        env = "TRACER_STATE_HOOK"
    )]
    pub state_hook: StateHook,

    /// The kernel's tick rate (CONFIG_HZ), which converts TCP's jiffy stamps to
    /// time. Detected from /proc/config.gz, /boot/config-<release> or
    /// /proc/timer_list; give it where none of those is readable (a container
    /// without /boot mounted).
    #[arg(long, global = true, value_name = "HZ", value_parser = clap::value_parser!(u32).range(24..=10_000))]
    pub hz: Option<u32>,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub diagnosis: DiagnosisArgs,
}

#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// How long to watch (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub duration: humantime::Duration,

    /// Report format: text for people, json for tools.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    #[command(flatten)]
    pub filter: FilterArgs,

    #[command(flatten)]
    pub diagnosis: DiagnosisArgs,
}

/// Parses `8M`, `64K`, `1G` or a byte count, and checks the ring buffer's rules.
fn parse_ring_size(text: &str) -> Result<u32, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let value: u64 = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let multiplier = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return Err(format!("unknown unit in {text} (use K, M or G)")),
    };
    let bytes = value * multiplier;
    if bytes < 4096 || !bytes.is_power_of_two() || bytes > 1 << 30 {
        return Err(format!(
            "{text} is {bytes} bytes; the ring buffer must be a power of two between 4K and 1G"
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("8M"), Ok(8 << 20));
        assert_eq!(parse_ring_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert!(parse_ring_size("3M").is_err());
        assert!(parse_ring_size("1K").is_err());
        assert!(parse_ring_size("8X").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
