//! Sends after idleness: the moment a pooled connection is reused, and whether the
//! peer had already closed it. Busy connections emit nothing.

use core::ffi::c_void;

use tracer_common::{
    event::{REUSE_PEER_CLOSED, ROLE_UNKNOWN, ReuseEvent},
    state::{LOCAL_PEER_FIN, LOCAL_RESPONDER, LOCAL_SENT, LOCAL_STALE_REPORTED, SockLocal},
};

use crate::{
    emit::{current_owner, emit, header, now_ns},
    globals::config,
    kernel::{Sock, since},
    local::storage,
    maps::{RECENTLY_CLOSED, SOCKS},
};

/// The peer's FIN arrived: remember it where the send hook looks. Reading the
/// state after a send would be too late, as the peer's answer to the send (a RST)
/// can be processed inside the send call on loopback.
pub fn peer_closed(sk: *mut c_void) {
    // Only TCP sockets may have storage: the send and read hooks take its
    // presence for proof that the socket is one (DCCP and MPTCP change state
    // through the same tracepoint).
    let sock = Sock(sk as u64);
    if !matches!(sock.is_tcp(), Ok(true)) {
        return;
    }
    let Ok(write_seq) = sock.write_seq() else {
        return;
    };
    if let Some(local) = storage(sk, true) {
        local.flags |= LOCAL_PEER_FIN;
        local.fin_write_seq = write_seq;
    }
}

/// A read by the process: the connection is in use, whatever came in. Only
/// sockets that ask (clients) are checked for reuse.
#[inline(always)]
pub fn on_receive(local: &mut SockLocal) {
    if local.flags & LOCAL_RESPONDER == 0 {
        local.last_active_ns = now_ns();
    }
}

/// A send of `bytes` on a classified socket: report it when it reuses the
/// connection after idleness, or when the peer had already closed it.
///
/// Idleness is timed on CLOCK_MONOTONIC from the process's own previous send or
/// read: the clock pools and servers time their idle timeouts with. The
/// kernel's TCP stamps count jiffies, which fall behind it while the CPU that
/// advances them is starved (a loaded VM), so that a pool's 500 ms idle could
/// measure under a 250 ms threshold; they are only used for a connection this
/// program has not seen used yet.
#[inline(never)]
pub fn on_send(sock: Sock, local: &mut SockLocal, bytes: u32) -> Result<(), i64> {
    let now = now_ns();
    let previous = local.last_active_ns;
    local.last_active_ns = now;
    // Most sends, and all of a busy connection's: a server's reply, or a send
    // within --min-idle of the process's previous send or read before any FIN
    // from the peer, can be neither a reuse nor stale. No kernel reads for those.
    if local.flags & LOCAL_SENT != 0
        && (local.flags & LOCAL_RESPONDER != 0
            || (local.flags & LOCAL_PEER_FIN == 0
                && now.saturating_sub(previous) < config!(min_idle_ns)))
    {
        return Ok(());
    }
    // The connection's first payload is no reuse; neither is a server's reply,
    // whose wait is processing time.
    let first_payload =
        local.flags & LOCAL_SENT == 0 && sock.bytes_sent()?.saturating_sub(bytes as u64) == 0;
    let idle_ns = if previous != 0 {
        now.saturating_sub(previous)
    } else {
        // Used before this program saw it: since payload last came in (the
        // send stamp is this very send's).
        since(sock.last_receive_jiffies()?) as u64 * config!(jiffy_ns) as u64
    };
    local.flags |= LOCAL_SENT;

    // A server answering after its client half-closed is not reusing anything.
    let stale = local.flags & (LOCAL_PEER_FIN | LOCAL_STALE_REPORTED | LOCAL_RESPONDER)
        == LOCAL_PEER_FIN
        && (local
            .fin_write_seq
            .wrapping_sub(sock.write_seq()?.wrapping_sub(bytes)) as i32)
            <= 0;
    let reuse =
        !first_payload && local.flags & LOCAL_RESPONDER == 0 && idle_ns >= config!(min_idle_ns);
    if !stale && !reuse {
        return Ok(());
    }
    let mut flags = 0;
    if stale {
        local.flags |= LOCAL_STALE_REPORTED;
        flags |= REUSE_PEER_CLOSED;
    }
    let conn = sock.endpoints()?;
    // The peer's answer may already have closed the connection inside this send.
    let role = if let Some(tracked) = SOCKS.get_ptr(sock.0) {
        // SAFETY: map values stay valid while the program runs.
        unsafe { (*tracked).role }
    } else if let Some(closed) = RECENTLY_CLOSED.get_ptr(conn) {
        // SAFETY: as above.
        unsafe { (*closed).owner.role }
    } else {
        ROLE_UNKNOWN
    };
    let owner = current_owner(role);
    let tcp_state = sock.state()?;
    emit(&owner, &conn, |event: &mut ReuseEvent| {
        event.header = header::<ReuseEvent>(now, &owner);
        event.conn = conn;
        event.idle_ns = idle_ns;
        event.bytes = bytes;
        event.state = tcp_state;
        event.flags = flags;
    });
    Ok(())
}
