//! Socket-local storage of the send and receive hooks, and what is fixed about a
//! socket the first time they see it: whether it asks or answers, the pool it
//! belongs to, and whether the user's filters want it counted.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_sk_storage_get},
};
use tracer_common::{
    event::{ROLE_CLIENT, ROLE_SERVER, ROLE_UNKNOWN},
    state::{
        LOCAL_FILTERED_OUT, LOCAL_RESPONDER, LOCAL_SEEN, POOL_CLIENT, POOL_SERVER, PoolKey,
        SockLocal,
    },
};

use crate::{
    emit::wanted_here,
    kernel::Sock,
    maps::{SOCK_LOCAL, SOCKS},
};

/// The socket's storage; created when `create` is set. `sk` must be the BTF
/// `struct sock *` a BTF tracepoint received: the helper accepts nothing else.
#[inline(always)]
pub fn storage(sk: *mut c_void, create: bool) -> Option<&'static mut SockLocal> {
    let map = ptr::from_ref(&SOCK_LOCAL).cast_mut().cast::<c_void>();
    let flags = if create {
        BPF_SK_STORAGE_GET_F_CREATE.into()
    } else {
        0
    };
    // SAFETY: `sk` comes from the tracepoint's arguments; the helper checks it.
    let value = unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) };
    // SAFETY: a non-null result points at this socket's storage.
    unsafe { value.cast::<SockLocal>().as_mut() }
}

/// Classifies a socket the first time a send or receive hook sees it: its pool
/// comes from the process (hooks run in process context, in the owner), and
/// whether it answers its peer from its role — an accepted connection answers,
/// a connected one asks — or, for connections that predate the agent, from
/// which way their first payload went. `already_sent` is what this very send
/// added.
#[inline(never)]
pub fn classify(sock: Sock, local: &mut SockLocal, already_sent: u64) -> Result<(), i64> {
    if local.flags & LOCAL_SEEN != 0 {
        return Ok(());
    }
    let role = match SOCKS.get_ptr(sock.0) {
        // SAFETY: map values stay valid while the program runs.
        Some(state) => unsafe { (*state).role },
        None => ROLE_UNKNOWN,
    };
    let responder = match role {
        ROLE_SERVER => true,
        ROLE_CLIENT => false,
        _ => {
            let sent_before = sock.bytes_sent()?.saturating_sub(already_sent);
            sent_before == 0 && sock.bytes_received()? > 0
        }
    };
    let conn = sock.endpoints()?;
    let mut pool = PoolKey {
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        family: conn.family,
        ..PoolKey::default()
    };
    if responder {
        local.flags |= LOCAL_RESPONDER;
        pool.side = POOL_SERVER;
        pool.port = conn.lport;
    } else {
        pool.side = POOL_CLIENT;
        pool.port = conn.rport;
        pool.addr = conn.raddr;
    }
    if !wanted_here(&conn) {
        local.flags |= LOCAL_FILTERED_OUT;
    }
    local.pool = pool;
    local.flags |= LOCAL_SEEN;
    Ok(())
}
