//! Every read of kernel memory, at offsets resolved from the running kernel's BTF.

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_jiffies64, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
};
use tracer_common::{
    comm_through_nul,
    event::Endpoints,
    tcp::{
        AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN, TCP_NEW_SYN_RECV, TCP_SYN_RECV, TCP_SYN_SENT,
        TCP_TIME_WAIT,
    },
};

use crate::globals::offset;

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|e| e as i64)
}

/// A kernel `struct sock *` (a full socket, or the `sock_common` of a mini socket).
#[derive(Clone, Copy)]
pub struct Sock(pub u64);

impl Sock {
    #[inline(always)]
    pub fn protocol(self) -> Result<u16, i64> {
        read(self.0 + offset!(sk_protocol))
    }

    /// A TCP stream socket. Raw sockets can carry protocol 6 too, and have no
    /// `tcp_sock` behind them.
    #[inline(always)]
    pub fn is_tcp(self) -> Result<bool, i64> {
        const SOCK_STREAM: u16 = 1;
        Ok(self.protocol()? == IPPROTO_TCP
            && read::<u16>(self.0 + offset!(sk_type))? == SOCK_STREAM)
    }

    #[inline(always)]
    pub fn state(self) -> Result<u32, i64> {
        read::<u8>(self.0 + offset!(skc_state)).map(u32::from)
    }

    /// TIME_WAIT and NEW_SYN_RECV sockets are mini sockets: only their
    /// `sock_common` part exists, so no `struct sock`/`tcp_sock` field may be read.
    #[inline(always)]
    pub fn is_full(self) -> bool {
        !matches!(self.state(), Ok(TCP_TIME_WAIT | TCP_NEW_SYN_RECV) | Err(_))
    }

    pub fn endpoints(self) -> Result<Endpoints, i64> {
        let mut conn = Endpoints {
            family: read(self.0 + offset!(skc_family))?,
            lport: self.local_port()?,
            rport: u16::from_be(read(self.0 + offset!(skc_dport))?),
            ..Endpoints::default()
        };
        if conn.family == AF_INET {
            let laddr: [u8; 4] = read(self.0 + offset!(skc_rcv_saddr))?;
            let raddr: [u8; 4] = read(self.0 + offset!(skc_daddr))?;
            conn.laddr[..4].copy_from_slice(&laddr);
            conn.raddr[..4].copy_from_slice(&raddr);
        } else if conn.family == AF_INET6 {
            read_buf(self.0 + offset!(skc_v6_rcv_saddr), &mut conn.laddr)?;
            read_buf(self.0 + offset!(skc_v6_daddr), &mut conn.raddr)?;
        }
        Ok(conn)
    }

    /// Inode number of the socket's network namespace.
    #[inline(always)]
    pub fn netns(self) -> Result<u32, i64> {
        let net: u64 = read(self.0 + offset!(skc_net))?;
        read(net + offset!(net_ns_inum))
    }

    /// The local port. `skc_num` is cleared when a closing socket gives its port
    /// back, before the CLOSE state change is traced; `inet_sport` keeps it. Mini
    /// sockets have no `inet_sock`, but keep `skc_num`.
    #[inline(always)]
    pub fn local_port(self) -> Result<u16, i64> {
        if self.is_full() {
            read::<u16>(self.0 + offset!(inet_sport)).map(u16::from_be)
        } else {
            read(self.0 + offset!(skc_num))
        }
    }

    /// `sk_err`: the error that ended the connection, as a positive errno.
    #[inline(always)]
    pub fn err(self) -> Result<u32, i64> {
        read::<i32>(self.0 + offset!(sk_err)).map(|e| e.unsigned_abs())
    }

    #[inline(always)]
    pub fn socket(self) -> Result<u64, i64> {
        read(self.0 + offset!(sk_socket))
    }

    /// Whether the TCP idle stamps hold times: the handshake is over and the socket
    /// is a full one.
    #[inline(always)]
    pub fn has_idle_stamps(self) -> bool {
        !matches!(
            self.state(),
            Ok(TCP_SYN_SENT | TCP_SYN_RECV | TCP_LISTEN | TCP_TIME_WAIT | TCP_NEW_SYN_RECV)
                | Err(_)
        )
    }

    /// Jiffies since payload last went out or came in, whichever is later.
    /// Both stamps are 32-bit jiffies (`tcp_jiffies32`), compared with wrap-around.
    pub fn idle_jiffies(self) -> Result<u32, i64> {
        let sent: u32 = read(self.0 + offset!(tcp_lsndtime))?;
        let received = self.last_receive_jiffies()?;
        let last = if (sent.wrapping_sub(received) as i32) > 0 {
            sent
        } else {
            received
        };
        Ok(since(last))
    }

    /// Jiffies since payload last came in from the peer.
    #[inline(always)]
    pub fn receive_idle_jiffies(self) -> Result<u32, i64> {
        Ok(since(self.last_receive_jiffies()?))
    }

    /// `tcp_sock.write_seq`: the sequence number after the last byte the process
    /// handed to the socket.
    #[inline(always)]
    pub fn write_seq(self) -> Result<u32, i64> {
        read(self.0 + offset!(tcp_write_seq))
    }

