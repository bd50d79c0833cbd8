//! Just enough blocking HTTP/1.1 to reproduce keep-alive failures: a client
//! connection, a pool that reuses idle connections without checking them, and a
//! keep-alive backend that closes idle connections like nginx does.

use std::{
    io::{self, BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Long enough for any loopback response, short enough that a test that waits
/// for an answer that never comes fails instead of hanging.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// The server announced it closes the connection after this response.
    pub connection_close: bool,
    pub body: Vec<u8>,
}

/// One client connection, used for any number of sequential requests.
pub struct HttpConnection {
    reader: BufReader<TcpStream>,
}

impl HttpConnection {
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream),
        })
    }

    /// The client port: how a trace tells this connection apart.
    pub fn local_port(&self) -> u16 {
        self.stream().local_addr().map_or(0, |a| a.port())
    }

    /// The socket, for tests that watch it directly (e.g. wait for the FIN).
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    /// Sends a GET and reads the whole response. On a connection the server
    /// has closed, the write still succeeds (the server's kernel answers it with
    /// a reset) and the read then finds the server's FIN: `UnexpectedEof`; a
    /// further attempt fails with `BrokenPipe`. Real clients fail the same way.
    pub fn request(&mut self, path: &str) -> io::Result<Response> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
        read_response(&mut self.reader)
    }
}

fn read_response(reader: &mut impl BufRead) -> io::Result<Response> {
    let status_line = read_line(reader)?;
    if status_line.is_empty() {
        return Err(eof("instead of a response"));
    }
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;

    let (mut content_length, mut chunked) = (None, false);
    let mut connection_close = version == "HTTP/1.0";
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            return Err(eof("in the response headers"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header {line:?}")))?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                content_length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
                )
            }
            "transfer-encoding" => chunked = has_token(value, "chunked"),
            "connection" if has_token(value, "close") => connection_close = true,
            "connection" if has_token(value, "keep-alive") => connection_close = false,
            _ => {}
        }
    }

    let body = if chunked {
        read_chunked(reader)?
    } else if let Some(length) = content_length {
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        // No length: the body ends when the server closes.
        connection_close = true;
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        body
    };
    Ok(Response {
        status,
        connection_close,
        body,
    })
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.trim().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(reader)?.trim().is_empty() {}
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        read_line(reader)?;
    }
}

/// One line including its CRLF; empty at EOF.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    Ok(line)
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, message)
}

fn eof(context: &str) -> io::Error {
    io::Error::new(
        ErrorKind::UnexpectedEof,
        format!("connection closed {context}"),
    )
}

/// A client pool with the classic keep-alive bug: it reuses an idle connection
/// without checking whether the server has closed it meanwhile. With `max_idle`
/// shorter than the server's keep-alive timeout it is a correctly configured pool.
pub struct NaivePool {
    addr: SocketAddr,
    max_idle: Option<Duration>,
    idle: Vec<(HttpConnection, Instant)>,
    last_local_port: Option<u16>,
    connections_opened: usize,
}

impl NaivePool {
    pub fn new(addr: SocketAddr, max_idle: Option<Duration>) -> Self {
        Self {
            addr,
            max_idle,
            idle: Vec::new(),
            last_local_port: None,
            connections_opened: 0,
        }
    }

    /// Sends on the most recently used idle connection, or a new one. Errors are
    /// returned, not retried: the failure is what the tests want to see.
    pub fn request(&mut self, path: &str) -> io::Result<Response> {
        self.close_idle();
        let mut connection = match self.idle.pop() {
            Some((connection, _)) => connection,
            None => {
                self.connections_opened += 1;
                HttpConnection::connect(self.addr)?
            }
        };
        self.last_local_port = Some(connection.local_port());
        let response = connection.request(path)?;
        if !response.connection_close {
            self.idle.push((connection, Instant::now()));
        }
        Ok(response)
    }

    /// Closes connections idle for longer than `max_idle`; without `max_idle`
    /// the pool trusts every idle connection forever.
    pub fn close_idle(&mut self) {
        if let Some(max_idle) = self.max_idle {
            self.idle.retain(|(_, since)| since.elapsed() <= max_idle);
        }
    }

    /// The client port of the connection that carried the last request.
    pub fn last_local_port(&self) -> Option<u16> {
        self.last_local_port
    }

    /// Connections the pool has opened, or tried to.
    pub fn connections_opened(&self) -> usize {
        self.connections_opened
    }

    pub fn idle_connections(&self) -> usize {
        self.idle.len()
    }

    /// Waits until the server has closed every idle connection (see
    /// [`crate::wait_for_peer_close`]), up to `timeout` each: the pool itself
    /// never looks.
    pub fn wait_for_server_to_close_idle(&self, timeout: Duration) {
        for (connection, _) in &self.idle {
            crate::wait_for_peer_close(connection.stream(), timeout);
        }
    }
}

