//! The `tracer` binary as an operator runs it: JSON lines on stdout, a summary on
//! stderr at Ctrl-C, a clean exit.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use std::os::unix::process::CommandExt as _;

use integration_tests::{Peer, require_root, tracer_bin};

/// Lines of a child's pipe, as they arrive.
fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, deadline: Instant, what: &str) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(left)
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[test]
fn trace_streams_json_lines_and_summarizes_on_sigint() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut agent = Command::new(tracer_bin());
    agent
        .args(["trace", "--format", "json", "--port", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut agent = Peer {
        child: agent.spawn().expect("start tracer"),
    };
    let stdout = lines(agent.child.stdout.take().unwrap());
    let stderr = lines(agent.child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = next_line(&stderr, deadline, "the ready line");
    assert!(ready.contains("tracing TCP connections"), "{ready}");

    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.read_exact(&mut [0; 3]).unwrap();
        stream.write_all(b"hello").unwrap();
    });
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.write_all(b"hey").unwrap();
    client.read_exact(&mut [0; 5]).unwrap();
    server.join().unwrap();
    drop(client);

    let mut events = Vec::new();
    while events
        .iter()
        .filter(|e: &&serde_json::Value| e["type"] == "close")
        .count()
        < 2
    {
        let line = next_line(&stdout, deadline, "two close events");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        events.push(event);
    }
    for event in &events {
        for key in [
            "ts", "type", "pid", "comm", "laddr", "lport", "raddr", "rport", "role",
        ] {
            assert!(event.get(key).is_some(), "no {key} in {event}");
        }
        assert_eq!(event["pid"], std::process::id());
    }
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "open").count(),
        2,
        "{types:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let summary = next_line(&stderr, deadline, "the summary line");
    assert_eq!(summary, "tracer: 4 events, 0 lost in the kernel");
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "tracer exited with {status}");
}

#[test]
fn clear_error_without_privileges() {
    // As an unprivileged user (nobody), loading must fail with the fix spelled out.
    let output = Command::new(tracer_bin())
        .arg("trace")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run tracer as nobody");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("needs root, or the CAP_BPF and CAP_PERFMON"),
        "{stderr}"
    );
}

/// `tracer diagnose --format json` watches for its duration and prints one JSON
/// report: the processes seen, their destinations and listeners.
#[test]
fn diagnose_prints_a_json_report_after_its_duration() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut agent = Command::new(tracer_bin());
    agent
        .args([
            "diagnose",
            "--duration",
            "3s",
            "--format",
            "json",
            "--port",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut agent = Peer {
        child: agent.spawn().expect("start tracer"),
    };
    let stderr = lines(agent.child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = next_line(&stderr, deadline, "the ready line");
    assert!(ready.contains("tracing TCP connections"), "{ready}");
    let server = thread::spawn(move || {
        for _ in 0..3 {
            let (mut stream, _) = listener.accept().unwrap();
            stream.read_exact(&mut [0; 3]).unwrap();
            stream.write_all(b"hello").unwrap();
        }
    });
    for _ in 0..3 {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(b"hey").unwrap();
        client.read_exact(&mut [0; 5]).unwrap();
    }
    server.join().unwrap();
    let mut output = String::new();
    agent
        .child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    assert!(agent.child.wait().unwrap().success());
    let report: serde_json::Value =
        serde_json::from_str(&output).unwrap_or_else(|e| panic!("not JSON ({e}): {output}"));
    assert!(report["duration_s"].as_f64().unwrap() >= 3.0);
    let me = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == std::process::id())
        .expect("this test process in the report");
    let destination = &me["destinations"][0];
    assert_eq!(destination["rport"], port);
    assert_eq!(destination["connections_opened"], 3);
    let closed = &destination["closed"];
    let ends = closed["local"].as_u64().unwrap() + closed["peer"].as_u64().unwrap();
    assert_eq!(ends, 3, "{closed}");
    assert_eq!(me["listeners"][0]["lport"], port);
}