    /// When payload last came in (the handshake's time before any did).
    #[inline(always)]
    pub fn last_receive_jiffies(self) -> Result<u32, i64> {
        read(self.0 + offset!(icsk_ack_lrcvtime))
    }

    /// Whether a request is outstanding: on a side that asks (a client), its
    /// last payload went out with nothing received after it; on a side that
    /// `answers` (a server), a request came in after its last reply. A peer's
    /// bare FIN moves neither stamp. In jiffies: an exchange within one tick
    /// counts as answered.
    #[inline(always)]
    pub fn awaiting_reply(self, answers: bool) -> Result<bool, i64> {
        let sent: u32 = read(self.0 + offset!(tcp_lsndtime))?;
        let received = self.last_receive_jiffies()?;
        let (last, before) = if answers {
            (received, sent)
        } else {
            (sent, received)
        };
        Ok((last.wrapping_sub(before) as i32) > 0)
    }

    /// Payload bytes sent, retransmissions counted once. (`bytes_acked` would
    /// count the SYN and FIN sequence numbers too.)
    #[inline(always)]
    pub fn bytes_sent(self) -> Result<u64, i64> {
        let sent: u64 = read(self.0 + offset!(tcp_bytes_sent))?;
        let retransmitted: u64 = read(self.0 + offset!(tcp_bytes_retrans))?;
        Ok(sent.saturating_sub(retransmitted))
    }

    /// Payload bytes received. The kernel's counter follows `rcv_nxt`, which the
    /// peer's FIN advances by one when this socket (not its TIME_WAIT successor)
    /// processes it; `SOCK_DONE` is set exactly then.
    #[inline(always)]
    pub fn bytes_received(self) -> Result<u64, i64> {
        let received: u64 = read(self.0 + offset!(tcp_bytes_received))?;
        let flags: u64 = read(self.0 + offset!(sk_flags))?;
        let fin = (flags >> offset!(sock_done_bit)) & 1;
        Ok(received.saturating_sub(fin))
    }

    /// Smoothed RTT in microseconds (`srtt_us` holds it shifted left by 3).
    #[inline(always)]
    pub fn srtt_us(self) -> Result<u32, i64> {
        read::<u32>(self.0 + offset!(tcp_srtt_us)).map(|srtt| srtt >> 3)
    }

    #[inline(always)]
    pub fn total_retrans(self) -> Result<u32, i64> {
        read(self.0 + offset!(tcp_total_retrans))
    }
}

#[inline(always)]
fn read_buf(addr: u64, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: bpf_probe_read_kernel_buf checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel_buf(addr as *const u8, dst) }.map_err(|e| e as i64)
}

/// Jiffies from the 32-bit stamp `then` to now. A stamp taken on another CPU
/// just after this one read the clock can be a jiffy ahead: that is no time.
#[inline(always)]
pub fn since(then: u32) -> u32 {
    let elapsed = jiffies32().wrapping_sub(then);
    if (elapsed as i32) < 0 { 0 } else { elapsed }
}

/// The kernel's `tcp_jiffies32`: the low 32 bits of jiffies.
#[inline(always)]
pub fn jiffies32() -> u32 {
    // SAFETY: no arguments, no side effects.
    (unsafe { bpf_jiffies64() }) as u32
}

/// The command name of the current task's thread-group leader, zero after its
/// NUL as `bpf_get_current_comm` would give it.
#[inline(always)]
pub fn group_leader_comm() -> Result<[u8; 16], i64> {
    // SAFETY: no arguments; the result is only ever probe-read.
    let task = unsafe { bpf_get_current_task() };
    let leader: u64 = read(task + offset!(task_group_leader))?;
    let comm: [u64; 2] = read(leader + offset!(task_comm))?;
    // SAFETY: both are 16 plain bytes.
    Ok(unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(comm_through_nul(comm)) })
}

/// The socket behind file descriptor `fd` of the current task, if it is one:
/// current->files->fdt->fd[fd]->private_data (a `struct socket`)->sk. The socket's
/// back pointer must lead to the same `struct socket`, which rejects every file
/// that is not a socket.
pub fn sock_from_fd(fd: i32) -> Result<Sock, i64> {
    if fd < 0 {
        return Err(-1);
    }
    // SAFETY: no arguments; the result is only ever probe-read.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + offset!(task_files))?;
    let fdt: u64 = read(files + offset!(files_fdt))?;
    let max_fds: u32 = read(fdt + offset!(fdtable_max_fds))?;
    if fd as u32 >= max_fds {
        return Err(-1);
    }
    let fds: u64 = read(fdt + offset!(fdtable_fd))?;
    let file: u64 = read(fds + fd as u64 * 8)?;
    if file == 0 {
        return Err(-1);
    }
    let socket: u64 = read(file + offset!(file_private_data))?;
    let sk: u64 = read(socket + offset!(socket_sk))?;
    let sock = Sock(sk);
    if sk == 0 || sock.socket()? != socket {
        return Err(-1);
    }
    Ok(sock)
}
