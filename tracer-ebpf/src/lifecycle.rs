//! A connection's life from its state changes: open, first FIN or RST, the
//! process's own close after the peer's, and CLOSE. One `open` and one `close`
//! event per connection and side.

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use tracer_common::{
    event::{
        CLOSE_AWAITING_REPLY, CLOSE_DURATION_KNOWN, CLOSE_IDLE_KNOWN, CLOSE_WAIT_KNOWN, CloseEvent,
        ClosedBy, ConnectErrorEvent, OpenEvent, ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN,
    },
    state::{
        CloseWait, ClosedConn, Counter, ListenerKey, Owner, SOCK_AWAITING_REPLY,
        SOCK_CLOSE_WAIT_DONE, SOCK_CLOSING, SOCK_IDLE_KNOWN, SOCK_OPEN_EMITTED, SOCK_RESET_IN,
        SockState,
    },
    tcp::*,
};

use crate::{
    emit::{current_owner, emit, header, now_ns},
    kernel::Sock,
    maps::{CLOSE_WAITS, CONNECTS, FAILED_CONNECTS, LISTENERS, RECENTLY_CLOSED, SOCKS, count},
};

#[inline(always)]
pub fn on_state_change(sk: u64, old: u32, new: u32) -> Result<(), i64> {
    let sock = Sock(sk);
    if sock.protocol()? != IPPROTO_TCP {
        return Ok(());
    }
    let now = now_ns();
    match (old, new) {
        (TCP_CLOSE, TCP_LISTEN) => listening(sock),
        (TCP_LISTEN, TCP_CLOSE) => {
            let _ = LISTENERS.remove(listener_key(sock)?);
            Ok(())
        }
        (TCP_CLOSE, TCP_SYN_SENT) => connecting(sk, now),
        (TCP_SYN_SENT, TCP_ESTABLISHED) => client_established(sock, now),
        (TCP_SYN_RECV, TCP_ESTABLISHED) => server_established(sock, now),
        (TCP_SYN_SENT, TCP_CLOSE) => connect_failed(sock, now),
        // The process called close() or shutdown(): process context.
        (TCP_ESTABLISHED, TCP_FIN_WAIT1) => first_fin(sock, now, ClosedBy::Local, true),
        // The peer's FIN arrived: softirq, the current task is nobody in particular.
        (TCP_ESTABLISHED, TCP_CLOSE_WAIT) => first_fin(sock, now, ClosedBy::Peer, false),
        (TCP_CLOSE_WAIT, TCP_LAST_ACK) => closed_after_peer(sock, now),
        (_, TCP_CLOSE) => closed(sock, old, now),
        _ => Ok(()),
    }
}

#[inline(always)]
fn listener_key(sock: Sock) -> Result<ListenerKey, i64> {
    Ok(ListenerKey {
        netns: sock.netns()?,
        port: sock.local_port()?,
        _pad: 0,
    })
}

/// listen(): process context, the caller owns the listener.
#[inline(never)]
fn listening(sock: Sock) -> Result<(), i64> {
    let owner = current_owner(ROLE_SERVER);
    LISTENERS
        .insert(listener_key(sock)?, owner, 0)
        .map_err(i64::from)
}

#[inline(always)]
fn new_state(owner: &Owner, tid: u32) -> SockState {
    SockState {
        pid: owner.pid,
        tid,
        comm: owner.comm,
        role: owner.role,
        flags: 0,
        syn_ns: 0,
        open_ns: 0,
        accept_ns: 0,
        first_close_ns: 0,
        close_wait_ns: 0,
        idle_jiffies: 0,
        closed_by: ClosedBy::Unknown as u32,
    }
}

#[inline(always)]
fn owner_of(state: &SockState) -> Owner {
    Owner {
        pid: state.pid,
        role: state.role,
        comm: state.comm,
    }
}

#[inline(always)]
fn insert(sk: u64, state: &SockState) -> Result<&'static mut SockState, i64> {
    if SOCKS.insert(sk, state, 0).is_err() {
        count(Counter::SockStateInsertFailed);
        return Err(-1);
    }
    count(Counter::SockStateInserted);
    lookup(sk)
}

#[inline(always)]
fn forget(sk: u64) {
    if SOCKS.remove(sk).is_ok() {
        count(Counter::SockStateRemoved);
    }
}

