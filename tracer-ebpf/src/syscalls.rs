//! `connect()` and `accept()` seen from the syscall tracepoints: the process that
//! accepted a connection, and connect() failures that never reach the TCP state
//! machine's error path.

use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};
use tracer_common::{
    event::{ConnectErrorEvent, Endpoints, ROLE_CLIENT, ROLE_SERVER},
    state::{ConnectCall, SOCK_OPEN_EMITTED},
    tcp::{AF_INET, AF_INET6},
};

use crate::{
    emit::{current_owner, emit, header, now_ns},
    kernel::sock_from_fd,
    lifecycle::emit_open,
    maps::{CONNECTS, FAILED_CONNECTS, SOCKS},
};

const EINTR: i64 = 4;
const EISCONN: i64 = 106;
const EALREADY: i64 = 114;
const EINPROGRESS: i64 = 115;
/// Errors above this are kernel-internal restart codes, never seen by the process.
const MAX_ERRNO: i64 = 511;

/// The destination as the process passed it to connect().
fn destination(uservaddr: u64) -> Result<Endpoints, i64> {
    let read_user = |offset: u64| -> Result<[u8; 4], i64> {
        // SAFETY: bpf_probe_read_user checks the address and fails cleanly.
        unsafe { bpf_probe_read_user((uservaddr + offset) as *const [u8; 4]) }.map_err(|e| e as i64)
    };
    // sockaddr_in / sockaddr_in6: family (u16), port (be16), then the IPv4 address
    // at 4, or flowinfo at 4 and the IPv6 address at 8.
    let head = read_user(0)?;
    let mut conn = Endpoints {
        family: u16::from_ne_bytes([head[0], head[1]]),
        rport: u16::from_be_bytes([head[2], head[3]]),
        ..Endpoints::default()
    };
    if conn.family == AF_INET {
        conn.raddr[..4].copy_from_slice(&read_user(4)?);
    } else if conn.family == AF_INET6 {
        for word in 0..4 {
            let bytes = read_user(8 + word * 4)?;
            conn.raddr[word as usize * 4..word as usize * 4 + 4].copy_from_slice(&bytes);
        }
    } else {
        return Err(-1);
    }
    Ok(conn)
}

pub fn on_connect_enter(fd: i32, uservaddr: u64) -> Result<(), i64> {
    let sock = sock_from_fd(fd)?;
    if !sock.is_tcp()? {
        return Ok(());
    }
    let call = ConnectCall {
        start_ns: now_ns(),
        sk: sock.0,
        conn: destination(uservaddr)?,
        reported: 0,
        _pad: 0,
    };
    CONNECTS
        .insert(bpf_get_current_pid_tgid(), call, 0)
        .map_err(i64::from)
}

pub fn on_connect_exit(ret: i64) -> Result<(), i64> {
    let key = bpf_get_current_pid_tgid();
    let Some(call) = CONNECTS.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: map values stay valid while the program runs.
    let call = unsafe { *call };
    let _ = CONNECTS.remove(key);
    let errno = -ret;
    // Success, a non-blocking connect under way (its outcome arrives through the
    // state change), or an interrupted one that carries on in the background.
    if ret >= 0
        || call.reported != 0
        || FAILED_CONNECTS.get_ptr(call.sk).is_some()
        || matches!(errno, EINPROGRESS | EALREADY | EISCONN | EINTR)
        || errno > MAX_ERRNO
    {
        return Ok(());
    }
    let now = now_ns();
    let owner = current_owner(ROLE_CLIENT);
    let mut conn = call.conn;
    if let Ok(local) = crate::kernel::Sock(call.sk).endpoints() {
        conn.lport = local.lport;
        conn.laddr = local.laddr;
    }
    emit(&owner, &conn, |event: &mut ConnectErrorEvent| {
        event.header = header::<ConnectErrorEvent>(now, &owner);
        event.conn = conn;
        event.connect_ns = now - call.start_ns;
        event.errno = errno as u32;
    });
    Ok(())
}

/// accept() returned a socket: its caller owns the connection from now on, and the
/// open event, held back since the handshake completed, goes out with that owner.
pub fn on_accept_exit(ret: i64) -> Result<(), i64> {
    if ret < 0 {
        return Ok(());
    }
    let sock = sock_from_fd(ret as i32)?;
    let Some(state) = SOCKS.get_ptr_mut(sock.0) else {
        return Ok(());
    };
    // SAFETY: map values stay valid while the program runs.
    let state = unsafe { &mut *state };
    if state.role != ROLE_SERVER || state.flags & SOCK_OPEN_EMITTED != 0 {
        return Ok(());
    }
    let now = now_ns();
    let owner = current_owner(ROLE_SERVER);
    state.pid = owner.pid;
    state.comm = owner.comm;
    state.accept_ns = now;
    state.flags |= SOCK_OPEN_EMITTED;
    let accept_wait_ns = if state.open_ns != 0 {
        now - state.open_ns
    } else {
        0
    };
    emit_open(sock, state, now, 0, accept_wait_ns)
}
