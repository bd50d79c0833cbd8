//! The name of every metric as a scrape shows it: counters with their
//! `_total`, histograms by their family name (a scrape adds `_bucket`, `_sum`
//! and `_count`). The registry, the integration tests and `cargo xtask bench`
//! (which includes this file by path, as it cannot depend on the agent) all
//! read them from here.

pub const CONNECTIONS_OPENED: &str = "tcptracer_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "tcptracer_connections_closed_total";
pub const IDLE_AT_CLOSE: &str = "tcptracer_connection_idle_at_close_seconds";
pub const CONNECT_DURATION: &str = "tcptracer_connect_duration_seconds";
pub const CONNECT_ERRORS: &str = "tcptracer_connect_errors_total";
pub const RESETS: &str = "tcptracer_resets_total";
pub const RETRANSMITS_AFTER_IDLE: &str = "tcptracer_retransmits_after_idle_total";
pub const PEER_IDLE_TIMEOUT: &str = "tcptracer_peer_idle_timeout_seconds";
pub const LOCAL_IDLE_TIMEOUT: &str = "tcptracer_local_idle_timeout_seconds";
pub const STALE_REUSES: &str = "tcptracer_stale_reuses_total";
pub const IDLE_TIMEOUT_MISMATCHES: &str = "tcptracer_idle_timeout_mismatches_total";
pub const SILENT_DROPS: &str = "tcptracer_silent_drops_total";
pub const CLOSE_WAIT_CONNECTIONS: &str = "tcptracer_close_wait_connections";
pub const CLOSE_WAIT_LEAKS: &str = "tcptracer_close_wait_leaks_total";
pub const LATE_REQUEST_RESETS: &str = "tcptracer_late_request_resets_total";
pub const POOL_CONNECTIONS: &str = "tcptracer_pool_connections";
pub const POOL_BUSY_CONNECTIONS: &str = "tcptracer_pool_busy_connections";
pub const POOL_REQUESTS: &str = "tcptracer_pool_requests_total";
pub const POOL_SATURATED: &str = "tcptracer_pool_saturated_seconds_total";
pub const LISTEN_QUEUE_DEPTH: &str = "tcptracer_listen_queue_depth";
pub const LISTEN_QUEUE_LIMIT: &str = "tcptracer_listen_queue_limit";
pub const LISTEN_DROPS: &str = "tcptracer_listen_drops_total";
pub const ACCEPT_WAIT: &str = "tcptracer_accept_wait_seconds";
pub const FINDINGS: &str = "tcptracer_findings_total";
pub const EVENTS: &str = "tcptracer_events_total";
pub const EVENTS_LOST: &str = "tcptracer_events_lost_total";
pub const EVENTS_UNDECODABLE: &str = "tcptracer_events_undecodable_total";
pub const RINGBUF_PENDING: &str = "tcptracer_ringbuf_pending_bytes";
pub const RINGBUF_SIZE: &str = "tcptracer_ringbuf_size_bytes";
pub const TRACKED: &str = "tcptracer_tracked_connections";
pub const TRACKED_LIMIT: &str = "tcptracer_tracked_connections_limit";
pub const UNTRACKED: &str = "tcptracer_untracked_connections_total";
pub const ATTACH_INFO: &str = "tcptracer_attach_info";
pub const BUILD_INFO: &str = "tcptracer_build_info";
