//! The report: the targets against what this run measured, and a section per
//! part, as the Markdown that is printed and written to `bench/results*.md`.

use std::{fmt::Write as _, time::Duration};

use super::{
    Options, Plan,
    kernel_cost::KernelCost,
    measure::{Machine, ProgramStats},
    median,
    metric_names::{EVENTS_LOST, RINGBUF_PENDING, TRACKED},
    mib, percent,
    pipeline::Pipeline,
    rates::{RateResult, rate_name},
    rss::Held,
    soak::Soak,
    thousands,
    throughput::{AgentRun, Throughput},
    workload::{TracerKind, Workload},
};

pub(super) struct Report {
    machine: Machine,
    command: String,
    quick: bool,
    rounds: u32,
    duration: Duration,
    pub(super) throughput: Vec<Throughput>,
    pub(super) costs: Vec<KernelCost>,
    pub(super) rates: Vec<RateResult>,
    pub(super) held: Option<Held>,
    pub(super) pipeline: Option<Pipeline>,
    pub(super) soak: Option<Soak>,
    /// Nanoseconds per run of an almost empty program, for scale.
    pub(super) reference_ns: Option<f64>,
    /// Parts that failed, with the error.
    pub(super) failures: Vec<(String, String)>,
}

/// One line of the targets table.
struct Target {
    target: String,
    measured: String,
    /// `None`: not measured as specified (the measured column says why).
    passed: Option<bool>,
}

impl Report {
    pub(super) fn new(machine: Machine, plan: &Plan, options: &Options) -> Self {
        let mut command = "cargo xtask bench".to_string();
        if options.quick {
            command.push_str(" --quick");
        }
        if options.rounds.is_some() {
            write!(command, " --rounds {}", plan.rounds).expect("to a string");
        }
        if options.duration.is_some() {
            write!(command, " --duration {}", plan.duration.as_secs()).expect("to a string");
        }
        if options.soak {
            command.push_str(" --soak");
        }
        if !options.only.is_empty() {
            let parts: Vec<String> = options
                .only
                .iter()
                .map(|p| format!("{p:?}").to_lowercase())
                .collect();
            write!(command, " --only {}", parts.join(",")).expect("to a string");
        }
        if let Some(tracer) = &options.tracer {
            write!(command, " --tracer {}", tracer.display()).expect("to a string");
        }
        Self {
            machine,
            command,
            quick: plan.quick,
            rounds: plan.rounds,
            duration: plan.duration,
            throughput: Vec::new(),
            costs: Vec::new(),
            rates: Vec::new(),
            held: None,
            pipeline: None,
            soak: None,
            reference_ns: None,
            failures: Vec::new(),
        }
    }

    fn throughput_of(&self, workload: Workload) -> Option<&Throughput> {
        self.throughput.iter().find(|t| t.workload == workload)
    }

