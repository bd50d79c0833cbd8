//! The matrix's outcome: a table on stdout and a Markdown report (the source of
//! docs/kernels.md).

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use super::{
    build::PROBE,
    guest::{GuestResult, Status, TestResult},
};

pub struct Matrix {
    /// The command that ran it.
    pub command: String,
    pub results: Vec<GuestResult>,
    pub suites: Vec<String>,
    pub filter: Option<String>,
    pub test_timeout: Duration,
    pub memory_mib: u32,
}

/// What `tracer probe` said, digested.
struct Probe {
    /// `mode` line, or why loading failed.
    mode: String,
    loaded: bool,
    minimum: Option<String>,
    /// Hooks listed as missing.
    missing: Vec<String>,
    /// `degraded` lines: hooks refused and what is lost.
    degraded: Vec<String>,
    /// Log lines (fallbacks the loader took).
    notes: Vec<String>,
    /// Alternatives for state changes and what became of them.
    alternatives: Vec<String>,
    /// The loader's error, when the programs did not load.
    error: Option<String>,
}

fn parse_probe(text: Option<&str>) -> Probe {
    let mut probe = Probe {
        mode: "unknown (no probe output)".into(),
        loaded: false,
        minimum: None,
        missing: Vec::new(),
        degraded: Vec::new(),
        notes: Vec::new(),
        alternatives: Vec::new(),
        error: None,
    };
    let Some(text) = text else {
        return probe;
    };
    let mut in_alternatives = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(rest) = line.strip_prefix("kernel ") {
            probe.minimum = rest
                .split_once("(minimum ")
                .and_then(|(_, m)| m.split(')').next())
                .map(str::to_string);
        } else if let Some(mode) = line.strip_prefix("mode ") {
            probe.mode = mode.trim().to_string();
            probe.loaded = true;
        } else if let Some(degraded) = trimmed.strip_prefix("degraded ") {
            probe.degraded.push(degraded.trim().to_string());
        } else if line.starts_with("alternatives") {
            in_alternatives = true;
        } else if in_alternatives && line.starts_with("  ") {
            probe
                .alternatives
                .push(trimmed.split_whitespace().collect::<Vec<_>>().join(" "));
        } else if trimmed.ends_with(" missing") && line.starts_with("  ") {
            probe
                .missing
                .push(trimmed.trim_end_matches(" missing").trim().to_string());
        } else if let Some(error) = line.strip_prefix("tracer: ") {
            probe.error = Some(error.trim().to_string());
        } else if line.starts_with('[') && (line.contains(" INFO ") || line.contains(" WARN ")) {
            let note = line.split_once("] ").map_or(line, |(_, rest)| rest);
            probe.notes.push(note.trim().to_string());
        }
    }
    if !probe.loaded {
        probe.mode = match &probe.error {
            Some(_) => "none: the programs did not load".into(),
            None => "unknown (probe did not finish)".into(),
        };
    }
    probe
}

/// The verifier's own complaint, when the error carries one.
fn verifier_summary(error: &str) -> String {
    match error.split_once("Verifier output: ") {
        Some((head, verifier)) => {
            let first = verifier.lines().next().unwrap_or("").trim();
            format!("{} verifier: {first}", head.trim_end_matches(". ").trim())
        }
        None => error.lines().next().unwrap_or("").to_string(),
    }
}

/// How a kernel's tests ended. A flaky test (failed, then passed when run
/// again) is a failure like any other: it is counted apart only so that the
/// report tells a test that fails by chance from one that always fails.
#[derive(Default)]
struct Counts {
    passed: usize,
    flaky: usize,
    failed: usize,
    timeout: usize,
    not_run: usize,
    /// Not applicable: the kernel does not offer the suite's state hook.
    unsupported: usize,
}

impl Counts {
    fn of(tests: &[TestResult]) -> Self {
        let mut counts = Self::default();
        for test in tests {
            let slot = match test.status {
                Status::Ok | Status::Ignored => &mut counts.passed,
                Status::Flaky => &mut counts.flaky,
                Status::Failed => &mut counts.failed,
                Status::Timeout => &mut counts.timeout,
                Status::NotRun => &mut counts.not_run,
                Status::Unsupported => &mut counts.unsupported,
            };
            *slot += 1;
        }
        counts
    }

    fn failures(&self) -> usize {
        self.flaky + self.failed + self.timeout + self.not_run
    }

