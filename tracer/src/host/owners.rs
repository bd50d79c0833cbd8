//! Owners of connections the kernel programs met mid-life (they existed before the
//! agent started), found the way `ss -p` finds them: socket inodes in
//! `/proc/<pid>/net/tcp{,6}` matched with `/proc/<pid>/fd` links.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt,
    time::{Duration, Instant},
};

use crate::comm::Comm;

/// A connection as both /proc/net/tcp and events name it.
pub type ConnKey = (IpAddr, u16, IpAddr, u16);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcOwner {
    pub pid: u32,
    pub comm: Comm,
}

/// Connection-to-process table from /proc, rebuilt on demand at a bounded rate.
///
/// Two passes are kept: the latest, and the one before it, for a connection
/// whose process closed its fd between them and that still reports a late
/// event. Older entries go: kept until a bound, they grew the agent by every
/// connection alive at each pass (a soak of a million connections, with a
/// pass every 10 s, grew its RSS linearly).
pub struct SocketOwners {
    table: HashMap<ConnKey, ProcOwner>,
    previous: HashMap<ConnKey, ProcOwner>,
    scanned: Option<Instant>,
    min_rescan: Duration,
}

impl Default for SocketOwners {
    fn default() -> Self {
        Self {
            table: HashMap::new(),
            previous: HashMap::new(),
            scanned: None,
            // A full pass reads every process's fd table: not more often.
            min_rescan: Duration::from_secs(10),
        }
    }
}

impl SocketOwners {
    /// Reads /proc now: call at start, while connections that predate the agent
    /// are still listed there.
    pub fn refresh(&mut self) {
        self.replace(scan());
    }

    fn replace(&mut self, fresh: HashMap<ConnKey, ProcOwner>) {
        self.previous = std::mem::replace(&mut self.table, fresh);
        self.scanned = Some(Instant::now());
    }

    fn known(&self, key: &ConnKey) -> Option<ProcOwner> {
        self.table
            .get(key)
            .or_else(|| self.previous.get(key))
            .cloned()
    }

    /// The process holding the connection, scanning /proc when the table is older
    /// than the rescan interval and does not know it.
    pub fn lookup(&mut self, key: &ConnKey) -> Option<ProcOwner> {
        if let Some(owner) = self.known(key) {
            return Some(owner);
        }
        if self
            .scanned
            .is_some_and(|at| at.elapsed() < self.min_rescan)
        {
            return None;
        }
        self.refresh();
        self.known(key)
    }
}

/// The numeric entries of /proc: every process, as (pid, its /proc directory).
fn processes() -> impl Iterator<Item = (u32, std::path::PathBuf)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// Every socket inode held open by a process, with the first process found
/// holding it (what `ss -p` shows).
pub fn socket_inode_owners() -> HashMap<u64, ProcOwner> {
    let mut owners = HashMap::new();
    for (pid, dir) in processes() {
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let comm = fs::read_to_string(dir.join("comm"))
            .map(|c| Comm::from(c.trim_end()))
            .unwrap_or_default();
        for fd in fds.flatten() {
            if let Some(inode) = fs::read_link(fd.path())
                .ok()
                .and_then(|target| socket_inode(target.to_str()?))
            {
                owners
                    .entry(inode)
                    .or_insert_with(|| ProcOwner { pid, comm });
            }
        }
    }
    owners
}

/// One pass over /proc: every TCP socket of every network namespace, with the
/// first process found holding it.
fn scan() -> HashMap<ConnKey, ProcOwner> {
    let inode_owner = socket_inode_owners();
    let mut namespaces = HashSet::new();
    let mut sockets: Vec<(ConnKey, u64)> = Vec::new();
    for (_, dir) in processes() {
        // Each network namespace is read once, through the first process in it.
        if let Ok(netns) = fs::metadata(dir.join("ns/net"))
            && namespaces.insert(netns.ino())
        {
            for file in ["net/tcp", "net/tcp6"] {
                if let Ok(text) = fs::read_to_string(dir.join(file)) {
                    sockets.extend(parse_proc_net_tcp(&text));
                }
            }
        }
    }
    sockets
        .into_iter()
        .filter_map(|(key, inode)| Some((key, inode_owner.get(&inode)?.clone())))
        .collect()
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Rows of /proc/net/tcp or tcp6: connection and socket inode. Listening sockets
/// (no remote port) are skipped.
fn parse_proc_net_tcp(text: &str) -> Vec<(ConnKey, u64)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (laddr, lport) = parse_endpoint(fields.get(1)?)?;
            let (raddr, rport) = parse_endpoint(fields.get(2)?)?;
            let inode = fields.get(9)?.parse().ok()?;
            (rport != 0 && inode != 0).then_some(((laddr, lport, raddr, rport), inode))
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host
/// byte order, then the port in hex. IPv4-mapped addresses become IPv4, as in events.
fn parse_endpoint(field: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_outlive_one_pass_but_not_two() {
        let localhost = IpAddr::from([127, 0, 0, 1]);
        let key = |port| (localhost, port, localhost, 80);
        let owner = |pid| ProcOwner {
            pid,
            comm: "curl".into(),
        };
        let mut owners = SocketOwners::default();
        owners.replace(HashMap::from([(key(1), owner(1))]));
        owners.replace(HashMap::from([(key(2), owner(2))]));
        // The first connection's process let go of it: still known, once.
        assert_eq!(owners.known(&key(1)), Some(owner(1)));
        assert_eq!(owners.known(&key(2)), Some(owner(2)));
        owners.replace(HashMap::from([(key(3), owner(3))]));
        assert_eq!(owners.known(&key(1)), None);
        assert_eq!(owners.known(&key(2)), Some(owner(2)));
        assert_eq!(owners.table.len() + owners.previous.len(), 2);
    }

    #[test]
    fn parses_proc_net_tcp_rows() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 20 4 30 10 -1
";
        let rows = parse_proc_net_tcp(text);
        let localhost = IpAddr::from([127, 0, 0, 1]);
        assert_eq!(rows, [((localhost, 8080, localhost, 50000), 2222)]);
    }

    #[test]
    fn parses_ipv6_and_mapped_endpoints() {
        // ::1 port 443
        assert_eq!(
            parse_endpoint("00000000000000000000000001000000:01BB"),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 443))
        );
        // ::ffff:127.0.0.1 port 80
        assert_eq!(
            parse_endpoint("0000000000000000FFFF00000100007F:0050"),
            Some((IpAddr::from([127, 0, 0, 1]), 80))
        );
        assert_eq!(parse_endpoint("zz:0050"), None);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
    }

    #[test]
    fn finds_the_owner_of_a_live_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let local = client.local_addr().unwrap();
        let remote = client.peer_addr().unwrap();
        let mut owners = SocketOwners::default();
        let owner = owners
            .lookup(&(local.ip(), local.port(), remote.ip(), remote.port()))
            .expect("this test process owns the connection");
        assert_eq!(owner.pid, std::process::id());
    }
}
