//! The router fixture itself: that the path forwards, and that each way of
//! breaking it fails a client's send the way the tracer tests rely on.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::router::{RoutedPath, echo, in_netns};
use nix::errno::Errno;

const USER_TIMEOUT_MS: u32 = 2000;

fn connect(path: &RoutedPath, port: u16) -> TcpStream {
    path.connect(port, Duration::from_millis(USER_TIMEOUT_MS.into()))
}

/// Sends on a connection whose path is broken; returns the errno it failed
/// with and how long after the send.
fn failing_echo(stream: &mut TcpStream) -> (Option<Errno>, Duration) {
    let start = Instant::now();
    let error = echo(stream, b"into the void").expect_err("the send went through");
    (error.raw_os_error().map(Errno::from_raw), start.elapsed())
}

fn namespaces() -> String {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    assert!(output.status.success(), "ip netns list failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn names(path: &RoutedPath) -> [String; 3] {
    [
        path.client_ns.clone(),
        path.router_ns.clone(),
        path.server_ns.clone(),
    ]
}

fn assert_gone(names: &[String]) {
    let listed = namespaces();
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name)),
            "namespace {name} is still there:\n{listed}"
        );
    }
}

#[test]
fn forwards_traffic_between_client_and_server() {
    let forwarding = || std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let host_forwarding = forwarding();
    let path = RoutedPath::create();
    assert_eq!(
        forwarding(),
        host_forwarding,
        "creating the path changed the host's ip_forward"
    );
    let (_server, port) = path.spawn_echo_server();
    let mut stream = connect(&path, port);
    assert_eq!(stream.local_addr().unwrap().ip(), path.client_addr);
    assert_eq!(stream.peer_addr().unwrap().ip(), path.server_addr);
    echo(&mut stream, b"hello through the router").expect("echo");
    echo(&mut stream, &[7; 100_000]).expect("a larger echo");
}

#[test]
fn in_netns_runs_in_the_namespace() {
    let path = RoutedPath::create();
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = in_netns(&path.client_ns, || {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    });
    let named = std::fs::metadata(format!("/run/netns/{}", path.client_ns)).unwrap();
    assert_ne!(inside, own);
    assert_eq!(
        inside.to_string_lossy(),
        format!("net:[{}]", std::os::unix::fs::MetadataExt::ino(&named))
    );
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        own,
        "in_netns moved the caller's thread"
    );
}

#[test]
fn drop_forwarded_times_out_a_send() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut stream = connect(&path, port);
    echo(&mut stream, b"before").expect("echo before the drop");
    path.drop_forwarded(port);
    let (errno, took) = failing_echo(&mut stream);
    eprintln!("drop_forwarded: {errno:?} after {took:?}");
    assert_eq!(errno, Some(Errno::ETIMEDOUT));
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&took),
        "ETIMEDOUT after {took:?}, expected about {USER_TIMEOUT_MS} ms"
    );
}

#[test]
fn reset_forwarded_resets_a_send() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut stream = connect(&path, port);
    echo(&mut stream, b"before").expect("echo before the reset");
    path.reset_forwarded(port);
    let (errno, took) = failing_echo(&mut stream);
    eprintln!("reset_forwarded: {errno:?} after {took:?}");
    assert_eq!(errno, Some(Errno::ECONNRESET));
    assert!(
        took < Duration::from_millis(500),
        "ECONNRESET after {took:?}"
    );
}

