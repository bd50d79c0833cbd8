//! Load-time globals. Userspace fills them before loading; the kernel freezes them
//! read-only, so the verifier sees every offset and filter as a constant.

use crate::COMM_LEN;

/// `Config::state_source`: the `inet_sock_set_state` tracepoint (BTF or
/// classic) reports every state change.
pub const STATE_FROM_TRACEPOINT: u32 = 0;
/// `Config::state_source`: a probe on `tcp_set_state` (fentry or kprobe)
/// reports state changes; the tracepoint only reports sockets starting to
/// listen, which `inet_csk_listen_start` does without `tcp_set_state`.
pub const STATE_FROM_FUNCTION: u32 = 1;

/// `Config::filters` bit: only sockets owned by `filter_pid`.
pub const FILTER_PID: u32 = 1 << 0;
/// `Config::filters` bit: only connections with `filter_port` at either end.
pub const FILTER_PORT: u32 = 1 << 1;
/// `Config::filters` bit: only sockets owned by a process named `filter_comm`.
pub const FILTER_COMM: u32 = 1 << 2;

/// Aligned to 8 so that `filter_comm` is compared in words (see
/// [`crate::event::Endpoints`]).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// `FILTER_*` bits: which filters apply to emitted events.
    pub filters: u32,
    pub filter_pid: u32,
    pub filter_port: u16,
    pub _pad: u16,
    /// `STATE_FROM_*`: which programs report state changes.
    pub state_source: u32,
    /// Sends after at least this many nanoseconds of idleness produce a reuse
    /// event.
    pub min_idle_ns: u64,
    /// Nanoseconds per jiffy (1e9 / CONFIG_HZ): turns the kernel's own idle
    /// stamps into time.
    pub jiffy_ns: u32,
    /// Events are written without waking the reader, which polls; a write that
    /// leaves at least this many bytes waiting wakes it.
    pub wakeup_bytes: u32,
    /// NUL-padded command name.
    pub filter_comm: [u8; COMM_LEN],
}

/// Byte offsets of the kernel struct fields the programs read, resolved by
/// userspace from the running kernel's BTF. Rust eBPF cannot emit CO-RE
/// relocations, so this table is what makes the programs portable across kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    // struct sock_common (at the start of struct sock)
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_net: u32,
    // struct sock
    pub sk_protocol: u32,
    pub sk_type: u32,
    pub sk_err: u32,
    pub sk_socket: u32,
    pub sk_flags: u32,
    /// Bit number of `SOCK_DONE` (enum sock_flags) in `sk_flags`: set when the
    /// peer's FIN was processed.
    pub sock_done_bit: u32,
    // struct inet_sock
    pub inet_sport: u32,
    // struct tcp_sock (struct inet_connection_sock is its first member)
    pub tcp_lsndtime: u32,
    pub tcp_bytes_sent: u32,
    pub tcp_bytes_retrans: u32,
    pub tcp_bytes_received: u32,
    pub tcp_srtt_us: u32,
    pub tcp_total_retrans: u32,
    pub tcp_write_seq: u32,
    pub icsk_ack_lrcvtime: u32,
    // struct net
    pub net_ns_inum: u32,
    // from the current task to the socket behind a file descriptor
    pub task_files: u32,
    pub task_group_leader: u32,
    pub task_comm: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
}

/// Field offsets inside classic tracepoint records, read from tracefs `format`
/// files. They are stable in practice but not ABI, so they are not hard-coded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    pub set_state_skaddr: u32,
    pub set_state_oldstate: u32,
    pub set_state_newstate: u32,
    pub receive_reset_skaddr: u32,
    pub send_reset_skaddr: u32,
    pub retransmit_skaddr: u32,
    pub connect_fd: u32,
    pub connect_uservaddr: u32,
    /// `ret` of `sys_exit_*` records.
    pub sys_exit_ret: u32,
    /// `err` of `tcp_retransmit_skb` (Linux 6.? and later trace failed attempts
    /// too); 0 when the record has no such field.
    pub retransmit_err: u32,
    /// `skbaddr` of `tcp_send_reset`, set only where kprobes on
    /// `tcp_v{4,6}_send_reset` report the resets that answer a segment: before
    /// 6.10 the tracepoint shows those only for IPv6 full sockets, never from
    /// TIME_WAIT remnants. The tracepoint then keeps the others (no skb).
    pub send_reset_skbaddr: u32,
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<Config>() == 48);
    assert!(size_of::<KernelOffsets>() == 33 * 4);
    assert!(size_of::<TracepointOffsets>() == 48);
};

#[cfg(feature = "user")]
crate::impl_pod!(Config, KernelOffsets, TracepointOffsets);
