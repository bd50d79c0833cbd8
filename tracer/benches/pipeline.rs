//! The agent's userspace pipeline on one core: raw ring-buffer records decoded
//! ([`Decoder`]), correlated ([`Diagnoser::observe`]) and counted
//! ([`Metrics::observe_event`], findings and occurrences), as the agent does
//! for every record it reads. Criterion reports events per second.
//!
//! The records are made by hand the way the kernel programs write them
//! (`#[repr(C)]` structs copied into bytes) and describe a realistic mix: a few
//! hundred client connections to a few hundred destinations, opened, reused
//! after idle, closed by either side, some reset, some reused after the peer
//! closed (stale reuse); and server connections accepted on a few ports. Every
//! iteration replays them later in time (the stamps move on), so the state the
//! pipeline keeps is in steady state, as in a long-running agent.
//!
//! `cargo bench -p tracer --bench pipeline`; `cargo xtask bench` runs it and
//! reports the `pipeline/decode_diagnose_metrics` throughput.

use std::{hint::black_box, num::NonZeroUsize, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    diagnosis::{self, Diagnoser},
    kernel::clock::{Jiffies, WallClock},
    kernel::decode::Decoder,
    kernel::loader::AttachReport,
    sinks::metrics::{Metrics, MetricsOptions},
};
use tracer_common::{
    COMM_LEN,
    event::{
        CLOSE_AWAITING_REPLY, CLOSE_DURATION_KNOWN, CLOSE_IDLE_KNOWN, CLOSE_WAIT_KNOWN, CloseEvent,
        ClosedBy, Endpoints, EventHeader, EventKind, IDLE_KNOWN, OpenEvent, RESET_AWAITING_REPLY,
        RESET_IN, REUSE_PEER_CLOSED, ROLE_CLIENT, ROLE_SERVER, ResetEvent, ReuseEvent,
    },
    tcp::AF_INET,
};

/// The kernel's tick rate the records' idle times are counted in.
const HZ: u32 = 250;
/// Client processes, each with its own destinations.
const CLIENT_PROCESSES: u32 = 6;
/// Distinct destinations (address, port) over all client processes.
const DESTINATIONS: u32 = 300;
/// Client connections per destination in one replay.
const CONNECTIONS_PER_DESTINATION: u32 = 2;
/// Server connections accepted in one replay, over `LISTEN_PORTS`.
const SERVER_CONNECTIONS: u32 = 200;
const LISTEN_PORTS: [u16; 4] = [8080, 8443, 9000, 5432];
/// Simulated time one replay covers; the next replay starts after it.
const SPAN_NS: u64 = 10_000_000_000;
/// Records handed over together, as the agent reads the ring buffer in batches
/// and passes occurrences to the metrics once per batch.
const BATCH: usize = 64;

const STATE_ESTABLISHED: u32 = 1;
const STATE_CLOSE_WAIT: u32 = 8;

/// Ring-buffer records, back to back, each 8-byte aligned as the kernel lays
/// them out, with their offsets and their stamps relative to the replay start.
struct Records {
    bytes: Vec<u8>,
    records: Vec<(usize, usize, u64)>,
}

impl Records {
    fn len(&self) -> usize {
        self.records.len()
    }

    /// Moves every stamp to replay `round`.
    fn restamp(&mut self, base_ns: u64, round: u64) {
        for &(offset, _, relative_ns) in &self.records {
            let ts = base_ns + round * SPAN_NS + relative_ns;
            // `EventHeader::ts_ns` is at byte 8 of every record.
            self.bytes[offset + 8..offset + 16].copy_from_slice(&ts.to_ne_bytes());
        }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.records
            .iter()
            .map(|&(offset, len, _)| &self.bytes[offset..offset + len])
    }
}

