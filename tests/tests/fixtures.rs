//! The HTTP fixtures themselves: a real nginx closes idle keep-alive connections
//! the way the keep-alive tests rely on, the naive pool turns that into a failed
//! request, and the backend behaves like nginx's upstreams do.

use std::{
    io::{self, ErrorKind, Read},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    http::{Backend, HttpConnection, NaivePool},
    nginx::Nginx,
    wait_for_peer_close,
};

const KEEPALIVE_1S: &str = r#"
    server {
        listen 127.0.0.1:{port};
        keepalive_timeout 1s;
        location / { return 200 "ok\n"; }
    }"#;

/// How long the clients stay idle: past nginx's 1 s keep-alive timeout, as the
/// keep-alive tests' clients do. It is scenario time, no promise that nginx has
/// closed by then on a slow machine: tests that need the close wait for it.
const PAST_TIMEOUT: Duration = Duration::from_millis(1500);

/// The most a close that is due may take to arrive: generous, for emulated
/// and loaded machines; a close that comes on time costs nothing.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// How a request on a connection the server has closed fails.
fn assert_closed(result: io::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
            ) => {}
        other => panic!("{what}: expected a closed-connection error, got {other:?}"),
    }
}

fn ok_body(nginx: &Nginx, result: io::Result<integration_tests::http::Response>) -> Vec<u8> {
    let response = result.unwrap_or_else(|e| {
        panic!(
            "request failed: {e}\n--- nginx error.log ---\n{}",
            nginx.error_log()
        )
    });
    assert_eq!(response.status, 200, "{response:?}");
    response.body
}

#[test]
fn nginx_closes_an_idle_keepalive_connection() {
    let nginx = Nginx::start(KEEPALIVE_1S);
    let mut connection = HttpConnection::connect(nginx.addr()).expect("connect to nginx");
    assert_eq!(ok_body(&nginx, connection.request("/")), b"ok\n");
    assert_eq!(ok_body(&nginx, connection.request("/again")), b"ok\n");
    thread::sleep(PAST_TIMEOUT);
    wait_for_peer_close(connection.stream(), CLOSE_DEADLINE);
    assert_closed(
        connection.request("/"),
        "request after nginx's keepalive_timeout",
    );
}

/// What the tracer will see: nginx closes with a FIN (no reset), one timeout
/// after the last response.
#[test]
fn nginx_idle_close_is_a_fin_one_timeout_after_the_response() {
    let nginx = Nginx::start(KEEPALIVE_1S);
    let mut connection = HttpConnection::connect(nginx.addr()).expect("connect to nginx");
    ok_body(&nginx, connection.request("/"));
    let responded = Instant::now();
    let read = connection.stream().read(&mut [0; 16]);
    let waited = responded.elapsed();
    assert!(
        matches!(read, Ok(0)),
        "expected EOF (FIN) from nginx, got {read:?}"
    );
    assert!(
        (Duration::from_millis(950)..Duration::from_millis(1300)).contains(&waited),
        "nginx closed after {waited:?}, expected about 1 s"
    );
}

#[test]
fn naive_pool_fails_when_it_reuses_a_connection_nginx_closed() {
    let nginx = Nginx::start(KEEPALIVE_1S);
    let mut pool = NaivePool::new(nginx.addr(), None);
    ok_body(&nginx, pool.request("/"));
    let first_port = pool.last_local_port();
    thread::sleep(PAST_TIMEOUT);
    pool.wait_for_server_to_close_idle(CLOSE_DEADLINE);
    assert_closed(pool.request("/"), "naive pool reusing a stale connection");
    assert_eq!(pool.last_local_port(), first_port, "the pool reused it");
    assert_eq!(
        pool.idle_connections(),
        0,
        "the failed connection is dropped"
    );
    // The failure is not retried, but the next request gets a fresh connection.
    ok_body(&nginx, pool.request("/"));
    assert_eq!(pool.connections_opened(), 2);
}

#[test]
fn pool_with_max_idle_below_the_server_timeout_reconnects() {
    let nginx = Nginx::start(KEEPALIVE_1S);
    let mut pool = NaivePool::new(nginx.addr(), Some(Duration::from_millis(500)));
    ok_body(&nginx, pool.request("/"));
    let first_port = pool.last_local_port();
    // Idle longer than the pool's 500 ms: the pool drops the connection on its
    // own clock, whether or not nginx has closed it yet.
    thread::sleep(PAST_TIMEOUT);
    ok_body(&nginx, pool.request("/"));
    assert_ne!(pool.last_local_port(), first_port);
    assert_eq!(pool.connections_opened(), 2);
}

#[test]
fn keepalive_requests_closes_after_the_last_allowed_response() {
    let nginx = Nginx::start(
        r#"
        server {
            listen 127.0.0.1:{port};
            keepalive_requests 3;
            location / { return 200 "ok\n"; }
        }"#,
    );
    let mut pool = NaivePool::new(nginx.addr(), None);
    let mut ports = Vec::new();
    let mut closes = Vec::new();
    for _ in 0..4 {
        let response = pool.request("/").expect("request through the pool");
        assert_eq!(response.status, 200);
        ports.push(pool.last_local_port().expect("a connection"));
        closes.push(response.connection_close);
    }
    assert_eq!(closes, [false, false, true, false]);
    assert!(ports[0] == ports[1] && ports[1] == ports[2], "{ports:?}");
    assert_ne!(
        ports[3], ports[2],
        "the fourth request needs a new connection"
    );
    assert_eq!(pool.connections_opened(), 2);
}

