//! The server side of accept-queue overflow, sampled from userspace: how full each
//! listener's accept queue is (what `ss -ltn` prints as Recv-Q/Send-Q) and the
//! namespace's ListenOverflows/ListenDrops counters.
//!
//! The kernel programs see connections, not listeners: a SYN dropped because the
//! accept queue is full never becomes a socket they could follow. Whether a
//! server's backlog is too small, or its accept loop too slow, shows only here.
//! Listeners and counters are per network namespace, so a containerised server is
//! read from inside its namespace with [`in_netns_of`].

use std::{
    fs::{self, File},
    io,
    net::IpAddr,
    os::unix::fs::MetadataExt,
};

use netlink_packet_sock_diag::{
    TCP_LISTEN,
    inet::{InetResponseHeader, StateFlags},
};
use nix::sched::{CloneFlags, setns};

use crate::host::sock_diag::{self, SockDiagError};

/// One TCP listener and its accept queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerQueue {
    pub port: u16,
    /// Bound address; IPv4-mapped IPv6 addresses are given as IPv4, as in events.
    pub addr: IpAddr,
    /// Connections that finished their handshake and wait for `accept()`
    /// (`sk_ack_backlog`). The kernel refuses new ones only once this is *above*
    /// `limit`, so a full queue reads `limit + 1`.
    pub depth: u32,
    /// The backlog given to `listen()`, capped by `net.core.somaxconn`
    /// (`sk_max_ack_backlog`).
    pub limit: u32,
    /// Socket inode, to find the owning process through `/proc/<pid>/fd`.
    pub inode: u64,
}

