//! TCP states as the kernel numbers them (`include/net/tcp_states.h`), and the
//! address families and protocol numbers the programs filter on.

pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_SYN_RECV: u32 = 3;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_TIME_WAIT: u32 = 6;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_CLOSING: u32 = 11;
pub const TCP_NEW_SYN_RECV: u32 = 12;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// The name `ss` and the kernel's own tracepoint output use for a state.
pub fn state_name(state: u32) -> &'static str {
    match state {
        TCP_ESTABLISHED => "ESTABLISHED",
        TCP_SYN_SENT => "SYN_SENT",
        TCP_SYN_RECV => "SYN_RECV",
        TCP_FIN_WAIT1 => "FIN_WAIT1",
        TCP_FIN_WAIT2 => "FIN_WAIT2",
        TCP_TIME_WAIT => "TIME_WAIT",
        TCP_CLOSE => "CLOSE",
        TCP_CLOSE_WAIT => "CLOSE_WAIT",
        TCP_LAST_ACK => "LAST_ACK",
        TCP_LISTEN => "LISTEN",
        TCP_CLOSING => "CLOSING",
        TCP_NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}
