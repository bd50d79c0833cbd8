//! The agent's RSS with many tracked connections held open, by helper
//! processes (this binary with `--hold N`) that keep both ends of each.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{
    Plan, Tools, check_interrupted,
    loopback::listen,
    measure::{Memory, process_memory},
    metric_names::{EVENTS, EVENTS_LOST, TRACKED, TRACKED_LIMIT, UNTRACKED},
    mib, thousands,
    workload::{Agent, Guarded},
};

pub(super) struct HeldPoint {
    pub(super) connections: usize,
    pub(super) tracked: f64,
    pub(super) untracked: f64,
    pub(super) memory: Memory,
}

pub(super) struct Held {
    pub(super) baseline: Memory,
    pub(super) points: Vec<HeldPoint>,
    /// Why fewer connections than planned were held.
    pub(super) shortfall: Option<String>,
    /// Helper processes, and the most connections each held.
    pub(super) helpers: usize,
    pub(super) per_helper: usize,
    pub(super) limit: f64,
    pub(super) lost: f64,
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
pub(super) fn hold_helper(count: usize) -> anyhow::Result<()> {
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

pub(super) fn held_connections(plan: &Plan, tools: &Tools) -> anyhow::Result<Held> {
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
        lost: end.get(EVENTS_LOST),
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
