//! TCP socket dumps from NETLINK_SOCK_DIAG, the interface `ss` uses: the
//! request and receive loop behind [`listen_queue`](crate::host::listen_queue)'s
//! listeners and the TIME_WAIT counts of destinations that churn.
//!
//! Not /proc/net/tcp, which formats every socket as text whatever its state and
//! re-enters its walk of the socket hash table at every read() (under
//! connection churn, `tcp_seq_start` took most of the agent's CPU). A dump is
//! filtered by state in the kernel and resumes where the previous datagram
//! stopped. Dumps cover the calling thread's network namespace: run them in a
//! process's own with [`in_netns_of`](crate::host::listen_queue::in_netns_of).

use std::{collections::HashMap, io, net::IpAddr};

use netlink_packet_core::{
    DecodeError, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SockDiagMessage, TCP_TIME_WAIT,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("sock_diag: cannot {operation}")]
    Netlink {
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag: the kernel refused the socket dump")]
    Kernel {
        #[source]
        source: io::Error,
    },
    #[error("sock_diag: cannot decode the kernel's answer")]
    Decode {
        #[source]
        source: DecodeError,
    },
}

/// A remote endpoint as events name it: IPv4-mapped IPv6 addresses as IPv4.
pub type Destination = (IpAddr, u16);

/// How many TIME_WAIT sockets of the calling thread's network namespace, IPv4
/// and IPv6, point at each of `destinations`; every destination is in the
/// answer, with 0 when none do. An IPv4 destination counts the IPv4-mapped
/// sockets of dual-stack clients too.
///
/// One dump for all the destinations, of TIME_WAIT sockets only, counted as
/// they arrive: memory is bounded by `destinations`, not by the number of
/// sockets. Most of a dump's cost is the kernel's walk of its whole
/// established-socket table (every namespace's), which no filter shortens.
pub fn time_wait_towards(
    destinations: impl IntoIterator<Item = Destination>,
) -> Result<HashMap<Destination, u64>, SockDiagError> {
    let mut counts: HashMap<Destination, u64> =
        destinations.into_iter().map(|dest| (dest, 0)).collect();
    if counts.is_empty() {
        return Ok(counts);
    }
    // netlink-packet-sock-diag 0.5 has no INET_DIAG_REQ_BYTECODE attribute
    // (address and port conditions) for a request. The request's own
    // destination port spares the sending and decoding of other ports' sockets
    // when all destinations share one; addresses are matched here. A dump per
    // port would walk the table once per port.
    let mut ports = counts.keys().map(|&(_, port)| port);
    let port = ports
        .next()
        .filter(|&first| ports.all(|port| port == first));
    dump_tcp(StateFlags::TIME_WAIT, port, |socket| {
        count_time_wait(&mut counts, socket);
    })?;
    Ok(counts)
}

fn count_time_wait(counts: &mut HashMap<Destination, u64>, socket: &InetResponseHeader) {
    if socket.state != TCP_TIME_WAIT {
        return;
    }
    let id = &socket.socket_id;
    let towards = (id.destination_address.to_canonical(), id.destination_port);
    if let Some(count) = counts.get_mut(&towards) {
        *count += 1;
    }
}