#[test]
fn forget_idle_flows_drops_a_flow_idle_longer_than_the_timeout() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    // Opened before the call: the router tracks flows from their SYN.
    let mut stream = connect(&path, port);
    echo(&mut stream, b"before").expect("echo before forget_idle_flows");
    path.forget_idle_flows(1);
    // This exchange refreshes the flow's entry with the 1 s timeout.
    echo(&mut stream, b"arms the timeout").expect("echo right after the call");
    // Idle shorter than the 1 s timeout, then longer: conntrack checks an
    // entry's deadline when the next packet comes, so the idle time alone
    // decides.
    std::thread::sleep(Duration::from_millis(500));
    echo(&mut stream, b"short idle").expect("echo after 0.5 s idle (< 1 s timeout)");
    std::thread::sleep(Duration::from_millis(1500));
    let (errno, took) = failing_echo(&mut stream);
    eprintln!("forget_idle_flows: {errno:?} after {took:?}");
    assert_eq!(errno, Some(Errno::ETIMEDOUT));
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&took),
        "ETIMEDOUT after {took:?}, expected about {USER_TIMEOUT_MS} ms"
    );
    // A new flow is tracked from its SYN and goes through.
    let mut fresh = connect(&path, port);
    echo(&mut fresh, b"new flow").expect("echo on a new connection");
}

#[test]
fn forget_flows_drops_a_flow_at_once() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    // With no flow to forget yet, it only arms the drop: flows opened later are
    // tracked from their SYN and go through.
    path.forget_flows(port);
    let mut stream = connect(&path, port);
    echo(&mut stream, b"before").expect("echo on a flow opened after forget_flows");
    path.forget_flows(port);
    let (errno, took) = failing_echo(&mut stream);
    eprintln!("forget_flows: {errno:?} after {took:?}");
    assert_eq!(errno, Some(Errno::ETIMEDOUT));
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(4)).contains(&took),
        "ETIMEDOUT after {took:?}, expected about {USER_TIMEOUT_MS} ms"
    );
}

#[test]
fn heal_lets_stalled_flows_through_again() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut stream = connect(&path, port);
    echo(&mut stream, b"before").expect("echo before breaking the path");

    // A send stalled behind the drop completes with a retransmission once the
    // path heals, before TCP_USER_TIMEOUT gives up on it.
    path.drop_forwarded(port);
    stream.write_all(b"stalled").unwrap();
    // The stall itself: scenario time, well within TCP_USER_TIMEOUT.
    std::thread::sleep(Duration::from_millis(300));
    path.heal();
    let mut back = [0; 7];
    stream.read_exact(&mut back).expect("echo after heal");
    assert_eq!(&back, b"stalled");

    path.forget_flows(port);
    path.heal();
    echo(&mut stream, b"forgotten, then healed").expect("echo after forget_flows + heal");

    path.forget_idle_flows(1);
    path.heal();
    // Idle past the 1 s timeout that heal undid.
    std::thread::sleep(Duration::from_millis(1500));
    echo(&mut stream, b"idle, then healed").expect("echo after forget_idle_flows + heal");

    path.reset_forwarded(port);
    path.heal();
    echo(&mut stream, b"reset, then healed").expect("echo after reset_forwarded + heal");
}

#[test]
fn add_delay_delays_or_says_why_not() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut stream = connect(&path, port);
    match path.add_delay(100) {
        Ok(()) => {
            let start = Instant::now();
            echo(&mut stream, b"slow").expect("echo through the delay");
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(100), "echo took {took:?}");
            path.heal();
            let start = Instant::now();
            echo(&mut stream, b"fast").expect("echo after heal");
            assert!(start.elapsed() < Duration::from_millis(50));
        }
        Err(why) => {
            eprintln!("add_delay unavailable here, not checked: {why}");
            echo(&mut stream, b"unchanged").expect("echo after a failed add_delay");
        }
    }
}

#[test]
fn drop_deletes_the_namespaces() {
    let path = RoutedPath::create();
    let names = names(&path);
    let listed = namespaces();
    for name in &names {
        assert!(listed.contains(name.as_str()), "{name} missing:\n{listed}");
    }
    drop(path);
    assert_gone(&names);
}

#[test]
fn a_panicking_test_still_deletes_the_namespaces() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let path = RoutedPath::create();
        path.drop_forwarded(1);
        seen = Some(names(&path));
        panic!("deliberate panic while the path exists");
    }));
    assert!(result.is_err());
    assert_gone(&seen.expect("the path was created"));
}
