//! `cargo xtask bench`: what the agent costs and how much it holds, measured on
//! this machine, printed and written to `bench/results.md`.
//!
//! - Throughput: `wrk` against a local nginx, keep-alive (the send/receive path)
//!   and a new connection per request (the state-change path), each without a
//!   tracer, with the agent, and with a peer tracer (`bench/peer.bt`, bpftrace on
//!   the same tracepoint, one line per closed connection, like tcplife),
//!   interleaved over rounds; medians, ratios, and CPU per request.
//! - Kernel cost per program run (`kernel.bpf_stats_enabled`), in separate runs:
//!   the statistics cost two clock reads per run, which the throughput runs
//!   must not pay; beside it, what an almost empty program costs here.
//! - Connection rates from a loopback client: events lost, agent CPU.
//! - RSS with many tracked connections held open, by helper processes (this
//!   binary with `--hold N`), as one process's descriptor limit may be capped
//!   below what 100,000 connections with both ends local need.
//! - The userspace pipeline micro-benchmark (`tracer/benches/pipeline.rs`).
//! - With `--soak`: a million connections over about ten minutes, RSS sampled.
//!
//! Every part that fails is reported as failed and the others still run;
//! `--only` runs some parts (written to `bench/results-partial.md`).
//!
//! Throughput on a small machine is noisy: rounds are interleaved (the order
//! rotates each round) so that drift hits every configuration alike, and CPU per
//! request is reported beside requests per second.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::{
    sys::signal::{self, Signal},
    unistd::Pid,
};

use crate::{build, exec, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Interleaved rounds per workload (each runs no tracer, the agent and
    /// bpftrace once) [default: 5, 1 with --quick].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u32>,
    /// Seconds per wrk run and per connection-rate run [default: 10, 3 with --quick].
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Also run the soak test: a million connections over about ten minutes
    /// with the agent running (with --quick: 30,000 over 30 s).
    #[arg(long)]
    pub soak: bool,
    /// A short smoke run: one round of a few seconds, fewer connections held;
    /// written to bench/results-quick.md, not bench/results.md.
    #[arg(long)]
    pub quick: bool,
    /// Run only these parts (comma-separated), written to
    /// bench/results-partial.md.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PART")]
    pub only: Vec<Part>,
    /// Measure this agent binary instead of building one.
    #[arg(long, value_name = "PATH")]
    pub tracer: Option<PathBuf>,
    /// Internal: hold N loopback connections open (both ends) until stdin
    /// closes. The held-connections test runs several such processes, as one
    /// process's descriptor limit may not fit them all.
    #[arg(long, value_name = "N", hide = true)]
    pub hold: Option<usize>,
}

/// The parts of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The criterion micro-benchmark of the userspace pipeline.
    Pipeline,
    /// wrk against nginx: no tracer, agent, bpftrace.
    Throughput,
    /// Kernel time per program run (bpf_stats_enabled).
    Cost,
    /// Connection rates: lost events, agent CPU.
    Rate,
    /// Agent RSS with connections held open.
    Held,
    /// A million connections over about ten minutes.
    Soak,
}

/// What this run measures, from the options.
struct Plan {
    quick: bool,
    parts: Vec<Part>,
    rounds: u32,
    duration: Duration,
    /// New connections per second for the rate tests (`None` is as fast as
    /// the machine goes), and whether the agent runs.
    rates: Vec<(Option<f64>, bool)>,
    /// Connections held open at each RSS checkpoint.
    held: Vec<usize>,
    soak: Option<SoakPlan>,
    output: PathBuf,
}

struct SoakPlan {
    connections: u64,
    duration: Duration,
    warm_up: Duration,
    sample_every: Duration,
}

impl Plan {
    fn new(options: &Options) -> anyhow::Result<Self> {
        let rounds = options.rounds.unwrap_or(if options.quick { 1 } else { 5 });
        let seconds = options
            .duration
            .unwrap_or(if options.quick { 3 } else { 10 });
        ensure!(rounds >= 1, "--rounds must be at least 1");
        ensure!(seconds >= 1, "--duration must be at least 1 s");
        let parts = if options.only.is_empty() {
            let mut parts = vec![
                Part::Pipeline,
                Part::Throughput,
                Part::Cost,
                Part::Rate,
                Part::Held,
            ];
            if options.soak {
                parts.push(Part::Soak);
            }
            parts
        } else {
            options.only.clone()
        };
        let soak = parts.contains(&Part::Soak).then(|| {
            if options.quick {
                SoakPlan {
                    connections: 30_000,
                    duration: Duration::from_secs(30),
                    warm_up: Duration::from_secs(10),
                    sample_every: Duration::from_secs(5),
                }
            } else {
                SoakPlan {
                    connections: 1_000_000,
                    duration: Duration::from_secs(600),
                    warm_up: Duration::from_secs(60),
                    sample_every: Duration::from_secs(10),
                }
            }
        });
        let name = if options.quick {
            "results-quick.md"
        } else if !options.only.is_empty() {
            "results-partial.md"
        } else {
            "results.md"
        };
        Ok(Self {
            quick: options.quick,
            parts,
            rounds,
            duration: Duration::from_secs(seconds),
            rates: vec![
                (None, false),
                (Some(10_000.0), true),
                (Some(20_000.0), true),
                (None, true),
            ],
            held: if options.quick {
                vec![5_000, 10_000]
            } else {
                vec![10_000, 25_000, 50_000, 100_000]
            },
            soak,
            output: exec::workspace_root().join("bench").join(name),
        })
    }

    fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }
}

