//! Names of maps, globals and programs in the eBPF object. Both sides use these
//! constants, so a rename cannot silently break loading.

/// Ring buffer carrying every event to userspace.
pub const MAP_EVENTS: &str = "EVENTS";
/// Per-socket connection state, keyed by the kernel socket address (LRU).
pub const MAP_SOCKS: &str = "SOCKS";
/// Owner of each listening socket, keyed by network namespace and port.
pub const MAP_LISTENERS: &str = "LISTENERS";
/// `connect()` calls in flight, keyed by thread (pid_tgid).
pub const MAP_CONNECTS: &str = "CONNECTS";
/// Connections in CLOSE_WAIT, for the leak scan.
pub const MAP_CLOSE_WAITS: &str = "CLOSE_WAITS";
/// Request accounting per pool (process and destination, or listening port).
pub const MAP_POOLS: &str = "POOLS";
/// Owners of connections that just reached CLOSE, keyed by endpoints, for resets
/// sent after the close.
pub const MAP_RECENTLY_CLOSED: &str = "RECENTLY_CLOSED";
/// Per-CPU counters indexed by [`crate::state::Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Load-time global holding [`crate::config::Config`].
pub const GLOBAL_CONFIG: &str = "CONFIG";
/// Load-time global holding [`crate::config::KernelOffsets`].
pub const GLOBAL_OFFSETS: &str = "OFFSETS";
/// Load-time global holding [`crate::config::TracepointOffsets`].
pub const GLOBAL_TP_OFFSETS: &str = "TP_OFFSETS";

/// `tp_btf/inet_sock_set_state`: state changes through a BTF tracepoint.
pub const PROG_SET_STATE_BTF: &str = "inet_sock_set_state_btf";
/// `sock:inet_sock_set_state`: the classic tracepoint fallback.
pub const PROG_SET_STATE_TP: &str = "inet_sock_set_state_tp";
/// `fentry/tcp_set_state`: state changes through a BPF trampoline.
pub const PROG_SET_STATE_FENTRY: &str = "tcp_set_state_fentry";
/// `kprobe/tcp_set_state`: state changes through a kprobe.
pub const PROG_SET_STATE_KPROBE: &str = "tcp_set_state_kprobe";
pub const PROG_RECEIVE_RESET: &str = "tcp_receive_reset";
pub const PROG_SEND_RESET: &str = "tcp_send_reset";
/// `kprobe/tcp_v4_send_reset` and `kprobe/tcp_v6_send_reset`: resets that
/// answer a segment, before 6.10.
pub const PROG_SEND_RESET_KPROBE: &str = "tcp_send_reset_kprobe";
pub const PROG_RETRANSMIT: &str = "tcp_retransmit_skb";
pub const PROG_CONNECT_ENTER: &str = "sys_enter_connect";
pub const PROG_CONNECT_EXIT: &str = "sys_exit_connect";
pub const PROG_ACCEPT_EXIT: &str = "sys_exit_accept";
/// `tp_btf/sock_send_length`: sends, for reuse after idle.
pub const PROG_SEND_BTF: &str = "sock_send_length_btf";
/// `tp_btf/sock_recv_length`: reads, for request accounting.
pub const PROG_RECV_BTF: &str = "sock_recv_length_btf";
/// `fexit/tcp_sendmsg`: sends, where `sock_send_length` is missing (before 6.3).
pub const PROG_SEND_FEXIT: &str = "tcp_sendmsg_fexit";
/// `fentry/tcp_cleanup_rbuf`: reads, where `sock_recv_length` is missing.
pub const PROG_RECV_FENTRY: &str = "tcp_cleanup_rbuf_fentry";
/// Never attached: a program every kernel must refuse (`tracer probe
/// --broken-program`), to show that a bad offset ends in a readable error.
pub const PROG_BROKEN: &str = "broken_unresolved_offset";
