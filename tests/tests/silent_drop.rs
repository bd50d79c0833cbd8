//! Acceptance 7: a router between client and server forgets an idle flow. The
//! client's first send after the idle period is retransmitted into the void until
//! the kernel gives up: a silent drop. When the router answers with a reset
//! instead, the failure is immediate and is a stale reuse, not a silent drop.
//! The namespaces and every rule go away with the `RoutedPath`.

use std::{thread, time::Duration};

use integration_tests::{
    Trace,
    router::{RoutedPath, echo},
};
use tracer::kernel::loader::Filter;

/// How long the client's kernel waits for an ACK before ETIMEDOUT.
const USER_TIMEOUT: Duration = Duration::from_secs(3);

fn port_filter(port: u16) -> Filter {
    Filter {
        port: Some(port),
        ..Filter::default()
    }
}

#[test]
fn router_forgetting_an_idle_flow_is_a_silent_drop() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut trace = Trace::start(port_filter(port));
    // A NAT whose idle timeout (1 s) is shorter than the client's idle period.
    path.forget_idle_flows(1);
    let mut stream = path.connect(port, USER_TIMEOUT);
    echo(&mut stream, b"request").expect("the path works while the flow is fresh");
    // Idle past the router's 1 s: the idle time the finding must report.
    thread::sleep(Duration::from_millis(1500));
    let error = echo(&mut stream, b"request after idle").expect_err("dropped");
    assert_eq!(error.raw_os_error(), Some(nix::libc::ETIMEDOUT), "{error}");

    let me = std::process::id();
    trace.wait_until(Duration::from_secs(5), |t| {
        !t.findings_of("silent_drop", me).is_empty()
    });
    let drop = trace.findings_of("silent_drop", me)[0];
    assert_eq!(drop.raddr, Some(path.server_addr));
    assert_eq!(drop.rport, Some(port));
    let idle = drop.evidence["idle_before_send_ms"].as_u64().unwrap();
    assert!(
        (1475..=1600).contains(&idle),
        "idle before the send: {idle} ms"
    );
    assert!(drop.evidence["retransmits"].as_u64().unwrap() >= 1);
    assert_eq!(drop.evidence["ended_with"], "ETIMEDOUT");
    assert!(
        trace.findings_of("stale_reuse", me).is_empty(),
        "{}",
        trace.dump()
    );
    assert!(
        drop.recommendation.contains("keep-alive"),
        "{}",
        drop.recommendation
    );
}

#[test]
fn router_resetting_an_idle_flow_is_a_reset_after_idle_not_a_silent_drop() {
    let path = RoutedPath::create();
    let (_server, port) = path.spawn_echo_server();
    let mut trace = Trace::start(port_filter(port));
    let mut stream = path.connect(port, USER_TIMEOUT);
    echo(&mut stream, b"request").expect("the path works");
    // The idle time the finding must report.
    thread::sleep(Duration::from_millis(1000));
    path.reset_forwarded(port);
    let error = echo(&mut stream, b"request after idle").expect_err("reset");
    assert_eq!(error.raw_os_error(), Some(nix::libc::ECONNRESET), "{error}");

    let me = std::process::id();
    trace.wait_until(Duration::from_secs(5), |t| {
        !t.findings_of("stale_reuse", me).is_empty()
    });
    let stale = trace.findings_of("stale_reuse", me)[0];
    assert_eq!(stale.evidence["came_back"], "RST");
    assert_eq!(stale.evidence["peer_closed_before_send"], false);
    let idle = stale.evidence["idle_before_reuse_ms"].as_u64().unwrap();
    assert!((975..=1100).contains(&idle), "{idle} ms");
    trace.collect_for(Duration::from_millis(500));
    assert!(
        trace.findings_of("silent_drop", me).is_empty(),
        "{}",
        trace.dump()
    );
}
