//! A tracing session: the loaded programs, the ring buffer they write to, and the
//! decoding of what comes out of it.

use std::io;

use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Interval, MissedTickBehavior},
};
use tracer_common::{
    names::{MAP_CLOSE_WAITS, MAP_COUNTERS, MAP_EVENTS, MAP_LISTENERS, MAP_POOLS},
    state::{CloseWait, Counter, ListenerKey, Owner, POOL_CLIENT, PoolKey, PoolStats},
};

use super::tables::{self, CloseWaitEntry, PoolCounters, PoolRef};
use crate::{
    comm::Comm,
    event::{self, DestinationKey, Event},
    kernel::clock::{ClockError, Jiffies, WallClock},
    kernel::decode::{self, Decoder},
    kernel::loader::{self, AttachReport, LoadError, Options},
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("cannot open map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot poll the ring buffer")]
    Poll(#[source] io::Error),
}

/// Totals since the session started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records decoded into events.
    pub events: u64,
    /// Records that did not decode (a version mismatch or a bug; never expected).
    pub undecodable: u64,
    /// Events the kernel could not write because the ring buffer was full.
    pub lost: u64,
    /// Sockets the kernel could not start tracking (socket table insert failed).
    pub untracked: u64,
    /// Connections in the kernel's socket table now (inserted minus removed; LRU
    /// evictions are not seen, so an upper bound).
    pub tracked: u64,
}

pub struct Session {
    /// `None` once detached; the ring buffer outlives it so it can be drained.
    ebpf: Option<aya::Ebpf>,
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    close_waits: HashMap<MapData, u64, CloseWait>,
    pools: HashMap<MapData, PoolKey, PoolStats>,
    listeners: HashMap<MapData, ListenerKey, Owner>,
    /// The reader's look at the ring (see [`POLL_INTERVAL`]).
    poll: Interval,
    /// The previous read stopped at [`MAX_BATCH`] with records left.
    backlog: bool,
    intake: Intake,
    report: AttachReport,
}

/// Turns ring-buffer records into events, with what that needs and counts.
struct Intake {
    decoder: Decoder,
    events: u64,
    undecodable: u64,
}

/// Events taken from the ring buffer per wake-up, so that a sustained flood
/// neither grows the batch without bound nor keeps the scans and the metrics
/// endpoint, on the same thread, from running.
pub const MAX_BATCH: usize = 4096;

/// How often the ring is read. The programs write without waking the reader
/// unless the ring is more than 1/[`loader::WAKEUP_FRACTION`] full: a wake-up per event
/// costs a context switch per connection under churn. Events therefore reach
/// userspace up to this late, which no finding notices (they span seconds).
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

impl Session {
    /// Loads and attaches the programs. Must run inside a tokio runtime.
    pub fn start(options: &Options) -> Result<Self, SessionError> {
        let jiffies = match options.hz {
            Some(hz) => Jiffies { hz },
            None => Jiffies::detect()?,
        };
        let loader::Loaded { mut ebpf, report } = loader::load(options, jiffies)?;
        let ring: RingBuf<MapData> = take_map(&mut ebpf, MAP_EVENTS)?;
        let counters = take_map(&mut ebpf, MAP_COUNTERS)?;
        let close_waits = take_map(&mut ebpf, MAP_CLOSE_WAITS)?;
        let pools = take_map(&mut ebpf, MAP_POOLS)?;
        let listeners = take_map(&mut ebpf, MAP_LISTENERS)?;
        // SAFETY: the ring buffer owns its map fd and keeps it open for as long as
        // the AsyncFd holds it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| SessionError::Poll(e.into_parts().1))?;
        Ok(Self {
            ebpf: Some(ebpf),
            ring,
            counters,
            close_waits,
            pools,
            listeners,
            poll: {
                let mut poll = tokio::time::interval(POLL_INTERVAL);
                poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
                poll
            },
            backlog: false,
            intake: Intake {
                decoder: Decoder {
                    clock: WallClock::new(),
                    jiffies,
                },
                events: 0,
                undecodable: 0,
            },
            report,
        })
    }

    pub fn report(&self) -> &AttachReport {
        &self.report
    }

    pub fn jiffies(&self) -> Jiffies {
        self.intake.decoder.jiffies
    }

