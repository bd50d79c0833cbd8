//! Events as the agent reports them: decoded, with wall-clock times, addresses,
//! names and durations in the units of the output contract (docs/events.md).

use std::{net::IpAddr, time::SystemTime};

use serde::{Serialize, Serializer};

use crate::comm::Comm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Server,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    Local,
    Peer,
    ResetLocal,
    ResetPeer,
    Timeout,
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

/// The name serde gives a unit variant: what the JSON stream writes, and so
/// what metric labels and text output write too.
pub fn serde_name<T: Serialize>(variant: &T) -> &'static str {
    serde_variant::to_variant_name(variant).expect("a unit variant")
}

impl Role {
    pub fn name(self) -> &'static str {
        serde_name(&self)
    }
}

impl ClosedBy {
    pub fn name(self) -> &'static str {
        serde_name(&self)
    }
}

impl Direction {
    pub fn name(self) -> &'static str {
        serde_name(&self)
    }
}

/// One event of the `tracer trace` stream.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    #[serde(serialize_with = "rfc3339_micros")]
    pub ts: SystemTime,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pid: u32,
    pub comm: Comm,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub role: Role,
    #[serde(flatten)]
    pub detail: Detail,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    Open(Open),
    Close(Close),
    Reset(Reset),
    Retransmit(Retransmit),
    ConnectError(ConnectError),
    Reuse(Reuse),
}

impl Detail {
    /// The `type` of an event carrying this detail.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Open(_) => "open",
            Self::Close(_) => "close",
            Self::Reset(_) => "reset",
            Self::Retransmit(_) => "retransmit",
            Self::ConnectError(_) => "connect_error",
            Self::Reuse(_) => "reuse",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Open {
    /// Client: SYN sent to ESTABLISHED.
    pub connect_us: Option<u64>,
    /// Server: handshake completed to accept() returning it.
    pub accept_wait_us: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Close {
    pub duration_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub closed_by: ClosedBy,
    pub idle_ms: Option<u64>,
    pub close_wait_ms: Option<f64>,
    pub error: Option<String>,
    /// At the first FIN or RST a request was outstanding: a client's request
    /// unanswered, or a request a server had not answered yet.
    pub awaiting_reply: bool,
    pub srtt_us: u32,
    pub retransmits: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reset {
    pub direction: Direction,
    pub state: &'static str,
    pub idle_ms: Option<u64>,
    /// When the RST went out for a connection this side had already closed: how
    /// long ago it closed.
    pub since_close_ms: Option<f64>,
    /// With `since_close_ms`: how that connection had ended.
    pub closed_by: Option<ClosedBy>,
    /// A request was outstanding when the RST came (as `Close::awaiting_reply`).
    pub awaiting_reply: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reuse {
    /// How long the connection had carried no payload before this send.
    pub idle_ms: u64,
    pub bytes: u32,
    /// TCP state right after the send.
    pub state: &'static str,
    /// The peer had already closed the connection (its FIN arrived before the send).
    pub peer_closed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retransmit {
    pub state: &'static str,
    pub idle_ms: Option<u64>,
    pub retransmits: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnectError {
    pub error: String,
    pub connect_us: u64,
}

/// How the agent writes a time: RFC 3339 in UTC, to the microsecond
/// (`2026-11-28T22:04:01.123456Z`).
pub fn rfc3339(ts: SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_micros(ts)
}

/// [`rfc3339`] for `#[serde(serialize_with)]`.
pub(crate) fn rfc3339_micros<S: Serializer>(
    ts: &SystemTime,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&rfc3339(*ts))
}

/// A process and a remote endpoint it talks to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestinationKey {
    pub pid: u32,
    pub raddr: IpAddr,
    pub rport: u16,
}

/// A process and one of its listening ports.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub pid: u32,
    pub lport: u16,
}