fn bytes_of<T>(value: &T) -> &[u8] {
    // SAFETY: the event structs are plain-old-data `#[repr(C)]` values without
    // padding (tracer-common asserts their sizes).
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

fn comm(name: &str) -> [u8; COMM_LEN] {
    let mut comm = [0; COMM_LEN];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    comm
}

fn header<T>(kind: EventKind, pid: u32, role: u32, name: &str) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        size: size_of::<T>() as u32,
        ts_ns: 0,
        pid,
        role,
        comm: comm(name),
    }
}

fn endpoints(laddr: [u8; 4], lport: u16, raddr: [u8; 4], rport: u16) -> Endpoints {
    let mut conn = Endpoints {
        family: AF_INET,
        lport,
        rport,
        ..Endpoints::default()
    };
    conn.laddr[..4].copy_from_slice(&laddr);
    conn.raddr[..4].copy_from_slice(&raddr);
    conn
}

fn jiffies(ms: u64) -> u32 {
    (ms * u64::from(HZ) / 1000) as u32
}

/// One record before it is laid out: when it happens and its bytes.
struct Pending {
    at_ns: u64,
    bytes: Vec<u8>,
}

fn pending<T>(at_ns: u64, value: &T) -> Pending {
    Pending {
        at_ns,
        bytes: bytes_of(value).to_vec(),
    }
}

const MS: u64 = 1_000_000;

/// The lifecycle of one client connection: open, requests after idle, and how
/// it ends, chosen by `n` so that the mix is fixed and varied.
fn client_connection(n: u32, out: &mut Vec<Pending>) {
    let process = n % CLIENT_PROCESSES;
    let pid = 1000 + process;
    let name = [
        "checkout", "cart", "search", "payments", "gateway", "worker",
    ][process as usize];
    let destination = n % DESTINATIONS;
    let raddr = [
        10,
        0,
        (destination / 250) as u8,
        (destination % 250) as u8 + 1,
    ];
    let rport = [80, 443, 8080, 5432, 6379][(destination % 5) as usize];
    let lport = 32_768 + (n % 28_000) as u16;
    let conn = endpoints([10, 9, 0, 1], lport, raddr, rport);
    // Spread the opens over the first second of the replay.
    let start =
        u64::from(n) * 1_000_000_000 / u64::from(DESTINATIONS * CONNECTIONS_PER_DESTINATION);

    out.push(pending(
        start,
        &OpenEvent {
            header: header::<OpenEvent>(EventKind::Open, pid, ROLE_CLIENT, name),
            conn,
            connect_ns: 150_000 + u64::from(n % 7) * 10_000,
            accept_wait_ns: 0,
        },
    ));
    // Requests after idle: the reuse events.
    let reuses = 1 + n % 4;
    let mut at = start;
    for r in 0..reuses {
        at += 400 * MS + u64::from(r) * 150 * MS;
        out.push(pending(
            at,
            &ReuseEvent {
                header: header::<ReuseEvent>(EventKind::Reuse, pid, ROLE_CLIENT, name),
                conn,
                idle_ns: (400 + u64::from(r) * 150) * MS,
                bytes: 180,
                state: STATE_ESTABLISHED,
                flags: 0,
                _pad: 0,
            },
        ));
    }
    at += 1_200 * MS;
    let duration_ns = at - start;
    let close = |closed_by: ClosedBy, idle_ms: u64, flags: u32, close_wait_ns: u64| CloseEvent {
        header: header::<CloseEvent>(EventKind::Close, pid, ROLE_CLIENT, name),
        conn,
        duration_ns,
        bytes_sent: 180 * u64::from(reuses),
        bytes_received: 1_400 * u64::from(reuses),
        close_wait_ns,
        idle_jiffies: jiffies(idle_ms),
        closed_by: closed_by as u32,
        errno: 0,
        flags: CLOSE_DURATION_KNOWN | CLOSE_IDLE_KNOWN | flags,
        srtt_us: 60 + n % 40,
        total_retrans: 0,
    };
    match n % 10 {
        // The destination closes idle pooled connections (keep-alive timeout).
        0..=3 => out.push(pending(
            at,
            &close(ClosedBy::Peer, 1_000, CLOSE_WAIT_KNOWN, 90_000),
        )),
        // The pool closes them itself.
        4..=7 => out.push(pending(at, &close(ClosedBy::Local, 1_200, 0, 0))),
        // A request crosses the peer's close: stale reuse, then a reset.
        8 => {
            out.push(pending(
                at,
                &ReuseEvent {
                    header: header::<ReuseEvent>(EventKind::Reuse, pid, ROLE_CLIENT, name),
                    conn,
                    idle_ns: 1_000 * MS,
                    bytes: 180,
                    state: STATE_CLOSE_WAIT,
                    flags: REUSE_PEER_CLOSED,
                    _pad: 0,
                },
            ));
            out.push(pending(
                at + 80_000,
                &ResetEvent {
                    header: header::<ResetEvent>(EventKind::Reset, pid, ROLE_CLIENT, name),
                    conn,
                    direction: RESET_IN,
                    state: STATE_CLOSE_WAIT,
                    idle_jiffies: 0,
                    flags: IDLE_KNOWN | RESET_AWAITING_REPLY,
                    since_close_ns: 0,
                    closed_by: 0,
                    _pad: 0,
                },
            ));
            out.push(pending(
                at + 90_000,
                &close(ClosedBy::ResetPeer, 1_000, CLOSE_AWAITING_REPLY, 0),
            ));
        }
        // The peer resets a connection mid-request.
        _ => {
            out.push(pending(
                at,
                &ResetEvent {
                    header: header::<ResetEvent>(EventKind::Reset, pid, ROLE_CLIENT, name),
                    conn,
                    direction: RESET_IN,
                    state: STATE_ESTABLISHED,
                    idle_jiffies: jiffies(5),
                    flags: IDLE_KNOWN | RESET_AWAITING_REPLY,
                    since_close_ns: 0,
                    closed_by: 0,
                    _pad: 0,
                },
            ));
            out.push(pending(
                at + 10_000,
                &close(ClosedBy::ResetPeer, 5, CLOSE_AWAITING_REPLY, 0),
            ));
        }
    }
}

