//! Raw ring-buffer records to [`Event`]s. Every record is checked for length and
//! kind and read unaligned; a bad record is an error to count, never a panic.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tracer_common::{
    event::{
        self as raw, CLOSE_AWAITING_REPLY, CLOSE_DURATION_KNOWN, CLOSE_IDLE_KNOWN,
        CLOSE_WAIT_KNOWN, EventHeader, EventKind, IDLE_KNOWN, KernelEvent, RESET_AFTER_CLOSE,
        RESET_AWAITING_REPLY, REUSE_PEER_CLOSED,
    },
    tcp::{AF_INET, AF_INET6, state_name},
};

use crate::{
    comm::Comm,
    event::{
        Close, ClosedBy, ConnectError, Detail, Direction, Event, Open, Reset, Retransmit, Reuse,
        Role,
    },
    kernel::clock::{Jiffies, WallClock},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Truncated(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} event needs {expected} bytes, record has {actual}")]
    Size {
        kind: EventKind,
        expected: usize,
        actual: usize,
    },
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Turns kernel records into events.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    pub clock: WallClock,
    pub jiffies: Jiffies,
}

impl Decoder {
    pub fn decode(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let header: EventHeader = read(bytes).ok_or(DecodeError::Truncated(bytes.len()))?;
        let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
        let (conn, detail) = match kind {
            EventKind::Open => {
                let e: raw::OpenEvent = read_event(bytes)?;
                let detail = Detail::Open(Open {
                    connect_us: (header.role == raw::ROLE_CLIENT && e.connect_ns != 0)
                        .then_some(e.connect_ns / 1000),
                    accept_wait_us: (header.role == raw::ROLE_SERVER && e.accept_wait_ns != 0)
                        .then_some(e.accept_wait_ns / 1000),
                });
                (e.conn, detail)
            }
            EventKind::Close => {
                let e: raw::CloseEvent = read_event(bytes)?;
                (e.conn, Detail::Close(self.close(&e)))
            }
            EventKind::Reset => {
                let e: raw::ResetEvent = read_event(bytes)?;
                let detail = Detail::Reset(Reset {
                    direction: if e.direction == raw::RESET_IN {
                        Direction::In
                    } else {
                        Direction::Out
                    },
                    state: state_name(e.state),
                    idle_ms: (e.flags & IDLE_KNOWN != 0)
                        .then(|| millis(self.jiffies.to_duration(e.idle_jiffies))),
                    since_close_ms: (e.flags & RESET_AFTER_CLOSE != 0)
                        .then(|| fractional_ms(e.since_close_ns)),
                    closed_by: (e.flags & RESET_AFTER_CLOSE != 0).then(|| closed_by(e.closed_by)),
                    awaiting_reply: e.flags & RESET_AWAITING_REPLY != 0,
                });
                (e.conn, detail)
            }
            EventKind::Reuse => {
                let e: raw::ReuseEvent = read_event(bytes)?;
                let detail = Detail::Reuse(Reuse {
                    idle_ms: millis(Duration::from_nanos(e.idle_ns)),
                    bytes: e.bytes,
                    state: state_name(e.state),
                    peer_closed: e.flags & REUSE_PEER_CLOSED != 0,
                });
                (e.conn, detail)
            }
            EventKind::Retransmit => {
                let e: raw::RetransmitEvent = read_event(bytes)?;
                let detail = Detail::Retransmit(Retransmit {
                    state: state_name(e.state),
                    idle_ms: (e.flags & IDLE_KNOWN != 0)
                        .then(|| millis(self.jiffies.to_duration(e.idle_jiffies))),
                    retransmits: e.total_retrans,
                });
                (e.conn, detail)
            }
            EventKind::ConnectError => {
                let e: raw::ConnectErrorEvent = read_event(bytes)?;
                let detail = Detail::ConnectError(ConnectError {
                    error: errno_name(e.errno),
                    connect_us: e.connect_ns / 1000,
                });
                (e.conn, detail)
            }
        };
        let (laddr, raddr) = addresses(&conn)?;
        Ok(Event {
            ts: self.clock.to_wall(header.ts_ns),
            kind: detail.kind(),
            pid: header.pid,
            comm: Comm::from_kernel(&header.comm),
            laddr,
            lport: conn.lport,
            raddr,
            rport: conn.rport,
            role: match header.role {
                raw::ROLE_CLIENT => Role::Client,
                raw::ROLE_SERVER => Role::Server,
                _ => Role::Unknown,
            },
            detail,
        })
    }

