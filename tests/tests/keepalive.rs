//! Keep-alive diagnosis against real software: nginx closing idle connections, a
//! client pool reusing them, nginx as a reverse proxy reusing upstream
//! connections, a process leaking CLOSE_WAIT sockets.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use integration_tests::{
    Peer, Trace,
    http::{Backend, HttpConnection, NaivePool},
    nginx::Nginx,
};
use tracer::{
    diagnosis::{
        figures::{human_ms, safe_below},
        finding::Finding,
    },
    event::{ClosedBy, Detail},
    kernel::loader::{Filter, Options},
};

const PEER: &str = env!("CARGO_BIN_EXE_peer");

fn nginx_with_keepalive(timeout: &str, extra: &str) -> Nginx {
    Nginx::start(&format!(
        r#"
        server {{
            listen 127.0.0.1:{{port}};
            keepalive_timeout {timeout};
            {extra}
            location / {{ return 200 "ok\n"; }}
        }}"#
    ))
}

fn port_filter(port: u16) -> Filter {
    Filter {
        port: Some(port),
        ..Filter::default()
    }
}

/// What the server does with the pool's connection while it sits idle.
#[derive(Clone, Copy)]
enum Server {
    /// Keeps it: the pause is shorter than its keep-alive timeout.
    Keeps,
    /// Closes it: the pause outlasts its timeout, and the next request waits
    /// until the close has arrived, however late a slow machine delivers it.
    Closes,
}

/// Requests through `pool`, `pause` apart; a request that fails on a stale
/// connection is retried once on a new one, as a client's retry logic would.
/// Returns how many failed.
fn drive(pool: &mut NaivePool, requests: usize, pause: Duration, server: Server) -> usize {
    let mut failures = 0;
    for i in 0..requests {
        if i > 0 {
            thread::sleep(pause);
            if let Server::Closes = server {
                pool.wait_for_server_to_close_idle(Duration::from_secs(10));
            }
        }
        if pool.request("/").is_err() {
            failures += 1;
            let response = pool.request("/").expect("a fresh connection works");
            assert_eq!(response.status, 200);
        }
    }
    failures
}

fn kinds_for(trace: &Trace, pid: u32) -> Vec<&'static str> {
    let mut kinds: Vec<&str> = trace
        .findings
        .iter()
        .filter(|f| f.pid == pid)
        .map(|f| f.kind.name())
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// Checks the peer idle timeout a mismatch inferred is nginx's 1 s, and the
/// pool timeout it recommends safely under it: 900 ms for 1.0 s
/// (emulated kernels measure a little later, and recommend accordingly).
fn check_inferred_one_second(mismatch: &Finding) {
    let timeout = mismatch.evidence["peer_idle_timeout_ms"].as_f64().unwrap();
    assert!((900.0..=1100.0).contains(&timeout), "inferred {timeout} ms");
    let safe = safe_below(timeout);
    assert!(
        safe <= 0.9 * timeout,
        "{safe} ms is not safely below {timeout} ms"
    );
    let below = format!("below {}", human_ms(safe));
    assert!(
        mismatch.recommendation.contains(&below),
        "{below}: {}",
        mismatch.recommendation
    );
}

/// Acceptance 1: nginx closes idle connections after 1 s; the client's pool
/// reuses them after 1.5 s without checking.
#[test]
fn pool_reusing_after_the_servers_keepalive_timeout() {
    let nginx = nginx_with_keepalive("1s", "");
    let mut trace = Trace::start(port_filter(nginx.port()));
    let me = std::process::id();
    let mut pool = NaivePool::new(nginx.addr(), None);
    let failures = drive(&mut pool, 5, Duration::from_millis(1500), Server::Closes);
    assert_eq!(
        failures, 4,
        "every reuse should have hit a connection nginx had closed"
    );

    let workers = nginx.worker_pids();
    let sends = trace.traces_sends();
    trace.wait_until(Duration::from_secs(10), |t| {
        (!sends || !t.findings_of("stale_reuse", me).is_empty())
            && !t.findings_of("idle_timeout_mismatch", me).is_empty()
            && t.findings
                .iter()
                .any(|f| f.kind.name() == "late_request_reset")
    });

    if sends {
        let stale = trace.findings_of("stale_reuse", me)[0];
        assert_eq!(stale.rport, Some(nginx.port()));
        assert!(stale.evidence["idle_before_reuse_ms"].as_u64().unwrap() >= 1400);
        assert_eq!(
            stale.evidence["peer_closed_before_send"],
            trace.flags_peer_fin()
        );
    }

    let mismatch = trace.findings_of("idle_timeout_mismatch", me);
    let mismatch = mismatch.last().unwrap();
    check_inferred_one_second(mismatch);
    assert!(mismatch.evidence["peer_idle_closes"].as_u64().unwrap() >= 3);
    // The request that hit the closed connection makes it an error, when the
    // kernel lets the agent see that request.
    let upgraded = trace
        .findings_of("idle_timeout_mismatch", me)
        .into_iter()
        .any(|f| f.severity == tracer::diagnosis::finding::Severity::Error);
    assert_eq!(upgraded, sends, "{}", trace.dump());

    // The latest evidence: the server's own timeout is known once it has closed
    // enough idle connections.
    let current = trace.diagnoser().findings();
    let late = current
        .iter()
        .find(|f| f.kind.name() == "late_request_reset")
        .unwrap();
    assert_eq!(late.comm, "nginx");
    assert!(
        workers.contains(&late.pid),
        "{} not in {workers:?}",
        late.pid
    );
    assert_eq!(late.lport, Some(nginx.port()));
    let server_timeout = late.evidence["server_idle_timeout_ms"].as_f64().unwrap();
    assert!((900.0..=1100.0).contains(&server_timeout));

    println!("{}", trace.report_text());
}

