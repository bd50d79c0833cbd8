//! Connection lifecycle, end to end: the real kernel programs watching real TCP
//! connections on loopback and across network namespaces.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    thread,
    time::Duration,
};

use integration_tests::*;
use tracer::{
    event::{ClosedBy, ConnectError, Detail, Direction, Event, Role},
    kernel::loader::{Filter, Options, StateHook},
};

fn port_filter(port: u16) -> Filter {
    Filter {
        port: Some(port),
        ..Filter::default()
    }
}

const WAIT: Duration = Duration::from_secs(10);
const PEER: &str = env!("CARGO_BIN_EXE_peer");

fn closes_on(lports: &[u16]) -> impl Fn(&[Event]) -> bool + '_ {
    move |events| {
        lports
            .iter()
            .all(|&port| !of_kind(events, "close", port).is_empty())
    }
}

/// Acceptance 1: the client closes first after 300 ms idle. `auto` takes the
/// BTF tracepoint unless `TRACER_STATE_HOOK` forces another hook (the kernel
/// matrix) or the kernel refuses it (5.10), which the report must say.
#[test]
fn client_closes_first_after_idle() {
    client_closes_first_after_idle_with(
        StateHook::Auto,
        forced_state_hook().and_then(StateHook::mode),
    );
}

/// The same through the classic tracepoint, the fallback for kernels that refuse
/// BTF tracepoints.
#[test]
fn classic_tracepoint_fallback_sees_the_same() {
    client_closes_first_after_idle_with(StateHook::Tracepoint, Some("tracepoint"));
}

/// `expected_mode`: the mode the report must name; `None` for `auto`'s choice.
fn client_closes_first_after_idle_with(state_hook: StateHook, expected_mode: Option<&str>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start_with(Options {
        filter: port_filter(server_port),
        state_hook,
        ..Options::default()
    });
    let report = trace.report();
    match expected_mode {
        Some(mode) => assert_eq!(report.state_mode, mode),
        None if report.state_mode == "tp_btf" => {}
        None => {
            // 5.10 refuses typed pointer arithmetic and socket storage in
            // tracing programs; every kernel since 5.11 must take the BTF one.
            assert!(
                tracer::kernel::loader::running_kernel() < Some((5, 11)),
                "auto did not take tp_btf: {report:?}"
            );
            assert_eq!(report.state_mode, "tracepoint");
            assert!(
                report
                    .degraded
                    .iter()
                    .any(|d| d.starts_with("tp_btf/inet_sock_set_state unavailable")),
                "auto left tp_btf without saying why: {report:?}"
            );
        }
    }

    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0; 100]).unwrap();
        stream.write_all(&[1; 1000]).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        // Linger a little so the server's close is clearly after the client's.
        thread::sleep(Duration::from_millis(50));
    });
    let mut client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    client.write_all(&[2; 100]).unwrap();
    client.read_exact(&mut [0; 1000]).unwrap();
    // The idle time both closes must report.
    thread::sleep(Duration::from_millis(300));
    drop(client);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, closes_on(&[client_port, server_port]));
    let me = std::process::id();

    let open = one(events, "open", client_port);
    assert_eq!((open.role, open.pid), (Role::Client, me));
    let client_close = one(events, "close", client_port);
    assert_eq!(client_close.role, Role::Client);
    assert_eq!(client_close.pid, me);
    assert_eq!(client_close.rport, server_port);
    let close = close_detail(client_close);
    assert_eq!(close.closed_by, ClosedBy::Local);
    assert_near("client idle_ms", close.idle_ms.unwrap() as f64, 300.0);
    assert_eq!((close.bytes_sent, close.bytes_received), (100, 1000));
    assert!(close.duration_ms.unwrap() >= 300.0);
    assert_eq!(close.error, None);

    let server_close = of_kind(events, "close", server_port)
        .into_iter()
        .find(|e| e.rport == client_port)
        .expect("server-side close");
    assert_eq!(server_close.role, Role::Server);
    let close = close_detail(server_close);
    assert_eq!(close.closed_by, ClosedBy::Peer);
    assert_eq!((close.bytes_sent, close.bytes_received), (1000, 100));
    assert_near("server idle_ms", close.idle_ms.unwrap() as f64, 300.0);
    assert_near("server close_wait_ms", close.close_wait_ms.unwrap(), 50.0);
}