#[inline(always)]
fn lookup(sk: u64) -> Result<&'static mut SockState, i64> {
    match SOCKS.get_ptr_mut(sk) {
        // SAFETY: map values stay valid while the program runs.
        Some(state) => Ok(unsafe { &mut *state }),
        None => Err(-1),
    }
}

/// The state of a socket first seen mid-life (it existed before the agent started,
/// or its entry was evicted): role unknown, owner the current task only when the
/// transition happens in process context.
#[inline(always)]
fn lookup_or_adopt(sk: u64, process_context: bool) -> Result<&'static mut SockState, i64> {
    if let Ok(state) = lookup(sk) {
        if process_context && state.pid == 0 {
            let owner = current_owner(state.role);
            state.pid = owner.pid;
            state.comm = owner.comm;
        }
        return Ok(state);
    }
    let owner = if process_context {
        current_owner(ROLE_UNKNOWN)
    } else {
        Owner {
            pid: 0,
            role: ROLE_UNKNOWN,
            comm: [0; 16],
        }
    };
    insert(sk, &new_state(&owner, 0))
}

/// connect(): process context. A stale entry left by a reused socket address is
/// overwritten.
#[inline(never)]
fn connecting(sk: u64, now: u64) -> Result<(), i64> {
    let _ = FAILED_CONNECTS.remove(sk);
    let owner = current_owner(ROLE_CLIENT);
    let mut state = new_state(&owner, bpf_get_current_pid_tgid() as u32);
    state.syn_ns = now;
    insert(sk, &state).map(|_| ())
}

#[inline(never)]
fn client_established(sock: Sock, now: u64) -> Result<(), i64> {
    let state = match lookup(sock.0) {
        Ok(state) => state,
        Err(_) => {
            // connect() began before the agent: a client whose process is unknown.
            let owner = Owner {
                pid: 0,
                role: ROLE_CLIENT,
                comm: [0; 16],
            };
            insert(sock.0, &new_state(&owner, 0))?
        }
    };
    state.open_ns = now;
    state.flags |= SOCK_OPEN_EMITTED;
    let connect_ns = if state.syn_ns != 0 {
        now - state.syn_ns
    } else {
        0
    };
    emit_open(sock, state, now, connect_ns, 0)
}

/// The handshake of an accepted connection completed: softirq. The owner is the
/// listener's until the process accepts it (see `syscalls::on_accept_exit`), which
/// is also when the open event goes out.
#[inline(never)]
fn server_established(sock: Sock, now: u64) -> Result<(), i64> {
    let owner = match LISTENERS.get_ptr(listener_key(sock)?) {
        // SAFETY: map values stay valid while the program runs.
        Some(owner) => unsafe { *owner },
        None => Owner {
            pid: 0,
            role: ROLE_SERVER,
            comm: [0; 16],
        },
    };
    let mut state = new_state(&owner, 0);
    state.role = ROLE_SERVER;
    state.open_ns = now;
    insert(sock.0, &state).map(|_| ())
}

#[inline(always)]
pub fn emit_open(
    sock: Sock,
    state: &SockState,
    now: u64,
    connect_ns: u64,
    accept_wait_ns: u64,
) -> Result<(), i64> {
    let conn = sock.endpoints()?;
    let owner = owner_of(state);
    let ts = if state.open_ns != 0 {
        state.open_ns
    } else {
        now
    };
    emit(&owner, &conn, |event: &mut OpenEvent| {
        event.header = header::<OpenEvent>(ts, &owner);
        event.conn = conn;
        event.connect_ns = connect_ns;
        event.accept_wait_ns = accept_wait_ns;
    });
    Ok(())
}