    fn close(&self, e: &raw::CloseEvent) -> Close {
        Close {
            duration_ms: (e.flags & CLOSE_DURATION_KNOWN != 0)
                .then(|| fractional_ms(e.duration_ns)),
            bytes_sent: e.bytes_sent,
            bytes_received: e.bytes_received,
            closed_by: closed_by(e.closed_by),
            idle_ms: (e.flags & CLOSE_IDLE_KNOWN != 0)
                .then(|| millis(self.jiffies.to_duration(e.idle_jiffies))),
            close_wait_ms: (e.flags & CLOSE_WAIT_KNOWN != 0)
                .then(|| fractional_ms(e.close_wait_ns)),
            error: (e.errno != 0).then(|| errno_name(e.errno)),
            awaiting_reply: e.flags & CLOSE_AWAITING_REPLY != 0,
            srtt_us: e.srtt_us,
            retransmits: e.total_retrans,
        }
    }
}

fn closed_by(raw: u32) -> ClosedBy {
    match raw::ClosedBy::from_u32(raw) {
        raw::ClosedBy::Local => ClosedBy::Local,
        raw::ClosedBy::Peer => ClosedBy::Peer,
        raw::ClosedBy::ResetLocal => ClosedBy::ResetLocal,
        raw::ClosedBy::ResetPeer => ClosedBy::ResetPeer,
        raw::ClosedBy::Timeout => ClosedBy::Timeout,
        raw::ClosedBy::Unknown => ClosedBy::Unknown,
    }
}

/// Reads a `T` from the start of `bytes`, unaligned: ring-buffer records carry no
/// alignment promise for userspace.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; every `T` used here is a plain-old-data
    // `#[repr(C)]` type for which any bit pattern is valid.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn read_event<T: KernelEvent>(bytes: &[u8]) -> Result<T, DecodeError> {
    read(bytes).ok_or(DecodeError::Size {
        kind: T::KIND,
        expected: size_of::<T>(),
        actual: bytes.len(),
    })
}

