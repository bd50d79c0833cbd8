//! Measurements: the CPU time of the machine and of a process, a process's
//! memory, the run statistics of its BPF programs, the agent's `/metrics`,
//! sockets in TIME_WAIT, and what the machine is (for the report's header).

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};

use super::metric_names::EVENTS;
use crate::exec;

/// /proc/stat's aggregate CPU line, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct CpuTimes {
    busy: u64,
}

impl CpuTimes {
    pub(super) fn read() -> anyhow::Result<Self> {
        let text = fs::read_to_string("/proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        ensure!(values.len() >= 5, "short cpu line in /proc/stat");
        // user nice system idle iowait irq softirq steal (guest is in user).
        let total: u64 = values.iter().take(8).sum();
        let idle = values[3] + values[4];
        Ok(Self { busy: total - idle })
    }

    /// Busy CPU seconds since `earlier`.
    pub(super) fn busy_seconds_since(&self, earlier: &Self) -> f64 {
        (self.busy.saturating_sub(earlier.busy)) as f64 / clock_ticks()
    }
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// utime + stime of a process, all threads, in seconds.
pub(super) fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which may contain spaces: state is
    // field 3, utime 14, stime 15.
    let after = text
        .rsplit_once(')')
        .context("unexpected /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    ensure!(fields.len() > 12, "short /proc/<pid>/stat");
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    Ok((utime + stime) as f64 / clock_ticks())
}

/// VmRSS and VmHWM in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Memory {
    pub(super) rss: u64,
    pub(super) hwm: u64,
}

pub(super) fn process_memory(pid: u32) -> anyhow::Result<Memory> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("no value")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

/// The ids of the BPF programs a process holds, from /proc/<pid>/fdinfo.
pub(super) fn program_ids(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .flatten()
        .filter_map(|entry| fs::read_to_string(entry.path()).ok())
        .filter_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A program's run statistics (counted while `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Debug, Default)]
pub(super) struct ProgramStats {
    pub(super) name: String,
    pub(super) run_time_ns: u64,
    pub(super) run_count: u64,
}

/// The statistics of a process's programs, by program id. The names are the
/// kernel's (at most 15 characters).
pub(super) fn program_stats(pid: u32) -> anyhow::Result<BTreeMap<u32, ProgramStats>> {
    let ids = program_ids(pid);
    let mut stats = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing BPF programs")?;
        if ids.binary_search(&info.id()).is_ok() {
            stats.insert(
                info.id(),
                ProgramStats {
                    name: info.name_as_str().unwrap_or("?").to_string(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_count: info.run_count(),
                },
            );
        }
    }
    Ok(stats)
}

/// Per-program differences between two snapshots, summed by name.
pub(super) fn program_delta(
    before: &BTreeMap<u32, ProgramStats>,
    after: &BTreeMap<u32, ProgramStats>,
) -> BTreeMap<String, ProgramStats> {
    let mut by_name: BTreeMap<String, ProgramStats> = BTreeMap::new();
    for (id, now) in after {
        let then = before.get(id).cloned().unwrap_or_default();
        let entry = by_name.entry(now.name.clone()).or_insert(ProgramStats {
            name: now.name.clone(),
            ..Default::default()
        });
        entry.run_time_ns += now.run_time_ns.saturating_sub(then.run_time_ns);
        entry.run_count += now.run_count.saturating_sub(then.run_count);
    }
    by_name
}

/// `kernel.bpf_stats_enabled`, restored to what it was when dropped.
pub(super) struct BpfStats {
    original: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn save() -> anyhow::Result<Self> {
        let original = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        let stats = Self { original };
        stats.set(false)?;
        Ok(stats)
    }

    pub(super) fn set(&self, enabled: bool) -> anyhow::Result<()> {
        fs::write(BPF_STATS, if enabled { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.original);
    }
}

/// The agent's own metrics (those without labels), by name.
#[derive(Clone, Debug, Default)]
pub(super) struct Scrape(HashMap<String, f64>);

impl Scrape {
    pub(super) fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    pub(super) fn delta(&self, earlier: &Self, name: &str) -> f64 {
        self.get(name) - earlier.get(name)
    }
}

pub(super) fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to the agent's metrics at {addr}"))?;
    // The agent serves metrics from the thread that reads events and scans the
    // kernel's tables: a busy agent answers late.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the agent's metrics from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "metrics answered {}",
        head.lines().next().unwrap_or_default()
    );
    let mut values = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.contains('{') {
            continue;
        }
        if let Some((name, value)) = line.split_once(' ')
            && let Ok(value) = value.trim().parse::<f64>()
        {
            values.insert(name.to_string(), value);
        }
    }
    ensure!(values.contains_key(EVENTS), "no {EVENTS} in the metrics");
    Ok(Scrape(values))
}

/// Sockets in TIME_WAIT in this network namespace (/proc/net/sockstat).
pub(super) fn time_wait_sockets() -> u64 {
    let text = fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "tw")?;
            fields.get(at + 1)?.parse().ok()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The machine

pub(super) struct Machine {
    pub(super) kernel: String,
    pub(super) cpus: usize,
    pub(super) cpu_model: String,
    pub(super) memory: String,
    pub(super) date: String,
    pub(super) commit: String,
    pub(super) tools: Vec<(String, String)>,
}

impl Machine {
    pub(super) fn read(tracer: &Path) -> Self {
        let first_line = |cmd: &mut Command| -> String {
            exec::output(cmd)
                .map(|out| {
                    let text = if out.stdout.is_empty() {
                        out.stderr
                    } else {
                        out.stdout
                    };
                    String::from_utf8_lossy(&text)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|_| "?".into())
        };
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or("?".into(), |kib| {
                format!("{:.1} GiB", kib as f64 / 1048576.0)
            });
        let root = exec::workspace_root();
        let mut commit = first_line(Command::new("git").arg("-C").arg(&root).args([
            "rev-parse",
            "--short",
            "HEAD",
        ]));
        let changed = exec::output(Command::new("git").arg("-C").arg(&root).args([
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_ok_and(|out| !out.stdout.is_empty());
        if changed {
            commit.push_str(" with local changes");
        }
        Self {
            kernel: first_line(Command::new("uname").arg("-r")),
            cpus: thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map_or("?".into(), |(_, model)| model.trim().to_string()),
            memory,
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            commit,
            tools: vec![
                ("agent".into(), tracer.display().to_string()),
                ("nginx".into(), first_line(Command::new("nginx").arg("-v"))),
                ("wrk".into(), first_line(Command::new("wrk").arg("-v"))),
                (
                    "bpftrace".into(),
                    first_line(Command::new("bpftrace").arg("--version")),
                ),
            ],
        }
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "Linux {}, {} CPUs ({}), {} RAM, {}",
            self.kernel, self.cpus, self.cpu_model, self.memory, self.date
        )
    }
}