/// SYN_SENT to CLOSE: the connection never opened. When the kernel recorded an
/// error (refused, timed out, unreachable) it is reported here, and the connect()
/// call is marked so that its return value is not reported twice. Failures without
/// `sk_err` (EADDRNOTAVAIL while picking a port) are left to the syscall exit.
#[inline(never)]
fn connect_failed(sock: Sock, now: u64) -> Result<(), i64> {
    let Ok(state) = lookup(sock.0) else {
        return Ok(());
    };
    let errno = sock.err().unwrap_or(0);
    if errno != 0 {
        let _ = FAILED_CONNECTS.insert(sock.0, now, 0);
        let owner = owner_of(state);
        let conn = sock.endpoints()?;
        let connect_ns = if state.syn_ns != 0 {
            now - state.syn_ns
        } else {
            0
        };
        emit(&owner, &conn, |event: &mut ConnectErrorEvent| {
            event.header = header::<ConnectErrorEvent>(now, &owner);
            event.conn = conn;
            event.connect_ns = connect_ns;
            event.errno = errno;
        });
        let tid_key = ((state.pid as u64) << 32) | state.tid as u64;
        if let Some(call) = CONNECTS.get_ptr_mut(tid_key) {
            // SAFETY: map values stay valid while the program runs.
            let call = unsafe { &mut *call };
            if call.sk == sock.0 {
                call.reported = 1;
            }
        }
    }
    forget(sock.0);
    Ok(())
}

/// The first FIN or RST on an established connection: remember when, how long the
/// connection had been idle, and whether a request was outstanding.
#[inline(always)]
fn mark_first_close(sock: Sock, state: &mut SockState, now: u64, by: ClosedBy) {
    state.flags |= SOCK_CLOSING | SOCK_IDLE_KNOWN;
    if sock
        .awaiting_reply(state.role == ROLE_SERVER)
        .unwrap_or(false)
    {
        state.flags |= SOCK_AWAITING_REPLY;
    }
    state.first_close_ns = now;
    state.closed_by = by as u32;
    state.idle_jiffies = sock.idle_jiffies().unwrap_or(0);
}

/// The first FIN, sent (`Local`) or received (`Peer`). A peer's FIN starts
/// CLOSE_WAIT, which the leak scan watches until the process closes its side.
#[inline(never)]
fn first_fin(sock: Sock, now: u64, by: ClosedBy, process_context: bool) -> Result<(), i64> {
    let state = lookup_or_adopt(sock.0, process_context)?;
    if state.flags & SOCK_CLOSING != 0 {
        return Ok(());
    }
    mark_first_close(sock, state, now, by);
    if by == ClosedBy::Peer {
        let waiting = CloseWait {
            owner: owner_of(state),
            conn: sock.endpoints()?,
            since_ns: now,
        };
        let _ = CLOSE_WAITS.insert(sock.0, waiting, 0);
    }
    Ok(())
}

/// CLOSE_WAIT to LAST_ACK: the process finally closed a connection its peer had
/// closed. Process context.
#[inline(never)]
fn closed_after_peer(sock: Sock, now: u64) -> Result<(), i64> {
    // First: the socket table may be full, and CLOSE will not remove it again.
    let _ = CLOSE_WAITS.remove(sock.0);
    let state = lookup_or_adopt(sock.0, true)?;
    if state.flags & SOCK_CLOSING != 0 && state.flags & SOCK_CLOSE_WAIT_DONE == 0 {
        state.flags |= SOCK_CLOSE_WAIT_DONE;
        state.close_wait_ns = now - state.first_close_ns;
    }
    Ok(())
}

/// How a connection that reached CLOSE without an earlier FIN ended.
#[inline(always)]
fn abort_cause(state: &SockState, old: u32, errno: u32) -> ClosedBy {
    const EPIPE: u32 = 32;
    const ECONNABORTED: u32 = 103;
    const ECONNRESET: u32 = 104;
    // Before CLOSE is traced only tcp_reset() sets these two: a peer's RST, even
    // on a connection whose reset event found no state (it predates the agent).
    if state.flags & SOCK_RESET_IN != 0 || matches!(errno, ECONNRESET | EPIPE) {
        ClosedBy::ResetPeer
    } else if errno == ECONNABORTED {
        // An administrator killed it (`ss -K`).
        ClosedBy::ResetLocal
    } else if errno != 0 {
        ClosedBy::Timeout
    } else if matches!(old, TCP_ESTABLISHED | TCP_SYN_RECV | TCP_CLOSE_WAIT) {
        // Only an abort goes straight from these states to CLOSE without an error:
        // close() with SO_LINGER 0 or unread data, which sends a RST right after.
        ClosedBy::ResetLocal
    } else {
        ClosedBy::Unknown
    }
}