/// Dumps the TCP sockets in one of `states` (and connected to
/// `destination_port`, when given) of the calling thread's network namespace,
/// IPv4 then IPv6, handing each to `on_socket` as it arrives.
pub(crate) fn dump_tcp(
    states: StateFlags,
    destination_port: Option<u16>,
    mut on_socket: impl FnMut(&InetResponseHeader),
) -> Result<(), SockDiagError> {
    let netlink = |operation| move |source| SockDiagError::Netlink { operation, source };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(netlink("open a netlink socket"))?;
    socket
        .bind_auto()
        .map_err(netlink("bind the netlink socket"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(netlink("connect to the kernel"))?;

    // The kernel sizes dump datagrams by the reader's buffer, at most 32 KiB.
    let mut buf = vec![0u8; 64 * 1024];
    // One dump per family: a request names exactly one. A dual-stack socket
    // (bound to ::, or IPv4-mapped) comes once, in the IPv6 dump.
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let request = dump_request(family, states.clone(), destination_port, sequence);
        socket
            .send(&request, 0)
            .map_err(netlink("send the dump request"))?;
        loop {
            let len = socket
                .recv(&mut &mut buf[..], libc::MSG_TRUNC)
                .map_err(netlink("receive the dump"))?;
            if len > buf.len() {
                return Err(SockDiagError::Netlink {
                    operation: "receive the dump",
                    source: io::Error::other(format!(
                        "datagram of {len} bytes exceeds the {}-byte buffer",
                        buf.len()
                    )),
                });
            }
            if parse_dump(&buf[..len], sequence, &mut on_socket)? == Dump::Done {
                break;
            }
        }
    }
    Ok(())
}

fn dump_request(
    family: u8,
    states: StateFlags,
    destination_port: Option<u16>,
    sequence: u32,
) -> Vec<u8> {
    let mut socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    // The kernel compares it with each socket's when it is not 0.
    socket_id.destination_port = destination_port.unwrap_or(0);
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

#[derive(Debug, PartialEq, Eq)]
enum Dump {
    More,
    Done,
}

/// One datagram of a sock_diag dump: hands each socket it holds to `on_socket`
/// and tells whether the dump is over. Messages of another sequence (a stale
/// answer) are skipped.
fn parse_dump(
    mut datagram: &[u8],
    sequence: u32,
    on_socket: &mut impl FnMut(&InetResponseHeader),
) -> Result<Dump, SockDiagError> {
    while !datagram.is_empty() {
        let message = NetlinkMessage::<SockDiagMessage>::deserialize(datagram)
            .map_err(|source| SockDiagError::Decode { source })?;
        // Netlink messages are 4-byte aligned; deserialize checked the length
        // against the datagram, and it is at least a header, so this advances.
        let len = (message.header.length as usize + 3) & !3;
        datagram = datagram.get(len..).unwrap_or_default();
        if message.header.sequence_number != sequence {
            continue;
        }
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                on_socket(&response.header);
            }
            NetlinkPayload::Done(done) if done.code != 0 => {
                return Err(SockDiagError::Kernel {
                    source: io::Error::from_raw_os_error(done.code.abs()),
                });
            }
            NetlinkPayload::Done(_) => return Ok(Dump::Done),
            NetlinkPayload::Error(error) if error.code.is_some() => {
                return Err(SockDiagError::Kernel {
                    source: error.to_io(),
                });
            }
            _ => {}
        }
    }
    Ok(Dump::More)
}

/// Hand-built dump answers, for the decoders here and in the modules that use
/// the dumps.
#[cfg(test)]
pub(crate) mod testing {
    use netlink_packet_sock_diag::inet::InetResponse;

    use super::*;

    /// A socket as a dump describes it: `source` is the local end.
    pub(crate) fn dumped(
        family: u8,
        state: u8,
        source: IpAddr,
        destination: Destination,
    ) -> InetResponseHeader {
        let mut socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        socket_id.source_address = source;
        socket_id.source_port = 8080;
        (socket_id.destination_address, socket_id.destination_port) = destination;
        InetResponseHeader {
            family,
            state,
            timer: None,
            socket_id,
            recv_queue: 5,
            send_queue: 4,
            uid: 0,
            inode: 4242,
        }
    }

    pub(crate) fn datagram(
        sequence: u32,
        payloads: Vec<NetlinkPayload<SockDiagMessage>>,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        for payload in payloads {
            let mut header = NetlinkHeader::default();
            header.sequence_number = sequence;
            let mut message = NetlinkMessage::new(header, payload);
            message.finalize();
            let start = bytes.len();
            bytes.resize(start + message.buffer_len(), 0);
            message.serialize(&mut bytes[start..]);
        }
        bytes
    }

