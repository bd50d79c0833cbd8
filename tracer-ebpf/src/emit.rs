//! Writing events to the ring buffer, after the user's filters.

use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use tracer_common::{
    config::{FILTER_COMM, FILTER_PID, FILTER_PORT},
    event::{Endpoints, EventHeader, KernelEvent, ROLE_UNKNOWN},
    state::{Counter, Owner},
};

use crate::{
    globals::{config, filter_comm},
    maps::{EVENTS, count, submit_flags},
};

/// The current task as the owner of a socket. Only meaningful in process context
/// (a syscall on the socket), never in softirq.
#[inline(always)]
pub fn current_owner(role: u32) -> Owner {
    Owner {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        role,
        comm: process_comm(),
    }
}

/// The process's name, not the calling thread's: threads of one process often
/// carry names of their own (worker pools, runtimes), and findings are per
/// process.
#[inline(always)]
fn process_comm() -> [u8; 16] {
    crate::kernel::group_leader_comm()
        .or_else(|_| bpf_get_current_comm().map_err(i64::from))
        .unwrap_or([0; 16])
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn wanted(owner: &Owner, conn: &Endpoints) -> bool {
    let filters = config!(filters);
    if filters & FILTER_PID != 0 && owner.pid != config!(filter_pid) {
        return false;
    }
    if filters & FILTER_PORT != 0 {
        let port = config!(filter_port);
        if conn.lport != port && conn.rport != port {
            return false;
        }
    }
    if filters & FILTER_COMM != 0 {
        // SAFETY: `Owner` is 8-aligned with `comm` at offset 8.
        let comm = unsafe { (&raw const owner.comm).cast::<[u64; 2]>().read() };
        if comm != filter_comm() {
            return false;
        }
    }
    true
}

/// Whether the filters take a connection of the current process: without
/// filters, at no cost.
#[inline(always)]
pub fn wanted_here(conn: &Endpoints) -> bool {
    config!(filters) == 0 || wanted(&current_owner(ROLE_UNKNOWN), conn)
}

/// The header of a `T`: its kind and size, when, and whose.
#[inline(always)]
pub fn header<T: KernelEvent>(ts_ns: u64, owner: &Owner) -> EventHeader {
    EventHeader {
        kind: T::KIND as u32,
        size: size_of::<T>() as u32,
        ts_ns,
        pid: owner.pid,
        role: owner.role,
        comm: owner.comm,
    }
}

/// Emits an event unless the filters reject it; a full ring buffer is counted,
/// never silent. `fill` sets the fields in the ring buffer's own memory: built on
/// the stack and copied, every event would take its size of stack again, and the
/// verifier allows 512 bytes for a whole chain of calls (kernels before 6.x count
/// every frame of it, whichever path runs).
#[inline(always)]
pub fn emit<T: KernelEvent + 'static>(owner: &Owner, conn: &Endpoints, fill: impl FnOnce(&mut T)) {
    if !wanted(owner, conn) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count(Counter::EventsLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: events are `repr(C)` integers and byte arrays, valid when all zero;
    // zeroing also defines their padding before the record reaches userspace.
    unsafe {
        event.write_bytes(0, 1);
        fill(&mut *event);
    }
    entry.submit(submit_flags(size_of::<T>()));
}
