//! Resets in and out, and retransmissions: per-segment signals on a connection.

use tracer_common::{
    event::{
        Endpoints, IDLE_KNOWN, RESET_AFTER_CLOSE, RESET_AWAITING_REPLY, RESET_IN, RESET_OUT,
        ROLE_SERVER, ROLE_UNKNOWN, ResetEvent, RetransmitEvent,
    },
    state::{ClosedConn, Owner, SOCK_RESET_IN},
};

use crate::{
    emit::{emit, header, now_ns},
    kernel::Sock,
    maps::{RECENTLY_CLOSED, SOCKS},
};

/// Who owns the connection, and when it closed if it already has: the live
/// connection's owner, else the owner it had when it reached CLOSE. A RST often
/// goes out after CLOSE: close() with SO_LINGER 0 sends it right after, and data
/// arriving at a TIME_WAIT remnant (another kernel object with the same
/// endpoints) is answered with one.
fn owner(sock: Sock, conn: &Endpoints) -> (Owner, Option<ClosedConn>) {
    if let Some(state) = SOCKS.get_ptr(sock.0) {
        // SAFETY: map values stay valid while the program runs.
        let state = unsafe { &*state };
        let owner = Owner {
            pid: state.pid,
            role: state.role,
            comm: state.comm,
        };
        return (owner, None);
    }
    if let Some(closed) = RECENTLY_CLOSED.get_ptr(conn) {
        // SAFETY: as above.
        let closed = unsafe { *closed };
        return (closed.owner, Some(closed));
    }
    let unknown = Owner {
        pid: 0,
        role: ROLE_UNKNOWN,
        comm: [0; 16],
    };
    (unknown, None)
}

fn emit_reset(sock: Sock, direction: u32) -> Result<(), i64> {
    let state = sock.state()?;
    let (idle_jiffies, mut flags) = if sock.has_idle_stamps() {
        (sock.idle_jiffies().unwrap_or(0), IDLE_KNOWN)
    } else {
        (0, 0)
    };
    let conn = sock.endpoints()?;
    let (owner, closed) = owner(sock, &conn);
    if flags & IDLE_KNOWN != 0
        && sock
            .awaiting_reply(owner.role == ROLE_SERVER)
            .unwrap_or(false)
    {
        flags |= RESET_AWAITING_REPLY;
    }
    let now = now_ns();
    let (since_close_ns, closed_by) = match closed {
        Some(closed) => {
            flags |= RESET_AFTER_CLOSE;
            (now.saturating_sub(closed.close_ns), closed.closed_by)
        }
        None => (0, 0),
    };
    emit(&owner, &conn, |event: &mut ResetEvent| {
        event.header = header::<ResetEvent>(now, &owner);
        event.conn = conn;
        event.direction = direction;
        event.state = state;
        event.idle_jiffies = idle_jiffies;
        event.flags = flags;
        event.since_close_ns = since_close_ns;
        event.closed_by = closed_by;
    });
    Ok(())
}

pub fn on_reset_received(sk: u64) -> Result<(), i64> {
    if let Some(state) = SOCKS.get_ptr_mut(sk) {
        // SAFETY: map values stay valid while the program runs.
        unsafe { (*state).flags |= SOCK_RESET_IN };
    }
    emit_reset(Sock(sk), RESET_IN)
}

pub fn on_reset_sent(sk: u64) -> Result<(), i64> {
    // A RST answering a segment that matched no socket carries no socket.
    if sk == 0 {
        return Ok(());
    }
    emit_reset(Sock(sk), RESET_OUT)
}

pub fn on_retransmit(sk: u64) -> Result<(), i64> {
    let sock = Sock(sk);
    if !sock.is_full() {
        return Ok(());
    }
    let conn = sock.endpoints()?;
    let (owner, _) = owner(sock, &conn);
    let state = sock.state()?;
    let (idle_jiffies, flags) = if sock.has_idle_stamps() {
        (sock.receive_idle_jiffies().unwrap_or(0), IDLE_KNOWN)
    } else {
        (0, 0)
    };
    let total_retrans = sock.total_retrans().unwrap_or(0);
    let now = now_ns();
    emit(&owner, &conn, |event: &mut RetransmitEvent| {
        event.header = header::<RetransmitEvent>(now, &owner);
        event.conn = conn;
        event.state = state;
        event.idle_jiffies = idle_jiffies;
        event.total_retrans = total_retrans;
        event.flags = flags;
    });
    Ok(())
}
