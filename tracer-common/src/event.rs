//! Events the kernel programs write to the ring buffer.
//!
//! Every event starts with an [`EventHeader`]; `kind` says which struct follows and
//! `size` is the whole event's length, so userspace can check both before reading.
//! Kind ids are never reused: a retired kind keeps its number.

use crate::COMM_LEN;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Open = 1,
    Close = 2,
    Reset = 3,
    Retransmit = 4,
    ConnectError = 5,
    Reuse = 6,
}

impl EventKind {
    pub fn from_u32(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::Open,
            2 => Self::Close,
            3 => Self::Reset,
            4 => Self::Retransmit,
            5 => Self::ConnectError,
            6 => Self::Reuse,
            _ => return None,
        })
    }
}

/// An event struct and the kind its header carries: the one tie between
/// them, which the kernel's emit sites and the decoder both use.
pub trait KernelEvent: Copy {
    const KIND: EventKind;
}

/// Who opened the connection, as seen from this host.
pub const ROLE_UNKNOWN: u32 = 0;
/// This host called `connect()`.
pub const ROLE_CLIENT: u32 = 1;
/// This host accepted the connection on a listening socket.
pub const ROLE_SERVER: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    pub kind: u32,
    /// Size of the whole event in bytes, header included.
    pub size: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Process (tgid) owning the socket; 0 when it could not be known.
    pub pid: u32,
    /// One of the `ROLE_*` constants.
    pub role: u32,
    pub comm: [u8; COMM_LEN],
}

/// Both ends of a connection as this socket sees them. Ports are in host byte
/// order; addresses in network order, IPv4 in the first four bytes. Aligned to
/// 8 (no layout changes: every holder has it at a multiple of 8) so that the BPF
/// backend copies it in words: byte-wise copies of the addresses spill a stack
/// slot per byte, past the verifier's 512-byte stack.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub _pad: u16,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
}

/// A connection reached ESTABLISHED (client) or was accepted (server).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OpenEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    /// Client: SYN sent to ESTABLISHED. 0 for servers.
    pub connect_ns: u64,
    /// Server: handshake completed to `accept()` returned it. 0 for clients, and for
    /// server connections that closed before the process accepted them.
    pub accept_wait_ns: u64,
}

/// `CloseEvent::flags`: `duration_ns` is meaningful (the open was seen).
pub const CLOSE_DURATION_KNOWN: u32 = 1 << 0;
/// `CloseEvent::flags`: `close_wait_ns` is meaningful (the peer closed first and the
/// process's close was seen).
pub const CLOSE_WAIT_KNOWN: u32 = 1 << 1;
/// `CloseEvent::flags`: `idle_jiffies` was measured at the first FIN or RST.
pub const CLOSE_IDLE_KNOWN: u32 = 1 << 2;
/// `CloseEvent::flags`: at the first FIN or RST a request was outstanding: a
/// client had sent the last payload and nothing had come back since, or a
/// server had received a request after its last reply.
pub const CLOSE_AWAITING_REPLY: u32 = 1 << 3;

/// How a connection ended, from this socket's point of view.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosedBy {
    Unknown = 0,
    /// This side sent the first FIN.
    Local = 1,
    /// The peer sent the first FIN.
    Peer = 2,
    /// This side aborted the connection with a RST.
    ResetLocal = 3,
    /// The peer aborted the connection with a RST.
    ResetPeer = 4,
    /// The kernel gave up on the connection (retransmission or keep-alive timeout).
    Timeout = 5,
}

impl ClosedBy {
    pub fn from_u32(value: u32) -> Self {
        match value {
            1 => Self::Local,
            2 => Self::Peer,
            3 => Self::ResetLocal,
            4 => Self::ResetPeer,
            5 => Self::Timeout,
            _ => Self::Unknown,
        }
    }
}

/// A connection reached CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    /// ESTABLISHED to CLOSE.
    pub duration_ns: u64,
    /// Payload bytes sent, each byte once however often it was retransmitted
    /// (`tcp_sock.bytes_sent - bytes_retrans`).
    pub bytes_sent: u64,
    /// Payload bytes received in order (`tcp_sock.bytes_received`, less the one
    /// sequence number of the peer's FIN when this socket processed it).
    pub bytes_received: u64,
    /// Peer's FIN to the process's own close.
    pub close_wait_ns: u64,
    /// Jiffies since the last payload in either direction, at the first FIN or RST.
    pub idle_jiffies: u32,
    /// A [`ClosedBy`] value.
    pub closed_by: u32,
    /// `sk_err` at CLOSE (positive errno), 0 when the kernel recorded no error.
    pub errno: u32,
    /// `CLOSE_*` flags.
    pub flags: u32,
    pub srtt_us: u32,
    pub total_retrans: u32,
}

