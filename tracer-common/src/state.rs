//! Map keys and values the kernel programs keep between events. Userspace reads
//! some of them (counters, socket states for periodic scans).

use crate::{COMM_LEN, event::Endpoints};

/// `SockState::flags`: the open event was emitted.
pub const SOCK_OPEN_EMITTED: u32 = 1 << 0;
/// `SockState::flags`: a RST was received.
pub const SOCK_RESET_IN: u32 = 1 << 1;
/// `SockState::flags`: the first FIN or RST was seen; `first_close_ns`,
/// `closed_by` and `idle_jiffies` are set.
pub const SOCK_CLOSING: u32 = 1 << 2;
/// `SockState::flags`: `close_wait_ns` is set.
pub const SOCK_CLOSE_WAIT_DONE: u32 = 1 << 3;
/// `SockState::flags`: `idle_jiffies` was measured when the connection left
/// ESTABLISHED.
pub const SOCK_IDLE_KNOWN: u32 = 1 << 4;
/// `SockState::flags`: at the first FIN or RST a request was outstanding.
pub const SOCK_AWAITING_REPLY: u32 = 1 << 5;

/// What the programs remember about one socket, from its first state change to CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockState {
    /// Owning process (tgid); 0 while unknown.
    pub pid: u32,
    /// The thread that called `connect()` (client sockets), to find its call.
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    /// `ROLE_*`.
    pub role: u32,
    /// `SOCK_*` flags.
    pub flags: u32,
    /// SYN sent (client), 0 otherwise.
    pub syn_ns: u64,
    /// ESTABLISHED, 0 when not seen.
    pub open_ns: u64,
    /// Server: when `accept()` returned the socket.
    pub accept_ns: u64,
    /// First FIN or RST, sent or received.
    pub first_close_ns: u64,
    pub close_wait_ns: u64,
    pub idle_jiffies: u32,
    /// `ClosedBy` decided at the first FIN or RST.
    pub closed_by: u32,
}

/// A listening socket: network namespace inode and local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A process that owns a socket. Aligned to 8 for word copies of `comm`, as
/// [`crate::event::Endpoints`] is.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub pid: u32,
    pub role: u32,
    pub comm: [u8; COMM_LEN],
}

/// A connection that just reached CLOSE, keyed by its endpoints so that its
/// TIME_WAIT remnant (another kernel object) can be attributed too.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClosedConn {
    pub owner: Owner,
    pub close_ns: u64,
    /// `ClosedBy`.
    pub closed_by: u32,
    pub _pad: u32,
}

/// A connection its peer closed and the process has not, keyed by socket.
/// Userspace scans these for CLOSE_WAIT leaks; the map only ever holds sockets
/// currently in CLOSE_WAIT, so a scan is cheap.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseWait {
    pub owner: Owner,
    pub conn: Endpoints,
    /// When the peer's FIN arrived.
    pub since_ns: u64,
}

/// `SockLocal::flags`: the hooks have seen this socket (it is classified).
pub const LOCAL_SEEN: u32 = 1 << 0;
/// `SockLocal::flags`: the peer's FIN arrived.
pub const LOCAL_PEER_FIN: u32 = 1 << 1;
/// `SockLocal::flags`: a send after the peer's FIN was reported.
pub const LOCAL_STALE_REPORTED: u32 = 1 << 2;
/// `SockLocal::flags`: this socket's first payload came in before any went out:
/// it answers its peer (a server). Its sends are replies, not reuses, and its
/// requests are what it receives.
pub const LOCAL_RESPONDER: u32 = 1 << 3;
/// `SockLocal::flags`: a request is in progress: for a client, sent and not yet
/// answered; for a server, received and not yet answered.
pub const LOCAL_BUSY: u32 = 1 << 4;
/// `SockLocal::flags`: the process has sent on this socket.
pub const LOCAL_SENT: u32 = 1 << 5;
/// `SockLocal::flags`: the last request was answered and its exchange is not
/// yet counted into the pool: more of the answer may still move (a body after
/// its headers, a chunk held back by Nagle and delayed ACK), and each of it
/// moves `SockLocal::answered_ns` on.
pub const LOCAL_ANSWERED: u32 = 1 << 6;
/// `SockLocal::flags`: the user's filters (pid, command, port) leave this
/// socket out, so its requests are not counted into any pool.
pub const LOCAL_FILTERED_OUT: u32 = 1 << 7;

