//! Harness for the integration tests: a tracing session on the real kernel
//! programs, helper processes and network namespaces that clean up after
//! themselves, and event queries.
//!
//! The tests need root. They never skip: without root they fail and say so.

pub mod http;
pub mod nginx;
pub mod router;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use tracer::{
    diagnosis::{self, Diagnoser, finding::Finding},
    event::{Close, Detail, Event},
    kernel::loader::{AttachReport, Filter, Options, StateHook},
    kernel::session::Stats,
    pipeline::{Batch, Pipeline},
};

/// The state hook `TRACER_STATE_HOOK` asks for: the kernel matrix runs suites
/// again with state changes hooked by fentry or kprobe, through the variable
/// the agent itself reads.
pub fn forced_state_hook() -> Option<StateHook> {
    let value = std::env::var("TRACER_STATE_HOOK").ok()?;
    Some(
        <StateHook as clap::ValueEnum>::from_str(&value, true)
            .unwrap_or_else(|e| panic!("TRACER_STATE_HOOK={value}: {e}")),
    )
}

/// A loopback port that nothing listens on now: bound, read and let go.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding a free loopback port")
        .port()
}

/// Tolerance for durations measured from jiffies (4 ms here) plus scheduling.
pub const TOLERANCE_MS: f64 = 25.0;

/// The agent binary: `TRACER_BIN` (set by `cargo xtask test`), else the one next
/// to this test's own build directory.
pub fn tracer_bin() -> PathBuf {
    let path = std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test>-<hash> -> target/<profile>/tracer
            exe.parent().unwrap().parent().unwrap().join("tracer")
        });
    assert!(
        path.is_file(),
        "{} not found: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the integration tests load eBPF programs and need root: run `cargo xtask test`"
    );
}

/// A tracing pipeline and the events and findings it has produced so far.
pub struct Trace {
    runtime: tokio::runtime::Runtime,
    pipeline: Pipeline,
    pub events: Vec<Event>,
    pub findings: Vec<Finding>,
}

impl Trace {
    pub fn start(filter: Filter) -> Self {
        Self::start_with(Options {
            filter,
            ..Options::default()
        })
    }

    pub fn start_with(options: Options) -> Self {
        Self::start_diagnosing(options, diagnosis::Config::default())
    }

    /// Starts a session; `TRACER_STATE_HOOK` replaces an `Auto` state hook, as it
    /// does for the agent (see [`forced_state_hook`]).
    pub fn start_diagnosing(mut options: Options, diagnosis: diagnosis::Config) -> Self {
        require_root();
        if options.state_hook == StateHook::Auto
            && let Some(forced) = forced_state_hook()
        {
            options.state_hook = forced;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let pipeline = {
            let _context = runtime.enter();
            Pipeline::start(&options, diagnosis)
                .unwrap_or_else(|e| panic!("starting the tracer: {e:?}"))
        };
        Self {
            runtime,
            pipeline,
            events: Vec::new(),
            findings: Vec::new(),
        }
    }

    /// Collects until `done` holds, or panics after `timeout`.
    pub fn wait_until(&mut self, timeout: Duration, done: impl Fn(&Trace) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?}; events and findings so far:\n{}",
                self.dump()
            );
            let step = left.min(Duration::from_millis(100));
            let mut batch = Batch::default();
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(step, self.pipeline.next(&mut batch)).await
            });
            self.events.append(&mut batch.events);
            self.findings.append(&mut batch.findings);
        }
    }

    /// Collects events until `done` holds for all of them, or panics after
    /// `timeout`.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&[Event]) -> bool) -> &[Event] {
        self.wait_until(timeout, |trace| done(&trace.events));
        &self.events
    }

    /// Collects whatever arrives within `period`.
    pub fn collect_for(&mut self, period: Duration) -> &[Event] {
        let deadline = Instant::now() + period;
        self.wait_for(period + Duration::from_secs(1), |_| {
            Instant::now() >= deadline
        })
    }

    /// Findings of `kind` about process `pid`, as reported so far.
    pub fn findings_of(&self, kind: &str, pid: u32) -> Vec<&Finding> {
        self.findings
            .iter()
            .filter(|f| f.kind.name() == kind && f.pid == pid)
            .collect()
    }

    pub fn diagnoser(&self) -> &Diagnoser {
        self.pipeline.diagnoser()
    }

    /// The `diagnose` report of everything seen so far, as text.
    pub fn report_text(&self) -> String {
        tracer::sinks::report::text(&self.diagnoser().report(self.pipeline.elapsed()))
    }

    pub fn stats(&self) -> Stats {
        self.pipeline.stats()
    }

    /// Whether sends after the peer's FIN can be flagged `peer_closed`: only a
    /// state hook with a typed socket (tp_btf, fentry) marks the socket's
    /// storage (docs/kernels.md).
    pub fn flags_peer_fin(&self) -> bool {
        self.report().typed_state_hook()
    }

    /// Whether sends are traced (reuse events, stale_reuse). Where no send hook
    /// loads (5.10: docs/kernels.md) the agent must say what is lost, which is
    /// then what there is to check.
    pub fn traces_sends(&self) -> bool {
        let report = self.report();
        let traced = report
            .attached
            .iter()
            .any(|hook| hook == "tp_btf/sock_send_length" || hook == "fexit/tcp_sendmsg");
        if !traced {
            assert!(
                report
                    .degraded
                    .iter()
                    .any(|d| d.contains("no reuse events, no stale_reuse findings")),
                "sends are not traced, and the report does not say so: {report:?}"
            );
            println!("no send hook on this kernel: reuses are not checked");
        }
        traced
    }

    pub fn report(&self) -> &AttachReport {
        self.pipeline.session().report()
    }

    pub fn dump(&self) -> String {
        let events = self
            .events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap_or_default());
        let findings = self
            .findings
            .iter()
            .map(|f| serde_json::to_string(f).unwrap_or_default());
        let mut dump = events.chain(findings).collect::<Vec<_>>();
        dump.push(self.report_text());
        dump.join("\n")
    }
}