pub const RESET_IN: u32 = 0;
pub const RESET_OUT: u32 = 1;

/// `ResetEvent::flags` and `RetransmitEvent::flags`: `idle_jiffies` is
/// meaningful. It is not before the handshake completed (the stamps are not set
/// yet), nor for mini sockets (TIME_WAIT, NEW_SYN_RECV), which have no `tcp_sock`.
pub const IDLE_KNOWN: u32 = 1 << 0;

/// A RST received (`direction` = `RESET_IN`) or sent (`RESET_OUT`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ResetEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    pub direction: u32,
    /// TCP state of the socket when the RST was seen.
    pub state: u32,
    /// Jiffies since the last payload in either direction.
    pub idle_jiffies: u32,
    /// `IDLE_KNOWN`, `RESET_AFTER_CLOSE`.
    pub flags: u32,
    /// With `RESET_AFTER_CLOSE`: time since this side's connection reached CLOSE.
    pub since_close_ns: u64,
    /// With `RESET_AFTER_CLOSE`: how that connection had ended (`ClosedBy`).
    pub closed_by: u32,
    pub _pad: u32,
}

/// `ResetEvent::flags`: a request was outstanding when the RST was seen (as
/// `CLOSE_AWAITING_REPLY`).
pub const RESET_AWAITING_REPLY: u32 = 1 << 2;

/// `ResetEvent::flags`: the RST went out for a connection this side had already
/// closed (from its TIME_WAIT remnant, or right after CLOSE): the peer sent data
/// after the close.
pub const RESET_AFTER_CLOSE: u32 = 1 << 1;

/// `ReuseEvent::flags`: the peer had closed the connection (its FIN arrived)
/// before this send: the request went to a connection that was already gone.
pub const REUSE_PEER_CLOSED: u32 = 1 << 0;

/// The first send on a connection after it sat idle for at least the configured
/// minimum, or any first send after the peer's FIN.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ReuseEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    /// Nanoseconds the process had neither sent nor read on the connection
    /// before this send (see `SockLocal::last_active_ns`).
    pub idle_ns: u64,
    /// Bytes this send accepted.
    pub bytes: u32,
    /// TCP state right after the send (on loopback the peer's answer may already
    /// have been processed).
    pub state: u32,
    /// `REUSE_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// A segment was retransmitted.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RetransmitEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    pub state: u32,
    /// Jiffies since payload was last received from the peer: how long the peer has
    /// been silent. (The last-send time is the retransmission itself.)
    pub idle_jiffies: u32,
    /// `tcp_sock.total_retrans`, this retransmission included.
    pub total_retrans: u32,
    /// `IDLE_KNOWN`.
    pub flags: u32,
}

/// `connect()` failed: synchronously (the syscall's return value) or after the SYN
/// was sent (the kernel's `sk_err` when SYN_SENT went to CLOSE).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectErrorEvent {
    pub header: EventHeader,
    pub conn: Endpoints,
    /// `connect()` entry, or SYN sent, to the failure.
    pub connect_ns: u64,
    pub errno: u32,
    pub _pad: u32,
}

macro_rules! kinds {
    ($($ty:ty => $kind:ident),* $(,)?) => {
        $(impl KernelEvent for $ty {
            const KIND: EventKind = EventKind::$kind;
        })*
    };
}

kinds! {
    OpenEvent => Open,
    CloseEvent => Close,
    ResetEvent => Reset,
    RetransmitEvent => Retransmit,
    ConnectErrorEvent => ConnectError,
    ReuseEvent => Reuse,
}

const _: () = {
    assert!(size_of::<EventHeader>() == 40);
    assert!(size_of::<Endpoints>() == 40);
    assert!(size_of::<OpenEvent>() == 96);
    assert!(size_of::<CloseEvent>() == 136);
    assert!(size_of::<ResetEvent>() == 112);
    assert!(size_of::<ReuseEvent>() == 104);
    assert!(size_of::<RetransmitEvent>() == 96);
    assert!(size_of::<ConnectErrorEvent>() == 96);
};

#[cfg(feature = "user")]
crate::impl_pod!(Endpoints);