/// Set by SIGINT: the run stops at the next step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if let Some(count) = options.hold {
        return hold_helper(count);
    }
    let plan = Plan::new(options)?;
    if !exec::is_root() {
        bail!(
            "the benchmark loads BPF programs and sets kernel.bpf_stats_enabled: run it as \
             root (e.g. sudo -E env PATH=\"$PATH\" cargo xtask bench)"
        );
    }
    let tracer = match &options.tracer {
        Some(path) => path.clone(),
        None => agent_binary()?,
    };
    ensure!(tracer.is_file(), "no agent binary at {}", tracer.display());
    setup::bench_packages()?;

    let handler = signal::SigHandler::Handler(on_sigint);
    // SAFETY: the handler only stores to an atomic.
    unsafe { signal::signal(Signal::SIGINT, handler) }.context("installing a SIGINT handler")?;

    let machine = Machine::read(&tracer);
    println!("bench: {}", machine.summary());
    let mut report = Report::new(machine, &plan, options);

    // A part that fails is reported as such; the others still run.
    let attempt = |report: &mut Report, part: &str, result: anyhow::Result<()>| {
        if let Err(error) = result {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(error);
            }
            eprintln!("bench: {part} failed: {error:#}");
            report
                .failures
                .push((part.to_string(), format!("{error:#}")));
        }
        Ok(())
    };

    if plan.runs(Part::Pipeline) {
        println!("bench: userspace pipeline micro-benchmark (criterion)");
        let result = pipeline_benchmark(&plan).map(|p| report.pipeline = Some(p));
        attempt(&mut report, "pipeline micro-benchmark", result)?;
    }

    let stats = BpfStats::save()?;
    let nginx = if plan.runs(Part::Throughput) || plan.runs(Part::Cost) {
        Some(Nginx::start().context("starting nginx")?)
    } else {
        None
    };
    let peer_script = exec::workspace_root().join("bench").join("peer.bt");
    let tools = Tools {
        tracer: &tracer,
        peer_script: &peer_script,
        nginx: nginx.as_ref(),
        stats: &stats,
    };

    if plan.runs(Part::Throughput) {
        for workload in [Workload::KeepAlive, Workload::Churn] {
            let result = throughput(&plan, &tools, workload).map(|t| report.throughput.push(t));
            attempt(
                &mut report,
                &format!("{} throughput", workload.short()),
                result,
            )?;
        }
    }
    if plan.runs(Part::Cost) {
        let result = reference_cost(&tools).map(|ns| report.reference_ns = Some(ns));
        attempt(&mut report, "reference program cost", result)?;
        for workload in [Workload::KeepAlive, Workload::Churn] {
            let result = kernel_cost(&plan, &tools, workload).map(|c| report.costs.push(c));
            attempt(
                &mut report,
                &format!("{} kernel cost", workload.short()),
                result,
            )?;
        }
    }
    if plan.runs(Part::Rate) {
        for &(rate, with_agent) in &plan.rates {
            let result = settle(&plan)
                .and_then(|()| connection_rate(&plan, &tools, rate, with_agent))
                .map(|r| report.rates.push(r));
            attempt(
                &mut report,
                &format!("connection rate {}", rate_name(rate)),
                result,
            )?;
        }
    }
    if plan.runs(Part::Held) {
        let result = settle(&plan)
            .and_then(|()| held_connections(&plan, &tools))
            .map(|h| report.held = Some(h));
        attempt(&mut report, "held connections", result)?;
    }
    if let Some(soak_plan) = &plan.soak {
        let result = settle(&plan)
            .and_then(|()| soak(soak_plan, &tools))
            .map(|s| report.soak = Some(s));
        attempt(&mut report, "soak", result)?;
    }
    drop(nginx);
    drop(stats);

    let text = report.render();
    println!("\n{text}");
    fs::write(&plan.output, &text).with_context(|| format!("writing {}", plan.output.display()))?;
    println!("bench: written to {}", plan.output.display());
    ensure!(
        report.failures.is_empty(),
        "{} part(s) of the benchmark failed (see above)",
        report.failures.len()
    );
    Ok(())
}

/// Builds the optimized agent. `build::run` names the binary under the
/// workspace's `target/`; a CARGO_TARGET_DIR puts it elsewhere.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let default = build::run(&build::Options { release: true })?;
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => exec::workspace_root()
            .join(dir)
            .join("release")
            .join("tracer"),
        None => default,
    })
}

/// What the measurements use.
struct Tools<'a> {
    tracer: &'a Path,
    peer_script: &'a Path,
    /// Running when the throughput or kernel-cost parts run.
    nginx: Option<&'a Nginx>,
    stats: &'a BpfStats,
}

impl Tools<'_> {
    fn url(&self) -> anyhow::Result<String> {
        Ok(self.nginx.context("nginx is not running")?.url())
    }
}

// ---------------------------------------------------------------------------
// Workloads and tracers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    /// Keep-alive connections, many small requests each: the send/receive path.
    KeepAlive,
    /// `Connection: close`: a new connection per request, the state-change path.
    Churn,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Churn => "churn (new connection per request)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Churn => "churn",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum TracerKind {
    None,
    Agent,
    Bpftrace,
}

impl TracerKind {
    const ALL: [Self; 3] = [Self::None, Self::Agent, Self::Bpftrace];

    fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Agent => "agent",
            Self::Bpftrace => "bpftrace (peer.bt)",
        }
    }
}

/// A child process stopped with SIGINT (then SIGKILL) when dropped.
struct Guarded {
    child: Child,
    name: &'static str,
}

impl Guarded {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = signal::kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: {} did not stop on SIGINT; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The last lines a child wrote on a stream, for error messages.
#[derive(Clone, Default)]
struct Tail(Arc<Mutex<Vec<String>>>);

impl Tail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().expect("tail lock");
        if lines.len() == 20 {
            lines.remove(0);
        }
        lines.push(line);
    }

    fn text(&self) -> String {
        self.0.lock().expect("tail lock").join("\n")
    }
}

/// The agent, with its metrics endpoint.
struct Agent {
    process: Guarded,
    metrics: SocketAddr,
}

impl Agent {
    /// Starts `tracer agent` and waits until its programs are attached (it
    /// announces the metrics endpoint after attaching).
    fn start(binary: &Path) -> anyhow::Result<Self> {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let mut cmd = Command::new(binary);
        cmd.args(["agent", "--metrics-addr", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut process = Guarded {
            child,
            name: "the agent",
        };
        let tail = Tail::default();
        let (ready_tx, ready) = mpsc::channel();
        {
            let tail = tail.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("metrics on") {
                        let _ = ready_tx.send(());
                    }
                    tail.push(line);
                }
            });
        }
        wait_ready(&mut process, &ready, &tail, Duration::from_secs(120))?;
        Ok(Self { process, metrics })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn scrape(&self) -> anyhow::Result<Scrape> {
        scrape(self.metrics)
    }

    fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

/// bpftrace running the peer script; counts the lines it prints.
struct Peer {
    process: Guarded,
    lines: Arc<AtomicU64>,
}

impl Peer {
    fn start(script: &Path) -> anyhow::Result<Self> {
        Self::spawn(Command::new("bpftrace").arg(script))
    }

    fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        cmd
            // Sockets whose close the script misses stay in its maps: room for
            // the connections a run leaves behind.
            .env("BPFTRACE_MAP_KEYS_MAX", "262144")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut process = Guarded {
            child,
            name: "bpftrace",
        };
        let tail = Tail::default();
        let lines = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready) = mpsc::channel();
        {
            let tail = tail.clone();
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                let mut attached = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if attached {
                        lines.fetch_add(1, Ordering::Relaxed);
                    } else if line.starts_with("Attaching") {
                        attached = true;
                        let _ = ready_tx.send(());
                    } else {
                        tail.push(line);
                    }
                }
            });
        }
        {
            let tail = tail.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    tail.push(line);
                }
            });
        }
        wait_ready(&mut process, &ready, &tail, Duration::from_secs(60))?;
        // bpftrace announces "Attaching" before it attaches: wait for its
        // program, then for the attachment itself.
        let deadline = Instant::now() + Duration::from_secs(30);
        while program_ids(process.pid()).is_empty() {
            ensure!(
                Instant::now() < deadline,
                "bpftrace loaded no program within 30 s:\n{}",
                tail.text()
            );
            if let Some(status) = process.exited() {
                bail!("bpftrace exited ({status}):\n{}", tail.text());
            }
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(500));
        Ok(Self { process, lines })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

fn wait_ready(
    process: &mut Guarded,
    ready: &mpsc::Receiver<()>,
    tail: &Tail,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match ready.recv_timeout(Duration::from_millis(100)) {
            Ok(()) => return Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The output closed: the process is gone or going.
                thread::sleep(Duration::from_millis(200));
                let status = process.exited();
                bail!(
                    "{} stopped before it was ready ({}):\n{}",
                    process.name,
                    status.map_or("still running".into(), |s| s.to_string()),
                    tail.text()
                );
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = process.exited() {
            bail!(
                "{} exited before it was ready ({status}):\n{}",
                process.name,
                tail.text()
            );
        }
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "{} not ready after {} s:\n{}",
                process.name,
                timeout.as_secs(),
                tail.text()
            );
        }
    }
}

/// The running tracer of one throughput run.
enum Running {
    None,
    Agent(Agent),
    Peer(Peer),
}

impl Running {
    fn start(kind: TracerKind, tools: &Tools) -> anyhow::Result<Self> {
        Ok(match kind {
            TracerKind::None => Self::None,
            TracerKind::Agent => Self::Agent(Agent::start(tools.tracer)?),
            TracerKind::Bpftrace => Self::Peer(Peer::start(tools.peer_script)?),
        })
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::None => None,
            Self::Agent(agent) => Some(agent.pid()),
            Self::Peer(peer) => Some(peer.pid()),
        }
    }

    fn stop(self) {
        match self {
            Self::None => {}
            Self::Agent(agent) => agent.stop(),
            Self::Peer(peer) => peer.stop(),
        }
    }
}

// ---------------------------------------------------------------------------
// nginx and wrk

/// nginx from `bench/nginx.conf`, in a temporary prefix removed on drop.
struct Nginx {
    process: Option<Guarded>,
    prefix: PathBuf,
    port: u16,
}

impl Nginx {
    fn start() -> anyhow::Result<Self> {
        let template_path = exec::workspace_root().join("bench").join("nginx.conf");
        let template = fs::read_to_string(&template_path)
            .with_context(|| format!("reading {}", template_path.display()))?;
        let prefix =
            std::env::temp_dir().join(format!("tracer-bench-nginx-{}", std::process::id()));
        let _ = fs::remove_dir_all(&prefix);
        fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
        let mut nginx = Self {
            process: None,
            prefix,
            port: free_port()?,
        };
        let config = template
            .replace("{{PREFIX}}", &nginx.prefix.display().to_string())
            .replace("{{PORT}}", &nginx.port.to_string());
        let config_path = nginx.prefix.join("nginx.conf");
        fs::write(&config_path, config)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&nginx.prefix)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let mut process = Guarded {
            child,
            name: "nginx",
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(nginx.addr()).is_err() {
            if let Some(status) = process.exited() {
                let log = fs::read_to_string(nginx.prefix.join("error.log")).unwrap_or_default();
                bail!("nginx exited ({status}):\n{log}");
            }
            ensure!(
                Instant::now() < deadline,
                "nginx does not accept connections"
            );
            thread::sleep(Duration::from_millis(50));
        }
        nginx.process = Some(process);
        Ok(nginx)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGQUIT is nginx's graceful shutdown; SIGINT/SIGTERM its fast one.
            process.stop(Duration::from_secs(10));
        }
        let _ = fs::remove_dir_all(&self.prefix);
    }
}

/// What one wrk run reported.
#[derive(Clone, Debug, Default)]
struct WrkResult {
    requests_per_sec: f64,
    requests: u64,
    seconds: f64,
    /// Socket errors and non-2xx responses.
    errors: u64,
}

fn wrk(workload: Workload, url: &str, duration: Duration) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c50", &format!("-d{}s", duration.as_secs())]);
    if workload == Workload::Churn {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
    let out = exec::output(&mut cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult::default();
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("Requests/sec:") {
            result.requests_per_sec = value.trim().parse()?;
        } else if let Some((count, rest)) = line.split_once(" requests in ") {
            result.requests = count.trim().parse()?;
            let seconds = rest.split(',').next().unwrap_or_default().trim();
            result.seconds = parse_wrk_duration(seconds)?;
        } else if let Some(errors) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in errors.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    result.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            result.errors += n.trim().parse::<u64>().unwrap_or(0);
        }
    }
    ensure!(
        result.requests > 0 && result.requests_per_sec > 0.0,
        "no request count"
    );
    Ok(result)
}

/// wrk's durations: `10.00s`, `1.00m`, `500.00ms`.
fn parse_wrk_duration(text: &str) -> anyhow::Result<f64> {
    let (number, factor) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else if let Some(m) = text.strip_suffix('m') {
        (m, 60.0)
    } else {
        bail!("unknown duration {text}");
    };
    Ok(number.parse::<f64>()? * factor)
}

// ---------------------------------------------------------------------------
// Measurements of processes, the machine and the kernel programs

/// /proc/stat's aggregate CPU line, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
struct CpuTimes {
    busy: u64,
}