    pub(crate) fn response(header: InetResponseHeader) -> NetlinkPayload<SockDiagMessage> {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(InetResponse {
            header,
            nlas: Default::default(),
        })))
    }

    /// Every socket one datagram hands over, and whether it ended the dump.
    pub(crate) fn decode(
        datagram: &[u8],
        sequence: u32,
    ) -> Result<(Vec<InetResponseHeader>, bool), SockDiagError> {
        let mut sockets = Vec::new();
        let dump = parse_dump(datagram, sequence, &mut |socket| {
            sockets.push(socket.clone())
        })?;
        Ok((sockets, dump == Dump::Done))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
        time::Duration,
    };

    use netlink_packet_sock_diag::{TCP_ESTABLISHED, TCP_LISTEN};

    use super::{testing::*, *};

    #[test]
    fn decodes_a_dump() {
        let v4 = |last| IpAddr::V4(Ipv4Addr::new(10, 0, 0, last));
        let localhost = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let sockets = [
            dumped(AF_INET, TCP_LISTEN, v4(1), (v4(0), 0)),
            dumped(AF_INET6, TCP_TIME_WAIT, localhost, (localhost, 443)),
        ];
        let bytes = datagram(7, sockets.iter().cloned().map(response).collect());
        assert_eq!(decode(&bytes, 7).unwrap(), (sockets.to_vec(), false));

        // A stale answer of another request is ignored; DONE ends the dump.
        let mut stale = datagram(6, vec![response(sockets[0].clone())]);
        stale.extend(datagram(7, vec![NetlinkPayload::Done(Default::default())]));
        assert_eq!(decode(&stale, 7).unwrap(), (Vec::new(), true));

        assert!(matches!(
            decode(&[1, 2, 3], 7),
            Err(SockDiagError::Decode { .. })
        ));
    }

    /// Leaves `n` client sockets in TIME_WAIT towards `listener`, reached at `to`.
    fn time_wait(listener: &TcpListener, to: std::net::SocketAddr, n: usize) {
        for _ in 0..n {
            // The client closes first: its side keeps TIME_WAIT.
            let client = TcpStream::connect(to).unwrap();
            let (server, _) = listener.accept().unwrap();
            drop(client);
            std::thread::sleep(Duration::from_millis(20));
            drop(server);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    #[test]
    fn counts_time_wait_towards_a_destination() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let other_addr = other.local_addr().unwrap();
        time_wait(&listener, addr, 3);
        time_wait(&other, other_addr, 2);
        // Open connections towards the destination are not in TIME_WAIT.
        let _open = TcpStream::connect(addr).unwrap();

        let destination = (addr.ip(), addr.port());
        let unused = (IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port());
        let counts =
            time_wait_towards([destination, (other_addr.ip(), other_addr.port()), unused]).unwrap();
        assert_eq!(
            counts,
            HashMap::from([
                (destination, 3),
                ((other_addr.ip(), other_addr.port()), 2),
                (unused, 0)
            ])
        );
        assert_eq!(
            time_wait_towards([destination]).unwrap(),
            HashMap::from([(destination, 3)])
        );
        assert!(time_wait_towards([]).unwrap().is_empty());
    }

    #[test]
    fn the_kernel_filters_by_destination_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        time_wait(&listener, addr, 2);
        let mut ports = Vec::new();
        dump_tcp(StateFlags::TIME_WAIT, Some(addr.port()), |socket| {
            ports.push(socket.socket_id.destination_port);
        })
        .unwrap();
        assert_eq!(ports, [addr.port(); 2]);
    }

    #[test]
    fn counts_ipv4_mapped_time_wait_as_ipv4() {
        // A dual-stack listener on :: reached through ::ffff:127.0.0.1: the
        // client's socket is IPv6, its destination the IPv4 of events.
        let Ok(listener) = TcpListener::bind("[::]:0") else {
            return; // no IPv6 on this machine
        };
        let port = listener.local_addr().unwrap().port();
        time_wait(
            &listener,
            (Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port).into(),
            1,
        );
        let localhost = (IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        assert_eq!(
            time_wait_towards([localhost]).unwrap(),
            HashMap::from([(localhost, 1)])
        );
    }

    #[test]
    fn counts_only_time_wait_sockets_towards_the_destinations() {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        let (http, https) = ((localhost, 80), (localhost, 443));
        let mut counts = HashMap::from([(http, 0), (https, 0)]);
        for socket in [
            dumped(AF_INET, TCP_TIME_WAIT, localhost, http),
            // A dual-stack client's IPv4-mapped destination is the IPv4 one.
            dumped(AF_INET6, TCP_TIME_WAIT, mapped, (mapped, 80)),
            dumped(AF_INET, TCP_ESTABLISHED, localhost, http),
            dumped(AF_INET, TCP_TIME_WAIT, localhost, (localhost, 8080)),
        ] {
            count_time_wait(&mut counts, &socket);
        }
        assert_eq!(counts, HashMap::from([(http, 2), (https, 0)]));
    }
}
