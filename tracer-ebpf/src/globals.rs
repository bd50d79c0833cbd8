//! Load-time globals. Userspace overwrites them before loading and the kernel
//! freezes them, so every read below is a verifier-known constant. The volatile
//! reads stop the compiler from folding in the zero placeholders.

use tracer_common::config::{Config, KernelOffsets, TracepointOffsets};

#[unsafe(no_mangle)]
pub(crate) static CONFIG: Config = Config {
    filters: 0,
    filter_pid: 0,
    filter_port: 0,
    _pad: 0,
    state_source: 0,
    min_idle_ns: 0,
    jiffy_ns: 0,
    wakeup_bytes: 0,
    filter_comm: [0; 16],
};

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_state: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    sk_protocol: 0,
    sk_type: 0,
    sk_err: 0,
    sk_socket: 0,
    sk_flags: 0,
    sock_done_bit: 0,
    inet_sport: 0,
    tcp_lsndtime: 0,
    tcp_bytes_sent: 0,
    tcp_bytes_retrans: 0,
    tcp_bytes_received: 0,
    tcp_srtt_us: 0,
    tcp_total_retrans: 0,
    tcp_write_seq: 0,
    icsk_ack_lrcvtime: 0,
    net_ns_inum: 0,
    task_files: 0,
    task_group_leader: 0,
    task_comm: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
};

#[unsafe(no_mangle)]
static TP_OFFSETS: TracepointOffsets = TracepointOffsets {
    set_state_skaddr: 0,
    set_state_oldstate: 0,
    set_state_newstate: 0,
    receive_reset_skaddr: 0,
    send_reset_skaddr: 0,
    retransmit_skaddr: 0,
    connect_fd: 0,
    connect_uservaddr: 0,
    sys_exit_ret: 0,
    retransmit_err: 0,
    send_reset_skbaddr: 0,
    _pad: 0,
};

/// Reads one field of the config. Field by field: a volatile read of the whole
/// struct is done byte by byte, a stack slot per byte of `filter_comm`.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: a plain read of a field of a static.
        unsafe { core::ptr::read_volatile(&raw const $crate::globals::CONFIG.$field) }
    };
}
pub(crate) use config;

/// `filter_comm` as two words (the config is 8-aligned, and so is it).
#[inline(always)]
pub fn filter_comm() -> [u64; 2] {
    // SAFETY: as above; the cast keeps size and alignment.
    unsafe { core::ptr::read_volatile((&raw const CONFIG.filter_comm).cast::<[u64; 2]>()) }
}

#[inline(always)]
pub fn offsets() -> &'static KernelOffsets {
    &OFFSETS
}

#[inline(always)]
pub fn tp_offsets() -> TracepointOffsets {
    // SAFETY: a plain read of a static.
    unsafe { core::ptr::read_volatile(&TP_OFFSETS) }
}

/// Reads one offset field without letting the compiler assume its value.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a plain read of a field of a static.
        (unsafe { core::ptr::read_volatile(&$crate::globals::offsets().$field) }) as u64
    };
}
pub(crate) use offset;