    fn targets(&self) -> Vec<Target> {
        let mut targets = Vec::new();
        for (workload, goal) in [(Workload::KeepAlive, 0.99), (Workload::Churn, 0.97)] {
            if let Some(t) = self.throughput_of(workload) {
                let ratio = t.ratio(TracerKind::Agent);
                targets.push(Target {
                    target: format!(
                        "{}: throughput with the agent ≥ {:.0}% of no tracer",
                        workload.short(),
                        goal * 100.0
                    ),
                    measured: format!(
                        "{} (per-round median {}; {} rounds)",
                        percent(ratio),
                        percent(t.paired_ratio(TracerKind::Agent)),
                        self.rounds
                    ),
                    passed: Some(ratio >= goal),
                });
            }
        }
        for workload in [Workload::KeepAlive, Workload::Churn] {
            if let Some(t) = self.throughput_of(workload) {
                let agent = t.median_rps(TracerKind::Agent);
                let peer = t.median_rps(TracerKind::Bpftrace);
                targets.push(Target {
                    target: format!(
                        "{}: throughput with the agent better than with bpftrace",
                        workload.short()
                    ),
                    measured: format!(
                        "agent {} vs bpftrace {} of no tracer",
                        percent(t.ratio(TracerKind::Agent)),
                        percent(t.ratio(TracerKind::Bpftrace))
                    ),
                    passed: Some(agent > peer),
                });
            }
        }
        if !self.costs.is_empty() {
            let averages: Vec<(Workload, f64)> = self
                .costs
                .iter()
                .filter_map(|c| Some((c.workload, c.average_ns(TracerKind::Agent)?)))
                .collect();
            targets.push(Target {
                target: "kernel cost ≤ 150 ns per program run on average".into(),
                measured: format!(
                    "{}{}",
                    averages
                        .iter()
                        .map(|(w, ns)| format!("{} {:.0} ns", w.short(), ns))
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.reference_ns.map_or(String::new(), |ns| format!(
                        " (an almost empty program: {ns:.0} ns on this machine)"
                    ))
                ),
                passed: (!averages.is_empty()).then(|| averages.iter().all(|(_, ns)| *ns <= 150.0)),
            });
        }
        if let Some(r) = self
            .rates
            .iter()
            .find(|r| r.with_agent && r.target == Some(20_000.0))
        {
            targets.push(Target {
                target: "zero lost events at 20,000 new connections per second".into(),
                measured: if r.reached() {
                    format!(
                        "{} lost of {} events at {}/s",
                        thousands(r.lost as u64),
                        thousands(r.events as u64),
                        thousands(r.achieved as u64)
                    )
                } else {
                    format!(
                        "20,000/s not reached: the client made {}/s with the agent running{}; \
                         {} lost of {} events at that rate",
                        thousands(r.achieved as u64),
                        self.rates.iter().find(|b| !b.with_agent).map_or(
                            String::new(),
                            |b| format!(
                                " ({}/s at most without a tracer)",
                                thousands(b.achieved as u64)
                            )
                        ),
                        thousands(r.lost as u64),
                        thousands(r.events as u64)
                    )
                },
                passed: if r.lost > 0.0 {
                    Some(false)
                } else {
                    r.reached().then_some(true)
                },
            });
        }
        if let Some(r) = self
            .rates
            .iter()
            .find(|r| r.with_agent && r.target == Some(10_000.0))
        {
            let cpu = r.agent_cpu_percent();
            targets.push(Target {
                target: "agent CPU ≤ 5% of one core at 10,000 connections per second".into(),
                measured: if r.reached() {
                    format!("{cpu:.1}% at {}/s", thousands(r.achieved as u64))
                } else {
                    format!(
                        "{cpu:.1}% at {}/s (10,000/s not reached; ≈ {:.1}% scaled to 10,000/s)",
                        thousands(r.achieved as u64),
                        cpu * 10_000.0 / r.achieved.max(1.0)
                    )
                },
                // Already over the limit at a lower rate is over it at 10,000/s.
                passed: if r.reached() || cpu > 5.0 {
                    Some(cpu <= 5.0)
                } else {
                    None
                },
            });
        }
        if let Some(p) = &self.pipeline {
            targets.push(Target {
                target: "userspace pipeline ≥ 1,000,000 events/s on one core".into(),
                measured: format!("{} events/s", thousands(p.full.0 as u64)),
                passed: Some(p.full.0 >= 1_000_000.0),
            });
        }
        if let Some(held) = &self.held {
            let at_100k = held.points.iter().find(|p| p.tracked >= 100_000.0);
            targets.push(Target {
                target: "agent RSS ≤ 64 MiB with 100,000 tracked connections".into(),
                measured: match (at_100k, held.points.last()) {
                    (Some(p), _) => format!(
                        "{} with {} tracked ({} connections, both ends local; peak RSS so far \
                         {})",
                        mib(p.memory.rss),
                        thousands(p.tracked as u64),
                        thousands(p.connections as u64),
                        mib(p.memory.hwm)
                    ),
                    (None, Some(p)) => format!(
                        "{} with {} tracked: 100,000 not reached{}",
                        mib(p.memory.rss),
                        thousands(p.tracked as u64),
                        held.shortfall
                            .as_ref()
                            .map_or(String::new(), |s| format!(" ({s})"))
                    ),
                    (None, None) => "no measurement".into(),
                },
                passed: at_100k.map(|p| p.memory.rss <= 64 << 20),
            });
        }
        if let Some(soak) = &self.soak {
            let growth = soak.growth().map_or("n/a".into(), |(start, most)| {
                format!(
                    "{:+.1}% ({} → {})",
                    (most as f64 / start as f64 - 1.0) * 100.0,
                    mib(start),
                    mib(most)
                )
            });
            targets.push(Target {
                target: format!(
                    "soak: {} connections, RSS growth after warm-up < 5%, no lost events, no \
                     map full",
                    thousands(soak.planned)
                ),
                measured: format!(
                    "{} connections in {} s; RSS {growth}; {} lost; maps {}",
                    thousands(soak.connections),
                    soak.duration.as_secs(),
                    thousands(soak.lost() as u64),
                    if soak.maps_ok() { "never full" } else { "FULL" }
                ),
                passed: Some(soak.passed()),
            });
        }
        targets
    }

    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "# Benchmark results\n");
        if self.quick {
            let _ = writeln!(
                out,
                "**Smoke run (`--quick`): too short to measure anything; it only shows that \
                 every part of the benchmark works.**\n"
            );
        }
        let _ = writeln!(
            out,
            "- Machine: Linux {}, {} CPUs ({}), {} RAM",
            m.kernel, m.cpus, m.cpu_model, m.memory
        );
        let _ = writeln!(out, "- Date: {}", m.date);
        let _ = writeln!(out, "- Tracer: commit {}", m.commit);
        let _ = writeln!(out, "- Command: `{}`", self.command);
        for (name, version) in &m.tools {
            let _ = writeln!(out, "- {name}: {version}");
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "## Targets\n");
        let _ = writeln!(
            out,
            "Goals, not timed tests: each is reported against what this run measured.\n"
        );
        let _ = writeln!(out, "| target | measured | result |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for t in self.targets() {
            let result = match t.passed {
                Some(true) => "pass",
                Some(false) => "**fail**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {} |", t.target, t.measured, result);
        }
        let _ = writeln!(out);
        if !self.failures.is_empty() {
            let _ = writeln!(
                out,
                "Parts of the benchmark that failed (their targets are missing above):\n"
            );
            for (part, error) in &self.failures {
                let _ = writeln!(out, "- {part}: `{}`", error.replace('\n', " "));
            }
            let _ = writeln!(out);
        }

        self.render_throughput(&mut out);
        self.render_agent(&mut out);
        self.render_costs(&mut out);
        self.render_rates(&mut out);
        self.render_held(&mut out);
        self.render_pipeline(&mut out);
        self.render_soak(&mut out);
        self.render_method(&mut out);
        out
    }

    fn render_throughput(&self, out: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        let _ = writeln!(out, "## Throughput\n");
        let _ = writeln!(
            out,
            "`wrk -t2 -c50 -d{}s` against a local nginx (`return 200 \"ok\"`), {} interleaved \
             round(s); the order of the tracers rotates each round. CPU per request is the \
             whole machine's busy time (/proc/stat) during the run divided by the requests.\n",
            self.duration.as_secs(),
            self.rounds
        );
        for t in &self.throughput {
            let _ = writeln!(out, "### {}\n", t.workload.name());
            let _ = writeln!(
                out,
                "| tracer | median req/s | min – max | vs no tracer | per-round median ratio \
                 | CPU µs/request | errors |"
            );
            let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            for tracer in TracerKind::ALL {
                let rps: Vec<f64> = t.of(tracer).map(|r| r.wrk.requests_per_sec).collect();
                if rps.is_empty() {
                    continue;
                }
                let min = rps.iter().copied().fold(f64::INFINITY, f64::min);
                let max = rps.iter().copied().fold(0.0, f64::max);
                let errors: u64 = t.of(tracer).map(|r| r.wrk.errors).sum();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} – {} | {} | {} | {:.1} | {} |",
                    tracer.name(),
                    thousands(t.median_rps(tracer) as u64),
                    thousands(min as u64),
                    thousands(max as u64),
                    percent(t.ratio(tracer)),
                    if tracer == TracerKind::None {
                        "—".into()
                    } else {
                        percent(t.paired_ratio(tracer))
                    },
                    t.median_cpu_us(tracer),
                    errors
                );
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "<details><summary>every run</summary>\n");
            let _ = writeln!(
                out,
                "| round | tracer | req/s | requests | CPU µs/request | agent events / peer \
                 lines |"
            );
            let _ = writeln!(out, "| ---: | --- | ---: | ---: | ---: | ---: |");
            for r in &t.runs {
                let reported = match (&r.agent, r.peer_lines) {
                    (Some(a), _) => format!("{} events", thousands(a.events as u64)),
                    (None, Some(lines)) => format!("{} lines", thousands(lines)),
                    _ => "—".into(),
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.1} | {} |",
                    r.round + 1,
                    r.tracer.name(),
                    thousands(r.wrk.requests_per_sec as u64),
                    thousands(r.wrk.requests),
                    r.cpu_us_per_request(),
                    reported
                );
            }
            let _ = writeln!(out, "\n</details>\n");
        }
    }

    fn render_agent(&self, out: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        let _ = writeln!(out, "## The agent during the throughput runs\n");
        let _ = writeln!(
            out,
            "Medians over its runs. CPU is the agent process's user + system time \
             (/proc/<pid>/stat); it excludes the kernel programs, which run in the context \
             of the traffic (see the kernel cost). Peak RSS is VmHWM.\n"
        );
        let _ = writeln!(
            out,
            "| workload | events/s | events/request | lost | untracked | CPU ms per 1,000 \
             events | CPU % of one core | peak RSS |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for t in &self.throughput {
            let runs: Vec<&AgentRun> = t.agent_runs().collect();
            if runs.is_empty() {
                continue;
            }
            let events_per_sec = median(runs.iter().map(|a| a.events / a.seconds).collect());
            let requests: Vec<f64> = t
                .of(TracerKind::Agent)
                .filter_map(|r| Some(r.agent.as_ref()?.events / r.wrk.requests as f64))
                .collect();
            let lost: f64 = runs.iter().map(|a| a.lost).sum();
            let untracked: f64 = runs.iter().map(|a| a.untracked).sum();
            let cpu_per_1000 = median(
                runs.iter()
                    .filter(|a| a.events > 0.0)
                    .map(|a| a.cpu_seconds * 1000.0 / a.events * 1000.0)
                    .collect(),
            );
            let cpu_percent = median(
                runs.iter()
                    .map(|a| a.cpu_seconds / a.seconds * 100.0)
                    .collect(),
            );
            let hwm = runs.iter().map(|a| a.memory.hwm).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {} | {} | {:.3} | {:.1}% | {} |",
                t.workload.short(),
                thousands(events_per_sec as u64),
                median(requests),
                thousands(lost as u64),
                thousands(untracked as u64),
                cpu_per_1000,
                cpu_percent,
                mib(hwm)
            );
        }
        let _ = writeln!(out);
    }

    fn render_costs(&self, out: &mut String) {
        if self.costs.is_empty() && self.reference_ns.is_none() {
            return;
        }
        let _ = writeln!(out, "## Kernel cost per program run\n");
        let _ = writeln!(
            out,
            "`kernel.bpf_stats_enabled=1` (run time / run count of each program, names as \
             the kernel truncates them), in separate {} s wrk runs: the statistics cost two \
             clock reads per program run, so the throughput runs above are made with them \
             off.\n",
            self.duration.as_secs()
        );
        if let Some(ns) = self.reference_ns {
            let _ = writeln!(
                out,
                "For scale: an almost empty program (bpftrace `count()` on \
                 `sys_enter_getppid`, one per-CPU map update) costs **{ns:.0} ns** per run on \
                 this machine.\n"
            );
        }
        let _ = writeln!(
            out,
            "| workload | tracer | program | runs/s | runs/request | ns/run |"
        );
        let _ = writeln!(out, "| --- | --- | --- | ---: | ---: | ---: |");
        for cost in &self.costs {
            for (tracer, requests, seconds, programs) in &cost.tracers {
                let mut total = ProgramStats::default();
                for p in programs.values() {
                    total.run_time_ns += p.run_time_ns;
                    total.run_count += p.run_count;
                    if p.run_count == 0 {
                        continue;
                    }
                    let _ = writeln!(
                        out,
                        "| {} | {} | `{}` | {} | {:.2} | {:.0} |",
                        cost.workload.short(),
                        tracer.name(),
                        p.name,
                        thousands((p.run_count as f64 / seconds) as u64),
                        p.run_count as f64 / *requests as f64,
                        p.run_time_ns as f64 / p.run_count as f64
                    );
                }
                let _ = writeln!(
                    out,
                    "| {} | {} | **all** | {} | {:.2} | **{:.0}** (≈ {:.0} ns/request) |",
                    cost.workload.short(),
                    tracer.name(),
                    thousands((total.run_count as f64 / seconds) as u64),
                    total.run_count as f64 / *requests as f64,
                    total.run_time_ns as f64 / total.run_count.max(1) as f64,
                    total.run_time_ns as f64 / *requests as f64
                );
            }
        }
        let _ = writeln!(out);
    }

    fn render_rates(&self, out: &mut String) {
        if self.rates.is_empty() {
            return;
        }
        let _ = writeln!(out, "## Connection rate\n");
        let _ = writeln!(
            out,
            "A loopback client in the benchmark (8 threads, std::net) opens connections at \
             a set rate (or as fast as it can) to 4 listeners that close them at once; the \
             client reads the end of file and closes. {} s per rate. CPU per connection is \
             the whole machine's busy time (client and listeners included). Lost events \
             come from the agent's `{EVENTS_LOST}`, the ring buffer's fill from \
             `{RINGBUF_PENDING}` sampled every 0.5 s.\n",
            self.duration.as_secs()
        );
        let _ = writeln!(
            out,
            "| target rate | tracer | TIME_WAIT at start | achieved | client errors | CPU \
             µs/connection | events | lost | untracked | agent CPU % of one core | agent CPU ms \
             per 1,000 events | ring buffer peak |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in &self.rates {
            let achieved = format!(
                "{}/s{}",
                thousands(r.achieved as u64),
                if r.reached() { "" } else { " (not reached)" }
            );
            let common = format!(
                "| {} | {} | {} | {} | {} | {:.1} |",
                rate_name(r.target),
                if r.with_agent { "agent" } else { "no tracer" },
                thousands(r.time_wait_before),
                achieved,
                thousands(r.errors),
                r.cpu_us_per_connection()
            );
            if !r.with_agent {
                let _ = writeln!(out, "{common} — | — | — | — | — | — |");
                continue;
            }
            let _ = writeln!(
                out,
                "{common} {} | {} | {} | {:.1}% | {:.3} | {:.1}% of {} |",
                thousands(r.events as u64),
                thousands(r.lost as u64),
                thousands(r.untracked as u64),
                r.agent_cpu_percent(),
                if r.events > 0.0 {
                    r.agent_cpu_seconds * 1e6 / r.events
                } else {
                    0.0
                },
                if r.ringbuf_size > 0.0 {
                    r.ringbuf_peak / r.ringbuf_size * 100.0
                } else {
                    0.0
                },
                mib(r.ringbuf_size as u64)
            );
        }
        let _ = writeln!(out);
    }

    fn render_held(&self, out: &mut String) {
        let Some(held) = &self.held else { return };
        let _ = writeln!(out, "## RSS with connections held open\n");
        let _ = writeln!(
            out,
            "Loopback connections opened and kept by {} helper processes of the benchmark \
             (up to {} each: both ends of a connection are on this host, so each takes two \
             descriptors of the helper's RLIMIT_NOFILE, and each is two tracked sockets, \
             `{TRACKED}`, limit {}). RSS is sampled once the agent has read every event. \
             Agent RSS before any connection: {}.\n",
            held.helpers,
            thousands(held.per_helper as u64),
            thousands(held.limit as u64),
            mib(held.baseline.rss)
        );
        let _ = writeln!(
            out,
            "| connections open | tracked sockets | untracked | agent RSS | agent peak RSS |"
        );
        let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: |");
        for p in &held.points {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                thousands(p.connections as u64),
                thousands(p.tracked as u64),
                thousands(p.untracked as u64),
                mib(p.memory.rss),
                mib(p.memory.hwm)
            );
        }
        let _ = writeln!(out);
        if let [first, .., last] = held.points.as_slice()
            && last.tracked > first.tracked
        {
            let per =
                (last.memory.rss as f64 - first.memory.rss as f64) / (last.tracked - first.tracked);
            let _ = writeln!(
                out,
                "Growth between the first and last point: {per:.0} bytes of RSS per tracked \
                 socket.\n"
            );
        }
        if let Some(reason) = &held.shortfall {
            let _ = writeln!(out, "Fewer connections than planned: {reason}.\n");
        }
        if held.lost > 0.0 {
            let _ = writeln!(out, "Events lost during this test: {}.\n", held.lost);
        }
    }

    fn render_pipeline(&self, out: &mut String) {
        let Some(p) = &self.pipeline else { return };
        let _ = writeln!(out, "## Userspace pipeline\n");
        let _ = writeln!(
            out,
            "`cargo bench -p tracer --bench pipeline` (criterion, one thread): hand-made \
             ring-buffer records ({} per iteration: opens, reuses after idle, closes by \
             either side, resets, stale reuses; 600 client connections to 300 destinations \
             from 6 processes, 200 server connections on 4 ports) decoded, fed to the \
             diagnosis and the metrics.\n",
            thousands(p.events_per_iteration)
        );
        let _ = writeln!(out, "| stage | events/s (mean) | 95% interval |");
        let _ = writeln!(out, "| --- | ---: | ---: |");
        let _ = writeln!(
            out,
            "| decode + diagnosis + metrics | {} | {} – {} |",
            thousands(p.full.0 as u64),
            thousands(p.full.1 as u64),
            thousands(p.full.2 as u64)
        );
        if let Some(decode) = p.decode {
            let _ = writeln!(out, "| decode only | {} | |", thousands(decode as u64));
        }
        let _ = writeln!(out);
    }

    fn render_soak(&self, out: &mut String) {
        let Some(soak) = &self.soak else { return };
        let _ = writeln!(out, "## Soak\n");
        let _ = writeln!(
            out,
            "{} connections planned over about {} s with the agent running (the \
             connection-rate client, paced); agent RSS (VmRSS) sampled every {} s, the \
             agent's metrics read in the background; warm-up {} s. {} connections made in {} \
             s, {} client errors; the agent read {} events, lost {}, could not track {}. \
             Result: **{}** (RSS growth after warm-up {}, lost events {}, maps {}).\n",
            thousands(soak.planned),
            soak.planned_duration.as_secs(),
            soak.sample_every.as_secs(),
            soak.warm_up.as_secs(),
            thousands(soak.connections),
            soak.duration.as_secs(),
            thousands(soak.errors),
            thousands(soak.events as u64),
            thousands(soak.lost as u64),
            thousands(soak.untracked as u64),
            if soak.passed() { "pass" } else { "fail" },
            if soak.growth_ok() { "< 5%" } else { "≥ 5%" },
            if soak.lost == 0.0 { "none" } else { "some" },
            if soak.maps_ok() {
                "never full"
            } else {
                "full at some point"
            }
        );
        let _ = writeln!(
            out,
            "| time | connections | agent RSS | tracked | lost | untracked | TIME_WAIT \
             sockets | metrics age |"
        );
        let _ = writeln!(
            out,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for s in &soak.samples {
            let _ = writeln!(
                out,
                "| {} s | {} | {} | {} | {} | {} | {} | {} |",
                s.at.as_secs(),
                thousands(s.connections),
                mib(s.rss),
                thousands(s.tracked as u64),
                thousands(s.lost as u64),
                thousands(s.untracked as u64),
                thousands(s.time_wait),
                s.metrics_age
                    .map_or("—".into(), |age| format!("{:.1} s", age.as_secs_f64()))
            );
        }
        let _ = writeln!(out);
    }

    fn render_method(&self, out: &mut String) {
        let _ = writeln!(out, "## Notes\n");
        let _ = writeln!(
            out,
            "- Client, server, tracer and the machine's other work share {} CPUs; nothing is \
             pinned. Differences of a few percent between single runs are noise: compare the \
             medians, the per-round ratios and the CPU per request.",
            self.machine.cpus
        );
        let _ = writeln!(
            out,
            "- wrk keeps every CPU busy, so CPU per request is close to CPUs / throughput; it \
             tells more when the machine was not saturated, or when other work on the \
             machine moved the throughput."
        );
        let _ = writeln!(
            out,
            "- The agent runs with its defaults (`tracer agent`: every detection on, findings \
             logged, metrics served), its log going to /dev/null. The peer is \
             `bench/peer.bt`: bpftrace on `sock:inet_sock_set_state`, a tcplife-like line \
             per closed connection, read and discarded by the benchmark."
        );
        let _ = writeln!(
            out,
            "- A target is \"not measured\" when this machine could not produce the \
             condition it names (a connection rate it did not reach, a connection count it \
             could not hold); the measured column then says what it did reach."
        );
    }
}