/// Acceptance 2: the server closes first after idle; the client waits 150 ms in
/// CLOSE_WAIT before closing its side.
#[test]
fn server_closes_first_and_client_waits() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));

    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0; 10]).unwrap();
        stream.write_all(&[1; 20]).unwrap();
        // The idle time both closes must report.
        thread::sleep(Duration::from_millis(200));
        drop(stream);
    });
    let mut client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    client.write_all(&[2; 10]).unwrap();
    client.read_exact(&mut [0; 20]).unwrap();
    // read() returns 0 when the server's FIN arrives.
    assert_eq!(client.read(&mut [0; 1]).unwrap(), 0);
    // The time in CLOSE_WAIT the client's close must report.
    thread::sleep(Duration::from_millis(150));
    drop(client);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, closes_on(&[client_port, server_port]));
    let close = close_detail(one(events, "close", client_port));
    assert_eq!(close.closed_by, ClosedBy::Peer);
    assert_near("client close_wait_ms", close.close_wait_ms.unwrap(), 150.0);
    assert_near("client idle_ms", close.idle_ms.unwrap() as f64, 200.0);
    assert_eq!((close.bytes_sent, close.bytes_received), (10, 20));

    let server_close = one(events, "close", server_port);
    let close = close_detail(server_close);
    assert_eq!(close.closed_by, ClosedBy::Local);
    assert_near("server idle_ms", close.idle_ms.unwrap() as f64, 200.0);
    assert_eq!(close.close_wait_ms, None);
}

fn set_linger_zero(stream: &TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::Linger, &linger).unwrap();
}

/// Acceptance 3: close() with SO_LINGER 0 aborts with a RST.
#[test]
fn linger_zero_resets_both_sides() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));

    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0; 5]).unwrap();
        // The client's RST ends the connection: reads fail with ECONNRESET.
        let error = stream.read(&mut [0; 1]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    });
    let mut client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    client.write_all(&[0; 5]).unwrap();
    // The idle time the server's side must report when the reset comes.
    thread::sleep(Duration::from_millis(50));
    set_linger_zero(&client);
    drop(client);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, |events| {
        closes_on(&[client_port, server_port])(events)
            && !of_kind(events, "reset", client_port).is_empty()
            && !of_kind(events, "reset", server_port).is_empty()
    });
    let close = close_detail(one(events, "close", client_port));
    assert_eq!(close.closed_by, ClosedBy::ResetLocal);
    let close = close_detail(one(events, "close", server_port));
    assert_eq!(close.closed_by, ClosedBy::ResetPeer);
    assert_eq!(close.error.as_deref(), Some("ECONNRESET"));

    let sent = one(events, "reset", client_port);
    let received = one(events, "reset", server_port);
    assert_eq!(sent.pid, std::process::id());
    assert_eq!(received.pid, std::process::id());
    match (&sent.detail, &received.detail) {
        (Detail::Reset(out), Detail::Reset(inbound)) => {
            assert_eq!(out.direction, Direction::Out);
            assert_eq!(inbound.direction, Direction::In);
            assert_eq!(inbound.state, "ESTABLISHED");
            assert_near("idle at reset", inbound.idle_ms.unwrap() as f64, 50.0);
        }
        other => panic!("not resets: {other:?}"),
    }
}

/// Acceptance 4: connecting to a closed port is refused.
#[test]
fn connect_to_closed_port_is_refused() {
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut trace = Trace::start(port_filter(closed_port));
    let error = TcpStream::connect(("127.0.0.1", closed_port)).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);

    let events = trace.wait_for(WAIT, |events| {
        events.iter().any(|e| e.kind == "connect_error")
    });
    let errors: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "connect_error")
        .collect();
    assert_eq!(errors.len(), 1, "exactly one connect_error: {errors:#?}");
    let error = errors[0];
    assert_eq!(error.rport, closed_port);
    assert_eq!(error.raddr, Ipv4Addr::LOCALHOST);
    assert_eq!((error.pid, error.role), (std::process::id(), Role::Client));
    match &error.detail {
        Detail::ConnectError(ConnectError { error, connect_us }) => {
            assert_eq!(error, "ECONNREFUSED");
            assert!(*connect_us < 1_000_000);
        }
        other => panic!("{other:?}"),
    }
    assert!(of_kind(events, "open", error.lport).is_empty());
}

/// A request/response exchange on `client`, then the client closes.
fn exchange_and_close(mut client: TcpStream) {
    client.write_all(b"ping").unwrap();
    client.read_exact(&mut [0; 4]).unwrap();
}

fn echo_once(listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0; 4];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
    })
}

/// Acceptance 5a: IPv6 loopback.
#[test]
fn ipv6_loopback_addresses() {
    let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));
    let server = echo_once(listener);
    let client = TcpStream::connect((Ipv6Addr::LOCALHOST, server_port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    exchange_and_close(client);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, closes_on(&[client_port, server_port]));
    for (lport, rport, role) in [
        (client_port, server_port, Role::Client),
        (server_port, client_port, Role::Server),
    ] {
        for kind in ["open", "close"] {
            let event = one(events, kind, lport);
            assert_eq!(event.laddr, Ipv6Addr::LOCALHOST, "{event:?}");
            assert_eq!(event.raddr, Ipv6Addr::LOCALHOST, "{event:?}");
            assert_eq!((event.rport, event.role), (rport, role), "{event:?}");
        }
    }
}