/// Acceptance 2: the server keeps connections 10 s, the pool reuses them after
/// 0.5 s: nothing to report.
#[test]
fn pool_reusing_well_within_the_timeout_is_fine() {
    let nginx = nginx_with_keepalive("10s", "");
    let mut trace = Trace::start(port_filter(nginx.port()));
    let mut pool = NaivePool::new(nginx.addr(), None);
    assert_eq!(
        drive(&mut pool, 5, Duration::from_millis(500), Server::Keeps),
        0
    );
    assert_eq!(pool.connections_opened(), 1);
    let me = std::process::id();
    // The reuses are seen (the hook works), and judged harmless.
    if trace.traces_sends() {
        trace.wait_for(Duration::from_secs(5), |events| {
            events
                .iter()
                .filter(|e| matches!(&e.detail, Detail::Reuse(r) if r.idle_ms >= 450))
                .count()
                >= 4
        });
    }
    trace.collect_for(Duration::from_millis(1500));
    assert_eq!(
        kinds_for(&trace, me),
        Vec::<&str>::new(),
        "{}",
        trace.dump()
    );
    assert!(trace.findings.is_empty(), "{}", trace.dump());
}

/// Acceptance 3: the pool closes connections idle 0.5 s, the server would keep
/// them 10 s: local closes at ~500 ms idle, no finding.
#[test]
fn pool_closing_first_is_fine() {
    let nginx = nginx_with_keepalive("10s", "");
    let mut trace = Trace::start(port_filter(nginx.port()));
    let mut pool = NaivePool::new(nginx.addr(), Some(Duration::from_millis(500)));
    for _ in 0..4 {
        assert_eq!(pool.request("/").unwrap().status, 200);
        // The pool's reaper runs when the connection has been idle 0.5 s.
        thread::sleep(Duration::from_millis(505));
        pool.close_idle();
        assert_eq!(pool.idle_connections(), 0);
        // Scenario time: the next request comes a little after the close.
        thread::sleep(Duration::from_millis(100));
    }
    let me = std::process::id();
    trace.wait_for(Duration::from_secs(5), |events| {
        events
            .iter()
            .filter(|e| e.kind == "close" && e.pid == me)
            .count()
            >= 4
    });
    trace.collect_for(Duration::from_millis(500));
    for event in trace
        .events
        .iter()
        .filter(|e| e.kind == "close" && e.pid == me)
    {
        let Detail::Close(close) = &event.detail else {
            unreachable!()
        };
        assert_eq!(close.closed_by, ClosedBy::Local);
        let idle = close.idle_ms.unwrap() as f64;
        assert!((idle - 505.0).abs() <= 25.0, "closed at {idle} ms idle");
    }
    assert!(trace.findings.is_empty(), "{}", trace.dump());
}

/// Acceptance 4: every third response carries `Connection: close` and nginx
/// closes right after it; the client honours it. A graceful close is not a
/// mismatch.
#[test]
fn graceful_connection_close_is_not_a_mismatch() {
    let nginx = nginx_with_keepalive("10s", "keepalive_requests 3;");
    let mut trace = Trace::start(port_filter(nginx.port()));
    let mut pool = NaivePool::new(nginx.addr(), None);
    assert_eq!(
        drive(&mut pool, 12, Duration::from_millis(300), Server::Keeps),
        0
    );
    assert_eq!(pool.connections_opened(), 4);
    trace.wait_for(Duration::from_secs(5), |events| {
        events.iter().filter(|e| e.kind == "close").count() >= 6
    });
    trace.collect_for(Duration::from_secs(1));
    assert!(trace.findings.is_empty(), "{}", trace.dump());
}

