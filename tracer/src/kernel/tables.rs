//! The kernel's tables read back, as plain data: connections waiting in
//! CLOSE_WAIT and the request counters of each pool. [`super::session`] reads
//! them; the diagnosis judges them.

use std::{net::IpAddr, time::Duration};

use crate::{
    comm::Comm,
    event::{DestinationKey, ListenerKey},
};

/// One connection stuck in CLOSE_WAIT, from the kernel's table.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseWaitEntry {
    /// The kernel's identity of the socket, stable while it lives.
    pub sock: u64,
    pub pid: u32,
    pub comm: Comm,
    pub laddr: IpAddr,
    pub raddr: IpAddr,
    pub rport: u16,
    pub lport: u16,
    /// Since the peer's FIN.
    pub waiting: Duration,
}

/// Kernel request counters of one pool, as read from the `POOLS` map.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolCounters {
    pub pool: PoolRef,
    /// Connections with a request in progress now.
    pub busy: u64,
    pub requests: u64,
    pub responses: u64,
    pub busy_ns: u64,
    /// Gaps from reading a response to the next request, in log2 µs buckets.
    pub gaps: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PoolRef {
    Destination(DestinationKey),
    Listener(ListenerKey),
}

/// Addresses in `PoolKey`s decode like event addresses.
pub fn pool_address(family: u16, addr: &[u8; 16]) -> Option<IpAddr> {
    let conn = tracer_common::event::Endpoints {
        family,
        raddr: *addr,
        ..Default::default()
    };
    super::decode::addresses(&conn).ok().map(|(_, raddr)| raddr)
}