/// Acceptance 5b: an IPv6 socket talking IPv4 (v4-mapped addresses) reports the
/// IPv4 addresses, so both ends of the connection read the same.
#[test]
fn v4_mapped_ipv6_reads_as_ipv4() {
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    let listener = TcpListener::bind(SocketAddr::from((mapped, 0))).unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));
    let server = echo_once(listener);
    let client = TcpStream::connect((Ipv4Addr::LOCALHOST, server_port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    exchange_and_close(client);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, closes_on(&[client_port, server_port]));
    let server_close = one(events, "close", server_port);
    assert_eq!(server_close.laddr, Ipv4Addr::LOCALHOST);
    assert_eq!(server_close.raddr, Ipv4Addr::LOCALHOST);
    assert_eq!(server_close.rport, client_port);
    assert_eq!(server_close.role, Role::Server);
}

/// Acceptance 5c: a connection between two network namespaces over veth, each
/// side reporting the addresses and ports it sees.
#[test]
fn connection_between_namespaces() {
    let pair = NetnsPair::create();
    let mut server = Peer::spawn({
        let mut cmd = NetnsPair::exec_in(&pair.a, PEER);
        cmd.args([
            "ns-server",
            "listen",
            &format!("{}:0", pair.addr_a),
            "3",
            "7",
        ]);
        cmd
    });
    let server_port = server.read_port();
    let mut trace = Trace::start(port_filter(server_port));
    let client = Peer::spawn({
        let mut cmd = NetnsPair::exec_in(&pair.b, PEER);
        cmd.args([
            "ns-client",
            "connect",
            &format!("{}:{server_port}", pair.addr_a),
            "3",
            "7",
            "20",
        ]);
        cmd
    });
    let client_pid = client.pid();
    let server_pid = server.pid();
    client.wait_ok(WAIT);
    server.wait_ok(WAIT);

    let events = trace.wait_for(WAIT, |events| {
        events.iter().filter(|e| e.kind == "close").count() >= 2
    });
    let server_close = one(events, "close", server_port);
    assert_eq!(server_close.laddr, pair.addr_a);
    assert_eq!(server_close.raddr, pair.addr_b);
    assert_eq!(
        (server_close.pid, server_close.comm.as_str()),
        (server_pid, "ns-server")
    );
    let client_port = server_close.rport;
    let client_close = one(events, "close", client_port);
    assert_eq!(client_close.laddr, pair.addr_b);
    assert_eq!(client_close.raddr, pair.addr_a);
    assert_eq!(client_close.rport, server_port);
    assert_eq!(
        (client_close.pid, client_close.comm.as_str()),
        (client_pid, "ns-client")
    );
    let close = close_detail(client_close);
    assert_eq!((close.bytes_sent, close.bytes_received), (3, 7));
    assert_eq!(close.closed_by, ClosedBy::Local);
}

/// Acceptance 6: the listening socket belongs to this test process, a second
/// process accepts from it (as prefork servers do), a third connects. Each side's
/// events name the process that really owns it, though the handshake completes in
/// softirq context.
#[test]
fn events_name_the_accepting_and_connecting_processes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));

    // The acceptor inherits the listener as fd 3.
    let mut acceptor_cmd = Command::new(PEER);
    acceptor_cmd.args(["acceptor-proc", "accept", "3", "4", "6"]);
    let listener_fd = listener.as_raw_fd();
    // SAFETY: dup2 in the child between fork and exec, async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        acceptor_cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec, so clear it explicitly.
            if nix::libc::dup2(listener_fd, 3) < 0 || nix::libc::fcntl(3, nix::libc::F_SETFD, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let acceptor = Peer::spawn(acceptor_cmd);
    let mut client_cmd = Command::new(PEER);
    client_cmd.args([
        "client-proc",
        "connect",
        &format!("127.0.0.1:{server_port}"),
        "4",
        "6",
        "10",
    ]);
    let client = Peer::spawn(client_cmd);
    let (acceptor_pid, client_pid) = (acceptor.pid(), client.pid());
    client.wait_ok(WAIT);
    acceptor.wait_ok(WAIT);

    let events = trace.wait_for(WAIT, |events| {
        events.iter().filter(|e| e.kind == "close").count() >= 2
    });
    for kind in ["open", "close"] {
        let server_side = one(events, kind, server_port);
        assert_eq!(server_side.role, Role::Server);
        assert_eq!(
            (server_side.pid, server_side.comm.as_str()),
            (acceptor_pid, "acceptor-proc"),
            "{kind} on the server side"
        );
        let client_side = one(events, kind, server_side.rport);
        assert_eq!(client_side.role, Role::Client);
        assert_eq!(
            (client_side.pid, client_side.comm.as_str()),
            (client_pid, "client-proc"),
            "{kind} on the client side"
        );
    }
    match &one(events, "open", server_port).detail {
        Detail::Open(open) => assert!(open.accept_wait_us.is_some()),
        other => panic!("{other:?}"),
    }
}

