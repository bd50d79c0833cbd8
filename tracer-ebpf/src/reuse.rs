//! Sends after idleness: the moment a pooled connection is reused, and whether the
//! peer had already closed it. This runs on every send of every socket, so it
//! filters to TCP first and emits nothing for busy connections.

use core::{ffi::c_void, ptr};

use aya_ebpf::{bindings::BPF_SK_STORAGE_GET_F_CREATE, helpers::generated::bpf_sk_storage_get};
use tracer_common::{
    event::{EventKind, REUSE_PEER_CLOSED, ROLE_UNKNOWN, ReuseEvent},
    state::{
        SEND_FIRST_PAYLOAD, SEND_PEER_FIN, SEND_RESPONDER, SEND_SEEN, SEND_STALE_REPORTED,
        SendState,
    },
    tcp::IPPROTO_TCP,
};

use crate::{
    emit::{current_owner, emit, header, now_ns},
    globals::config,
    kernel::{Sock, jiffies32, since},
    maps::{RECENTLY_CLOSED, SEND_STATE, SOCKS},
};

/// The socket's send-hook storage, created on first use. `sk` must be the BTF
/// `struct sock *` a BTF tracepoint received: the helper accepts nothing else.
#[inline(always)]
fn storage(sk: *mut c_void) -> Option<&'static mut SendState> {
    let map = ptr::from_ref(&SEND_STATE).cast_mut().cast::<c_void>();
    // SAFETY: `sk` comes from the tracepoint's arguments; the helper checks it.
    let value =
        unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE.into()) };
    // SAFETY: a non-null result points at this socket's storage.
    unsafe { value.cast::<SendState>().as_mut() }
}

/// The peer's FIN arrived: remember it where the send hook looks. Reading the
/// state after a send would be too late, as the peer's answer to the send (a RST)
/// can be processed inside the send call on loopback.
pub fn peer_closed(sk: *mut c_void) {
    let Ok(write_seq) = Sock(sk as u64).write_seq() else {
        return;
    };
    if let Some(state) = storage(sk) {
        state.flags |= SEND_PEER_FIN;
        state.fin_write_seq = write_seq;
    }
}

pub fn on_send(sk: *mut c_void, bytes: u32) -> Result<(), i64> {
    let sock = Sock(sk as u64);
    if sock.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    let Some(state) = storage(sk) else {
        return Ok(());
    };
    let first_seen = state.flags & SEND_SEEN == 0;
    if first_seen {
        // A socket whose first payload goes out after payload came in is
        // answering its peer (a server): its sends follow requests, and the
        // wait before them is processing time, not idleness. The first payload
        // of a connection is no reuse either.
        let sent_before = sock.bytes_sent()?.saturating_sub(bytes as u64);
        if sent_before == 0 {
            state.flags |= SEND_FIRST_PAYLOAD;
            if sock.bytes_received()? > 0 {
                state.flags |= SEND_RESPONDER;
            }
        }
    }
    // Idle before this send: since the previous send or the last payload
    // received, whichever is later. Before any send seen here, the receive stamp
    // alone.
    let received = sock.last_receive_jiffies()?;
    let last = if !first_seen && (state.last_send_jiffies.wrapping_sub(received) as i32) > 0 {
        state.last_send_jiffies
    } else {
        received
    };
    let idle_jiffies = since(last);
    state.last_send_jiffies = jiffies32();
    state.flags |= SEND_SEEN;
    let first_payload = state.flags & SEND_FIRST_PAYLOAD != 0;
    state.flags &= !SEND_FIRST_PAYLOAD;

    let stale = state.flags & (SEND_PEER_FIN | SEND_STALE_REPORTED) == SEND_PEER_FIN
        && (state
            .fin_write_seq
            .wrapping_sub(sock.write_seq()?.wrapping_sub(bytes)) as i32)
            <= 0;
    let reuse = !first_payload
        && state.flags & SEND_RESPONDER == 0
        && idle_jiffies >= config().min_idle_jiffies;
    if !stale && !reuse {
        return Ok(());
    }
    let mut flags = 0;
    if stale {
        state.flags |= SEND_STALE_REPORTED;
        flags |= REUSE_PEER_CLOSED;
    }
    let conn = sock.endpoints()?;
    // The peer's answer may already have closed the connection inside this send.
    let role = if let Some(tracked) = SOCKS.get_ptr(sk as u64) {
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
    let ts = now_ns();
    emit(&owner, &conn, || ReuseEvent {
        header: header::<ReuseEvent>(EventKind::Reuse, ts, &owner),
        conn,
        idle_jiffies,
        bytes,
        state: tcp_state,
        flags,
    });
    Ok(())
}
