//! Requests and responses on each connection, counted per pool: how many
//! connections are busy, for how long, and how soon a client sends its next
//! request after reading a response. Transitions only (idle to busy and back):
//! a request sent in many writes, or a response read in many reads, counts once.

use aya_ebpf::bindings::BPF_NOEXIST;
use tracer_common::state::{GAP_BUCKETS, LOCAL_BUSY, LOCAL_RESPONDER, PoolStats, SockLocal};

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

/// A request starts: the client sent after a response, or the server received
/// after replying.
#[inline(always)]
fn start(sock: Sock, local: &mut SockLocal) {
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
    local.flags |= LOCAL_BUSY;
    local.busy_since_ns = now;
    let Some(stats) = stats(local) else {
        return;
    };
    add(&mut stats.busy, 1);
    add(&mut stats.requests, 1);
    if local.flags & LOCAL_RESPONDER == 0 && local.idle_since_ns != 0 {
        let gap_us = now.saturating_sub(local.idle_since_ns) / 1000;
        if let Some(slot) = stats.gaps.get_mut(bucket(gap_us)) {
            add(slot, 1);
        }
    }
}

/// A request ends: the client read the response, or the server replied.
#[inline(always)]
fn finish(local: &mut SockLocal) {
    if local.flags & LOCAL_BUSY == 0 {
        return;
    }
    let now = now_ns();
    local.flags &= !LOCAL_BUSY;
    local.idle_since_ns = now;
    let Some(stats) = stats(local) else {
        return;
    };
    add(&mut stats.busy, u64::MAX);
    add(&mut stats.responses, 1);
    add(&mut stats.busy_ns, now.saturating_sub(local.busy_since_ns));
}

/// The connection closed: a request still in progress no longer occupies it.
pub fn abandon(local: &mut SockLocal) {
    if local.flags & LOCAL_BUSY == 0 {
        return;
    }
    local.flags &= !LOCAL_BUSY;
    if let Some(stats) = stats(local) {
        add(&mut stats.busy, u64::MAX);
    }
}

#[inline(never)]
pub fn on_send(sock: Sock, local: &mut SockLocal) {
    if local.flags & LOCAL_RESPONDER != 0 {
        finish(local);
    } else {
        start(sock, local);
    }
}

#[inline(never)]
pub fn on_receive(sock: Sock, local: &mut SockLocal) {
    if local.flags & LOCAL_RESPONDER != 0 {
        start(sock, local);
    } else {
        finish(local);
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
