//! The agent as Prometheus sees it: a real Prometheus server scrapes it while
//! known traffic runs, and the values are read back through Prometheus's HTTP
//! API; promtool lints the exposition; thousands of destinations stay within
//! the series budget.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use tracer::sinks::metrics::names::{
    BUILD_INFO, CONNECTIONS_CLOSED, CONNECTIONS_OPENED, FINDINGS, IDLE_TIMEOUT_MISMATCHES,
    PEER_IDLE_TIMEOUT,
};

use integration_tests::{Peer, free_port, poll_until, require_root, router::in_netns, tracer_bin};

/// The agent, filtering on `port`, serving metrics on a free loopback port.
struct Agent {
    /// Kills the agent when the test ends.
    _process: Peer,
    metrics: SocketAddr,
}

impl Agent {
    fn start(port: u16, extra: &[&str]) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(tracer_bin());
        command
            .args(["agent", "--port", &port.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut peer = Peer {
            child: command.spawn().expect("start tracer"),
        };
        let (tx, rx) = mpsc::channel();
        let stderr = peer.child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the agent says where it serves metrics");
            if line.contains("metrics on") {
                break;
            }
        }
        Self {
            _process: peer,
            metrics,
        }
    }

    /// GET `path` from the agent's endpoint.
    fn get(&self, path: &str, accept: Option<&str>) -> (String, String) {
        http_get(self.metrics, path, accept)
    }

    /// Scrapes `/metrics` until `counted` finds in it what the test's traffic
    /// must have produced (its `Err` says what it found instead), and returns
    /// that scrape: (headers, body). The agent reads events every 25 ms, but
    /// how soon it gets to run is up to the machine.
    fn scrape_until(
        &self,
        what: &str,
        counted: impl Fn(&str) -> Result<(), String>,
    ) -> (String, String) {
        poll_until(
            what,
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let (head, body) = self.get("/metrics", None);
                counted(&body).map(|()| (head, body))
            },
        )
    }
}