/// TcpExt counters of one network namespace: cumulative since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenCounters {
    /// SYNs and handshake-completing ACKs refused because an accept queue was full.
    pub overflows: u64,
    /// Every SYN or ACK a listener dropped, overflows included.
    pub drops: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenQueueError {
    #[error("cannot open the network namespace of pid {pid}")]
    OpenNamespace {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the network namespace of pid {pid}")]
    EnterNamespace {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot start a thread in the network namespace of pid {pid}")]
    SpawnThread {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the listening sockets")]
    SockDiag(#[from] SockDiagError),
    #[error("cannot read the TCP counters of pid {pid}")]
    ReadNetstat {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("the TCP counters of pid {pid} have no ListenOverflows and ListenDrops")]
    ParseNetstat { pid: u32 },
}

/// Every TCP listener (IPv4 and IPv6) of the calling thread's network namespace,
/// with its accept-queue depth and limit.
///
/// Uses NETLINK_SOCK_DIAG rather than /proc/net/tcp: the dump is filtered by
/// state in the kernel, so it costs the same on a host with a million
/// connections as on an idle one.
pub fn listening_sockets() -> Result<Vec<ListenerQueue>, ListenQueueError> {
    let mut listeners = Vec::new();
    sock_diag::dump_tcp(StateFlags::LISTEN, None, |socket| {
        listeners.extend(listener(socket));
    })?;
    Ok(listeners)
}

/// For a listener, idiag_rqueue is the accept-queue length and idiag_wqueue the
/// backlog limit (for other sockets they are byte counts: skipped).
fn listener(header: &InetResponseHeader) -> Option<ListenerQueue> {
    if header.state != TCP_LISTEN {
        return None;
    }
    Some(ListenerQueue {
        port: header.socket_id.source_port,
        addr: header.socket_id.source_address.to_canonical(),
        depth: header.recv_queue,
        limit: header.send_queue,
        inode: header.inode.into(),
    })
}

/// Runs `f` in the network namespace of process `pid`, for [`listening_sockets`]
/// of a server in a container.
///
/// setns(CLONE_NEWNET) moves only the calling thread, so `f` runs on a
/// short-lived thread of its own that ends with it: the caller's threads never
/// change namespace. When `pid` shares the caller's namespace, `f` just runs here.
pub fn in_netns_of<T: Send>(pid: u32, f: impl FnOnce() -> T + Send) -> Result<T, ListenQueueError> {
    let open = |source| ListenQueueError::OpenNamespace { pid, source };
    let namespace = File::open(format!("/proc/{pid}/ns/net")).map_err(open)?;
    let target = namespace.metadata().map_err(open)?;
    // thread-self, not self: a caller already inside in_netns_of runs on a thread
    // whose namespace differs from the main thread's.
    let own = fs::metadata("/proc/thread-self/ns/net").map_err(open)?;
    if (target.dev(), target.ino()) == (own.dev(), own.ino()) {
        return Ok(f());
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns-{pid}"))
            .spawn_scoped(scope, move || {
                setns(&namespace, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| ListenQueueError::EnterNamespace { pid, source })?;
                Ok(f())
            })
            .map_err(|source| ListenQueueError::SpawnThread { pid, source })?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// ListenOverflows and ListenDrops of the network namespace of process `pid`.
///
/// `/proc/<pid>/net/` shows the namespace of that process, so no setns is needed.
pub fn listen_counters(pid: u32) -> Result<ListenCounters, ListenQueueError> {
    let text = fs::read_to_string(format!("/proc/{pid}/net/netstat"))
        .map_err(|source| ListenQueueError::ReadNetstat { pid, source })?;
    parse_netstat(&text).ok_or(ListenQueueError::ParseNetstat { pid })
}

/// /proc/net/netstat holds pairs of lines per group, names then values, each
/// starting with the group's name (`TcpExt:`). Counters are looked up by name:
/// their order changes between kernels.
fn parse_netstat(text: &str) -> Option<ListenCounters> {
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    let (mut overflows, mut drops) = (None, None);
    for (name, value) in names.zip(values) {
        match name {
            "ListenOverflows" => overflows = value.parse().ok(),
            "ListenDrops" => drops = value.parse().ok(),
            _ => {}
        }
    }
    Some(ListenCounters {
        overflows: overflows?,
        drops: drops?,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener, TcpStream},
        os::fd::OwnedFd,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use netlink_packet_sock_diag::{AF_INET, AF_INET6};
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, connect, listen, socket,
    };

    use super::*;
    use crate::host::sock_diag::testing::dumped;

    /// From /proc/net/netstat of a 6.18 kernel, cut after ListenDrops (the
    /// parser must not rely on the line's length).
    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed EmbryonicRsts PruneCalled RcvPruned OfoPruned OutOfWindowIcmps LockDroppedIcmps ArpFilter TW TWRecycled TWKilled PAWSActive PAWSEstab BeyondWindow TSEcrRejected PAWSOldAck PAWSTimewait DelayedACKs DelayedACKLocked DelayedACKLost ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 0 0 0 0 0 0 0 0 0 354603 1898 0 0 0 0 0 0 0 725 0 6 17 23 1456
IpExt: InNoRoutes InTruncatedPkts InMcastPkts OutMcastPkts InBcastPkts OutBcastPkts InOctets OutOctets
IpExt: 0 0 0 0 0 0 192670497 126465977
";

    #[test]
    fn parses_listen_counters_from_netstat() {
        assert_eq!(
            parse_netstat(NETSTAT),
            Some(ListenCounters {
                overflows: 17,
                drops: 23
            })
        );
        // The values line is missing, or the counters are.
        assert_eq!(parse_netstat(NETSTAT.lines().next().unwrap()), None);
        assert_eq!(parse_netstat("TcpExt: TW PAWSActive\nTcpExt: 1 2\n"), None);
        assert_eq!(parse_netstat(""), None);
    }

    #[test]
    fn reads_listeners_from_dumped_sockets() {
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        let nowhere = (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
        let expected = |addr| ListenerQueue {
            port: 8080,
            addr,
            depth: 5,
            limit: 4,
            inode: 4242,
        };
        assert_eq!(
            listener(&dumped(AF_INET6, TCP_LISTEN, mapped, nowhere)),
            Some(expected(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))))
        );
        let localhost = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            listener(&dumped(AF_INET6, TCP_LISTEN, localhost, nowhere)),
            Some(expected(localhost))
        );
        // An established socket's queues are bytes, not connections.
        let established = dumped(AF_INET, 1, IpAddr::V4(Ipv4Addr::LOCALHOST), nowhere);
        assert_eq!(listener(&established), None);
    }

    /// A listener on 127.0.0.1 with an exact backlog (std always uses 128).
    fn listener_with_backlog(backlog: i32) -> TcpListener {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
        )
        .unwrap();
        listen(&fd, Backlog::new(backlog).unwrap()).unwrap();
        TcpListener::from(fd)
    }

    /// A connect that never blocks: on a full accept queue the SYN is dropped
    /// and the client stays in SYN-SENT until dropped.
    fn connect_nonblocking(listener: &TcpListener) -> OwnedFd {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!("bound to 127.0.0.1")
        };
        match connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(addr),
        ) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => fd,
            Err(e) => panic!("connect: {e}"),
        }
    }

    fn queue_of(listener: &TcpListener) -> ListenerQueue {
        let port = listener.local_addr().unwrap().port();
        listening_sockets()
            .unwrap()
            .into_iter()
            .find(|l| l.port == port)
            .expect("sock_diag lists the test's listener")
    }

    fn inode_of(listener: &TcpListener) -> u64 {
        let fd = std::os::fd::AsRawFd::as_raw_fd(listener);
        fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino()
    }

    /// Polls `probe` until it holds: loopback handshakes finish in softirq,
    /// usually but not surely before connect() returns.
    fn eventually<T>(what: &str, mut probe: impl FnMut() -> (bool, T)) -> T {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let (done, value) = probe();
            if done {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn reports_accept_queue_depth_and_limit() {
        let listener = listener_with_backlog(4);
        let addr = listener.local_addr().unwrap();
        let _clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).unwrap())
            .collect();
        let queue = eventually("3 queued connections", || {
            let queue = queue_of(&listener);
            (queue.depth == 3, queue)
        });
        assert_eq!(queue.limit, 4);
        assert_eq!(queue.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(queue.inode, inode_of(&listener));

        let _accepted: Vec<TcpStream> = (0..3).map(|_| listener.accept().unwrap().0).collect();
        assert_eq!(queue_of(&listener).depth, 0);
    }

    #[test]
    fn lists_ipv6_listeners() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return; // no IPv6 on this machine
        };
        let queue = queue_of(&listener);
        assert_eq!(queue.addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(queue.limit, 128);
    }

    #[test]
    fn overflow_fills_the_queue_one_past_its_limit_and_counts() {
        let pid = std::process::id();
        let before = listen_counters(pid).unwrap();
        let listener = listener_with_backlog(1);
        let _clients: Vec<OwnedFd> = (0..4).map(|_| connect_nonblocking(&listener)).collect();
        let after = eventually("ListenOverflows to grow", || {
            let now = listen_counters(pid).unwrap();
            (now.overflows > before.overflows, now)
        });
        assert!(after.drops > before.drops, "overflows are drops too");
        // sk_acceptq_is_full() is `backlog > max`: a backlog of 1 holds 2.
        let queue = eventually("2 queued connections", || {
            let queue = queue_of(&listener);
            (queue.depth == 2, queue)
        });
        assert_eq!(queue.limit, 1);
    }

    #[test]
    fn counters_are_plausible() {
        let counters = listen_counters(std::process::id()).unwrap();
        assert!(counters.drops >= counters.overflows, "{counters:?}");
        assert!(matches!(
            listen_counters(u32::MAX),
            Err(ListenQueueError::ReadNetstat { pid: u32::MAX, .. })
        ));
    }

    #[test]
    fn own_namespace_runs_in_place() {
        let caller = std::thread::current().id();
        let ran_on = in_netns_of(std::process::id(), || std::thread::current().id()).unwrap();
        assert_eq!(ran_on, caller);
        let err = in_netns_of(u32::MAX, || ()).unwrap_err();
        assert!(matches!(err, ListenQueueError::OpenNamespace { .. }));
        assert_eq!(
            err.to_string(),
            format!("cannot open the network namespace of pid {}", u32::MAX)
        );
    }

    /// A named network namespace (`ip netns add`) with a process in it, both
    /// removed on drop, even when the test panics.
    struct Namespace {
        name: String,
        process: Option<Child>,
    }

    impl Namespace {
        fn new(tag: &str) -> Self {
            let name = format!("tracer-test-{tag}-{}", std::process::id());
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip (iproute2) runs");
            assert!(status.success(), "ip netns add {name}");
            let mut namespace = Self {
                name,
                process: None,
            };
            let child = Command::new("ip")
                .args(["netns", "exec", &namespace.name, "sleep", "30"])
                .stdin(Stdio::null())
                .spawn()
                .expect("ip netns exec runs");
            namespace.process = Some(child);
            namespace
        }

        /// The process's pid, once it has joined the namespace (`ip` execs
        /// `sleep` after setns, keeping the pid).
        fn pid(&self) -> u32 {
            let pid = self.process.as_ref().unwrap().id();
            let own = fs::metadata("/proc/self/ns/net").unwrap().ino();
            eventually("the process to enter the namespace", || {
                let ino = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
                (ino.as_ref().is_ok_and(|&ino| ino != own), ())
            });
            pid
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            if let Some(mut child) = self.process.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
        }
    }

    #[test]
    fn sees_the_listeners_of_another_namespace_only() {
        let host = TcpListener::bind("127.0.0.1:0").unwrap();
        let host_inode = queue_of(&host).inode;

        let namespace = Namespace::new("listen");
        let pid = namespace.pid();
        // The socket belongs to the namespace of the thread that creates it; lo
        // is down in a new namespace, so bind the wildcard address.
        let inside = in_netns_of(pid, || TcpListener::bind("0.0.0.0:0").unwrap()).unwrap();
        let inside_inode = inode_of(&inside);

        let listeners = in_netns_of(pid, listening_sockets).unwrap().unwrap();
        let found = listeners.iter().find(|l| l.inode == inside_inode);
        assert_eq!(
            found.map(|l| (l.addr, l.port)),
            Some((
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                inside.local_addr().unwrap().port()
            )),
            "{listeners:?}"
        );
        assert!(listeners.iter().all(|l| l.inode != host_inode));
        // The caller's namespace is untouched: the inside listener is not here.
        assert!(
            listening_sockets()
                .unwrap()
                .iter()
                .all(|l| l.inode != inside_inode)
        );
        // A fresh namespace has counted nothing yet.
        assert_eq!(listen_counters(pid).unwrap(), ListenCounters::default());
    }
}