impl CpuTimes {
    fn read() -> anyhow::Result<Self> {
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
    fn busy_seconds_since(&self, earlier: &Self) -> f64 {
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
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
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
struct Memory {
    rss: u64,
    hwm: u64,
}

fn process_memory(pid: u32) -> anyhow::Result<Memory> {
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
fn program_ids(pid: u32) -> Vec<u32> {
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
struct ProgramStats {
    name: String,
    run_time_ns: u64,
    run_count: u64,
}

/// The statistics of a process's programs, by program id. The names are the
/// kernel's (at most 15 characters).
fn program_stats(pid: u32) -> anyhow::Result<BTreeMap<u32, ProgramStats>> {
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
fn program_delta(
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
struct BpfStats {
    original: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn save() -> anyhow::Result<Self> {
        let original = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        let stats = Self { original };
        stats.set(false)?;
        Ok(stats)
    }

    fn set(&self, enabled: bool) -> anyhow::Result<()> {
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
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    fn delta(&self, earlier: &Self, name: &str) -> f64 {
        self.get(name) - earlier.get(name)
    }
}

const EVENTS: &str = "tcptracer_events_total";
const LOST: &str = "tcptracer_events_lost_total";
const TRACKED: &str = "tcptracer_tracked_connections";
const TRACKED_LIMIT: &str = "tcptracer_tracked_connections_limit";
const UNTRACKED: &str = "tcptracer_untracked_connections_total";
const RINGBUF_PENDING: &str = "tcptracer_ringbuf_pending_bytes";
const RINGBUF_SIZE: &str = "tcptracer_ringbuf_size_bytes";

fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
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

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// Throughput

/// One wrk run under one tracer.
#[derive(Clone, Debug)]
struct Run {
    round: u32,
    tracer: TracerKind,
    wrk: WrkResult,
    /// Busy CPU seconds, all CPUs, during the wrk run.
    cpu_seconds: f64,
    agent: Option<AgentRun>,
    /// Lines the peer printed (closed connections).
    peer_lines: Option<u64>,
}

impl Run {
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.wrk.requests as f64
    }
}

/// What the agent did during one run.
#[derive(Clone, Debug, Default)]
struct AgentRun {
    events: f64,
    lost: f64,
    untracked: f64,
    cpu_seconds: f64,
    seconds: f64,
    memory: Memory,
}

struct Throughput {
    workload: Workload,
    runs: Vec<Run>,
}

impl Throughput {
    fn of(&self, tracer: TracerKind) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.tracer == tracer)
    }

    fn median_rps(&self, tracer: TracerKind) -> f64 {
        median(self.of(tracer).map(|r| r.wrk.requests_per_sec).collect())
    }

    fn median_cpu_us(&self, tracer: TracerKind) -> f64 {
        median(self.of(tracer).map(Run::cpu_us_per_request).collect())
    }

    fn ratio(&self, tracer: TracerKind) -> f64 {
        self.median_rps(tracer) / self.median_rps(TracerKind::None)
    }

    /// The median of the per-round ratios against the no-tracer run of the same
    /// round: less sensitive to drift over the whole run.
    fn paired_ratio(&self, tracer: TracerKind) -> f64 {
        let ratios = self
            .of(tracer)
            .filter_map(|run| {
                self.of(TracerKind::None)
                    .find(|none| none.round == run.round)
                    .map(|none| run.wrk.requests_per_sec / none.wrk.requests_per_sec)
            })
            .collect();
        median(ratios)
    }

    fn agent_runs(&self) -> impl Iterator<Item = &AgentRun> {
        self.runs.iter().filter_map(|r| r.agent.as_ref())
    }
}

fn throughput(plan: &Plan, tools: &Tools, workload: Workload) -> anyhow::Result<Throughput> {
    let mut runs = Vec::new();
    // Warm nginx and the page cache up; not measured.
    wrk(workload, &tools.url()?, Duration::from_secs(1))?;
    for round in 0..plan.rounds {
        // The order rotates, so each tracer runs first, second and third.
        let mut order = TracerKind::ALL;
        order.rotate_left(round as usize % TracerKind::ALL.len());
        for tracer in order {
            check_interrupted()?;
            let run = throughput_run(plan, tools, workload, tracer, round)?;
            println!(
                "bench: {} round {}/{}: {:<20} {:>10.0} req/s, {:.1} µs CPU/request{}",
                workload.short(),
                round + 1,
                plan.rounds,
                tracer.name(),
                run.wrk.requests_per_sec,
                run.cpu_us_per_request(),
                match &run.agent {
                    Some(agent) => format!(
                        ", {:.0} events/s, {} lost",
                        agent.events / agent.seconds,
                        agent.lost
                    ),
                    None => String::new(),
                }
            );
            runs.push(run);
        }
    }
    Ok(Throughput { workload, runs })
}

fn throughput_run(
    plan: &Plan,
    tools: &Tools,
    workload: Workload,
    tracer: TracerKind,
    round: u32,
) -> anyhow::Result<Run> {
    let running = Running::start(tracer, tools)?;
    // Let start-up work (BTF parsing, the first scans) finish.
    thread::sleep(Duration::from_secs(1));
    let agent_before = match &running {
        Running::Agent(agent) => Some((agent.scrape()?, process_cpu_seconds(agent.pid())?)),
        _ => None,
    };
    let cpu_before = CpuTimes::read()?;
    let started = Instant::now();
    let result = wrk(workload, &tools.url()?, plan.duration)?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuTimes::read()?;
    let agent = match (&running, agent_before) {
        (Running::Agent(agent), Some((scrape_before, cpu_before))) => {
            // The agent reads the ring buffer continuously; give it a moment
            // to count the last events.
            thread::sleep(Duration::from_millis(300));
            let scrape_after = agent.scrape()?;
            Some(AgentRun {
                events: scrape_after.delta(&scrape_before, EVENTS),
                lost: scrape_after.delta(&scrape_before, LOST),
                untracked: scrape_after.delta(&scrape_before, UNTRACKED),
                cpu_seconds: process_cpu_seconds(agent.pid())? - cpu_before,
                seconds: elapsed,
                memory: process_memory(agent.pid())?,
            })
        }
        _ => None,
    };
    let peer_lines = match &running {
        Running::Peer(peer) => Some(peer.lines()),
        _ => None,
    };
    running.stop();
    // Let the connections of this run close before the next one starts.
    thread::sleep(Duration::from_secs(1));
    Ok(Run {
        round,
        tracer,
        wrk: result,
        cpu_seconds: cpu_after.busy_seconds_since(&cpu_before),
        agent,
        peer_lines,
    })
}

// ---------------------------------------------------------------------------
// Kernel cost per program run

struct KernelCost {
    workload: Workload,
    /// Per tracer: requests during the measurement and per-program deltas.
    tracers: Vec<(TracerKind, u64, f64, BTreeMap<String, ProgramStats>)>,
}

impl KernelCost {
    fn average_ns(&self, tracer: TracerKind) -> Option<f64> {
        let (_, _, _, programs) = self.tracers.iter().find(|(t, ..)| *t == tracer)?;
        let time: u64 = programs.values().map(|p| p.run_time_ns).sum();
        let count: u64 = programs.values().map(|p| p.run_count).sum();
        (count > 0).then(|| time as f64 / count as f64)
    }
}

/// What an almost empty program costs per run on this machine, for scale:
/// bpftrace counting getppid() calls (one per-CPU map update), a million of
/// them. Virtual machines in particular make every program run dearer.
fn reference_cost(tools: &Tools) -> anyhow::Result<f64> {
    check_interrupted()?;
    let peer = Peer::spawn(Command::new("bpftrace").args([
        "-e",
        "tracepoint:syscalls:sys_enter_getppid { @calls = count(); }",
    ]))?;
    tools.stats.set(true)?;
    let before = program_stats(peer.pid());
    for _ in 0..1_000_000 {
        std::hint::black_box(nix::unistd::getppid());
    }
    let after = program_stats(peer.pid());
    tools.stats.set(false)?;
    peer.stop();
    let delta = program_delta(&before?, &after?);
    let time: u64 = delta.values().map(|p| p.run_time_ns).sum();
    let runs: u64 = delta.values().map(|p| p.run_count).sum();
    ensure!(runs >= 1_000_000, "the reference program ran {runs} times");
    let ns = time as f64 / runs as f64;
    println!("bench: reference program (bpftrace count()): {ns:.0} ns/run");
    Ok(ns)
}

fn kernel_cost(plan: &Plan, tools: &Tools, workload: Workload) -> anyhow::Result<KernelCost> {
    let mut tracers = Vec::new();
    for tracer in [TracerKind::Agent, TracerKind::Bpftrace] {
        check_interrupted()?;
        let running = Running::start(tracer, tools)?;
        thread::sleep(Duration::from_secs(1));
        let pid = running.pid().expect("a tracer runs");
        tools.stats.set(true)?;
        let before = program_stats(pid)?;
        let started = Instant::now();
        let result = wrk(workload, &tools.url()?, plan.duration);
        let seconds = started.elapsed().as_secs_f64();
        let after = program_stats(pid);
        tools.stats.set(false)?;
        running.stop();
        let result = result?;
        let delta = program_delta(&before, &after?);
        let total_time: u64 = delta.values().map(|p| p.run_time_ns).sum();
        let total_runs: u64 = delta.values().map(|p| p.run_count).sum();
        println!(
            "bench: {} kernel cost, {}: {} program runs, {:.0} ns/run, {:.0} ns/request",
            workload.short(),
            tracer.name(),
            total_runs,
            total_time as f64 / total_runs.max(1) as f64,
            total_time as f64 / result.requests.max(1) as f64
        );
        tracers.push((tracer, result.requests, seconds, delta));
        thread::sleep(Duration::from_secs(1));
    }
    Ok(KernelCost { workload, tracers })
}

// ---------------------------------------------------------------------------
// Loopback connections: a trivial server and a paced client

/// A listening socket with a backlog as deep as the system allows (std's
/// `TcpListener::bind` asks for 128, which a fast client overflows).
fn listen(port: u16) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )
    .context("bind")?;
    listen(&fd, Backlog::new(65_535).unwrap_or(Backlog::MAXCONN)).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// Listeners on loopback ports that accept connections and either close them
/// at once (the server ends every connection) or keep them.
struct Server {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<TcpStream>>>,
}

impl Server {
    fn start(listeners: usize, keep: bool) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut addrs = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..listeners {
            let listener = listen(0)?;
            addrs.push(listener.local_addr()?);
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                let mut kept = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) if keep => kept.push(stream),
                        Ok(_) => {}
                        // Out of descriptors or the like: back off.
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
                kept
            }));
        }
        Ok(Self {
            addrs,
            stop,
            threads,
        })
    }

    /// Stops accepting; returns the connections kept.
    fn stop(self) -> Vec<TcpStream> {
        self.stop.store(true, Ordering::Relaxed);
        for addr in &self.addrs {
            // Wakes the blocked accept().
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// Counters of a connection client.
#[derive(Default)]
struct ClientCounters {
    /// Connections attempted (or about to be).
    issued: AtomicU64,
    /// Connections made and closed.
    done: AtomicU64,
    errors: AtomicU64,
}

/// Opens and closes connections to `addrs`, `rate` per second in all (or as fast
/// as it can), until `duration` has passed or `total` were made. The server
/// closes first; the client reads the end of file and closes.
fn drive_connections(
    addrs: &[SocketAddr],
    rate: Option<f64>,
    duration: Duration,
    total: Option<u64>,
    counters: &ClientCounters,
) {
    let threads = 8;
    let started = Instant::now();
    thread::scope(|scope| {
        for index in 0..threads {
            scope.spawn(move || {
                let interval = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
                let mut next = started
                    + interval.map_or(Duration::ZERO, |i| i * index as u32 / threads as u32);
                let mut n = index;
                let mut buf = [0u8; 64];
                loop {
                    if INTERRUPTED.load(Ordering::Relaxed) || started.elapsed() >= duration {
                        break;
                    }
                    if let Some(interval) = interval {
                        let now = Instant::now();
                        if now < next {
                            thread::sleep(next - now);
                        } else if now - next > Duration::from_secs(1) {
                            // Far behind: do not try to make up for it in a burst.
                            next = now;
                        }
                        next += interval;
                    }
                    if counters.issued.fetch_add(1, Ordering::Relaxed) >= total.unwrap_or(u64::MAX)
                    {
                        break;
                    }
                    let addr = addrs[n % addrs.len()];
                    n += threads;
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                        Ok(mut stream) => {
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                            let _ = stream.read(&mut buf);
                            counters.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------
// Connection rate: lost events and agent CPU

#[derive(Default)]
struct RateResult {
    target: Option<f64>,
    with_agent: bool,
    achieved: f64,
    connections: u64,
    errors: u64,
    events: f64,
    lost: f64,
    untracked: f64,
    agent_cpu_seconds: f64,
    /// Busy CPU seconds, all CPUs.
    cpu_seconds: f64,
    seconds: f64,
    /// Sockets in TIME_WAIT when the run started.
    time_wait_before: u64,
    ringbuf_peak: f64,
    ringbuf_size: f64,
}

impl RateResult {
    fn agent_cpu_percent(&self) -> f64 {
        self.agent_cpu_seconds / self.seconds * 100.0
    }

    fn cpu_us_per_connection(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.connections.max(1) as f64
    }

    fn reached(&self) -> bool {
        self.target.is_none_or(|t| self.achieved >= 0.95 * t)
    }
}

fn rate_name(rate: Option<f64>) -> String {
    rate.map_or("as fast as possible".into(), |r| {
        format!("{}/s", thousands(r as u64))
    })
}

fn connection_rate(
    plan: &Plan,
    tools: &Tools,
    rate: Option<f64>,
    with_agent: bool,
) -> anyhow::Result<RateResult> {
    check_interrupted()?;
    let server = Server::start(4, false)?;
    let agent = with_agent.then(|| Agent::start(tools.tracer)).transpose()?;
    thread::sleep(Duration::from_secs(1));
    let before = agent.as_ref().map(Agent::scrape).transpose()?;
    let agent_cpu_before = agent
        .as_ref()
        .map(|a| process_cpu_seconds(a.pid()))
        .transpose()?;
    let counters = ClientCounters::default();
    let time_wait_before = time_wait_sockets();
    let cpu_before = CpuTimes::read()?;
    let started = Instant::now();
    let mut ringbuf_peak = 0.0_f64;
    thread::scope(|scope| {
        let client =
            scope.spawn(|| drive_connections(&server.addrs, rate, plan.duration, None, &counters));
        while !client.is_finished() {
            thread::sleep(Duration::from_millis(500));
            if let Some(Ok(now)) = agent.as_ref().map(Agent::scrape) {
                ringbuf_peak = ringbuf_peak.max(now.get(RINGBUF_PENDING));
            }
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = CpuTimes::read()?.busy_seconds_since(&cpu_before);
    let mut result = RateResult {
        target: rate,
        with_agent,
        achieved: counters.done.load(Ordering::Relaxed) as f64 / seconds,
        connections: counters.done.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        cpu_seconds,
        seconds,
        time_wait_before,
        ..RateResult::default()
    };
    if let (Some(agent), Some(before), Some(agent_cpu_before)) = (agent, before, agent_cpu_before) {
        thread::sleep(Duration::from_millis(500));
        let after = agent.scrape()?;
        result.agent_cpu_seconds = process_cpu_seconds(agent.pid())? - agent_cpu_before;
        result.events = after.delta(&before, EVENTS);
        result.lost = after.delta(&before, LOST);
        result.untracked = after.delta(&before, UNTRACKED);
        result.ringbuf_peak = ringbuf_peak.max(after.get(RINGBUF_PENDING));
        result.ringbuf_size = after.get(RINGBUF_SIZE);
        agent.stop();
    }
    server.stop();
    println!(
        "bench: connections at {}, {}: achieved {}/s, {:.1} µs CPU/connection{}",
        rate_name(rate),
        if with_agent { "agent" } else { "no tracer" },
        thousands(result.achieved as u64),
        result.cpu_us_per_connection(),
        if with_agent {
            format!(
                ", {} events, {} lost, agent CPU {:.1}% of one core",
                thousands(result.events as u64),
                result.lost,
                result.agent_cpu_percent()
            )
        } else {
            String::new()
        }
    );
    thread::sleep(Duration::from_secs(1));
    Ok(result)
}

// ---------------------------------------------------------------------------
// RSS with connections held open

struct HeldPoint {
    connections: usize,
    tracked: f64,
    untracked: f64,
    memory: Memory,
}

struct Held {
    baseline: Memory,
    points: Vec<HeldPoint>,
    /// Why fewer connections than planned were held.
    shortfall: Option<String>,
    /// Helper processes, and the most connections each held.
    helpers: usize,
    per_helper: usize,
    limit: f64,
    lost: f64,
}

/// Connections one helper process can hold: both ends are in it, so two
/// descriptors each, within the descriptor limit it inherits (a container may
/// cap it, even for root); at most 20,000, well inside the ephemeral port range
/// towards its one listener.
fn per_helper() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    (hard.saturating_sub(256) / 2).clamp(100, 20_000) as usize
}

/// `--hold N`: opens N loopback connections to a listener of its own, keeps
/// both ends, says `held N` on stdout and waits for stdin to close.
fn hold_helper(count: usize) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let listener = listen(0)?;
    let addr = listener.local_addr()?;
    let mut held = Vec::with_capacity(2 * count);
    let mut error = None;
    for _ in 0..count {
        // On loopback connect() returns with the handshake done and the
        // connection waiting in the accept queue.
        let client = match TcpStream::connect(addr) {
            Ok(client) => client,
            Err(e) => {
                error = Some(format!("connect: {e}"));
                break;
            }
        };
        match listener.accept() {
            Ok((server, _)) => held.extend([client, server]),
            Err(e) => {
                error = Some(format!("accept: {e}"));
                break;
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    match error {
        Some(error) => writeln!(stdout, "held {} {error}", held.len() / 2)?,
        None => writeln!(stdout, "held {}", held.len() / 2)?,
    }
    stdout.flush()?;
    // Until the benchmark closes our stdin (or goes away).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}

/// A `--hold` helper process.
struct Holder {
    process: Guarded,
    held: usize,
}

impl Holder {
    fn spawn(count: usize) -> anyhow::Result<(Self, Option<String>)> {
        let mut cmd = Command::new(std::env::current_exe().context("the xtask binary")?);
        cmd.args(["bench", "--hold", &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let process = Guarded {
            child,
            name: "a connection holder",
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let rest = line
            .trim()
            .strip_prefix("held ")
            .with_context(|| format!("the connection holder said {line:?}"))?;
        let (number, error) = match rest.split_once(' ') {
            Some((number, error)) => (number, Some(error.to_string())),
            None => (rest, None),
        };
        let held = number.parse()?;
        Ok((Self { process, held }, error))
    }
}

fn held_connections(plan: &Plan, tools: &Tools) -> anyhow::Result<Held> {
    check_interrupted()?;
    let per_helper = per_helper();
    let agent = Agent::start(tools.tracer)?;
    thread::sleep(Duration::from_secs(2));
    let baseline = process_memory(agent.pid())?;
    let mut holders: Vec<Holder> = Vec::new();
    let mut held = 0;
    let mut points = Vec::new();
    let mut shortfall = None;
    'checkpoints: for &checkpoint in &plan.held {
        while held < checkpoint {
            check_interrupted()?;
            let (holder, error) = Holder::spawn(per_helper.min(checkpoint - held))?;
            held += holder.held;
            holders.push(holder);
            if let Some(error) = error {
                shortfall = Some(format!(
                    "after {} connections: {error}",
                    thousands(held as u64)
                ));
                break 'checkpoints;
            }
        }
        let point = held_point(&agent, held)?;
        println!(
            "bench: {} connections held: {} sockets tracked, agent RSS {}",
            thousands(point.connections as u64),
            thousands(point.tracked as u64),
            mib(point.memory.rss)
        );
        points.push(point);
    }
    if shortfall.is_some() && points.last().is_none_or(|p| p.connections < held) {
        points.push(held_point(&agent, held)?);
    }
    let end = agent.scrape()?;
    let helpers = holders.len();
    for mut holder in holders {
        holder.process.stop(Duration::from_secs(10));
    }
    // Let the agent see the closes before it stops.
    thread::sleep(Duration::from_secs(2));
    agent.stop();
    if let Some(reason) = &shortfall {
        println!("bench: held fewer connections than planned: {reason}");
    }
    Ok(Held {
        baseline,
        points,
        shortfall,
        helpers,
        per_helper,
        limit: end.get(TRACKED_LIMIT),
        lost: end.get(LOST),
    })
}

/// Waits until the agent has seen the connections opened so far, then samples.
fn held_point(agent: &Agent, connections: usize) -> anyhow::Result<HeldPoint> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_events = -1.0;
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = agent.scrape()?;
        let settled = now.get(EVENTS) == last_events;
        last_events = now.get(EVENTS);
        if (settled && now.get(TRACKED) >= connections as f64) || Instant::now() > deadline {
            // One more scan interval for the userspace tables.
            thread::sleep(Duration::from_millis(1200));
            let now = agent.scrape()?;
            return Ok(HeldPoint {
                connections,
                tracked: now.get(TRACKED),
                untracked: now.get(UNTRACKED),
                memory: process_memory(agent.pid())?,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// Soak

struct SoakSample {
    at: Duration,
    rss: u64,
    connections: u64,
    time_wait: u64,
    /// How old the metrics of this sample are (`None`: none yet).
    metrics_age: Option<Duration>,
    lost: f64,
    tracked: f64,
    untracked: f64,
}

impl SoakSample {
    /// A note when the agent had not answered for a while.
    fn stale_note(&self) -> String {
        match self.metrics_age {
            Some(age) if age > Duration::from_secs(3) => {
                format!(" (metrics {} s old: the agent answers late)", age.as_secs())
            }
            None => " (the agent has not answered yet)".into(),
            Some(_) => String::new(),
        }
    }
}

struct Soak {
    planned: u64,
    planned_duration: Duration,
    duration: Duration,
    warm_up: Duration,
    sample_every: Duration,
    samples: Vec<SoakSample>,
    connections: u64,
    errors: u64,
    limit: f64,
    /// Totals over the whole soak, read at its end.
    lost: f64,
    untracked: f64,
    events: f64,
}

impl Soak {
    /// RSS at the end of the warm-up, and the most after it.
    fn growth(&self) -> Option<(u64, u64)> {
        let start = self.samples.iter().find(|s| s.at >= self.warm_up)?.rss;
        let most = self
            .samples
            .iter()
            .filter(|s| s.at >= self.warm_up)
            .map(|s| s.rss)
            .max()?;
        Some((start, most))
    }

    fn growth_ok(&self) -> bool {
        self.growth()
            .is_some_and(|(start, most)| (most as f64) < start as f64 * 1.05)
    }

    fn lost(&self) -> f64 {
        self.lost
    }

    fn maps_ok(&self) -> bool {
        self.untracked == 0.0 && self.samples.iter().all(|s| s.tracked < self.limit)
    }

    fn passed(&self) -> bool {
        self.growth_ok() && self.lost() == 0.0 && self.maps_ok()
    }
}

fn soak(plan: &SoakPlan, tools: &Tools) -> anyhow::Result<Soak> {
    check_interrupted()?;
    let rate = plan.connections as f64 / plan.duration.as_secs_f64();
    println!(
        "bench: soak: {} connections over {} s ({:.0}/s)",
        thousands(plan.connections),
        plan.duration.as_secs(),
        rate
    );
    let server = Server::start(4, false)?;
    let agent = Agent::start(tools.tracer)?;
    thread::sleep(Duration::from_secs(1));
    let base = agent.scrape()?;
    let counters = ClientCounters::default();
    let started = Instant::now();
    let mut samples = Vec::new();
    // Scraped in the background: a busy agent answers late, and RSS is still
    // sampled on time.
    let latest: Mutex<Option<(Instant, Scrape)>> = Mutex::new(None);
    let scraping = AtomicBool::new(true);
    thread::scope(|scope| -> anyhow::Result<()> {
        let client = scope.spawn(|| {
            drive_connections(
                &server.addrs,
                Some(rate),
                // Some slack for a client that falls behind.
                plan.duration + plan.duration / 5,
                Some(plan.connections),
                &counters,
            )
        });
        scope.spawn(|| {
            while scraping.load(Ordering::Relaxed) {
                if let Ok(scrape) = agent.scrape() {
                    *latest.lock().expect("scrape lock") = Some((Instant::now(), scrape));
                }
                for _ in 0..10 {
                    if scraping.load(Ordering::Relaxed) {
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        });
        let sampled = (|| -> anyhow::Result<()> {
            let mut next = started + plan.sample_every;
            loop {
                while Instant::now() < next && !client.is_finished() {
                    thread::sleep(Duration::from_millis(100));
                }
                let finished = client.is_finished();
                next += plan.sample_every;
                let rss = process_memory(agent.pid())?.rss;
                let scrape = latest.lock().expect("scrape lock").clone();
                let (age, now) = match scrape {
                    Some((at, scrape)) => (Some(at.elapsed()), scrape),
                    None => (None, base.clone()),
                };
                let sample = SoakSample {
                    at: started.elapsed(),
                    rss,
                    connections: counters.done.load(Ordering::Relaxed),
                    time_wait: time_wait_sockets(),
                    metrics_age: age,
                    lost: now.delta(&base, LOST),
                    tracked: now.get(TRACKED),
                    untracked: now.delta(&base, UNTRACKED),
                };
                println!(
                    "bench: soak {:>4} s: {:>9} connections, RSS {}, {} tracked, {} lost, {} \
                     in TIME_WAIT{}",
                    sample.at.as_secs(),
                    thousands(sample.connections),
                    mib(sample.rss),
                    thousands(sample.tracked as u64),
                    thousands(sample.lost as u64),
                    thousands(sample.time_wait),
                    sample.stale_note()
                );
                samples.push(sample);
                if finished {
                    return Ok(());
                }
                check_interrupted()?;
            }
        })();
        scraping.store(false, Ordering::Relaxed);
        sampled
    })?;
    // The totals, however long the agent takes to answer.
    let end = agent.scrape()?;
    agent.stop();
    server.stop();
    let result = Soak {
        planned: plan.connections,
        planned_duration: plan.duration,
        duration: started.elapsed(),
        warm_up: plan.warm_up,
        sample_every: plan.sample_every,
        samples,
        connections: counters.done.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        limit: end.get(TRACKED_LIMIT),
        lost: end.delta(&base, LOST),
        untracked: end.delta(&base, UNTRACKED),
        events: end.delta(&base, EVENTS),
    };
    println!(
        "bench: soak {}",
        if result.passed() { "passed" } else { "FAILED" }
    );
    Ok(result)
}

/// Sockets in TIME_WAIT in this network namespace (/proc/net/sockstat).
fn time_wait_sockets() -> u64 {
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

/// Waits (up to 70 s) for the TIME_WAIT sockets earlier parts left behind to
/// expire, so that each connection-heavy part starts from the same state: the
/// agent's scans read the kernel's socket tables. Not in quick runs.
fn settle(plan: &Plan) -> anyhow::Result<()> {
    if plan.quick || time_wait_sockets() < 1_000 {
        return Ok(());
    }
    println!(
        "bench: waiting for {} TIME_WAIT sockets to expire",
        thousands(time_wait_sockets())
    );
    let deadline = Instant::now() + Duration::from_secs(70);
    while time_wait_sockets() >= 1_000 && Instant::now() < deadline {
        check_interrupted()?;
        thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The pipeline micro-benchmark

struct Pipeline {
    /// Events per second through decode + diagnosis + metrics (mean, and the
    /// 95% confidence interval).
    full: (f64, f64, f64),
    decode: Option<f64>,
    events_per_iteration: u64,
}

fn pipeline_benchmark(plan: &Plan) -> anyhow::Result<Pipeline> {
    let home = std::env::temp_dir().join(format!("tracer-bench-criterion-{}", std::process::id()));
    let _ = fs::remove_dir_all(&home);
    let mut cargo = exec::cargo();
    cargo
        .args(["bench", "--package", "tracer", "--bench", "pipeline", "--"])
        .env("CRITERION_HOME", &home);
    if plan.quick {
        cargo.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    let outcome = exec::run(&mut cargo).and_then(|()| {
        let full = criterion_throughput(&home, "decode_diagnose_metrics")?;
        let decode = criterion_throughput(&home, "decode")
            .ok()
            .map(|(mean, ..)| mean.0);
        Ok(Pipeline {
            full: full.0,
            decode,
            events_per_iteration: full.1,
        })
    });
    let _ = fs::remove_dir_all(&home);
    outcome
}

/// Elements per second (mean, low, high) of a criterion benchmark, and the
/// elements per iteration, from its `new/estimates.json` and `benchmark.json`.
fn criterion_throughput(home: &Path, bench: &str) -> anyhow::Result<((f64, f64, f64), u64)> {
    let dir = home.join("pipeline").join(bench).join("new");
    let read = |name: &str| -> anyhow::Result<serde_json::Value> {
        let path = dir.join(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let benchmark = read("benchmark.json")?;
    let elements = benchmark["throughput"]["Elements"]
        .as_u64()
        .context("no Elements throughput in benchmark.json")?;
    let estimates = read("estimates.json")?;
    let mean = &estimates["mean"];
    let ns = |value: &serde_json::Value| -> anyhow::Result<f64> {
        value.as_f64().context("estimate is not a number")
    };
    let per_sec = |ns_per_iter: f64| elements as f64 / (ns_per_iter / 1e9);
    let point = ns(&mean["point_estimate"])?;
    let low = ns(&mean["confidence_interval"]["upper_bound"])?;
    let high = ns(&mean["confidence_interval"]["lower_bound"])?;
    Ok(((per_sec(point), per_sec(low), per_sec(high)), elements))
}

// ---------------------------------------------------------------------------
// The machine

struct Machine {
    kernel: String,
    cpus: usize,
    cpu_model: String,
    memory: String,
    date: String,
    commit: String,
    tools: Vec<(String, String)>,
}

impl Machine {
    fn read(tracer: &Path) -> Self {
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

    fn summary(&self) -> String {
        format!(
            "Linux {}, {} CPUs ({}), {} RAM, {}",
            self.kernel, self.cpus, self.cpu_model, self.memory, self.date
        )
    }
}

// ---------------------------------------------------------------------------
// The report

struct Report {
    machine: Machine,
    command: String,
    quick: bool,
    rounds: u32,
    duration: Duration,
    throughput: Vec<Throughput>,
    costs: Vec<KernelCost>,
    rates: Vec<RateResult>,
    held: Option<Held>,
    pipeline: Option<Pipeline>,
    soak: Option<Soak>,
    /// Nanoseconds per run of an almost empty program, for scale.
    reference_ns: Option<f64>,
    /// Parts that failed, with the error.
    failures: Vec<(String, String)>,
}

/// One line of the targets table.
struct Target {
    target: String,
    measured: String,
    /// `None`: not measured as specified (the measured column says why).
    passed: Option<bool>,
}

impl Report {
    fn new(machine: Machine, plan: &Plan, options: &Options) -> Self {
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

    fn render(&self) -> String {
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
             come from the agent's `tcptracer_events_lost_total`, the ring buffer's fill \
             from `tcptracer_ringbuf_pending_bytes` sampled every 0.5 s.\n",
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
             `tcptracer_tracked_connections`, limit {}). RSS is sampled once the agent has \
             read every event. Agent RSS before any connection: {}.\n",
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

// ---------------------------------------------------------------------------
// Formatting

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.1}%", ratio * 100.0)
    } else {
        "n/a".into()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   519.22us  278.86us   8.19ms   84.94%
    Req/Sec    47.52k     3.81k   55.29k    71.00%
  945563 requests in 10.00s, 136.17MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  94552.12
Transfer/sec:     13.62MB
";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.requests, 945_563);
        assert_eq!(result.requests_per_sec, 94_552.12);
        assert_eq!(result.seconds, 10.0);
        assert_eq!(result.errors, 6);
    }

    #[test]
    fn formats() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
