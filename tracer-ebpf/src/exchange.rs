//! Requests and responses on each connection, counted per pool: how many
//! connections are busy, for how long, and how soon a client sends its next
//! request after reading a response. An HTTP/1.1 exchange as it happens on the
//! wire: a request goes out in one write or several, its answer comes back in
//! one read or several (headers and body apart, chunks, a tail held back by
//! Nagle and delayed ACK); the exchange runs from the request's first byte to
//! the answer's last before the next request, and counts once. End-of-file
//! reads never get here (the hooks pass only reads that returned data).

use aya_ebpf::bindings::BPF_NOEXIST;
use tracer_common::state::{
    GAP_BUCKETS, LOCAL_ANSWERED, LOCAL_BUSY, LOCAL_FILTERED_OUT, LOCAL_RESPONDER, PoolStats,
    SockLocal,
};

use tracer_common::tcp::TCP_CLOSE;

use crate::{emit::now_ns, kernel::Sock, maps::POOLS};

/// Atomic add to a map value field that other CPUs update too. The BPF target
/// offers no atomic read-modify-write types in `core`, but LLVM lowers the
/// intrinsic to the BPF atomic add instruction.
#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: `counter` is a valid, aligned map value field.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, value,
        );
    }
    // Host builds (clippy) only type-check this module.
    #[cfg(not(target_arch = "bpf"))]
    {
        *counter = counter.wrapping_add(value);
    }
}

#[inline(always)]
fn stats(local: &SockLocal) -> Option<&'static mut PoolStats> {
    if let Some(stats) = POOLS.get_ptr_mut(local.pool) {
        // SAFETY: map values stay valid while the program runs.
        return Some(unsafe { &mut *stats });
    }
    let fresh = PoolStats {
        busy: 0,
        requests: 0,
        responses: 0,
        busy_ns: 0,
        gaps: [0; GAP_BUCKETS],
    };
    // Another CPU may have created it meanwhile: insert only if it is still
    // missing, and look it up again either way.
    let _ = POOLS.insert(local.pool, fresh, BPF_NOEXIST.into());
    // SAFETY: as above.
    POOLS
        .get_ptr_mut(local.pool)
        .map(|stats| unsafe { &mut *stats })
}

/// The request's side of an exchange moved: the client sent, or the server
/// received. The first such move after an answer starts a new request and
/// counts the previous exchange, now that its answer is complete; the rest
/// (a request written in several writes, or read in several reads) belong to
/// the request already in progress.
#[inline(always)]
fn asked(sock: Sock, local: &mut SockLocal) {
    if local.flags & LOCAL_BUSY != 0 {
        return;
    }
    // A send on a connection the peer had reset during the call (a stale
    // reuse, on loopback) finds it closed already: its CLOSE was counted, a
    // request started now would never end.
    if matches!(sock.state(), Ok(TCP_CLOSE) | Err(_)) {
        return;
    }
    let now = now_ns();
    let Some(stats) = stats(local) else {
        return;
    };
    if local.flags & LOCAL_ANSWERED != 0 && local.flags & LOCAL_RESPONDER == 0 {
        let gap_us = now.saturating_sub(local.answered_ns) / 1000;
        if let Some(slot) = stats.gaps.get_mut(bucket(gap_us)) {
            add(slot, 1);
        }
    }
    count_answered(local, stats);
    local.flags |= LOCAL_BUSY;
    local.busy_since_ns = now;
    add(&mut stats.busy, 1);
    add(&mut stats.requests, 1);
}

/// The answer's side moved: the client read, or the server wrote. The first
/// such move frees the connection; each later one, until the next request,
/// is more of the same answer and only moves its end on. Nothing touches the
/// pool's shared counters then: the exchange is counted when the next request
/// starts or the connection closes.
#[inline(always)]
fn answered(local: &mut SockLocal) {
    if local.flags & LOCAL_BUSY != 0 {
        local.flags = (local.flags & !LOCAL_BUSY) | LOCAL_ANSWERED;
        if let Some(stats) = stats(local) {
            add(&mut stats.busy, u64::MAX);
        }
    }
    if local.flags & LOCAL_ANSWERED != 0 {
        local.answered_ns = now_ns();
    }
}

/// Counts an answered exchange into the pool: one response, busy from the
/// request's first byte to the answer's last.
#[inline(always)]
fn count_answered(local: &mut SockLocal, stats: &mut PoolStats) {
    if local.flags & LOCAL_ANSWERED == 0 {
        return;
    }
    local.flags &= !LOCAL_ANSWERED;
    add(&mut stats.responses, 1);
    add(
        &mut stats.busy_ns,
        local.answered_ns.saturating_sub(local.busy_since_ns),
    );
}

/// The connection closed: a request still in progress no longer occupies it,
/// and an answered one is counted.
pub fn closed(local: &mut SockLocal) {
    if local.flags & (LOCAL_BUSY | LOCAL_ANSWERED) == 0 {
        return;
    }
    let Some(stats) = stats(local) else {
        return;
    };
    if local.flags & LOCAL_BUSY != 0 {
        local.flags &= !LOCAL_BUSY;
        add(&mut stats.busy, u64::MAX);
    }
    count_answered(local, stats);
}

#[inline(never)]
pub fn on_send(sock: Sock, local: &mut SockLocal) {
    if local.flags & LOCAL_FILTERED_OUT != 0 {
        return;
    }
    if local.flags & LOCAL_RESPONDER != 0 {
        answered(local);
    } else {
        asked(sock, local);
    }
}

#[inline(never)]
pub fn on_receive(sock: Sock, local: &mut SockLocal) {
    if local.flags & LOCAL_FILTERED_OUT != 0 {
        return;
    }
    if local.flags & LOCAL_RESPONDER != 0 {
        asked(sock, local);
    } else {
        answered(local);
    }
}

/// log2 bucket of a gap in microseconds.
#[inline(always)]
fn bucket(gap_us: u64) -> usize {
    let log2 = 63 - (gap_us | 1).leading_zeros() as usize;
    if log2 >= GAP_BUCKETS {
        GAP_BUCKETS - 1
    } else {
        log2
    }
}