    /// The counts in the order of [`Counts::HEADINGS`].
    fn columns(&self) -> [usize; 6] {
        [
            self.passed,
            self.flaky,
            self.failed,
            self.timeout,
            self.not_run,
            self.unsupported,
        ]
    }

    const HEADINGS: [&str; 6] = ["passed", "flaky", "failed", "timed out", "not run", "n/a"];
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or("-".into(), |d| format!("{:.0} s", d.as_secs_f64()))
}

/// The first panic of a failed test's output, or its last lines.
fn excerpt(log: Option<&Path>) -> String {
    let Some(text) = log.and_then(|p| fs::read_to_string(p).ok()) else {
        return "(no output)".into();
    };
    let lines: Vec<&str> = text.lines().collect();
    if let Some(at) = lines.iter().position(|l| l.contains("panicked at")) {
        return lines[at..]
            .iter()
            .take_while(|l| !l.trim().is_empty() && !l.starts_with("note: "))
            .take(8)
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
    }
    let start = lines.len().saturating_sub(6);
    lines[start..].join("\n")
}

impl Matrix {
    pub fn failures(&self) -> usize {
        self.results
            .iter()
            .map(|r| {
                Counts::of(&r.tests).failures()
                    + usize::from(r.problem.is_some() && r.tests.is_empty())
            })
            .sum()
    }

