//! Resets in and out, and retransmissions: per-segment signals on a connection.

use tracer_common::{
    event::{
        EventKind, IDLE_KNOWN, RESET_IN, RESET_OUT, ROLE_UNKNOWN, ResetEvent, RetransmitEvent,
    },
    state::{Owner, SOCK_RESET_IN},
};

use crate::{
    emit::{emit, header, now_ns},
    kernel::Sock,
    maps::{RECENTLY_CLOSED, SOCKS},
};

/// Who owns `sk`: the live connection's owner, or the owner it had when it just
/// closed (a RST often goes out right after CLOSE: close() with SO_LINGER 0).
fn owner(sk: u64) -> Owner {
    if let Some(state) = SOCKS.get_ptr(sk) {
        // SAFETY: map values stay valid while the program runs.
        let state = unsafe { &*state };
        return Owner {
            pid: state.pid,
            role: state.role,
            comm: state.comm,
        };
    }
    if let Some(owner) = RECENTLY_CLOSED.get_ptr(sk) {
        // SAFETY: as above.
        return unsafe { *owner };
    }
    Owner {
        pid: 0,
        role: ROLE_UNKNOWN,
        comm: [0; 16],
    }
}

fn emit_reset(sock: Sock, direction: u32) -> Result<(), i64> {
    let state = sock.state()?;
    let (idle_jiffies, flags) = if sock.has_idle_stamps() {
        (sock.idle_jiffies().unwrap_or(0), IDLE_KNOWN)
    } else {
        (0, 0)
    };
    let owner = owner(sock.0);
    let conn = sock.endpoints()?;
    let now = now_ns();
    emit(&owner, &conn, || ResetEvent {
        header: header::<ResetEvent>(EventKind::Reset, now, &owner),
        conn,
        direction,
        state,
        idle_jiffies,
        flags,
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
    let owner = owner(sk);
    let conn = sock.endpoints()?;
    let state = sock.state()?;
    let (idle_jiffies, flags) = if sock.has_idle_stamps() {
        (sock.receive_idle_jiffies().unwrap_or(0), IDLE_KNOWN)
    } else {
        (0, 0)
    };
    let total_retrans = sock.total_retrans().unwrap_or(0);
    let now = now_ns();
    emit(&owner, &conn, || RetransmitEvent {
        header: header::<RetransmitEvent>(EventKind::Retransmit, now, &owner),
        conn,
        state,
        idle_jiffies,
        total_retrans,
        flags,
    });
    Ok(())
}
