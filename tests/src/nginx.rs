//! A real nginx (the Debian package) on loopback for one test, so keep-alive
//! failures are reproduced with the server people actually run, not a mock.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// An nginx master process and its workers, stopped and cleaned up when dropped
/// (also when the test panics).
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
    port2: Option<u16>,
}

impl Nginx {
    /// Starts nginx with `http_block` as the body of its `http { }` block; `{port}`
    /// (required) and `{port2}` (optional) become free loopback ports.
    pub fn start(http_block: &str) -> Self {
        Self::start_with(http_block, &[])
    }

    /// Like [`Nginx::start`], and replaces each `{name}` in `http_block` by its
    /// port, for ports the test already holds (a backend behind nginx).
    pub fn start_with(http_block: &str, known_ports: &[(&str, u16)]) -> Self {
        assert!(
            http_block.contains("{port}"),
            "the nginx http block must listen on {{port}} so the fixture knows when nginx is up:\n{http_block}"
        );
        let port = free_port();
        let port2 = http_block.contains("{port2}").then(free_port);
        let mut block = http_block.replace("{port}", &port.to_string());
        if let Some(port2) = port2 {
            block = block.replace("{port2}", &port2.to_string());
        }
        for (name, known) in known_ports {
            block = block.replace(&format!("{{{name}}}"), &known.to_string());
        }

        let dir = fresh_dir();
        let d = dir.display();
        let config = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             daemon off;\n\
             master_process on;\n\
             events {{}}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path {d}/client_body;\n\
             proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             {block}\n\
             }}\n"
        );
        let config_path = dir.join("nginx.conf");
        fs::write(&config_path, config).unwrap_or_else(|e| panic!("writing {config_path:?}: {e}"));
        let stderr = fs::File::create(dir.join("stderr.log")).expect("nginx stderr file");

        // `-e` keeps nginx from touching the system error log before it has read
        // our configuration.
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting nginx (apt-get install nginx): {e}"));
        // From here on, Drop cleans up whatever happens.
        let mut nginx = Self {
            child,
            dir,
            port,
            port2,
        };
        nginx.wait_ready();
        nginx
    }

    /// Waits until every port is listening and the worker exists. It checks the
    /// kernel's socket table instead of connecting, so that no probe connection
    /// shows up in a trace.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let ports: Vec<u16> = [Some(self.port), self.port2]
            .into_iter()
            .flatten()
            .collect();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "nginx exited with {status} while starting:\n{}",
                    self.logs()
                );
            }
            if ports.iter().all(|&p| listening(p)) && !self.worker_pids().is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nginx not listening on {ports:?} with a worker after {START_TIMEOUT:?}:\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// nginx as a reverse proxy keeping up to 8 idle upstream connections to a
    /// backend on `backend_port` (HTTP/1.1 with the Connection header cleared,
    /// which upstream keep-alive needs).
    pub fn reverse_proxy(backend_port: u16) -> Self {
        Self::start_with(
            r#"
            upstream backend {
                server 127.0.0.1:{backend};
                keepalive 8;
            }
            server {
                listen 127.0.0.1:{port};
                location / {
                    proxy_pass http://backend;
                    proxy_http_version 1.1;
                    proxy_set_header Connection "";
                }
            }"#,
            &[("backend", backend_port)],
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn port2(&self) -> u16 {
        self.port2.expect("this nginx configuration has no {port2}")
    }

    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    pub fn master_pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker processes: the ones that own client connections in a trace.
    pub fn worker_pids(&self) -> Vec<u32> {
        let master = self.master_pid();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| parent_of(pid) == Some(master))
            .collect()
    }

    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// The temporary directory holding the configuration, pid file and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn logs(&self) -> String {
        let stderr = fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        format!(
            "--- error.log ---\n{}--- stderr ---\n{stderr}",
            self.error_log()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Workers outlive a killed master, so remember them before they are
        // reparented.
        let workers = self.worker_pids();
        let master = Pid::from_raw(self.child.id() as i32);
        let _ = kill(master, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            for worker in workers {
                let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
            }
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A port nothing listens on right now; nginx binds it a moment later (a tiny
/// race with other programs, acceptable for tests).
fn fresh_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(format!("/tmp/tracer-nginx-{}-{n}", std::process::id()));
    // A leftover from an earlier run with the same pid would hold stale logs.
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
    dir
}

/// Whether a TCP socket listens on `port` in this network namespace.
fn listening(port: u16) -> bool {
    let local = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local_addr = fields.nth(1).unwrap_or_default();
                let state = fields.nth(1).unwrap_or_default();
                local_addr.ends_with(&local) && state == "0A"
            })
        })
    })
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after
    // the last ')'; they are state, then ppid.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