/// Addresses as the socket sees them; IPv4-mapped IPv6 addresses (a dual-stack
/// socket talking IPv4) are shown as the IPv4 address they carry, so both ends of
/// a connection read the same.
pub fn addresses(conn: &raw::Endpoints) -> Result<(IpAddr, IpAddr), DecodeError> {
    let addr = |bytes: &[u8; 16]| -> Result<IpAddr, DecodeError> {
        match conn.family {
            AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            AF_INET6 => {
                let v6 = Ipv6Addr::from(*bytes);
                Ok(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
            }
            family => Err(DecodeError::Family(family)),
        }
    };
    Ok((addr(&conn.laddr)?, addr(&conn.raddr)?))
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// Milliseconds with microsecond resolution.
fn fractional_ms(ns: u64) -> f64 {
    (ns / 1000) as f64 / 1000.0
}

/// `ECONNREFUSED` for 111: the name an operator greps for.
pub fn errno_name(errno: u32) -> String {
    match nix::errno::Errno::from_raw(errno as i32) {
        nix::errno::Errno::UnknownErrno => format!("E{errno}"),
        known => format!("{known:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tracer_common::{
        COMM_LEN,
        event::{
            CloseEvent, ConnectErrorEvent, Endpoints, OpenEvent, REUSE_PEER_CLOSED, ROLE_CLIENT,
            ROLE_SERVER, ReuseEvent,
        },
    };

    use super::*;

    fn decoder() -> Decoder {
        Decoder {
            clock: WallClock::new(),
            jiffies: Jiffies { hz: 250 },
        }
    }

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header<T: KernelEvent>(role: u32) -> EventHeader {
        let mut comm = [0; COMM_LEN];
        comm[..4].copy_from_slice(b"curl");
        EventHeader {
            kind: T::KIND as u32,
            size: size_of::<T>() as u32,
            ts_ns: WallClock::monotonic_now_ns(),
            pid: 4242,
            role,
            comm,
        }
    }

    fn v4(lport: u16, rport: u16) -> Endpoints {
        let mut conn = Endpoints {
            family: AF_INET,
            lport,
            rport,
            ..Endpoints::default()
        };
        conn.laddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        conn.raddr[..4].copy_from_slice(&[10, 1, 2, 3]);
        conn
    }

    #[test]
    fn decodes_a_client_close() {
        let raw = CloseEvent {
            header: header::<CloseEvent>(ROLE_CLIENT),
            conn: v4(40000, 80),
            duration_ns: 1_500_250_000,
            bytes_sent: 10,
            bytes_received: 20,
            close_wait_ns: 0,
            idle_jiffies: 75,
            closed_by: raw::ClosedBy::Local as u32,
            errno: 0,
            flags: CLOSE_DURATION_KNOWN | CLOSE_IDLE_KNOWN,
            srtt_us: 52,
            total_retrans: 0,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(event.kind, "close");
        assert_eq!(event.pid, 4242);
        assert_eq!(event.comm, "curl");
        assert_eq!(event.role, Role::Client);
        assert_eq!(event.laddr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(event.rport, 80);
        let Detail::Close(close) = event.detail else {
            panic!("not a close: {event:?}")
        };
        assert_eq!(close.duration_ms, Some(1500.25));
        assert_eq!(close.idle_ms, Some(300));
        assert_eq!(close.closed_by, ClosedBy::Local);
        assert_eq!(close.close_wait_ms, None);
        assert_eq!(close.error, None);
        assert_eq!((close.bytes_sent, close.bytes_received), (10, 20));
    }

    #[test]
    fn a_reuse_keeps_its_idle_time_to_the_millisecond() {
        let raw = ReuseEvent {
            header: header::<ReuseEvent>(ROLE_CLIENT),
            conn: v4(40000, 80),
            idle_ns: 1_500_999_000,
            bytes: 30,
            state: tracer_common::tcp::TCP_CLOSE_WAIT,
            flags: REUSE_PEER_CLOSED,
            _pad: 0,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        let Detail::Reuse(reuse) = event.detail else {
            panic!("not a reuse: {event:?}")
        };
        assert_eq!(reuse.idle_ms, 1500);
        assert_eq!(reuse.bytes, 30);
        assert_eq!(reuse.state, "CLOSE_WAIT");
        assert!(reuse.peer_closed);
    }

    #[test]
    fn json_uses_the_contract_names() {
        let raw = CloseEvent {
            header: header::<CloseEvent>(ROLE_SERVER),
            conn: v4(80, 40000),
            duration_ns: 2_000_000,
            bytes_sent: 1,
            bytes_received: 2,
            close_wait_ns: 25_000_000,
            idle_jiffies: 1,
            closed_by: raw::ClosedBy::Peer as u32,
            errno: 104,
            flags: CLOSE_DURATION_KNOWN | CLOSE_IDLE_KNOWN | CLOSE_WAIT_KNOWN,
            srtt_us: 0,
            total_retrans: 0,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        let json: serde_json::Value = serde_json::to_value(&event).unwrap();
        for key in [
            "ts",
            "type",
            "pid",
            "comm",
            "laddr",
            "lport",
            "raddr",
            "rport",
            "role",
            "duration_ms",
            "bytes_sent",
            "bytes_received",
            "closed_by",
            "idle_ms",
            "close_wait_ms",
            "error",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["type"], "close");
        assert_eq!(json["role"], "server");
        assert_eq!(json["closed_by"], "peer");
        assert_eq!(json["close_wait_ms"], 25.0);
        assert_eq!(json["idle_ms"], 4);
        assert_eq!(json["error"], "ECONNRESET");
        let ts = json["ts"].as_str().unwrap();
        // RFC 3339, UTC, microseconds: 2026-11-28T22:04:01.123456Z
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z'), "{ts}");
        let parsed = humantime::parse_rfc3339(ts).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(skew < Duration::from_secs(5));
    }

    #[test]
    fn open_reports_connect_time_for_clients_only() {
        let raw = OpenEvent {
            header: header::<OpenEvent>(ROLE_CLIENT),
            conn: v4(40000, 80),
            connect_ns: 123_456,
            accept_wait_ns: 0,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "open");
        assert_eq!(json["connect_us"], 123);
        assert!(json["accept_wait_us"].is_null());
    }

    #[test]
    fn mapped_ipv6_reads_as_ipv4() {
        let mut conn = Endpoints {
            family: AF_INET6,
            lport: 1,
            rport: 2,
            ..Endpoints::default()
        };
        conn.laddr = Ipv6Addr::LOCALHOST.octets();
        conn.raddr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        let raw = ConnectErrorEvent {
            header: header::<ConnectErrorEvent>(ROLE_CLIENT),
            conn,
            connect_ns: 5_000,
            errno: 111,
            _pad: 0,
        };
        let event = decoder().decode(&bytes_of(&raw)).unwrap();
        assert_eq!(event.laddr, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(event.raddr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(
            event.detail,
            Detail::ConnectError(ConnectError {
                error: "ECONNREFUSED".into(),
                connect_us: 5
            })
        );
    }

    #[test]
    fn bad_records_are_errors() {
        let d = decoder();
        assert_eq!(d.decode(&[0; 8]), Err(DecodeError::Truncated(8)));
        let mut unknown = bytes_of(&header::<OpenEvent>(ROLE_CLIENT));
        unknown[0] = 99;
        assert_eq!(d.decode(&unknown), Err(DecodeError::UnknownKind(99)));
        let short = bytes_of(&header::<CloseEvent>(ROLE_CLIENT));
        assert!(matches!(
            d.decode(&short),
            Err(DecodeError::Size {
                kind: EventKind::Close,
                expected: 136,
                actual: 40
            })
        ));
        let mut bad_family = OpenEvent {
            header: header::<OpenEvent>(ROLE_CLIENT),
            conn: v4(1, 2),
            connect_ns: 0,
            accept_wait_ns: 0,
        };
        bad_family.conn.family = 1;
        assert_eq!(
            d.decode(&bytes_of(&bad_family)),
            Err(DecodeError::Family(1))
        );
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(111), "ECONNREFUSED");
        assert_eq!(errno_name(110), "ETIMEDOUT");
        assert_eq!(errno_name(99), "EADDRNOTAVAIL");
        assert_eq!(errno_name(4000), "E4000");
    }
}