    /// Waits until the kernel has written something, then appends up to
    /// [`MAX_BATCH`] events to `out`.
    pub async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<(), SessionError> {
        if self.backlog {
            // Records are waiting: no await would yield, and a flood would
            // keep the scans, signals and the metrics endpoint from running.
            tokio::task::consume_budget().await;
        } else {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    // Cleared before reading: a wake-up for records written
                    // after the read below must not be lost.
                    guard.map_err(SessionError::Poll)?.clear_ready();
                }
                _ = self.poll.tick() => {}
            }
        }
        self.drain(out, MAX_BATCH);
        Ok(())
    }

    /// Appends up to `limit` events available now to `out`, without waiting.
    pub fn drain(&mut self, out: &mut Vec<Event>, limit: usize) {
        self.backlog = !self.intake.read(self.ring.get_mut(), out, limit);
    }

    /// Detaches every program. Events already in the ring buffer can still be
    /// drained.
    pub fn detach(&mut self) {
        self.ebpf = None;
    }

    /// Connections now in CLOSE_WAIT: their peer closed, their process has not
    /// (pid 0 where the kernel met the connection in softirq only).
    /// The kernel table holds only those, so this is cheap however many
    /// connections are open.
    pub fn close_waits(&self) -> Vec<CloseWaitEntry> {
        let now = WallClock::monotonic_now_ns();
        let mut entries = Vec::new();
        for item in self.close_waits.iter() {
            let Ok((sock, waiting)) = item else {
                // The entry went away between listing and reading: its process
                // closed it, which is the good outcome.
                continue;
            };
            let Ok((laddr, raddr)) = decode::addresses(&waiting.conn) else {
                continue;
            };
            entries.push(CloseWaitEntry {
                sock,
                pid: waiting.owner.pid,
                comm: Comm::from_kernel(&waiting.owner.comm),
                laddr,
                raddr,
                rport: waiting.conn.rport,
                lport: waiting.conn.lport,
                waiting: Duration::from_nanos(now.saturating_sub(waiting.since_ns)),
            });
        }
        entries
    }

    /// The kernel's request counters of every pool.
    /// The kernel's request counters per pool; none where the state hook cannot
    /// release a request whose connection closed (see
    /// [`AttachReport::typed_state_hook`]): they would only ever grow busy.
    pub fn pools(&self) -> Vec<PoolCounters> {
        if !self.report.typed_state_hook() {
            return Vec::new();
        }
        self.pools
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, stats)| {
                let pool = match key.side {
                    POOL_CLIENT => PoolRef::Destination(DestinationKey {
                        pid: key.pid,
                        raddr: tables::pool_address(key.family, &key.addr)?,
                        rport: key.port,
                    }),
                    _ => PoolRef::Listener(event::ListenerKey {
                        pid: key.pid,
                        lport: key.port,
                    }),
                };
                Some(PoolCounters {
                    pool,
                    busy: stats.busy,
                    requests: stats.requests,
                    responses: stats.responses,
                    busy_ns: stats.busy_ns,
                    gaps: stats.gaps.to_vec(),
                })
            })
            .collect()
    }

    /// Every listening socket the programs have seen opened: owner, network
    /// namespace inode and port.
    pub fn listeners(&self) -> Vec<(Owner, u32, u16)> {
        self.listeners
            .iter()
            .filter_map(Result::ok)
            .map(|(key, owner)| (owner, key.netns, key.port))
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let counter = |counter: Counter| -> u64 {
            self.counters
                .get(&(counter as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        Stats {
            events: self.intake.events,
            undecodable: self.intake.undecodable,
            lost: counter(Counter::EventsLost),
            untracked: counter(Counter::SockStateInsertFailed),
            tracked: counter(Counter::SockStateInserted)
                .saturating_sub(counter(Counter::SockStateRemoved)),
        }
    }

    /// The most data that waited in the ring buffer since the previous call, as
    /// the programs saw it after writing events; resets the peak.
    pub fn take_ring_buffer_peak(&mut self) -> u64 {
        let index = Counter::RingBufPendingPeak as u32;
        let Ok(per_cpu) = self.counters.get(&index, 0) else {
            return 0;
        };
        let peak = per_cpu.iter().copied().max().unwrap_or(0);
        let zeros = vec![0u64; per_cpu.len()];
        if let Ok(zeros) = aya::maps::PerCpuValues::try_from(zeros) {
            let _ = self.counters.set(index, zeros, 0);
        }
        peak
    }
}

/// Takes map `name` out of the loaded object, typed.
fn take_map<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, SessionError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(SessionError::MissingMap(name))?;
    T::try_from(map).map_err(|source| SessionError::Map { name, source })
}

impl Intake {
    /// Decodes up to `limit` records into `out`; true when the ring is empty.
    fn read(&mut self, ring: &mut RingBuf<MapData>, out: &mut Vec<Event>, limit: usize) -> bool {
        self.decoder.clock.refresh();
        for _ in 0..limit {
            let Some(record) = ring.next() else {
                return true;
            };
            match self.decoder.decode(&record) {
                Ok(event) => {
                    self.events += 1;
                    out.push(event);
                }
                Err(e) => {
                    self.undecodable += 1;
                    log::warn!("undecodable ring-buffer record: {e}");
                }
            }
        }
        false
    }
}
