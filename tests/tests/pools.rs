//! Pools and churn, client and server side, with real traffic: a fixed pool
//! that is too small, one that is big enough, a client that opens a connection
//! per request, a listener that stops accepting, a namespace that runs out of
//! local ports, and a worker-per-connection server held by idle clients.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    process::Command,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{Trace, router::in_netns};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, listen, socket,
};
use tracer::kernel::loader::Filter;

const MESSAGE: usize = 16;

fn port_filter(port: u16) -> Filter {
    Filter {
        port: Some(port),
        ..Filter::default()
    }
}

/// A server that answers each 16-byte request with 16 bytes after `delay`, a
/// thread per connection. Dropping it stops accepting.
struct SlowServer {
    listener: Arc<TcpListener>,
}

impl SlowServer {
    fn start(listener: TcpListener, delay: Duration) -> Self {
        let listener = Arc::new(listener);
        let accepting = Arc::clone(&listener);
        thread::spawn(move || {
            // Ends when the listener is shut down.
            while let Ok((mut stream, _)) = accepting.accept() {
                thread::spawn(move || {
                    let mut request = [0; MESSAGE];
                    while stream.read_exact(&mut request).is_ok() {
                        thread::sleep(delay);
                        if stream.write_all(&request).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { listener }
    }
}

impl Drop for SlowServer {
    fn drop(&mut self) {
        // Wakes the blocked accept() with an error.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

/// A fixed pool of `size` connections shared by `callers` threads, each sending
/// requests for `duration`: a caller waits for a free connection, uses it for
/// one request and puts it back.
fn run_pool(addr: SocketAddr, size: usize, callers: usize, duration: Duration) -> usize {
    let pool = Arc::new((
        Mutex::new(
            (0..size)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect::<Vec<_>>(),
        ),
        Condvar::new(),
    ));
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..callers)
        .map(|_| {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let mut served = 0;
                while Instant::now() < deadline {
                    let mut stream = {
                        let (idle, freed) = &*pool;
                        let mut idle = idle.lock().unwrap();
                        loop {
                            if let Some(stream) = idle.pop() {
                                break stream;
                            }
                            idle = freed.wait(idle).unwrap();
                        }
                    };
                    stream.write_all(&[1; MESSAGE]).unwrap();
                    stream.read_exact(&mut [0; MESSAGE]).unwrap();
                    served += 1;
                    let (idle, freed) = &*pool;
                    idle.lock().unwrap().push(stream);
                    freed.notify_one();
                }
                served
            })
        })
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).sum()
}

/// Acceptance 1: 4 connections, 16 callers, 50 ms per request.
#[test]
fn small_pool_with_many_callers_is_saturated() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = SlowServer::start(listener, Duration::from_millis(50));
    let mut trace = Trace::start(port_filter(addr.port()));
    let traffic = thread::spawn(move || run_pool(addr, 4, 16, Duration::from_secs(9)));
    let me = std::process::id();
    trace.wait_until(Duration::from_secs(12), |t| {
        !t.findings_of("pool_saturation", me).is_empty()
    });
    let served = traffic.join().unwrap();
    drop(server);
    let finding = trace.findings_of("pool_saturation", me)[0];
    assert_eq!(finding.rport, Some(addr.port()));
    assert_eq!(finding.evidence["pool_size"], 4);
    let busy = finding.evidence["busy_fraction"].as_f64().unwrap();
    assert!(busy >= 0.9, "busy fraction {busy}");
    let response = finding.evidence["mean_response_ms"].as_f64().unwrap();
    assert!((50.0..60.0).contains(&response), "{response} ms");
    assert!(served > 300, "{served} requests");
    println!("{}", trace.report_text());
}

/// Acceptance 2: 16 connections, 4 callers: busy a quarter of the time.
#[test]
fn big_enough_pool_is_not_saturated() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = SlowServer::start(listener, Duration::from_millis(50));
    let mut trace = Trace::start(port_filter(addr.port()));
    run_pool(addr, 16, 4, Duration::from_secs(8));
    drop(server);
    trace.collect_for(Duration::from_millis(1500));
    let me = std::process::id();
    assert!(
        trace.findings_of("pool_saturation", me).is_empty(),
        "{}",
        trace.dump()
    );
}

/// Acceptance 3: a new connection for every request, at more than 300 per
/// second; the client closes first, so TIME_WAIT piles up on its side.
#[test]
fn a_connection_per_request_is_churn() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = SlowServer::start(listener, Duration::ZERO);
    let mut trace = Trace::start(port_filter(addr.port()));
    // 400 requests per second for 7 s, each on a new connection, while the
    // trace is read.
    let traffic = thread::spawn(move || {
        let start = Instant::now();
        let mut requests = 0;
        while start.elapsed() < Duration::from_secs(7) {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(&[1; MESSAGE]).unwrap();
            stream.read_exact(&mut [0; MESSAGE]).unwrap();
            requests += 1;
            let next = start + Duration::from_micros(2500) * requests;
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        requests as f64 / start.elapsed().as_secs_f64()
    });
    let me = std::process::id();
    trace.wait_until(Duration::from_secs(10), |t| {
        !t.findings_of("connection_churn", me).is_empty()
    });
    let rate = traffic.join().unwrap();
    assert!(rate >= 300.0, "only {rate:.0} requests/s");
    drop(server);
    let finding = trace.findings_of("connection_churn", me)[0];
    assert_eq!(finding.rport, Some(addr.port()));
    let reported = finding.evidence["new_connections_per_s"].as_f64().unwrap();
    assert!(reported >= 300.0, "{reported}");
    assert_eq!(finding.evidence["requests_per_connection"], 1.0);
    let time_wait = finding.evidence["time_wait"].as_u64().unwrap();
    assert!(time_wait >= 1000, "{time_wait} in TIME_WAIT");
}

/// A listening socket with an explicit backlog.
fn listener_with_backlog(backlog: usize) -> (OwnedFd, SocketAddr) {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    listen(&fd, nix::sys::socket::Backlog::new(backlog as i32).unwrap()).unwrap();
    let local: SockaddrIn = nix::sys::socket::getsockname(fd.as_raw_fd()).unwrap();
    (fd, SocketAddr::from(([127, 0, 0, 1], local.port())))
}

/// Acceptance 4: a listener with backlog 4 that never accepts while 50 clients
/// connect.
#[test]
fn listener_that_stops_accepting_overflows() {
    let (listener, addr) = listener_with_backlog(4);
    let mut trace = Trace::start(port_filter(addr.port()));
    // Non-blocking connects: the refused handshakes retry in the background.
    let clients: Vec<OwnedFd> = (0..50)
        .map(|_| {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let _ = connect(
                fd.as_raw_fd(),
                &SockaddrIn::from(match addr {
                    SocketAddr::V4(v4) => v4,
                    SocketAddr::V6(_) => unreachable!(),
                }),
            );
            fd
        })
        .collect();
    let me = std::process::id();
    trace.wait_until(Duration::from_secs(10), |t| {
        t.findings_of("accept_queue_overflow", me)
            .iter()
            .any(|f| f.evidence["dropped"].as_u64().unwrap_or(0) > 0)
    });
    let finding = *trace
        .findings_of("accept_queue_overflow", me)
        .last()
        .unwrap();
    assert_eq!(finding.lport, Some(addr.port()));
    assert_eq!(finding.evidence["backlog_limit"], 4);
    assert!(finding.evidence["peak_depth"].as_u64().unwrap() >= 4);
    assert!(finding.evidence["dropped"].as_u64().unwrap() > 0);
    drop(clients);
    drop(listener);
}

/// A network namespace for one test, deleted when dropped.
struct Namespace(String);

impl Namespace {
    fn create(tag: &str) -> Self {
        let name = format!("trc-{tag}-{}", std::process::id());
        let ns = Self(name);
        run(&["ip", "netns", "add", &ns.0]);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    fn sysctl(&self, setting: &str) {
        run(&["ip", "netns", "exec", &self.0, "sysctl", "-qw", setting]);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?} failed: {status}");
}

/// Acceptance 5: a namespace whose local port range holds 5 ports; a client that
/// connects (and closes first, keeping TIME_WAIT) in a loop runs out.
#[test]
fn narrow_port_range_is_exhausted() {
    let ns = Namespace::create("ports");
    ns.sysctl("net.ipv4.ip_local_port_range=40000 40004");
    // TIME_WAIT ports must not be recycled for new connections.
    ns.sysctl("net.ipv4.tcp_tw_reuse=0");
    // A fixed port: an ephemeral one would take one of the five.
    let listener = in_netns(&ns.0, || TcpListener::bind("127.0.0.1:9000").unwrap());
    let addr = listener.local_addr().unwrap();
    let server = SlowServer::start(listener, Duration::ZERO);
    let mut trace = Trace::start(port_filter(addr.port()));
    // How many of the five ports connect() gets to use varies (it prefers one
    // parity and starts at a random offset): at least one attempt must fail.
    let errors = in_netns(&ns.0, move || {
        let mut errors = 0;
        for _ in 0..10 {
            match TcpStream::connect(addr) {
                Ok(mut stream) => {
                    stream.write_all(&[1; MESSAGE]).unwrap();
                    stream.read_exact(&mut [0; MESSAGE]).unwrap();
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(nix::libc::EADDRNOTAVAIL), "{e}");
                    errors += 1;
                }
            }
        }
        errors
    });
    assert!((5..=6).contains(&errors), "{errors} attempts of 10 failed");
    let me = std::process::id();
    trace.wait_until(Duration::from_secs(5), |t| {
        !t.findings_of("port_exhaustion", me).is_empty()
    });
    drop(server);
    let finding = trace.findings_of("port_exhaustion", me)[0];
    assert_eq!(finding.rport, Some(addr.port()));
    assert!(finding.recommendation.contains("EADDRNOTAVAIL"));
    let errors_seen = trace
        .events
        .iter()
        .filter(|e| e.kind == "connect_error")
        .count();
    assert_eq!(errors_seen, errors, "{}", trace.dump());
}

/// Acceptance 6: a server with 4 workers, each serving one keep-alive
/// connection until the client leaves (or 30 s of idleness). Four clients make a
/// request and stay idle; three more queue.
#[test]
fn idle_keepalive_clients_starve_a_worker_per_connection_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..4 {
        let listener = Arc::clone(&listener);
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let mut request = [0; MESSAGE];
                while stream.read_exact(&mut request).is_ok() {
                    if stream.write_all(&request).is_err() {
                        break;
                    }
                }
            }
        });
    }
    let mut trace = Trace::start(port_filter(addr.port()));
    let idle_clients: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.write_all(&[1; MESSAGE]).unwrap();
            stream.read_exact(&mut [0; MESSAGE]).unwrap();
            stream
        })
        .collect();
    // The handshake completes in the kernel; the connections wait in the
    // accept queue for a worker that never comes.
    let queued: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let me = std::process::id();
    trace.wait_until(Duration::from_secs(10), |t| {
        !t.findings_of("keepalive_worker_starvation", me).is_empty()
    });
    let finding = trace.findings_of("keepalive_worker_starvation", me)[0];
    assert_eq!(finding.lport, Some(addr.port()));
    assert_eq!(finding.evidence["queued"], 3);
    assert_eq!(finding.evidence["idle_keepalive_connections"], 4);
    assert_eq!(finding.evidence["open_connections"], 4);
    stop.store(true, Ordering::Relaxed);
    drop(idle_clients);
    drop(queued);
}
