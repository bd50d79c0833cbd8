//! A client and a server in separate network namespaces with a router namespace
//! between them, for tests of connections that die silently: a NAT or firewall on
//! the path forgets an idle flow and drops its packets, or answers them with a
//! reset. Neither end sees anything happen until it sends, which is the failure
//! the tracer has to explain.
//!
//! Everything — addresses, routes, `ip_forward`, firewall rules, conntrack
//! sysctls — lives in the three namespaces, so nothing on the host changes and
//! deleting the namespaces undoes it all.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use nix::{
    sched::CloneFlags,
    sys::socket::{setsockopt, sockopt::TcpUserTimeout},
};

use crate::{NetnsPair, Peer};

/// Device names. Each device is created directly inside its namespace, so the
/// names cannot clash with the host's or with another path's.
const CLIENT_DEV: &str = "to-router";
const ROUTER_CLIENT_DEV: &str = "to-client";
const ROUTER_SERVER_DEV: &str = "to-server";
const SERVER_DEV: &str = "to-router";

/// The router's conntrack sysctls that `forget_*` change and `heal` restores.
const CONNTRACK_SYSCTLS: [&str; 2] = [
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_loose",
];

/// client_ns --(10.203.N.0/24)-- router_ns --(10.204.N.0/24)-- server_ns,
/// removed when dropped.
///
/// The router forwards without NAT, so both ends see each other's real
/// addresses and the tracer's endpoints match `client_addr` and `server_addr`.
pub struct RoutedPath {
    pub client_ns: String,
    pub router_ns: String,
    pub server_ns: String,
    pub client_addr: IpAddr,
    pub server_addr: IpAddr,
    /// The router's sysctl values before the first `forget_*`, for `heal`.
    conntrack_defaults: Mutex<Option<Vec<(String, String)>>>,
    delayed: AtomicBool,
}