/// Socket-local storage of the send and receive hooks, freed with the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockLocal {
    /// When the process last sent or read on this socket (`bpf_ktime_get_ns`,
    /// CLOCK_MONOTONIC); 0 before either was seen.
    pub last_active_ns: u64,
    pub flags: u32,
    /// `write_seq` when the peer's FIN arrived: sends whose data was handed over
    /// after that went to a connection the peer had closed; a FIN processed
    /// during a send (on loopback the whole exchange can happen inside it) came
    /// after that send's data.
    pub fin_write_seq: u32,
    /// When the current or last request started: its first byte out (client)
    /// or in (server).
    pub busy_since_ns: u64,
    /// When the last byte of the last answer moved: read by a client, written
    /// by a server.
    pub answered_ns: u64,
    /// The pool this connection belongs to, fixed when first seen.
    pub pool: PoolKey,
}

pub const POOL_CLIENT: u16 = 1;
pub const POOL_SERVER: u16 = 2;

/// A process's connections to one destination (client side: `addr`:`port` is
/// the remote endpoint) or on one listening port (server side: `port` is the
/// local port, `addr` is zero). Aligned to 8 for word copies of `addr`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolKey {
    pub pid: u32,
    pub port: u16,
    /// `POOL_CLIENT` or `POOL_SERVER`.
    pub side: u16,
    /// Address family of `addr`.
    pub family: u16,
    pub _pad: [u8; 6],
    pub addr: [u8; 16],
}

/// Buckets of the gap histogram: bucket i counts gaps in [2^i, 2^(i+1)) µs
/// (bucket 0 also holds gaps under 1 µs; the last, everything longer).
pub const GAP_BUCKETS: usize = 20;

/// Request accounting of one pool, updated by the kernel with atomic adds from
/// every CPU, read by userspace every second.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PoolStats {
    /// Connections with a request in progress now. Kept as a wrapping counter:
    /// decrements add `u64::MAX`.
    pub busy: u64,
    pub requests: u64,
    /// Exchanges counted: answered, and followed by the next request or the
    /// close (until then more of the answer may come).
    pub responses: u64,
    /// Time connections spent busy over the counted exchanges, each from the
    /// request's first byte to the answer's last.
    pub busy_ns: u64,
    /// Client side: from reading a response to sending the next request on the
    /// same connection.
    pub gaps: [u64; GAP_BUCKETS],
}

/// A `connect()` call in flight, keyed by thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectCall {
    pub start_ns: u64,
    /// The socket being connected (kernel address).
    pub sk: u64,
    /// Destination from the syscall's `sockaddr`; the socket forgets it on failure.
    pub conn: Endpoints,
    /// Non-zero once the failure was reported from the state change.
    pub reported: u32,
    pub _pad: u32,
}

/// Indices into the per-CPU `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A ring-buffer reservation failed: an event was lost.
    EventsLost = 0,
    /// An insert into `SOCKS` failed.
    SockStateInsertFailed = 1,
    /// Entries put into `SOCKS`.
    SockStateInserted = 2,
    /// Entries removed from `SOCKS` (evictions are not seen).
    SockStateRemoved = 3,
    /// Not a count: the most data waiting in the ring buffer that this CPU saw
    /// after writing an event, since userspace last reset it.
    RingBufPendingPeak = 4,
}

pub const COUNTER_COUNT: u32 = 5;

const _: () = {
    assert!(size_of::<SockState>() == 80);
    assert!(size_of::<ListenerKey>() == 8);
    assert!(size_of::<Owner>() == 24);
    assert!(size_of::<ConnectCall>() == 64);
    assert!(size_of::<ClosedConn>() == 40);
    assert!(size_of::<CloseWait>() == 72);
    assert!(size_of::<SockLocal>() == 64);
    assert!(size_of::<PoolKey>() == 32);
    assert!(size_of::<PoolStats>() == 32 + 8 * GAP_BUCKETS);
};

#[cfg(feature = "user")]
crate::impl_pod!(
    SockState,
    ListenerKey,
    Owner,
    ConnectCall,
    ClosedConn,
    CloseWait,
    SockLocal,
    PoolKey,
    PoolStats
);