#[test]
fn nginx_proxies_to_the_backend_over_a_kept_alive_upstream_connection() {
    let backend = Backend::start_local(Duration::from_secs(1));
    let nginx = Nginx::reverse_proxy(backend.port());
    let mut pool = NaivePool::new(nginx.addr(), None);
    for _ in 0..3 {
        assert_eq!(ok_body(&nginx, pool.request("/")), Backend::body());
    }
    assert_eq!(backend.requests_served(), 3);
    assert_eq!(
        backend.connections_accepted(),
        1,
        "nginx should reuse its upstream connection"
    );
    assert_eq!(pool.connections_opened(), 1);
}

#[test]
fn backend_closes_a_connection_idle_for_its_timeout() {
    let timeout = Duration::from_millis(500);
    let backend = Backend::start_local(timeout);
    let addr: SocketAddr = (Ipv4Addr::LOCALHOST, backend.port()).into();
    let mut connection = HttpConnection::connect(addr).expect("connect to the backend");
    let response = connection.request("/").expect("first request");
    assert_eq!((response.status, response.connection_close), (200, false));
    // A request within the timeout restarts the idle clock.
    thread::sleep(timeout - Duration::from_millis(200));
    assert_eq!(
        connection.request("/").expect("second request").body,
        Backend::body()
    );
    // Idle for the whole timeout, then the backend's close, however late.
    thread::sleep(timeout);
    wait_for_peer_close(connection.stream(), CLOSE_DEADLINE);
    assert_closed(
        connection.request("/"),
        "request after the backend's timeout",
    );
    assert_eq!(backend.requests_served(), 2);
}

/// The wait the tests above use: it returns once the close has arrived, fails
/// when none comes in time, and leaves the socket's read timeout as it was.
#[test]
fn wait_for_peer_close_returns_at_the_close_and_fails_without_one() {
    let closing = Backend::start_local(Duration::from_millis(300));
    let connection = HttpConnection::connect(closing.addr()).expect("connect");
    let read_timeout = connection.stream().read_timeout().unwrap();
    wait_for_peer_close(connection.stream(), CLOSE_DEADLINE);
    assert_eq!(connection.stream().read_timeout().unwrap(), read_timeout);

    let keeping = Backend::start_local(Duration::from_secs(60));
    let connection = HttpConnection::connect(keeping.addr()).expect("connect");
    let panic = std::panic::catch_unwind(|| {
        wait_for_peer_close(connection.stream(), Duration::from_millis(200));
    })
    .expect_err("the backend keeps the connection 60 s");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("has not closed"), "{message}");
    assert_eq!(connection.stream().read_timeout().unwrap(), read_timeout);
}

#[test]
fn backend_drop_stops_promptly_and_closes_its_connections() {
    let backend = Backend::start_local(Duration::from_secs(60));
    let mut connection = HttpConnection::connect(backend.addr()).expect("connect");
    connection.request("/").expect("request");
    let dropping = Instant::now();
    drop(backend);
    assert!(
        dropping.elapsed() < Duration::from_millis(500),
        "dropping the backend took {:?}",
        dropping.elapsed()
    );
    assert_closed(connection.request("/"), "request after the backend stopped");
}

#[test]
fn nginx_serves_a_second_server_block_on_port2() {
    let nginx = Nginx::start(
        r#"
        server { listen 127.0.0.1:{port}; location / { return 200 "one\n"; } }
        server { listen 127.0.0.1:{port2}; location / { return 200 "two\n"; } }"#,
    );
    assert_ne!(nginx.port(), nginx.port2());
    let second: SocketAddr = (Ipv4Addr::LOCALHOST, nginx.port2()).into();
    let mut one = HttpConnection::connect(nginx.addr()).expect("connect to port");
    let mut two = HttpConnection::connect(second).expect("connect to port2");
    assert_eq!(ok_body(&nginx, one.request("/")), b"one\n");
    assert_eq!(ok_body(&nginx, two.request("/")), b"two\n");
}

#[test]
fn nginx_drop_stops_every_process_and_removes_its_directory() {
    let nginx = Nginx::start(KEEPALIVE_1S);
    let master = nginx.master_pid();
    let workers = nginx.worker_pids();
    assert_eq!(workers.len(), 1, "worker_processes 1");
    for pid in [master].iter().chain(&workers) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "nginx", "pid {pid}");
    }
    // An open keep-alive connection must not delay the shutdown.
    let mut connection = HttpConnection::connect(nginx.addr()).expect("connect to nginx");
    ok_body(&nginx, connection.request("/"));
    let dir = nginx.dir().to_owned();
    assert!(dir.join("nginx.pid").exists());

    let dropping = Instant::now();
    drop(nginx);
    assert!(
        dropping.elapsed() < Duration::from_secs(2),
        "stopping nginx took {:?}",
        dropping.elapsed()
    );
    for pid in [master].iter().chain(&workers) {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "nginx process {pid} survived the drop"
        );
    }
    assert!(!dir.exists(), "{dir:?} survived the drop");
}

#[test]
fn nginx_start_failure_reports_the_error_log() {
    let panic = std::panic::catch_unwind(|| {
        Nginx::start("server { listen 127.0.0.1:{port}; no_such_directive on; }")
    })
    .err()
    .expect("nginx must refuse an unknown directive");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("unknown directive \"no_such_directive\""),
        "the panic should carry nginx's error: {message}"
    );
}
