//! The send and receive hooks. They run on every send and receive of every
//! socket, so they filter to TCP first; everything after that works on the
//! socket's own storage, touching shared maps only when a request starts or ends
//! or a reuse is reported.

use core::ffi::c_void;

use tracer_common::state::{PoolKey, SockLocal};

use crate::{exchange, kernel::Sock, local, reuse};

/// The socket's storage, created on its first send or read if it is a TCP
/// socket. Every socket family's sends and reads come here, and storage exists
/// only for TCP sockets: found, it spares reading the protocol and type again
/// on every call (two kernel reads).
#[inline(always)]
fn tcp_storage(sk: *mut c_void) -> Result<Option<&'static mut SockLocal>, i64> {
    if let Some(local) = local::storage(sk, false) {
        return Ok(Some(local));
    }
    if !Sock(sk as u64).is_tcp()? {
        return Ok(None);
    }
    Ok(local::storage(sk, true))
}

#[inline(never)]
pub fn on_send(sk: *mut c_void, bytes: u32) -> Result<(), i64> {
    let sock = Sock(sk as u64);
    let Some(local) = tcp_storage(sk)? else {
        return Ok(());
    };
    local::classify(sock, local, bytes as u64)?;
    exchange::on_send(sock, local);
    reuse::on_send(sock, local, bytes)
}

#[inline(never)]
pub fn on_receive(sk: *mut c_void) -> Result<(), i64> {
    let sock = Sock(sk as u64);
    let Some(local) = tcp_storage(sk)? else {
        return Ok(());
    };
    local::classify(sock, local, 0)?;
    reuse::on_receive(local);
    exchange::on_receive(sock, local);
    Ok(())
}

/// The socket starts connecting: whatever its storage held belongs to an earlier
/// connection (connect() again after AF_UNSPEC, or after a failure).
#[inline(never)]
pub fn on_connect(sk: *mut c_void) {
    if let Some(local) = local::storage(sk, false) {
        *local = SockLocal {
            last_active_ns: 0,
            flags: 0,
            fin_write_seq: 0,
            busy_since_ns: 0,
            answered_ns: 0,
            pool: PoolKey::default(),
        };
    }
}

/// The connection reached CLOSE: a request in progress is abandoned, an
/// answered one counted.
#[inline(never)]
pub fn on_close(sk: *mut c_void) {
    if let Some(local) = local::storage(sk, false) {
        exchange::closed(local);
    }
}