    /// Per-kernel summary, then every test against every kernel.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nkernel matrix (QEMU TCG, 2 vCPUs, {} MiB; {} s per test)",
            self.memory_mib,
            self.test_timeout.as_secs()
        );
        let counts_heading: String = Counts::HEADINGS
            .iter()
            .map(|heading| format!(" {heading:>9}"))
            .collect();
        let _ = writeln!(
            out,
            "{:<7} {:<28} {:<48}{counts_heading} {:>6} {:>7}",
            "series", "kernel", "mode (tracer probe)", "boot", "tests"
        );
        for result in &self.results {
            let probe = parse_probe(result.probe.as_deref());
            let counts = Counts::of(&result.tests);
            let counts_cells: String = counts
                .columns()
                .iter()
                .map(|count| format!(" {count:>9}"))
                .collect();
            let _ = writeln!(
                out,
                "{:<7} {:<28} {:<48}{counts_cells} {:>6} {:>7}",
                result.kernel.series,
                result.kernel.release,
                truncate(&probe.mode, 48),
                seconds(result.boot),
                seconds(result.tests_time)
            );
            if let Some(problem) = &result.problem {
                let _ = writeln!(out, "        guest: {problem}");
            }
            if result.problem.is_some() || counts.failures() > 0 {
                let _ = writeln!(
                    out,
                    "        logs: {}, console: {}",
                    result.results_dir.join("logs").display(),
                    result.console.display()
                );
            }
        }
        let _ = writeln!(out);
        let width = self
            .rows()
            .iter()
            .map(|(suite, name)| label(suite, name).len())
            .max()
            .unwrap_or(10)
            .max(10);
        let _ = write!(out, "{:<width$}", "test");
        for result in &self.results {
            let _ = write!(out, " {:>8}", result.kernel.series);
        }
        let _ = writeln!(out);
        for (suite, name) in self.rows() {
            let _ = write!(out, "{:<width$}", label(&suite, &name));
            for result in &self.results {
                let status = result
                    .tests
                    .iter()
                    .find(|t| t.suite == suite && t.name == name)
                    .map_or("-", |t| t.status.label());
                let _ = write!(out, " {status:>8}");
            }
            let _ = writeln!(out);
        }
        for result in &self.results {
            for test in result.tests.iter().filter(|t| t.is_reported()) {
                let _ = writeln!(
                    out,
                    "\n{} {}: {}",
                    result.kernel.series,
                    label(&test.suite, &test.name),
                    test.status.label()
                );
                for line in excerpt(test.failed_log()).lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
        out
    }

    /// Every (suite, test) of any kernel, in plan order.
    fn rows(&self) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = Vec::new();
        for result in &self.results {
            for test in &result.tests {
                let row = (test.suite.clone(), test.name.clone());
                if !rows.contains(&row) {
                    rows.push(row);
                }
            }
        }
        rows
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let minimum = self
            .results
            .iter()
            .find_map(|r| parse_probe(r.probe.as_deref()).minimum)
            .unwrap_or_else(|| "5.8".into());
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let _ = writeln!(md, "# Kernels the agent runs on\n");
        let _ = writeln!(
            md,
            "Generated by `{}` ({date}) from the run it reports; do not edit by hand.\n",
            self.command
        );
        let _ = writeln!(
            md,
            "**Minimum kernel: {minimum}** (the BPF ring buffer; `tracer` refuses older \
             kernels), with BTF (`/sys/kernel/btf/vmlinux`, or `--btf`).\n"
        );
        md.push_str(HOOKS);
        let _ = writeln!(
            md,
            "Each kernel is the newest Debian cloud kernel of its series \
             (`linux-image-<series>.*-cloud-amd64-unsigned` from bullseye, bookworm and \
             bookworm-backports), booted under {qemu} with TCG (one host thread, `-cpu max,cx16=off`, 2 vCPUs, \
             {} MiB). The guest runs the binaries built on the host from the host's root \
             filesystem (read-only virtio-fs under a tmpfs overlay), as root: `tracer -v \
             probe`, then each test in a process of its own with a {} s timeout; the \
             kernels run side by side, one per host CPU. Suites: {}{}. Emulation is 10-30 \
             times slower than the host. A test that fails is run once more: one that then \
             passes is reported flaky, and counts as a failure all the same.\n",
            self.memory_mib,
            self.test_timeout.as_secs(),
            self.suites
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
            self.filter
                .as_ref()
                .map(|f| format!(" (integration tests matching `{f}`)"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            md,
            "| series | kernel | package version | mode (`tracer probe`) | {} | boot | tests |\n\
             | --- | --- | --- | --- | {}---: | ---: |",
            Counts::HEADINGS.join(" | "),
            "---: | ".repeat(Counts::HEADINGS.len())
        );
        for result in &self.results {
            let probe = parse_probe(result.probe.as_deref());
            let counts = Counts::of(&result.tests)
                .columns()
                .map(|count| count.to_string())
                .join(" | ");
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {counts} | {} | {} |",
                result.kernel.series,
                result.kernel.release,
                result.kernel.version,
                probe.mode,
                seconds(result.boot),
                seconds(result.tests_time)
            );
        }
        let _ = writeln!(md);

        for result in &self.results {
            let probe = parse_probe(result.probe.as_deref());
            let _ = writeln!(
                md,
                "## {} — `{}`\n\n`{}` {}\n",
                result.kernel.series,
                result.kernel.release,
                result.kernel.package,
                result.kernel.version
            );
            if let Some(problem) = &result.problem {
                let _ = writeln!(md, "**The guest did not finish:** {problem}.\n");
            }
            let _ = writeln!(md, "Mode: **{}**.\n", probe.mode);
            let mut degrades: Vec<String> = Vec::new();
            if let Some(error) = &probe.error {
                degrades.push(format!(
                    "the agent does not start: {}",
                    verifier_summary(error)
                ));
            }
            for note in &probe.notes {
                degrades.push(format!("loader: {note}"));
            }
            for degraded in &probe.degraded {
                degrades.push(degraded.clone());
            }
            for missing in &probe.missing {
                degrades.push(format!("{missing}: not offered by this kernel"));
            }
            if degrades.is_empty() && probe.loaded {
                let _ = writeln!(md, "Nothing degrades: every hook attached.\n");
            } else if !degrades.is_empty() {
                let _ = writeln!(md, "What degrades:\n");
                for line in degrades {
                    let _ = writeln!(md, "- {}", line.replace('\n', " "));
                }
                let _ = writeln!(md);
            }
            if !probe.alternatives.is_empty() {
                let _ = writeln!(md, "State-change alternatives (`--state-hook`):\n");
                for line in &probe.alternatives {
                    let _ = writeln!(md, "- {}", verifier_summary(line));
                }
                let _ = writeln!(md);
            }
            if let Some(text) = &result.probe {
                let _ = writeln!(
                    md,
                    "<details><summary><code>tracer -v probe</code></summary>\n\n```text\n{}\n```\n\n</details>\n",
                    text.trim_end()
                );
            }
            let _ = writeln!(md, "| test | result | seconds |\n| --- | --- | ---: |");
            for test in &result.tests {
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} |",
                    label(&test.suite, &test.name),
                    test.status.label(),
                    test.seconds.map_or("-".into(), |s| format!("{s:.1}"))
                );
            }
            let _ = writeln!(md);
            let failures: Vec<&TestResult> = result
                .tests
                .iter()
                .filter(|t| t.is_reported() && t.suite != PROBE)
                .collect();
            if !failures.is_empty() {
                let _ = writeln!(
                    md,
                    "Failures (a flaky test failed, then passed when run again):\n"
                );
                for test in failures {
                    let _ = writeln!(
                        md,
                        "- `{}` ({}):\n\n  ```text\n{}\n  ```\n",
                        label(&test.suite, &test.name),
                        test.status.label(),
                        excerpt(test.failed_log())
                            .lines()
                            .map(|l| format!("  {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                }
            }
        }
        md
    }
}

/// How the agent picks its hooks, and what each fallback costs: the part of
/// docs/kernels.md that explains the per-kernel results below it.
const HOOKS: &str = "\
## How the agent hooks each kernel

| what | preferred | fallbacks, in order | without any of them |
| --- | --- | --- | --- |
| state changes (`--state-hook auto`) | `tp_btf/inet_sock_set_state` | `tracepoint/sock:inet_sock_set_state`; by choice `fentry/tcp_set_state` or `kprobe/tcp_set_state` (`--state-hook`, or `TRACER_STATE_HOOK`) | the agent does not start |
| sends | `tp_btf/sock_send_length` (6.3+) | `fexit/tcp_sendmsg` | no `reuse` events, no `stale_reuse` findings |
| reads | `tp_btf/sock_recv_length` (6.3+) | `fentry/tcp_cleanup_rbuf` | no request accounting, no `pool_saturation` findings |
| resets sent in answer to a segment | `tracepoint/tcp:tcp_send_reset` (6.10+) | `kprobe/tcp_v4_send_reset`, `kprobe/tcp_v6_send_reset` (before 6.10 the tracepoint misses them, those from TIME_WAIT remnants included) | no `late_request_reset` findings |
| other resets, retransmits, connect/accept | classic tracepoints | — | the one event each names |

- The send and read hooks keep per-socket state in socket storage, which tracing
  programs may use from 5.11. On 5.10 neither the BTF tracepoints nor the
  trampolines load, so the agent runs on the classic state-change tracepoint
  alone: every lifecycle event and the findings built from closes
  (`idle_timeout_mismatch`, `close_wait_leak`, `silent_drop`,
  `late_request_reset`, churn, port exhaustion, accept queue) work; reuses,
  `stale_reuse` and request accounting (`pool_saturation`,
  `keepalive_worker_starvation`) do not.
- On 5.11–6.2 sends and reads come from the trampolines: the same events and
  findings, except that a `recv(MSG_PEEK)` counts as reading the response.
- With the state changes on the classic tracepoint or a kprobe, the socket
  pointer is untyped and cannot reach the socket storage: a send after the
  peer's FIN is reported as a reuse but not flagged `peer_closed`, and request
  accounting is off (a connection closed mid-request could not be released),
  so there are no `pool_saturation` or `keepalive_worker_starvation` findings.
- `tracer probe` prints all of this for the running kernel; the sections
  below are its output on each kernel of the matrix. The suites named
  `suite@hook` ran with `TRACER_STATE_HOOK=hook`. Each series has hooks it
  must accept (a refusal fails the suite); `n/a` marks any other hook that
  `tracer probe` did not list as available there.

";

fn label(suite: &str, name: &str) -> String {
    if suite == name || name.starts_with(&format!("{suite}::")) {
        name.to_string()
    } else {
        format!("{suite}::{name}")
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(status: Status) -> TestResult {
        TestResult {
            suite: "keepalive".into(),
            name: "pool".into(),
            status,
            seconds: Some(1.0),
            log: None,
            first_log: None,
        }
    }

    #[test]
    fn a_test_that_passes_only_when_run_again_is_a_failure() {
        let counts = Counts::of(&[
            test(Status::Ok),
            test(Status::Ignored),
            test(Status::Flaky),
            test(Status::Unsupported),
        ]);
        assert_eq!((counts.passed, counts.flaky, counts.unsupported), (2, 1, 1));
        assert_eq!(counts.failures(), 1);
    }

    #[test]
    fn kernels_without_the_suites_hook_fail_nothing() {
        let counts = Counts::of(&[test(Status::Ok), test(Status::Unsupported)]);
        assert_eq!(counts.failures(), 0);
        let counts = Counts::of(&[test(Status::Timeout), test(Status::NotRun)]);
        assert_eq!(counts.failures(), 2);
    }
}
