//! The workloads and the tracers the parts run: the two wrk workloads against
//! a local nginx, and the tracers under test, the agent (with its metrics
//! endpoint) and the bpftrace peer, as child processes stopped when dropped.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
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

use super::{
    Tools, check_interrupted,
    measure::{Scrape, program_ids, scrape},
};
use crate::exec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Workload {
    /// Keep-alive connections, many small requests each: the send/receive path.
    KeepAlive,
    /// `Connection: close`: a new connection per request, the state-change path.
    Churn,
}

impl Workload {
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Churn => "churn (new connection per request)",
        }
    }

    pub(super) fn short(self) -> &'static str {
        match self {
            Self::KeepAlive => "keep-alive",
            Self::Churn => "churn",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum TracerKind {
    None,
    Agent,
    Bpftrace,
}

impl TracerKind {
    pub(super) const ALL: [Self; 3] = [Self::None, Self::Agent, Self::Bpftrace];

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::None => "no tracer",
            Self::Agent => "agent",
            Self::Bpftrace => "bpftrace (peer.bt)",
        }
    }
}

/// A child process stopped with SIGINT (then SIGKILL) when dropped.
pub(super) struct Guarded {
    pub(super) child: Child,
    pub(super) name: &'static str,
}

impl Guarded {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(super) fn stop(&mut self, grace: Duration) {
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
pub(super) struct Agent {
    process: Guarded,
    metrics: SocketAddr,
}

impl Agent {
    /// Starts `tracer agent` and waits until its programs are attached (it
    /// announces the metrics endpoint after attaching).
    pub(super) fn start(binary: &Path) -> anyhow::Result<Self> {
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

    pub(super) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(super) fn scrape(&self) -> anyhow::Result<Scrape> {
        scrape(self.metrics)
    }

    pub(super) fn stop(mut self) {
        self.process.stop(Duration::from_secs(10));
    }
}

/// bpftrace running the peer script; counts the lines it prints.
pub(super) struct Peer {
    process: Guarded,
    lines: Arc<AtomicU64>,
}

impl Peer {
    fn start(script: &Path) -> anyhow::Result<Self> {
        Self::spawn(Command::new("bpftrace").arg(script))
    }

    pub(super) fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
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

    pub(super) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(super) fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    pub(super) fn stop(mut self) {
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
pub(super) enum Running {
    None,
    Agent(Agent),
    Peer(Peer),
}

impl Running {
    pub(super) fn start(kind: TracerKind, tools: &Tools) -> anyhow::Result<Self> {
        Ok(match kind {
            TracerKind::None => Self::None,
            TracerKind::Agent => Self::Agent(Agent::start(tools.tracer)?),
            TracerKind::Bpftrace => Self::Peer(Peer::start(tools.peer_script)?),
        })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            Self::None => None,
            Self::Agent(agent) => Some(agent.pid()),
            Self::Peer(peer) => Some(peer.pid()),
        }
    }

    pub(super) fn stop(self) {
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
pub(super) struct Nginx {
    process: Option<Guarded>,
    prefix: PathBuf,
    port: u16,
}

impl Nginx {
    pub(super) fn start() -> anyhow::Result<Self> {
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

    pub(super) fn url(&self) -> String {
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
pub(super) struct WrkResult {
    pub(super) requests_per_sec: f64,
    pub(super) requests: u64,
    seconds: f64,
    /// Socket errors and non-2xx responses.
    pub(super) errors: u64,
}

pub(super) fn wrk(workload: Workload, url: &str, duration: Duration) -> anyhow::Result<WrkResult> {
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

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
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
}
