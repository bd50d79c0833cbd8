//! Booting one kernel under QEMU and running the suites inside it.
//!
//! The guest sees the host's root filesystem read-only through virtio-fs
//! (`hostroot`), with a tmpfs overlay on top so that everything is writable and
//! nothing reaches the host, and a writable virtio-fs share (`results`) that is
//! this kernel's results directory on the host. Cloud kernels have no 9p, but
//! all of them have virtio-fs. Progress comes over the serial console as
//! `@@KM` lines; results are files in the share.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    Kernel,
    build::{Binaries, PROBE, Runner},
    initramfs,
};
use crate::exec;

/// Debian packages the matrix itself needs on the host.
const PACKAGES: &[(&str, &str)] = &[
    (
        "qemu-system-x86",
        "boots the kernels (and ships virtiofsd on bookworm)",
    ),
    (
        "busybox-static",
        "the guests' /init and modprobe; depmod and unxz on the host",
    ),
];

/// Where Debian puts virtiofsd: the Rust one (its own package, trixie and
/// later), and the C one shipped with QEMU up to 7.2.
const VIRTIOFSD: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// Whether a dpkg package is installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn root_command(program: &str) -> Command {
    if exec::is_root() {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg(program);
        sudo
    }
}

/// Installs QEMU and busybox-static when missing, and checks for virtiofsd.
pub fn host_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(package, _)| *package)
        .filter(|package| !installed(package))
        .collect();
    if !missing.is_empty() {
        println!("kernels: installing {}", missing.join(" "));
        let install = |cmd: &mut Command| {
            cmd.args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive");
            exec::run(cmd)
        };
        if install(&mut root_command("apt-get")).is_err() {
            exec::run(root_command("apt-get").arg("update"))?;
            install(&mut root_command("apt-get"))?;
        }
    }
    if virtiofsd().is_none() {
        // Newer Debian ships it on its own.
        exec::run(
            root_command("apt-get")
                .args(["install", "-y", "--no-install-recommends", "virtiofsd"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("virtiofsd is needed to share the host's files with the guests")?;
    }
    Ok(())
}

fn virtiofsd() -> Option<&'static str> {
    VIRTIOFSD.iter().copied().find(|p| Path::new(p).is_file())
}

/// How a guest may cache a share.
#[derive(Clone, Copy)]
enum Caching {
    /// Keep what was read: for the host's root, which nothing changes while a
    /// guest runs (the binaries are built before). Without it every exec and
    /// every library load goes back to the host under emulation: 0.5 s for
    /// `/bin/true`, about half of a short test's time.
    Always,
    /// Nothing cached: for the results the host reads after the guest ends.
    Never,
}

/// A virtiofsd for one shared directory; it serves one guest and exits when the
/// guest goes away.
fn start_virtiofsd(
    socket: &Path,
    shared: &Path,
    caching: Caching,
    log: &Path,
) -> anyhow::Result<Child> {
    let program = virtiofsd().context("virtiofsd not found")?;
    let mut cmd = root_command(program);
    if program.starts_with("/usr/libexec") {
        cmd.arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "chroot", "--cache"])
            .arg(match caching {
                Caching::Always => "always",
                Caching::Never => "never",
            });
    } else {
        // The namespace sandbox cannot pivot_root into /.
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg("-o")
            .arg(format!("source={}", shared.display()))
            .args(["-o", "sandbox=chroot", "-o"])
            .arg(match caching {
                Caching::Always => "cache=always",
                Caching::Never => "cache=none",
            });
    }
    let log = fs::File::create(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{program} did not create {}", socket.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}
/// Quotes a string for sh.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The script the guest runs as root inside the host's (overlaid) root. Every
/// test runs in a process of its own with a timeout; its line goes to
/// `results.tsv` and the console.
fn run_script(binaries: &Binaries, series: &str, results: &Path, limits: &Limits) -> String {
    let mut script = format!(
        "# Generated by `cargo xtask test --kernels`: runs inside the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export HOME=/root RUST_BACKTRACE=1 TRACER_BIN={tracer}\n\
         R={results}\n\
         T={timeout}\n\
         cd {workspace}\n\
         mkdir -p $R/logs\n\
         run_one() {{\n\
         \x20   suite=$1; name=$2; shift 2\n\
         \x20   log=\"$R/logs/$suite--$name.log\"\n\
         \x20   echo \"@@KM start $suite $name\"\n\
         \x20   start=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   timeout -k 10 $T \"$@\" > \"$log\" 2>&1\n\
         \x20   rc=$?\n\
         \x20   retried=\n\
         \x20   # A failure runs once more, to tell a test that fails by chance\n\
         \x20   # (flaky: still a failure) from one that always fails; the failed\n\
         \x20   # run's output is kept.\n\
         \x20   case $rc in 0|124|137) ;; *)\n\
         \x20       mv \"$log\" \"$R/logs/$suite--$name.first.log\"\n\
         \x20       echo \"@@KM retry $suite $name\"\n\
         \x20       timeout -k 10 $T \"$@\" > \"$log\" 2>&1\n\
         \x20       rc=$?; retried=1 ;;\n\
         \x20   esac\n\
         \x20   end=$(cut -d' ' -f1 /proc/uptime)\n\
         \x20   secs=$(awk \"BEGIN {{ printf \\\"%.1f\\\", $end - $start }}\")\n\
         \x20   case $rc in\n\
         \x20   0) status=ok; grep -q '^test result: ok. 0 passed; 0 failed; 1 ignored' \"$log\" && status=ignored; [ -n \"$retried\" ] && status=flaky ;;\n\
         \x20   124|137) status=timeout ;;\n\
         \x20   *) status=failed ;;\n\
         \x20   esac\n\
         \x20   printf '%s\\t%s\\t%s\\t%s\\t%s\\n' \"$suite\" \"$name\" \"$status\" \"$secs\" \"$rc\" >> $R/results.tsv\n\
         \x20   echo \"@@KM result $suite $name $status $secs\"\n\
         }}\n\
         # A state hook this kernel does not offer: the suite's tests are n/a.\n\
         hook_available() {{\n\
         \x20   case $1 in\n\
         \x20   tracepoint) pattern='^  tracepoint/sock:inet_sock_set_state +available' ;;\n\
         \x20   *) pattern=\"^  $1/tcp_set_state +available\" ;;\n\
         \x20   esac\n\
         \x20   \"$TRACER_BIN\" probe 2>/dev/null | grep -Eq \"$pattern\"\n\
         }}\n\
         unsupported() {{\n\
         \x20   printf '%s\\t%s\\tunsupported\\t0\\t-\\n' \"$1\" \"$2\" >> $R/results.tsv\n\
         \x20   echo \"@@KM result $1 $2 unsupported 0\"\n\
         }}\n",
        tracer = quote(&binaries.tracer.display().to_string()),
        results = quote(&results.display().to_string()),
        timeout = limits.test_timeout.as_secs(),
        workspace = quote(&exec::workspace_root().display().to_string()),
    );
    for suite in &binaries.suites {
        match &suite.runner {
            Runner::Probe => script.push_str(&format!(
                "run_one {PROBE} {PROBE} \"$TRACER_BIN\" -v probe\n"
            )),
            // A filter left nothing of it (and sh refuses empty branches).
            Runner::Tests(_) if suite.tests.is_empty() => {}
            Runner::Tests(exe) => {
                // A hook the series must offer runs unconditionally, so that a
                // refusal fails its tests; any other is n/a where unavailable.
                let optional_hook = suite
                    .state_hook
                    .as_deref()
                    .filter(|hook| !expected_hook(series, hook));
                if let Some(hook) = optional_hook {
                    script.push_str(&format!("if hook_available {hook}; then\n"));
                }
                let env = suite.state_hook.as_ref().map_or(String::new(), |hook| {
                    format!("env TRACER_STATE_HOOK={hook} ")
                });
                for test in &suite.tests {
                    script.push_str(&format!(
                        "run_one {} {} {env}{} --exact {} --test-threads=1\n",
                        quote(&suite.name),
                        quote(test),
                        quote(&exe.display().to_string()),
                        quote(test)
                    ));
                }
                if optional_hook.is_some() {
                    script.push_str("else\n");
                    for test in &suite.tests {
                        script.push_str(&format!(
                            "unsupported {} {}\n",
                            quote(&suite.name),
                            quote(test)
                        ));
                    }
                    script.push_str("fi\n");
                }
            }
        }
    }
    script.push_str("uname -a > $R/uname.txt\n");
    script
}

/// The state hooks each series of the matrix must accept: a refusal there
/// fails the suite rather than marking it n/a. 5.10's verifier refuses the
/// fentry program (typed pointer arithmetic; socket storage for tracing
/// programs arrives in 5.11).
const EXPECTED_HOOKS: &[(&str, &[&str])] = &[
    ("5.10", &["kprobe", "tracepoint"]),
    ("6.1", &["fentry", "kprobe", "tracepoint"]),
    ("6.12", &["fentry", "kprobe", "tracepoint"]),
];

fn expected_hook(series: &str, hook: &str) -> bool {
    EXPECTED_HOOKS
        .iter()
        .any(|(s, hooks)| *s == series && hooks.contains(&hook))
}

pub struct Limits {
    pub test_timeout: Duration,
    pub memory_mib: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Failed, then passed when run again: a failure all the same (the test
    /// depends on luck), listed with the failed run's output.
    Flaky,
    Ignored,
    Failed,
    /// Killed by its timeout inside the guest, or running when the guest hung.
    Timeout,
    /// The guest never got to it.
    NotRun,
    /// The suite's state hook is one this kernel does not offer (`tracer
    /// probe` does not list it available), so its tests were not run.
    Unsupported,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Flaky => "flaky",
            Self::Ignored => "ignored",
            Self::Unsupported => "n/a",
            Self::Failed => "FAILED",
            Self::Timeout => "TIMEOUT",
            Self::NotRun => "not run",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TestResult {
    pub suite: String,
    pub name: String,
    pub status: Status,
    pub seconds: Option<f64>,
    /// The test's output, for failures.
    pub log: Option<PathBuf>,
    /// A flaky test's failed run.
    pub first_log: Option<PathBuf>,
}

impl TestResult {
    /// Failed, timed out, or failed once (flaky): its output goes in the report.
    pub fn is_reported(&self) -> bool {
        matches!(
            self.status,
            Status::Failed | Status::Timeout | Status::Flaky
        )
    }

    /// The output of the run that failed.
    pub fn failed_log(&self) -> Option<&Path> {
        self.first_log.as_deref().or(self.log.as_deref())
    }
}

#[derive(Clone, Debug)]
pub struct GuestResult {
    pub kernel: Kernel,
    /// From QEMU's start to the guest's `ready` marker.
    pub boot: Option<Duration>,
    /// From `ready` to `done` (or to the end).
    pub tests_time: Option<Duration>,
    /// Why the guest ended early, when it did (timeout, panic, ...).
    pub problem: Option<String>,
    pub tests: Vec<TestResult>,
    /// `tracer -v probe` output.
    pub probe: Option<String>,
    pub console: PathBuf,
    pub results_dir: PathBuf,
}

/// Boots `kernel`, runs the suites, and collects what happened.
pub fn run(kernel: &Kernel, binaries: &Binaries, limits: &Limits) -> anyhow::Result<GuestResult> {
    let results = kernel.dir.join("results");
    if results.exists() {
        fs::remove_dir_all(&results).with_context(|| format!("removing {}", results.display()))?;
    }
    fs::create_dir_all(&results)?;
    fs::set_permissions(&results, fs::Permissions::from_mode(0o755))?;
    fs::write(
        results.join("guest.env"),
        format!(
            "MODULES={}\nRESULTS={}\nKEEP={}\n",
            quote(&kernel.modules_dir().display().to_string()),
            quote(&results.display().to_string()),
            quote(&format!(
                "{} {}",
                exec::workspace_root().display(),
                binaries.tracer.display()
            ))
        ),
    )?;
    fs::write(
        results.join("run.sh"),
        run_script(binaries, &kernel.series, &results, limits),
    )?;
    let initrd = kernel.dir.join("initramfs.cpio");
    fs::write(&initrd, initramfs::initramfs(kernel)?)?;

    // virtiofsd wants short socket paths (sun_path is 108 bytes).
    let sockets = std::env::temp_dir().join(format!(
        "xtask-kernels-{}-{}",
        std::process::id(),
        kernel.series
    ));
    let _ = fs::remove_dir_all(&sockets);
    fs::create_dir_all(&sockets)?;
    let root_socket = sockets.join("root.sock");
    let results_socket = sockets.join("results.sock");
    let mut daemons = vec![
        start_virtiofsd(
            &root_socket,
            Path::new("/"),
            Caching::Always,
            &kernel.dir.join("virtiofsd-root.log"),
        )?,
        start_virtiofsd(
            &results_socket,
            &results,
            Caching::Never,
            &kernel.dir.join("virtiofsd-results.log"),
        )?,
    ];

    let memory = format!("{}M", limits.memory_mib);
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    // KVM does not run standard guests on these machines. One host thread
    // runs both vCPUs in turn: a guest's tests keep about one vCPU busy, so
    // it is as fast as a thread per vCPU, and the kernels then run side by
    // side without competing for the host's CPUs. It also avoids a
    // multi-threaded TCG hazard: a vCPU executing code another vCPU has just
    // patched (seen as an int3 Oops in the syscall exit path while a test
    // attached its programs). cx16 is off: QEMU 7.2's TCG corrupts SLUB's
    // cmpxchg16b fast path on 6.12 guests (double faults and list corruption
    // during boot); without it the kernel uses its software fallback.
    .args([
        "-accel",
        "tcg,thread=single",
        "-cpu",
        "max,cx16=off",
        "-smp",
        "2",
        "-m",
        &memory,
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-memfd,id=mem,size={memory},share=on"
    ))
    .args(["-numa", "node,memdev=mem"])
    .arg("-kernel")
    .arg(kernel.vmlinuz())
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        // Under TCG every vCPU's TSC derives from the host's clock: it is
        // synchronized and stable. Without this, a loaded host makes the
        // boot-time check mark it unstable, and the kernel falls back to the
        // HPET, each read of which is an emulated device access.
        "console=ttyS0 panic=-1 oops=panic quiet mitigations=off tsc=reliable",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=hostroot,path={}", root_socket.display()))
    .args(["-device", "vhost-user-fs-pci,chardev=hostroot,tag=hostroot"])
    .arg("-chardev")
    .arg(format!(
        "socket,id=results,path={}",
        results_socket.display()
    ))
    .args(["-device", "vhost-user-fs-pci,chardev=results,tag=results"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("cannot start {qemu:?}"))?;

    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx_err = tx.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
            let line = format!("qemu: {}", String::from_utf8_lossy(&line));
            if tx_err.send(line).is_err() {
                break;
            }
        }
    });

    let console_path = kernel.dir.join("console.log");
    let mut console = fs::File::create(&console_path)?;
    // Progress means a marker: a guest that is silent for longer than one test
    // may take (plus boot and slack) has hung.
    let idle_limit = limits.test_timeout + Duration::from_secs(180);
    let mut last_progress = Instant::now();
    let mut boot = None;
    let mut ready_at = None;
    let mut done = false;
    let mut problem = None;
    let mut running: Option<(String, String)> = None;
    let mut tail: Vec<String> = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                writeln!(console, "{line}")?;
                tail.push(line.clone());
                if tail.len() > 40 {
                    tail.remove(0);
                }
                if let Some(marker) = line.split_once("@@KM ").map(|(_, m)| m.trim()) {
                    last_progress = Instant::now();
                    let mut words = marker.split_whitespace();
                    match words.next() {
                        Some("ready") => {
                            boot = Some(started.elapsed());
                            ready_at = Some(Instant::now());
                            println!(
                                "  {}: booted in {:.1} s",
                                kernel.series,
                                started.elapsed().as_secs_f64()
                            );
                        }
                        Some("start") => {
                            let suite = words.next().unwrap_or_default().to_string();
                            let name = words.next().unwrap_or_default().to_string();
                            running = Some((suite, name));
                        }
                        Some("result") => {
                            running = None;
                            let rest: Vec<&str> = words.collect();
                            if rest.len() >= 4 {
                                println!(
                                    "  {}: {} {} ... {} ({} s)",
                                    kernel.series, rest[0], rest[1], rest[2], rest[3]
                                );
                            }
                        }
                        Some("done") => done = true,
                        Some("fatal") => problem = Some(marker.to_string()),
                        _ => {}
                    }
                } else if line.contains("Kernel panic") && problem.is_none() {
                    problem = Some(line.trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Some(status) = child.try_wait()? {
            // Drain what is left.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                writeln!(console, "{}", line.trim_end_matches('\r'))?;
                if line.contains("@@KM done") {
                    done = true;
                }
            }
            if !done && problem.is_none() {
                problem = Some(format!("QEMU exited ({status}) before the guest finished"));
            }
            break;
        }
        let idle = last_progress.elapsed();
        let limit = if ready_at.is_some() {
            idle_limit
        } else {
            Duration::from_secs(300)
        };
        if idle > limit {
            problem = Some(format!(
                "no progress for {} s{}: guest killed",
                idle.as_secs(),
                running
                    .as_ref()
                    .map(|(s, n)| format!(" while running {s} {n}"))
                    .unwrap_or_else(|| if ready_at.is_none() {
                        " before the guest was ready".into()
                    } else {
                        String::new()
                    })
            ));
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
    }
    let tests_time = ready_at.map(|t| t.elapsed());
    for daemon in &mut daemons {
        // They exit with their guest; stop any that did not.
        let deadline = Instant::now() + Duration::from_secs(5);
        while daemon.try_wait()?.is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        if daemon.try_wait()?.is_none() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
    let _ = fs::remove_dir_all(&sockets);
    if let Some(problem) = &problem {
        println!("  {}: {problem}; last console lines:", kernel.series);
        for line in tail.iter().rev().take(15).rev() {
            println!("    | {line}");
        }
    }

    let tests = collect(binaries, &results, running.as_ref());
    let probe = fs::read_to_string(results.join(format!("logs/{PROBE}--{PROBE}.log"))).ok();
    Ok(GuestResult {
        kernel: kernel.clone(),
        boot,
        tests_time,
        problem,
        tests,
        probe,
        console: console_path,
        results_dir: results,
    })
}

/// Every planned test with its outcome from `results.tsv`; the one running
/// when the guest was killed timed out, the rest did not run.
fn collect(
    binaries: &Binaries,
    results: &Path,
    running: Option<&(String, String)>,
) -> Vec<TestResult> {
    let table = fs::read_to_string(results.join("results.tsv")).unwrap_or_default();
    let mut tests = Vec::new();
    for suite in &binaries.suites {
        for name in &suite.tests {
            let log = results.join(format!("logs/{}--{name}.log", suite.name));
            let first_log = results.join(format!("logs/{}--{name}.first.log", suite.name));
            let found = table.lines().find_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                (fields.len() >= 4 && fields[0] == suite.name && fields[1] == name)
                    .then(|| (fields[2].to_string(), fields[3].parse::<f64>().ok()))
            });
            let (status, seconds) = match found {
                Some((status, seconds)) => (
                    match status.as_str() {
                        "ok" => Status::Ok,
                        "flaky" => Status::Flaky,
                        "ignored" => Status::Ignored,
                        "unsupported" => Status::Unsupported,
                        "timeout" => Status::Timeout,
                        _ => Status::Failed,
                    },
                    seconds,
                ),
                None if running.is_some_and(|(s, n)| s == &suite.name && n == name) => {
                    (Status::Timeout, None)
                }
                None => (Status::NotRun, None),
            };
            let first_log = (status == Status::Flaky && first_log.is_file()).then_some(first_log);
            tests.push(TestResult {
                suite: suite.name.clone(),
                name: name.clone(),
                status,
                seconds,
                log: log.is_file().then_some(log),
                first_log,
            });
        }
    }
    tests
}
