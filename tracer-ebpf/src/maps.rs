//! The maps shared by every program. Sizes here are defaults; the agent overrides
//! the ring buffer and socket-table sizes at load time.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    event::Endpoints,
    state::{
        CloseWait, ClosedConn, ConnectCall, Counter, ListenerKey, Owner, PoolKey, PoolStats,
        SockLocal, SockState,
    },
};

use crate::globals::config;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
pub static SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(262_144, 0);

#[map]
pub static LISTENERS: LruHashMap<ListenerKey, Owner> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static CONNECTS: LruHashMap<u64, ConnectCall> = LruHashMap::with_max_entries(16_384, 0);

/// One shared LRU list, not one per CPU (BPF_F_NO_COMMON_LRU, cheaper
/// eviction): split per CPU, a host whose closes mostly run on one CPU would
/// keep a fraction of the entries, and a late request can come tens of seconds
/// after the close.
#[map]
pub static RECENTLY_CLOSED: LruHashMap<Endpoints, ClosedConn> =
    LruHashMap::with_max_entries(16_384, 0);

/// Sockets whose connect() failure was reported from the state change, so that
/// a later connect() on the same socket that only re-reads the failure (some
/// event loops check non-blocking connects that way) reports nothing new.
#[map]
pub static FAILED_CONNECTS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4_096, 0);

#[map]
pub static CLOSE_WAITS: LruHashMap<u64, CloseWait> = LruHashMap::with_max_entries(65_536, 0);

/// Per-socket state of the send and receive hooks, freed by the kernel with the
/// socket.
#[btf_map]
pub static SOCK_LOCAL: SkStorage<SockLocal> = SkStorage::new();

#[map]
pub static POOLS: LruHashMap<PoolKey, PoolStats> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(tracer_common::state::COUNTER_COUNT, 0);

/// How a record of `size` bytes is committed: without a wake-up while the
/// reader's next poll will find it, a wake-up when it takes the ring past
/// `wakeup_bytes` (a burst the poll might not drain in time). A wake-up per
/// record would cost the reader a wake-up per event and the writer an
/// interrupt each, and so would one per record while the ring stays past the
/// mark. (Records reserved at once on several CPUs can all miss the crossing;
/// the poll still reads them.) Raises this CPU's `RingBufPendingPeak` to what
/// the ring holds with this record.
#[inline(always)]
pub fn submit_flags(size: usize) -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    // bpf_ringbuf's record header, and its 8-byte rounding.
    const HEADER: u64 = 8;
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA);
    if let Some(peak) = COUNTERS.get_ptr_mut(Counter::RingBufPendingPeak as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if pending > *peak {
                *peak = pending;
            }
        }
    }
    let record = (size as u64 + HEADER + 7) & !7;
    let mark = u64::from(config!(wakeup_bytes));
    if pending >= mark && pending.saturating_sub(record) < mark {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *value += 1 };
    }
}