/// Acceptance 5: nginx as a reverse proxy keeps upstream connections to a
/// backend whose keep-alive timeout is 1 s; requests come just over 1 s apart.
/// nginx is the client that relies on the backend to close idle connections.
#[test]
fn reverse_proxy_relies_on_the_backend_to_close_idle_upstreams() {
    let backend = Backend::start_local(Duration::from_secs(1));
    let nginx = Nginx::reverse_proxy(backend.port());
    let mut trace = Trace::start(Filter {
        comm: Some("nginx".into()),
        ..Filter::default()
    });
    // nginx keeps the client's connection (75 s); its upstream connections
    // are what the backend closes, while they sit in nginx's pool.
    let mut pool = NaivePool::new(nginx.addr(), None);
    assert_eq!(
        drive(&mut pool, 5, Duration::from_millis(1200), Server::Keeps),
        0
    );
    let workers = nginx.worker_pids();
    trace.wait_until(Duration::from_secs(10), |t| {
        t.findings
            .iter()
            .any(|f| f.kind.name() == "idle_timeout_mismatch")
    });
    let mismatch = trace
        .findings
        .iter()
        .rfind(|f| f.kind.name() == "idle_timeout_mismatch")
        .unwrap();
    assert_eq!(mismatch.comm, "nginx");
    assert!(workers.contains(&mismatch.pid));
    assert_eq!(mismatch.rport, Some(backend.port()));
    check_inferred_one_second(mismatch);
    println!("{}", trace.report_text());
}

/// Acceptance 6: the peer closes, the client process keeps its socket 12 s
/// without closing it: reported while the socket is still open.
#[test]
fn close_wait_leak_is_reported_while_the_socket_is_open() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut trace = Trace::start(port_filter(port));
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"bye").unwrap();
        // Closing sends the FIN; the client never answers with its own.
    });
    let mut holder = Command::new(PEER);
    holder
        .args(["leaky-client", "hold", &format!("127.0.0.1:{port}"), "12"])
        .stdout(Stdio::piped());
    let mut holder = Peer::spawn(holder);
    let mut line = String::new();
    BufReader::new(holder.child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "eof");
    server.join().unwrap();

    let pid = holder.pid();
    trace.wait_until(Duration::from_secs(13), |t| {
        !t.findings_of("close_wait_leak", pid).is_empty()
    });
    // Still open: the holder has not exited.
    assert!(holder.child.try_wait().unwrap().is_none());
    let leak = trace.findings_of("close_wait_leak", pid)[0];
    assert_eq!(leak.comm, "leaky-client");
    assert_eq!(leak.rport, Some(port));
    assert_eq!(leak.count, 1);
    assert!(leak.evidence["oldest_close_wait_s"].as_f64().unwrap() >= 10.0);
    let mut rest = String::new();
    let _ = holder
        .child
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut rest);
}

/// The estimator's input is the kernel's own idle stamps: check the peer-close
/// idle times nginx produces are the configured timeout within a jiffy or two.
#[test]
fn nginx_idle_closes_measure_its_timeout() {
    let nginx = nginx_with_keepalive("700ms", "");
    let mut trace = Trace::start_with(Options {
        filter: port_filter(nginx.port()),
        ..Options::default()
    });
    let mut connection = HttpConnection::connect(nginx.addr()).unwrap();
    connection.request("/").unwrap();
    // nginx's FIN arrives after its timeout; close our side as soon as it does.
    assert_eq!(connection.stream().read(&mut [0; 1]).unwrap(), 0);
    drop(connection);
    let me = std::process::id();
    trace.wait_for(Duration::from_secs(5), |events| {
        events.iter().any(|e| e.kind == "close" && e.pid == me)
    });
    let close = trace
        .events
        .iter()
        .find(|e| e.kind == "close" && e.pid == me)
        .unwrap();
    let Detail::Close(close) = &close.detail else {
        unreachable!()
    };
    assert_eq!(close.closed_by, ClosedBy::Peer);
    let idle = close.idle_ms.unwrap() as f64;
    assert!((idle - 700.0).abs() <= 25.0, "{idle}");
    assert!(!close.awaiting_reply);
}
