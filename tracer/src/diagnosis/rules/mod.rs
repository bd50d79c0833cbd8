//! One file per finding kind: when it holds, the evidence it carries and the
//! advice it gives. Each is called from where its signal arrives:
//!
//! | finding | checked on |
//! | --- | --- |
//! | [`stale_reuse`] | a reuse, and the peer's reset or FIN after it (`connections`) |
//! | [`idle_timeout_mismatch`] | a client's connection closed by the peer, a stale reuse |
//! | [`silent_drop`] | the close of a connection retransmitting after a reuse |
//! | [`late_request_reset`] | a server's reset of a connection it had closed |
//! | [`port_exhaustion`] | a connect() that failed with EADDRNOTAVAIL |
//! | [`close_wait_leak`] | the scan of the kernel's CLOSE_WAIT table |
//! | [`pool_saturation`], [`connection_churn`] | the scan of the pools (`scans`) |
//! | [`accept_queue_overflow`], [`keepalive_worker_starvation`] | the scan of the listeners |
//!
//! A new finding kind gets its variant in [`super::finding::FindingKind`], a
//! file here, and a call where its signal arrives.

pub mod accept_queue_overflow;
pub mod close_wait_leak;
pub mod connection_churn;
pub mod idle_timeout_mismatch;
pub mod keepalive_worker_starvation;
pub mod late_request_reset;
pub mod pool_saturation;
pub mod port_exhaustion;
pub mod silent_drop;
pub mod stale_reuse;