/// A minimal HTTP/1.1 GET: (headers, body).
fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (head.to_string(), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

/// A Prometheus server scraping `target` every second, in a temporary
/// directory removed on drop.
struct Prometheus {
    _peer: Peer,
    dir: PathBuf,
    api: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tracer\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("prometheus.log")).unwrap());
        let peer = Peer {
            child: command
                .spawn()
                .expect("run prometheus (cargo xtask setup installs it)"),
        };
        let prometheus = Self {
            _peer: peer,
            dir,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(api).is_err()
            || !http_get(api, "/-/ready", None).0.contains(" 200 ")
        {
            assert!(
                Instant::now() < deadline,
                "prometheus did not start: {}",
                fs::read_to_string(prometheus.dir.join("prometheus.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// The value of the single-element result of `query`, if there is one.
    fn query(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let (_, body) = http_get(self.api, &path, None);
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `query` returns `expected` (or a value `accept` likes).
    fn wait_for(&self, query: &str, accept: impl Fn(f64) -> bool) -> f64 {
        poll_until(
            query,
            Duration::from_secs(30),
            Duration::from_millis(500),
            || match self.query(query) {
                Some(value) if accept(value) => Ok(value),
                other => Err(format!("= {other:?}")),
            },
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A server that answers `count` connections and closes each after 1 s of
/// idleness.
fn serve_and_close_after_idle(listener: TcpListener, count: usize) {
    let handlers: Vec<_> = (0..count)
        .map(|_| {
            let (mut stream, _) = listener.accept().unwrap();
            thread::spawn(move || {
                stream.read_exact(&mut [0; 4]).unwrap();
                stream.write_all(b"pong").unwrap();
                // The idle time the agent is to infer as this server's timeout.
                thread::sleep(Duration::from_secs(1));
            })
        })
        .collect();
    for handler in handlers {
        handler.join().unwrap();
    }
}

/// Acceptance 1: Prometheus scrapes the agent while 20 connections are closed
/// by their server after 1 s idle; the counters and the inferred timeout read
/// back through Prometheus's API.
#[test]
fn prometheus_reads_the_counters_and_the_inferred_timeout() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::start(addr.port(), &[]);
    let prometheus = Prometheus::start(agent.metrics);
    prometheus.wait_for("up{job=\"tracer\"}", |v| v == 1.0);

    let clients = thread::spawn(move || {
        let clients: Vec<_> = (0..20)
            .map(|_| {
                thread::spawn(move || {
                    let mut stream = TcpStream::connect(addr).unwrap();
                    stream.write_all(b"ping").unwrap();
                    stream.read_exact(&mut [0; 4]).unwrap();
                    // Wait for the server's FIN, then close.
                    assert_eq!(stream.read(&mut [0; 1]).unwrap(), 0);
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
    });
    serve_and_close_after_idle(listener, 20);
    clients.join().unwrap();

    let closed = prometheus.wait_for(
        &format!("sum({CONNECTIONS_CLOSED}{{role=\"client\",closed_by=\"peer\"}})"),
        |v| v >= 20.0,
    );
    assert_eq!(closed, 20.0);
    let opened = prometheus.wait_for(
        &format!("sum({CONNECTIONS_OPENED}{{role=\"client\"}})"),
        |v| v >= 20.0,
    );
    assert_eq!(opened, 20.0);
    let server_closed = prometheus.wait_for(
        &format!("sum({CONNECTIONS_CLOSED}{{role=\"server\",closed_by=\"local\"}})"),
        |v| v >= 20.0,
    );
    assert_eq!(server_closed, 20.0);
    let remote = format!("{addr}");
    let timeout = prometheus.wait_for(
        &format!("{PEER_IDLE_TIMEOUT}{{remote=\"{remote}\"}}"),
        |_| true,
    );
    assert!((0.9..=1.1).contains(&timeout), "inferred {timeout} s");
    let mismatches = prometheus.wait_for(
        &format!("sum({IDLE_TIMEOUT_MISMATCHES}{{remote=\"{remote}\"}})"),
        |v| v >= 20.0,
    );
    assert_eq!(mismatches, 20.0);
    let findings = prometheus.wait_for(
        &format!("sum({FINDINGS}{{kind=\"idle_timeout_mismatch\"}})"),
        |v| v >= 1.0,
    );
    assert!(findings >= 1.0);
    drop(agent);
}

/// Acceptance 2 (metrics part): promtool finds no problem in the exposition,
/// which is also served as OpenMetrics to scrapers that ask for it.
#[test]
fn promtool_finds_no_problem_in_the_exposition() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let agent = Agent::start(addr.port(), &[]);
    // Some traffic, so that families have samples.
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0; 4]).unwrap();
        stream.write_all(b"pong").unwrap();
    });
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"ping").unwrap();
    client.read_exact(&mut [0; 4]).unwrap();
    drop(client);
    server.join().unwrap();

    let (head, text) = agent.scrape_until("the agent counting the connection", |text| {
        if text.contains(&format!("{CONNECTIONS_OPENED}{{")) {
            Ok(())
        } else {
            Err(format!("no {CONNECTIONS_OPENED} sample"))
        }
    });
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(text.contains(&format!("{CONNECTIONS_OPENED}{{")), "{text}");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup installs prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let (head, openmetrics) = agent.get(
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(openmetrics.ends_with("# EOF\n"));
    let (head, _) = agent.get("/healthz", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _) = agent.get("/debug", None);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Acceptance 2 (alerts part): the shipped alert rules are valid and pass
/// their promtool unit tests. (That they query only exported metrics is a unit
/// test of the metrics module.)
#[test]
fn alert_rules_pass_promtool() {
    let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&deploy)
            .output()
            .expect("promtool (cargo xtask setup installs prometheus)");
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Acceptance 4: clients that send their request head one byte a second hold
/// neither the agent's endpoint from answering a scraper meanwhile, nor their
/// own connection past the header timeout.
#[test]
fn slow_clients_do_not_keep_a_scraper_waiting() {
    require_root();
    let agent = Agent::start(free_port(), &[]);
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nUser-Agent: slowloris\r\n\r\n",
        agent.metrics
    );
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let mut stream = TcpStream::connect(agent.metrics).unwrap();
            let head = head.clone();
            thread::spawn(move || {
                let started = Instant::now();
                for byte in head.bytes() {
                    if stream.write_all(&[byte]).is_err() {
                        break;
                    }
                    // The slow client: one byte a second.
                    thread::sleep(Duration::from_secs(1));
                }
                // Cut off: nothing but the end of the connection comes back.
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                (started.elapsed(), answer)
            })
        })
        .collect();
    // Scrapes while the slow heads trickle in, each on a fresh connection, a
    // second apart so they spread over the first bytes.
    for _ in 0..3 {
        thread::sleep(Duration::from_secs(1));
        let (head, body) = agent.get("/metrics", None);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.contains(BUILD_INFO), "{body}");
    }
    for client in slow {
        let (lasted, answer) = client.join().unwrap();
        assert!(
            !answer.starts_with(b"HTTP/1.1 200"),
            "a slow head was served after {lasted:?}"
        );
        // The head takes ~80 s to send; the default header timeout is 10 s.
        assert!(lasted < Duration::from_secs(30), "{lasted:?}");
    }
}

/// Acceptance 3: connections to 5,000 distinct loopback addresses from one
/// process; the series stay within the documented bound. The server listens
/// on every address inside a namespace of its own, so nothing outside the test
/// is reachable.
#[test]
fn five_thousand_destinations_stay_within_the_series_budget() {
    require_root();
    let ns = format!("trc-series-{}", std::process::id());
    struct Namespace(String);
    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let _guard = Namespace(ns.clone());
    assert!(
        Command::new("ip")
            .args(["-n", &ns, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success()
    );
    let listener = in_netns(&ns, || TcpListener::bind("0.0.0.0:7000").unwrap());
    let agent = Agent::start(7000, &["--metrics-max-destinations", "20"]);
    let server = thread::spawn(move || {
        for _ in 0..5000 {
            let (stream, _) = listener.accept().unwrap();
            drop(stream);
        }
    });
    in_netns(&ns, || {
        for i in 0..5000u32 {
            // 127.1.0.1 … 127.1.19.250: 5,000 distinct loopback addresses.
            let address = [127, 1, (i / 250) as u8, (i % 250 + 1) as u8];
            drop(TcpStream::connect(SocketAddr::from((address, 7000))).unwrap());
        }
    });
    server.join().unwrap();
    fn opened_under_other(text: &str) -> Option<&str> {
        text.lines().find(|l| {
            l.starts_with(&format!("{CONNECTIONS_OPENED}{{")) && l.contains("remote=\"other\"")
        })
    }
    let value = |line: &str| line.rsplit(' ').next()?.parse::<f64>().ok();
    // Destinations beyond the budget add up under `other` as the agent reads
    // the connections' events.
    let counted = |text: &str| match opened_under_other(text) {
        Some(line) if value(line).is_some_and(|n| n >= 4900.0) => Ok(()),
        line => Err(format!("at {}", line.unwrap_or("no `other` sample"))),
    };
    let (_, text) = agent.scrape_until("the agent counting the connections", counted);
    let series = |name: &str| {
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .count()
    };
    let opened = series(CONNECTIONS_OPENED);
    // This process: 20 destinations and `other` as a client; one port as a
    // server.
    assert!(opened <= 22, "{opened} series:\n{text}");
    let closed = series(CONNECTIONS_CLOSED);
    assert!(closed <= 2 * 22, "{closed} series");
    let total = text.lines().filter(|l| !l.starts_with('#')).count();
    assert!(total < 3000, "{total} samples in all");
    let other =
        opened_under_other(&text).expect("destinations beyond the budget are counted under other");
    let count = value(other).unwrap();
    assert!(count >= 4900.0, "{other}");
}
