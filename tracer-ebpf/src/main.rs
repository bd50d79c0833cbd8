//! Kernel programs of the TCP connection tracer.
//!
//! Each entry point is thin: it pulls the socket and arguments out of its context
//! and hands them to the module that owns that concern. The agent loads either the
//! BTF tracepoint or the classic tracepoint flavour of the state-change hook,
//! whichever the running kernel accepts.
#![no_std]
#![no_main]
// Atomic adds on map values (see exchange.rs); the BPF build runs with
// RUSTC_BOOTSTRAP=1 for -Z build-std already.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod emit;
mod exchange;
mod globals;
mod kernel;
mod lifecycle;
mod local;
mod maps;
mod resets;
mod reuse;
mod syscalls;
mod traffic;

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    macros::{btf_tracepoint, fentry, fexit, kprobe, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, TracePointContext,
    },
};
use tracer_common::{
    config::STATE_FROM_TRACEPOINT,
    tcp::{TCP_CLOSE, TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_SENT},
};

/// Whether the tracepoint flavours report this change: all of them, unless a
/// probe on tcp_set_state does (then only the start of listening).
#[inline(always)]
fn tracepoint_reports(old: u32, new: u32) -> bool {
    globals::config!(state_source) == STATE_FROM_TRACEPOINT
        || (old == TCP_CLOSE && new == TCP_LISTEN)
}

/// A state change seen with a BTF-typed socket pointer (tp_btf, fentry): the
/// lifecycle, plus what socket storage, which needs that pointer, keeps.
#[inline(always)]
fn typed_state_change(sk: *mut c_void, old: u32, new: u32) {
    let _ = lifecycle::on_state_change(sk as u64, old, new);
    if old == TCP_ESTABLISHED && new == TCP_CLOSE_WAIT {
        reuse::peer_closed(sk);
    } else if new == TCP_CLOSE {
        traffic::on_close(sk);
    } else if new == TCP_SYN_SENT {
        traffic::on_connect(sk);
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if tracepoint_reports(old as u32, new as u32) {
        typed_state_change(sk, old as u32, new as u32);
    }
    0
}

/// tcp_set_state(sk, state) at entry: the socket still has its old state.
#[fentry(function = "tcp_set_state")]
pub fn tcp_set_state_fentry(ctx: FEntryContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let new: i32 = ctx.arg(1);
    if let Ok(old) = kernel::Sock(sk as u64).state()
        && old != new as u32
    {
        typed_state_change(sk, old, new as u32);
    }
    0
}

/// The same through a kprobe, for kernels without BPF trampolines (no socket
/// storage there: no peer_closed flag on reuses).
#[kprobe]
pub fn tcp_set_state_kprobe(ctx: ProbeContext) -> u32 {
    let (Some(sk), Some(new)) = (ctx.arg::<u64>(0), ctx.arg::<i32>(1)) else {
        return 0;
    };
    if let Ok(old) = kernel::Sock(sk).state()
        && old != new as u32
    {
        let _ = lifecycle::on_state_change(sk, old, new as u32);
    }
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if ret > 0 {
        let _ = traffic::on_send(sk, ret as u32);
    }
    0
}

/// MSG_PEEK reads leave the data queued: the next read sees it again.
const MSG_PEEK: i32 = 2;

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret > 0 && flags & MSG_PEEK == 0 {
        let _ = traffic::on_receive(sk);
    }
    0
}

/// tcp_sendmsg(sk, msg, size) returned: sends, on kernels without the
/// sock_send_length tracepoint (before 6.3). Its signature has not changed
/// since 4.x, so its return value is the fourth slot.
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_sendmsg_fexit(ctx: FExitContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let ret: i32 = ctx.arg(3);
    if ret > 0 {
        let _ = traffic::on_send(sk, ret as u32);
    }
    0
}

/// tcp_cleanup_rbuf(sk, copied): reads, on kernels without sock_recv_length.
/// tcp_recvmsg's own signature changed in 5.19; this one did not. It runs once
/// or more per read with the running total, and a read only needs noting once
/// (`on_receive` does nothing the second time); MSG_PEEK reads are not told
/// apart here.
#[fentry(function = "tcp_cleanup_rbuf")]
pub fn tcp_cleanup_rbuf_fentry(ctx: FEntryContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    let copied: i32 = ctx.arg(1);
    if copied > 0 {
        let _ = traffic::on_receive(sk);
    }
    0
}