/// Calls `check` every `interval` until it returns `Ok`, and returns that
/// value; panics once `timeout` has passed, naming `what` and the last `Err`
/// (the state it was still in). For conditions there is no event to block on,
/// such as what a scrape or another process reports.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(state) => assert!(
                Instant::now() < deadline,
                "{what}: still {state} after {timeout:?}"
            ),
        }
        std::thread::sleep(interval);
    }
}

/// Waits until the peer has closed `stream` (its FIN, or a reset, has
/// arrived), up to `timeout`; panics if it has not by then, or if data comes
/// instead. A test that sends on a connection the peer closed must wait for the
/// close itself: how soon it comes after the peer's timer fires depends on the
/// machine.
pub fn wait_for_peer_close(stream: &TcpStream, timeout: Duration) {
    let before = stream.read_timeout().expect("SO_RCVTIMEO");
    let deadline = Instant::now() + timeout;
    let outcome = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(format!("the peer has not closed after {timeout:?}"));
        }
        stream.set_read_timeout(Some(left)).expect("SO_RCVTIMEO");
        // A blocking peek returns as soon as the FIN arrives (0 bytes), and
        // leaves any data where a later read expects it.
        match stream.peek(&mut [0; 1]) {
            Ok(0) => break Ok(()),
            Ok(_) => break Err("the peer sent data instead of closing".to_owned()),
            Err(e) => match e.kind() {
                ErrorKind::ConnectionReset => break Ok(()),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted => {}
                _ => break Err(format!("waiting for the peer to close: {e}")),
            },
        }
    };
    stream.set_read_timeout(before).expect("SO_RCVTIMEO");
    if let Err(why) = outcome {
        let peer = stream
            .peer_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        panic!("{why} (connection to {peer})");
    }
}

/// Events of `kind` on the socket whose local port is `lport`.
pub fn of_kind<'a>(events: &'a [Event], kind: &str, lport: u16) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| e.kind == kind && e.lport == lport)
        .collect()
}

/// The one event of `kind` on local port `lport`; panics when there is not
/// exactly one.
pub fn one<'a>(events: &'a [Event], kind: &str, lport: u16) -> &'a Event {
    let found = of_kind(events, kind, lport);
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} event on local port {lport}, got {}: {found:#?}",
        found.len()
    );
    found[0]
}

pub fn close_detail(event: &Event) -> &Close {
    match &event.detail {
        Detail::Close(close) => close,
        other => panic!("not a close event: {other:?}"),
    }
}

pub fn assert_near(what: &str, actual: f64, expected: f64) {
    assert!(
        (actual - expected).abs() <= TOLERANCE_MS,
        "{what}: {actual} ms, expected {expected} ± {TOLERANCE_MS} ms"
    );
}

/// A helper process (the `peer` binary, `CARGO_BIN_EXE_peer` in tests), killed
/// when dropped.
pub struct Peer {
    pub child: Child,
}

impl Peer {
    pub fn spawn(mut command: Command) -> Self {
        let child = command
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line the peer prints (a listening port).
    pub fn read_port(&mut self) -> u16 {
        use std::io::BufRead as _;
        let stdout = self.child.stdout.as_mut().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("peer prints its port");
        line.trim().parse().expect("a port number")
    }

    /// Waits for the peer to exit successfully.
    pub fn wait_ok(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for peer") {
                assert!(status.success(), "peer exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "peer still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two network namespaces joined by a veth pair, removed when dropped (deleting a
/// namespace deletes its end of the pair, and the pair with it).
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub addr_a: IpAddr,
    pub addr_b: IpAddr,
}

impl NetnsPair {
    pub fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let pair = Self {
            a: format!("trc-a-{id}"),
            b: format!("trc-b-{id}"),
            addr_a: "10.201.0.1".parse().unwrap(),
            addr_b: "10.201.0.2".parse().unwrap(),
        };
        // Created inside the namespaces, so the names cannot clash with the host's.
        let veth_a = format!("va{n}");
        let veth_b = format!("vb{n}");
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "link", "add", &veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b,
            "netns", &pair.b,
        ]);
        for (ns, dev, addr) in [
            (&pair.a, &veth_a, pair.addr_a),
            (&pair.b, &veth_b, pair.addr_b),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn exec_in(ns: &str, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]);
        command
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap_or_else(|e| {
        panic!("running ip {args:?}: {e} (install iproute2: cargo xtask setup)")
    });
    assert!(status.success(), "ip {args:?} failed: {status}");
}