impl RoutedPath {
    pub fn create() -> Self {
        crate::require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        // The subnets only need to differ from each other (every namespace has
        // its own routing table); N just makes `ip addr` output easier to match
        // to a test.
        let n = n as u8;
        let path = Self {
            client_ns: format!("trc-c-{id}"),
            router_ns: format!("trc-r-{id}"),
            server_ns: format!("trc-s-{id}"),
            client_addr: Ipv4Addr::new(10, 203, n, 2).into(),
            server_addr: Ipv4Addr::new(10, 204, n, 2).into(),
            conntrack_defaults: Mutex::new(None),
            delayed: AtomicBool::new(false),
        };
        // `path` exists before the first command, so a setup failure unwinds
        // through its Drop and removes whatever namespaces were made.
        let client_gw = format!("10.203.{n}.1");
        let server_gw = format!("10.204.{n}.1");
        for ns in [&path.client_ns, &path.router_ns, &path.server_ns] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        for (ns, dev, peer_ns, peer_dev) in [
            (
                &path.client_ns,
                CLIENT_DEV,
                &path.router_ns,
                ROUTER_CLIENT_DEV,
            ),
            (
                &path.server_ns,
                SERVER_DEV,
                &path.router_ns,
                ROUTER_SERVER_DEV,
            ),
        ] {
            ip(&[
                "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer_dev, "netns",
                peer_ns,
            ]);
        }
        for (ns, dev, addr) in [
            (&path.client_ns, CLIENT_DEV, path.client_addr.to_string()),
            (&path.router_ns, ROUTER_CLIENT_DEV, client_gw.clone()),
            (&path.router_ns, ROUTER_SERVER_DEV, server_gw.clone()),
            (&path.server_ns, SERVER_DEV, path.server_addr.to_string()),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&[
            "-n",
            &path.client_ns,
            "route",
            "add",
            "default",
            "via",
            &client_gw,
        ]);
        ip(&[
            "-n",
            &path.server_ns,
            "route",
            "add",
            "default",
            "via",
            &server_gw,
        ]);
        path.sysctl(&[("net.ipv4.ip_forward", "1")]);
        // Conntrack only tracks a namespace's flows while some rule needs it. A
        // rule that matches on conntrack state (and only counts) makes the router
        // track every flow from its SYN, so `forget_idle_flows` also works on
        // connections opened before it was called: with loose tracking off, a
        // flow conntrack first meets mid-stream would be INVALID at once. It lives
        // in the mangle table, which `heal` leaves alone.
        path.iptables(&[
            "-t",
            "mangle",
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,ESTABLISHED,RELATED,INVALID",
        ]);
        path
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn exec_in(ns: &str, program: &str) -> Command {
        NetnsPair::exec_in(ns, program)
    }

    /// An echo server in the server namespace on an ephemeral port, killed when
    /// the returned `Peer` is dropped. It serves any number of connections
    /// concurrently and echoes until the client closes.
    pub fn spawn_echo_server(&self) -> (Peer, u16) {
        const ECHO: &str = r#"
import socket, threading
s = socket.socket()
s.bind(("0.0.0.0", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
def echo(c):
    with c:
        while True:
            try:
                data = c.recv(65536)
            except OSError:
                return
            if not data:
                return
            c.sendall(data)
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;
        let mut command = Self::exec_in(&self.server_ns, "python3");
        command.args(["-c", ECHO]);
        let mut server = Peer::spawn(command);
        let port = server.read_port();
        (server, port)
    }

    /// From now on the router silently drops forwarded TCP packets to or from
    /// `server_port`, in both directions, as a NAT or stateful firewall does once
    /// it has forgotten a flow: the sender retransmits into nothing until its
    /// retransmission limit or `TCP_USER_TIMEOUT` gives up with ETIMEDOUT.
    pub fn drop_forwarded(&self, server_port: u16) {
        let port = server_port.to_string();
        for direction in ["--dport", "--sport"] {
            self.iptables(&["-I", "FORWARD", "-p", "tcp", direction, &port, "-j", "DROP"]);
        }
    }

    /// From now on the router answers client-to-server TCP packets for
    /// `server_port` with a reset in the server's name, as a firewall that
    /// rejects rather than drops does: the client's next send fails with
    /// ECONNRESET within a round trip.
    pub fn reset_forwarded(&self, server_port: u16) {
        self.iptables(&[
            "-I",
            "FORWARD",
            "-i",
            ROUTER_CLIENT_DEV,
            "-p",
            "tcp",
            "--dport",
            &server_port.to_string(),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]);
    }

    /// From now on the router forgets any flow that stays idle for longer than
    /// `established_timeout_secs` and drops its later packets, like a NAT whose
    /// idle timeout is shorter than the application's keepalive.
    ///
    /// The timeout applies to a flow from its next packet on (conntrack sets an
    /// entry's deadline when a packet refreshes it), so call this before the flow
    /// goes idle. Once the entry has expired, the next packet of the flow is not
    /// a SYN, and with loose tracking off conntrack will not pick it up again:
    /// the packet is INVALID and dropped, and so are all the retransmissions.
    pub fn forget_idle_flows(&self, established_timeout_secs: u32) {
        self.drop_untracked();
        self.sysctl(&[(CONNTRACK_SYSCTLS[0], &established_timeout_secs.to_string())]);
    }

    /// The router forgets the flows of `server_port` now and drops their later
    /// packets, like a NAT that rebooted or evicted them: the deterministic
    /// version of `forget_idle_flows`, with no timer to wait for. Needs the
    /// `conntrack` tool.
    pub fn forget_flows(&self, server_port: u16) {
        self.drop_untracked();
        let mut command = Self::exec_in(&self.router_ns, "conntrack");
        command.args([
            "-D",
            "-p",
            "tcp",
            "--orig-port-dst",
            &server_port.to_string(),
        ]);
        let output = command.output().unwrap_or_else(|e| {
            panic!("running {command:?}: {e} (install conntrack: apt-get install conntrack)")
        });
        // conntrack exits with 1 when there was nothing to delete, which is
        // not an error here: the caller may not have opened a flow yet.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() || stderr.contains("0 flow entries"),
            "{command:?} failed: {}\n{stderr}",
            output.status
        );
    }

    /// Delays every packet the router sends to the server by `ms`, so each
    /// round trip through the path grows by `ms`: for tests that need a send to
    /// stay unacknowledged for a while without being lost.
    ///
    /// Returns Err with tc's complaint when `tc` or the netem qdisc is missing
    /// (kernels built without CONFIG_NET_SCH_NETEM), so a test can skip the delay
    /// and say why instead of failing for a reason unrelated to what it checks.
    pub fn add_delay(&self, ms: u32) -> Result<(), String> {
        let mut command = Self::exec_in(&self.router_ns, "tc");
        command.args([
            "qdisc",
            "replace",
            "dev",
            ROUTER_SERVER_DEV,
            "root",
            "netem",
            "delay",
            &format!("{ms}ms"),
        ]);
        let output = command
            .output()
            .map_err(|e| format!("running {command:?}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "{command:?} failed: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        self.delayed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Removes what `drop_forwarded`, `reset_forwarded`, `forget_*` and
    /// `add_delay` added, so the router forwards everything again. Flows the
    /// router forgot are forwarded again too (INVALID packets pass once the drop
    /// rule is gone), although their conntrack entries stay missing.
    pub fn heal(&self) {
        self.iptables(&["-F", "FORWARD"]);
        if let Some(defaults) = self
            .conntrack_defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let defaults: Vec<(&str, &str)> = defaults
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            self.sysctl(&defaults);
        }
        if self.delayed.swap(false, Ordering::Relaxed) {
            run(Self::exec_in(&self.router_ns, "tc").args([
                "qdisc",
                "del",
                "dev",
                ROUTER_SERVER_DEV,
                "root",
            ]));
        }
    }

    /// Turns loose tracking off and drops INVALID packets: what makes a flow
    /// the router has no entry for undeliverable.
    fn drop_untracked(&self) {
        {
            let mut defaults = self
                .conntrack_defaults
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if defaults.is_none() {
                *defaults = Some(
                    CONNTRACK_SYSCTLS
                        .iter()
                        .map(|key| (key.to_string(), self.read_sysctl(key)))
                        .collect(),
                );
            } else {
                // Already in place; only the timeout may change.
                return;
            }
        }
        self.sysctl(&[(CONNTRACK_SYSCTLS[1], "0")]);
        self.iptables(&[
            "-I",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
    }

    fn iptables(&self, args: &[&str]) {
        let mut command = Self::exec_in(&self.router_ns, "iptables");
        // -w: wait for the xtables lock rather than fail when another iptables
        // (legacy backend) holds it.
        command.arg("-w").args(args);
        run(&mut command);
    }

    /// Sets sysctls in the router namespace only: `ip netns exec` mounts that
    /// namespace's /proc/sys/net, so the host's values are untouched.
    fn sysctl(&self, settings: &[(&str, &str)]) {
        let mut command = Self::exec_in(&self.router_ns, "sysctl");
        command.arg("-w");
        for (key, value) in settings {
            command.arg(format!("{key}={value}"));
        }
        run(&mut command);
    }

    fn read_sysctl(&self, key: &str) -> String {
        run(Self::exec_in(&self.router_ns, "sysctl").args(["-n", key]))
            .trim()
            .to_string()
    }
}

impl Drop for RoutedPath {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends (and so the pairs), its
        // firewall rules, conntrack entries and qdiscs. Namespaces a failed setup
        // never made fail to delete, which is fine.
        for ns in [&self.client_ns, &self.router_ns, &self.server_ns] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl RoutedPath {
    /// A client socket in the client namespace, connected to `port` on the
    /// server. `user_timeout` (TCP_USER_TIMEOUT) bounds how long unacknowledged
    /// data may wait before the kernel gives up with ETIMEDOUT, so a dropped
    /// path fails in seconds instead of the default quarter of an hour.
    pub fn connect(&self, port: u16, user_timeout: Duration) -> TcpStream {
        let server = SocketAddr::new(self.server_addr, port);
        let stream = in_netns(&self.client_ns, || {
            TcpStream::connect_timeout(&server, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("connecting from {} to {server}: {e}", self.client_ns));
        // A broken path must fail the read with an error of its own well before
        // this; the timeout only keeps a fixture bug from hanging the test.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("SO_RCVTIMEO");
        let millis = u32::try_from(user_timeout.as_millis()).expect("a timeout in u32 ms");
        setsockopt(&stream, TcpUserTimeout, &millis).expect("TCP_USER_TIMEOUT");
        stream
    }
}

/// Sends `message` and reads the echo back.
pub fn echo(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, message, "the echo differs from what was sent");
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its
/// result; a panic in `f` resumes on the caller.
///
/// A thread may switch network namespaces on its own, and a socket belongs to
/// the namespace it was created in for life, so sockets `f` creates can be
/// returned and used from any thread. A fresh thread keeps the caller's (and
/// the test harness's) namespace untouched.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    let handle = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({path}, CLONE_NEWNET): {e}"));
                drop(handle);
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Runs `command`, returning its stdout; panics naming the command, with its
/// stderr, when it cannot start or fails.
fn run(command: &mut Command) -> String {
    const INSTALL: &str = "the router fixture needs iproute2, iptables and conntrack: \
                           apt-get install iproute2 iptables conntrack";
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e} ({INSTALL})"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // `ip netns exec` reports a missing program as its own failure.
    let hint = if stderr.contains("exec of") {
        format!(" ({INSTALL})")
    } else {
        String::new()
    };
    assert!(
        output.status.success(),
        "{command:?} failed: {}{hint}\n{}",
        output.status,
        stderr.trim()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