/// How often a connection thread looks at the shutdown flag while it waits for
/// a request.
const POLL: Duration = Duration::from_millis(20);
const BACKEND_BODY: &[u8] = b"backend\n";

/// A keep-alive HTTP/1.1 server standing in for an application behind nginx: it
/// closes (FIN) a connection that has been idle for `keepalive_timeout`, which
/// is what makes nginx's pooled upstream connections go stale. The close comes
/// up to a few ms late: socket read timeouts count in jiffies.
pub struct Backend {
    addr: SocketAddr,
    listener: TcpListener,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    shutdown: AtomicBool,
    requests_served: AtomicUsize,
    connections_accepted: AtomicUsize,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Backend {
    /// Listens on `addr` (port 0 picks a free one).
    pub fn start(addr: SocketAddr, keepalive_timeout: Duration) -> Self {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("backend binding {addr}: {e}"));
        let addr = listener.local_addr().expect("backend address");
        let shared = Arc::new(Shared {
            shutdown: AtomicBool::new(false),
            requests_served: AtomicUsize::new(0),
            connections_accepted: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let listener = listener.try_clone().expect("backend listener clone");
            let shared = shared.clone();
            thread::spawn(move || accept_loop(listener, keepalive_timeout, shared))
        };
        Self {
            addr,
            listener,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// On loopback, port 0: the common case.
    pub fn start_local(keepalive_timeout: Duration) -> Self {
        Self::start((Ipv4Addr::LOCALHOST, 0).into(), keepalive_timeout)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn requests_served(&self) -> usize {
        self.shared.requests_served.load(Ordering::SeqCst)
    }

    pub fn connections_accepted(&self) -> usize {
        self.shared.connections_accepted.load(Ordering::SeqCst)
    }

    /// The body of every response.
    pub fn body() -> &'static [u8] {
        BACKEND_BODY
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // On Linux, shutting down a listening socket makes a blocked accept()
        // fail at once: no polling delay on accept (it would show up as
        // accept_wait in traces) and no wake-up connection.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = match self.shared.connections.lock() {
            Ok(mut connections) => std::mem::take(&mut *connections),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for connection in connections {
            let _ = connection.join();
        }
    }
}

fn accept_loop(listener: TcpListener, keepalive_timeout: Duration, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let Ok((stream, _)) = accepted else {
            // ECONNABORTED and friends: the next connection may be fine.
            thread::sleep(POLL);
            continue;
        };
        shared.connections_accepted.fetch_add(1, Ordering::SeqCst);
        let handle = {
            let shared = shared.clone();
            thread::spawn(move || {
                let _ = serve(stream, keepalive_timeout, &shared);
            })
        };
        if let Ok(mut connections) = shared.connections.lock() {
            connections.retain(|c| !c.is_finished());
            connections.push(handle);
        }
    }
}

/// Answers requests on one connection until the client closes it, it has been
/// idle for `keepalive_timeout`, or the backend shuts down.
fn serve(mut stream: TcpStream, keepalive_timeout: Duration, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut pending = Vec::new();
    let mut idle_since = Instant::now();
    let mut chunk = [0; 4096];
    loop {
        while let Some((length, close)) = complete_request(&pending) {
            pending.drain(..length);
            let connection = if close { "close" } else { "keep-alive" };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
                BACKEND_BODY.len()
            );
            // Counted before answering, so a client holding the response sees it.
            shared.requests_served.fetch_add(1, Ordering::SeqCst);
            stream.write_all(&[head.as_bytes(), BACKEND_BODY].concat())?;
            if close {
                return Ok(());
            }
            idle_since = Instant::now();
        }
        // Waking up at the idle deadline keeps the close time nearly as
        // predictable as nginx's timer.
        let left = keepalive_timeout.saturating_sub(idle_since.elapsed());
        if left.is_zero() || shared.shutdown.load(Ordering::SeqCst) {
            return Ok(());
        }
        stream.set_read_timeout(Some(left.min(POLL)))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

/// The length of the first complete request in `buffer` (headers and any
/// Content-Length body), and whether the connection closes after it.
fn complete_request(buffer: &[u8]) -> Option<(usize, bool)> {
    let end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buffer[..end]);
    let mut lines = head.lines();
    let mut close = lines.next()?.ends_with("HTTP/1.0");
    let mut content_length = 0;
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().unwrap_or(0),
            "connection" if has_token(value, "close") => close = true,
            "connection" if has_token(value, "keep-alive") => close = false,
            _ => {}
        }
    }
    (buffer.len() >= end + content_length).then_some((end + content_length, close))
}