/// A connection a local server accepted, served and closed.
fn server_connection(n: u32, out: &mut Vec<Pending>) {
    let pid = 2000 + n % 2;
    let name = if n.is_multiple_of(2) {
        "nginx"
    } else {
        "postgres"
    };
    let lport = LISTEN_PORTS[(n % LISTEN_PORTS.len() as u32) as usize];
    let raddr = [10, 8, (n / 200) as u8, (n % 200) as u8 + 1];
    let conn = endpoints([10, 9, 0, 1], lport, raddr, 40_000 + n as u16);
    let start = 50 * MS + u64::from(n) * 5 * MS;
    out.push(pending(
        start,
        &OpenEvent {
            header: header::<OpenEvent>(EventKind::Open, pid, ROLE_SERVER, name),
            conn,
            connect_ns: 0,
            accept_wait_ns: 20_000 + u64::from(n % 11) * 3_000,
        },
    ));
    let end = start + 2_000 * MS;
    let by_peer = n.is_multiple_of(3);
    out.push(pending(
        end,
        &CloseEvent {
            header: header::<CloseEvent>(EventKind::Close, pid, ROLE_SERVER, name),
            conn,
            duration_ns: end - start,
            bytes_sent: 4_096,
            bytes_received: 512,
            close_wait_ns: if by_peer { 40_000 } else { 0 },
            idle_jiffies: jiffies(if by_peer { 30 } else { 1_500 }),
            closed_by: if by_peer {
                ClosedBy::Peer as u32
            } else {
                ClosedBy::Local as u32
            },
            errno: 0,
            flags: CLOSE_DURATION_KNOWN
                | CLOSE_IDLE_KNOWN
                | if by_peer { CLOSE_WAIT_KNOWN } else { 0 },
            srtt_us: 45,
            total_retrans: 0,
        },
    ));
}