#[tracepoint]
pub fn inet_sock_set_state_tp(ctx: TracePointContext) -> u32 {
    let tp = globals::tp_offsets();
    // SAFETY: the offsets come from this tracepoint's tracefs format file.
    let fields = unsafe {
        (
            ctx.read_at::<u64>(tp.set_state_skaddr as usize),
            ctx.read_at::<i32>(tp.set_state_oldstate as usize),
            ctx.read_at::<i32>(tp.set_state_newstate as usize),
        )
    };
    if let (Ok(sk), Ok(old), Ok(new)) = fields
        && tracepoint_reports(old as u32, new as u32)
    {
        let _ = lifecycle::on_state_change(sk, old as u32, new as u32);
    }
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracefs format file.
    if let Ok(sk) =
        unsafe { ctx.read_at::<u64>(globals::tp_offsets().receive_reset_skaddr as usize) }
    {
        let _ = resets::on_reset_received(sk);
    }
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let tp = globals::tp_offsets();
    // SAFETY (both reads): offsets from the tracefs format file.
    if tp.send_reset_skbaddr != 0
        && unsafe { ctx.read_at::<u64>(tp.send_reset_skbaddr as usize) }.is_ok_and(|skb| skb != 0)
    {
        // Answering a segment: tcp_send_reset_kprobe reports it.
        return 0;
    }
    if let Ok(sk) = unsafe { ctx.read_at::<u64>(tp.send_reset_skaddr as usize) } {
        let _ = resets::on_reset_sent(sk);
    }
    0
}

/// tcp_v4_send_reset / tcp_v6_send_reset(sk, skb): resets answering a segment,
/// on kernels before 6.10 whose tracepoint misses most of them — the ones sent
/// from TIME_WAIT remnants included, which is how a late request on a
/// connection the server already closed shows.
#[kprobe]
pub fn tcp_send_reset_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        let _ = resets::on_reset_sent(sk);
    }
    0
}

#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let tp = globals::tp_offsets();
    if tp.retransmit_err != 0 {
        // SAFETY: offset from the tracefs format file.
        match unsafe { ctx.read_at::<i32>(tp.retransmit_err as usize) } {
            Ok(0) => {}
            // The segment could not go out (still queued, no memory): no
            // retransmission happened.
            _ => return 0,
        }
    }
    // SAFETY: offset from the tracefs format file.
    if let Ok(sk) = unsafe { ctx.read_at::<u64>(tp.retransmit_skaddr as usize) } {
        let _ = resets::on_retransmit(sk);
    }
    0
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let tp = globals::tp_offsets();
    // SAFETY: offsets from the tracefs format file.
    let args = unsafe {
        (
            ctx.read_at::<u64>(tp.connect_fd as usize),
            ctx.read_at::<u64>(tp.connect_uservaddr as usize),
        )
    };
    if let (Ok(fd), Ok(uservaddr)) = args {
        let _ = syscalls::on_connect_enter(fd as i32, uservaddr);
    }
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracefs format file.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(globals::tp_offsets().sys_exit_ret as usize) } {
        let _ = syscalls::on_connect_exit(ret);
    }
    0
}

/// Attached to both `sys_exit_accept` and `sys_exit_accept4`.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracefs format file.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(globals::tp_offsets().sys_exit_ret as usize) } {
        let _ = syscalls::on_accept_exit(ret);
    }
    0
}

// Host builds (clippy on the workspace) link std, which brings its own.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Never attached by the agent. `tracer probe --broken-program` loads it to
/// check, on every kernel of the test matrix, that a read through an offset BTF
/// never resolved (here: past the end of any tracepoint record) is refused by
/// the verifier with a readable error, and crashes nothing.
#[tracepoint]
pub fn broken_unresolved_offset(ctx: TracePointContext) -> u32 {
    const UNRESOLVED: usize = u32::MAX as usize;
    // SAFETY: none; the verifier refuses this load, which is the point.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(UNRESOLVED)) }.into()
}