#[inline(never)]
fn closed(sock: Sock, old: u32, now: u64) -> Result<(), i64> {
    // CLOSE_WAIT ends here only when the process aborted it; otherwise its
    // LAST_ACK removed the entry (a delete per connection is not free). Before
    // the lookup, which fails when the socket table is full.
    if old == TCP_CLOSE_WAIT {
        let _ = CLOSE_WAITS.remove(sock.0);
    }
    let state = match lookup(sock.0) {
        Ok(state) => state,
        // A half-open socket that never became a connection: nothing to report.
        Err(_) if matches!(old, TCP_SYN_RECV | TCP_NEW_SYN_RECV | TCP_LISTEN) => return Ok(()),
        Err(_) => lookup_or_adopt(sock.0, false)?,
    };
    let errno = sock.err().unwrap_or(0);
    if state.flags & SOCK_CLOSING == 0 {
        let cause = abort_cause(state, old, errno);
        if old == TCP_ESTABLISHED {
            mark_first_close(sock, state, now, cause);
        } else {
            state.flags |= SOCK_CLOSING;
            state.first_close_ns = now;
            state.closed_by = cause as u32;
        }
    }
    // The process closed a connection its peer had closed, with unread data:
    // straight from CLOSE_WAIT to CLOSE (and a RST out), still the end of its
    // CLOSE_WAIT.
    if old == TCP_CLOSE_WAIT
        && state.flags & (SOCK_RESET_IN | SOCK_CLOSE_WAIT_DONE) == 0
        && state.closed_by == ClosedBy::Peer as u32
        && errno == 0
    {
        state.flags |= SOCK_CLOSE_WAIT_DONE;
        state.close_wait_ns = now - state.first_close_ns;
    }
    if state.role == ROLE_SERVER && state.flags & SOCK_OPEN_EMITTED == 0 {
        // Closed before the process accepted it: report the open now, on behalf of
        // the listener's owner.
        state.flags |= SOCK_OPEN_EMITTED;
        emit_open(sock, state, now, 0, 0)?;
    }

    let mut flags = 0;
    if state.open_ns != 0 {
        flags |= CLOSE_DURATION_KNOWN;
    }
    if state.flags & SOCK_CLOSE_WAIT_DONE != 0 {
        flags |= CLOSE_WAIT_KNOWN;
    }
    if state.flags & SOCK_IDLE_KNOWN != 0 {
        flags |= CLOSE_IDLE_KNOWN;
    }
    if state.flags & SOCK_AWAITING_REPLY != 0 {
        flags |= CLOSE_AWAITING_REPLY;
    }
    let owner = owner_of(state);
    let conn = sock.endpoints()?;
    emit(&owner, &conn, |event: &mut CloseEvent| {
        event.header = header::<CloseEvent>(now, &owner);
        event.conn = conn;
        if state.open_ns != 0 {
            event.duration_ns = now - state.open_ns;
        }
        event.bytes_sent = sock.bytes_sent().unwrap_or(0);
        event.bytes_received = sock.bytes_received().unwrap_or(0);
        event.close_wait_ns = state.close_wait_ns;
        event.idle_jiffies = state.idle_jiffies;
        event.closed_by = state.closed_by;
        event.errno = errno;
        event.flags = flags;
        event.srtt_us = sock.srtt_us().unwrap_or(0);
        event.total_retrans = sock.total_retrans().unwrap_or(0);
    });
    let closed = ClosedConn {
        owner,
        close_ns: now,
        closed_by: state.closed_by,
        _pad: 0,
    };
    // Resets that follow CLOSE come from the side that closed first (its
    // TIME_WAIT remnant answers late segments) or from an abort: close() with
    // unread data or SO_LINGER 0 sets CLOSE, then sends the RST, also from
    // LAST_ACK after a shutdown(). The side that closed last, its FIN acked
    // after the process let go of the socket (orphaned: no `struct socket`),
    // leaves no remnant: late segments find no socket, and their resets carry
    // none. That spares half of a connection's inserts into this table, which
    // is full under any steady stream of connections, so that every insert
    // evicts. (A peer sending data after its own FIN to such a socket is
    // answered with a reset after CLOSE; that reset goes without an owner.)
    let passive_end = old == TCP_LAST_ACK && matches!(sock.socket(), Ok(0));
    if !passive_end {
        let _ = RECENTLY_CLOSED.insert(conn, closed, 0);
    }
    forget(sock.0);
    Ok(())
}