fn records() -> Records {
    let mut pending = Vec::new();
    for n in 0..DESTINATIONS * CONNECTIONS_PER_DESTINATION {
        client_connection(n, &mut pending);
    }
    for n in 0..SERVER_CONNECTIONS {
        server_connection(n, &mut pending);
    }
    // The ring buffer delivers them in time order, connections interleaved.
    pending.sort_by_key(|p| p.at_ns);
    assert!(pending.last().is_some_and(|p| p.at_ns < SPAN_NS));
    let mut bytes = Vec::new();
    let mut records = Vec::new();
    for p in pending {
        let offset = bytes.len();
        bytes.extend_from_slice(&p.bytes);
        records.push((offset, p.bytes.len(), p.at_ns));
        bytes.resize(bytes.len().next_multiple_of(8), 0);
    }
    Records { bytes, records }
}

/// What the agent keeps between records.
struct Agent {
    decoder: Decoder,
    diagnoser: Diagnoser,
    metrics: Metrics,
}

impl Agent {
    fn new() -> Self {
        let jiffies = Jiffies { hz: HZ };
        Self {
            decoder: Decoder {
                clock: WallClock::new(),
                jiffies,
            },
            diagnoser: Diagnoser::new(diagnosis::Config {
                jiffy: jiffies.to_duration(1),
                max_connections: NonZeroUsize::new(65_536).expect("non-zero"),
                ..diagnosis::Config::default()
            }),
            metrics: Metrics::new(
                MetricsOptions {
                    max_destinations: 20,
                    max_processes: 100,
                    min_idle: Duration::from_millis(250),
                    ring_buffer_bytes: 8 << 20,
                    tracked_limit: 262_144,
                },
                &AttachReport {
                    state_mode: "tp_btf",
                    attached: vec!["tp_btf/inet_sock_set_state".into()],
                    degraded: Vec::new(),
                },
            ),
        }
    }

    /// One batch of records through the whole pipeline; returns the findings
    /// made, so that nothing is optimized away.
    fn process<'a>(&mut self, batch: impl Iterator<Item = &'a [u8]>) -> usize {
        let mut findings = 0;
        for record in batch {
            let Ok(event) = self.decoder.decode(record) else {
                panic!("a hand-made record does not decode");
            };
            for finding in self.diagnoser.observe(&event) {
                self.metrics.observe_finding(&finding);
                findings += 1;
            }
            self.metrics.observe_event(&event);
        }
        for occurrence in self.diagnoser.take_occurrences() {
            self.metrics.observe_occurrence(&occurrence);
        }
        findings
    }
}

fn pipeline(c: &mut Criterion) {
    let mut records = records();
    let base_ns = WallClock::monotonic_now_ns();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));

    let decoder = Decoder {
        clock: WallClock::new(),
        jiffies: Jiffies { hz: HZ },
    };
    records.restamp(base_ns, 0);
    group.bench_function("decode", |b| {
        b.iter(|| {
            for record in records.iter() {
                black_box(decoder.decode(black_box(record)).is_ok());
            }
        });
    });

    let mut agent = Agent::new();
    let mut round = 0;
    group.bench_function("decode_diagnose_metrics", |b| {
        b.iter(|| {
            round += 1;
            records.restamp(base_ns, round);
            let mut findings = 0;
            for batch in records.records.chunks(BATCH) {
                findings += agent.process(
                    batch
                        .iter()
                        .map(|&(offset, len, _)| &records.bytes[offset..offset + len]),
                );
            }
            black_box(findings)
        });
    });
    group.finish();

    // The metrics were really updated: the exposition names the traffic.
    let text = String::from_utf8(
        agent
            .metrics
            .render(tracer::sinks::metrics::MetricsFormat::PrometheusText),
    )
    .expect("metrics are UTF-8");
    assert!(text.contains("tcptracer_connections_closed_total{"));
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