/// Acceptance 7: a burst of 10,000 connections gives exactly one open and one
/// close per connection and side, and nothing is lost.
#[test]
fn burst_of_ten_thousand_connections() {
    const CONNECTIONS: usize = 10_000;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(server_port));

    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut stream, _) = listener.accept().unwrap();
            let mut byte = [0; 1];
            stream.read_exact(&mut byte).unwrap();
            stream.write_all(&byte).unwrap();
            // Server closes first: TIME_WAIT stays on the server, not on the
            // client's ephemeral ports.
        }
    });
    let mut client_ports = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut client = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
        client_ports.push(client.local_addr().unwrap().port());
        client.write_all(&[7]).unwrap();
        client.read_exact(&mut [0; 1]).unwrap();
    }
    server.join().unwrap();

    let events = trace.wait_for(Duration::from_secs(60), |events| {
        events.iter().filter(|e| e.kind == "close").count() >= 2 * CONNECTIONS
    });
    let mut counts = std::collections::HashMap::new();
    for event in events {
        // (kind, side, client port): the client port names the connection.
        let (side, client_port) = if event.lport == server_port {
            ("server", event.rport)
        } else {
            ("client", event.lport)
        };
        *counts.entry((event.kind, side, client_port)).or_insert(0) += 1;
    }
    // The client does not keep TIME_WAIT, so a port can serve several connections.
    let mut uses = std::collections::HashMap::new();
    for port in &client_ports {
        *uses.entry(*port).or_insert(0) += 1;
    }
    for (port, uses) in uses {
        for kind in ["open", "close"] {
            for side in ["client", "server"] {
                assert_eq!(
                    counts.get(&(kind, side, port)),
                    Some(&uses),
                    "{kind} on the {side} side of the connections from port {port}"
                );
            }
        }
    }
    // Nothing else, except a retransmission that really happened: an emulated
    // kernel (the kernel matrix) can be slow enough for a FIN to time out.
    let retransmits = events.iter().filter(|e| e.kind == "retransmit").count();
    let others: Vec<&Event> = events
        .iter()
        .filter(|e| !matches!(e.kind, "open" | "close" | "retransmit"))
        .take(5)
        .collect();
    assert_eq!(
        events.len(),
        4 * CONNECTIONS + retransmits,
        "no other events: {others:#?}"
    );
    let stats = trace.stats();
    assert_eq!(stats.lost, 0, "events lost in the kernel");
    assert_eq!(stats.undecodable, 0);
}

/// The kernel-side pid filter: only the chosen process's connections come out.
#[test]
fn pid_filter_keeps_only_that_process() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let server = thread::spawn(move || {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0; 1];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&[0; 2]).unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).unwrap();
        }
    });
    // The helper waits in its own pid before connecting: start it, filter on it.
    let mut helper_cmd = Command::new("sh");
    helper_cmd.args([
        "-c",
        &format!("read go && exec {PEER} filtered-peer connect 127.0.0.1:{server_port} 1 2 0"),
    ]);
    helper_cmd.stdin(std::process::Stdio::piped());
    let mut helper = Peer::spawn(helper_cmd);
    let mut trace = Trace::start(Filter {
        pid: Some(helper.pid()),
        ..Filter::default()
    });
    // A connection from this process, which the filter must drop...
    let mine = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
    let my_port = mine.local_addr().unwrap().port();
    let mut mine = mine;
    mine.write_all(&[1]).unwrap();
    mine.read_exact(&mut [0; 2]).unwrap();
    drop(mine);
    // ...and one from the helper, which it must keep.
    helper
        .child
        .stdin
        .take()
        .unwrap()
        .write_all(b"go\n")
        .unwrap();
    let helper_pid = helper.pid();
    helper.wait_ok(WAIT);
    server.join().unwrap();

    let events = trace.wait_for(WAIT, |events| events.iter().any(|e| e.kind == "close"));
    assert!(events.iter().all(|e| e.pid == helper_pid), "{events:#?}");
    assert!(
        events
            .iter()
            .all(|e| e.lport != my_port && e.rport != my_port)
    );
    let close = events.iter().find(|e| e.kind == "close").unwrap();
    assert_eq!(close.comm, "filtered-peer");
    assert_eq!(close.role, Role::Client);
}
