//! The maps shared by every program. Sizes here are defaults; the agent overrides
//! the ring buffer and socket-table sizes at load time.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::state::{ConnectCall, Counter, ListenerKey, Owner, SockState};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
pub static SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(262_144, 0);

#[map]
pub static LISTENERS: LruHashMap<ListenerKey, Owner> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static CONNECTS: LruHashMap<u64, ConnectCall> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static RECENTLY_CLOSED: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(16_384, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(tracer_common::state::COUNTER_COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *value += 1 };
    }
}
