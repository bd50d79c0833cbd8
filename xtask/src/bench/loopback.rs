//! Loopback connections for the connection-rate, held-connections and soak
//! parts: listeners with a deep backlog, a server that closes or keeps what it
//! accepts, and a paced client.

use std::{
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::INTERRUPTED;

/// A listening socket with a backlog as deep as the system allows (std's
/// `TcpListener::bind` asks for 128, which a fast client overflows).
pub(super) fn listen(port: u16) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )
    .context("bind")?;
    listen(&fd, Backlog::new(65_535).unwrap_or(Backlog::MAXCONN)).context("listen")?;
    Ok(TcpListener::from(fd))
}

/// Listeners on loopback ports that accept connections and either close them
/// at once (the server ends every connection) or keep them.
pub(super) struct Server {
    pub(super) addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Vec<TcpStream>>>,
}

impl Server {
    pub(super) fn start(listeners: usize, keep: bool) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut addrs = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..listeners {
            let listener = listen(0)?;
            addrs.push(listener.local_addr()?);
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                let mut kept = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) if keep => kept.push(stream),
                        Ok(_) => {}
                        // Out of descriptors or the like: back off.
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
                kept
            }));
        }
        Ok(Self {
            addrs,
            stop,
            threads,
        })
    }

    /// Stops accepting; returns the connections kept.
    pub(super) fn stop(self) -> Vec<TcpStream> {
        self.stop.store(true, Ordering::Relaxed);
        for addr in &self.addrs {
            // Wakes the blocked accept().
            let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
        }
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect()
    }
}

/// Counters of a connection client.
#[derive(Default)]
pub(super) struct ClientCounters {
    /// Connections attempted (or about to be).
    issued: AtomicU64,
    /// Connections made and closed.
    pub(super) done: AtomicU64,
    pub(super) errors: AtomicU64,
}

/// Opens and closes connections to `addrs`, `rate` per second in all (or as fast
/// as it can), until `duration` has passed or `total` were made. The server
/// closes first; the client reads the end of file and closes.
pub(super) fn drive_connections(
    addrs: &[SocketAddr],
    rate: Option<f64>,
    duration: Duration,
    total: Option<u64>,
    counters: &ClientCounters,
) {
    let threads = 8;
    let started = Instant::now();
    thread::scope(|scope| {
        for index in 0..threads {
            scope.spawn(move || {
                let interval = rate.map(|r| Duration::from_secs_f64(threads as f64 / r));
                let mut next = started
                    + interval.map_or(Duration::ZERO, |i| i * index as u32 / threads as u32);
                let mut n = index;
                let mut buf = [0u8; 64];
                loop {
                    if INTERRUPTED.load(Ordering::Relaxed) || started.elapsed() >= duration {
                        break;
                    }
                    if let Some(interval) = interval {
                        let now = Instant::now();
                        if now < next {
                            thread::sleep(next - now);
                        } else if now - next > Duration::from_secs(1) {
                            // Far behind: do not try to make up for it in a burst.
                            next = now;
                        }
                        next += interval;
                    }
                    if counters.issued.fetch_add(1, Ordering::Relaxed) >= total.unwrap_or(u64::MAX)
                    {
                        break;
                    }
                    let addr = addrs[n % addrs.len()];
                    n += threads;
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                        Ok(mut stream) => {
                            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                            let _ = stream.read(&mut buf);
                            counters.done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            });
        }
    });
}
