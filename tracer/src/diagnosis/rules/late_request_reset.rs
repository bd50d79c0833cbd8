//! `late_request_reset`: the server's side of a stale reuse, a request that
//! reached a server after it had closed the connection.

use serde_json::json;

use crate::{
    diagnosis::{
        Diagnoser,
        figures::{endpoint, human_ms, safe_below},
        finding::{Finding, FindingKind, Severity},
        stats::ConnectionStats,
    },
    event::{Event, ListenerKey, Reset},
};

impl Diagnoser {
    /// A server answered data on a connection it had closed with a reset: the
    /// client reused a connection this server had ended.
    pub(in crate::diagnosis) fn late_request(
        &mut self,
        event: &Event,
        reset: &Reset,
    ) -> Option<Finding> {
        self.occurred(FindingKind::LateRequestReset, event, 1.0);
        let jiffy = self.config.jiffy;
        let key = ListenerKey {
            pid: event.pid,
            lport: event.lport,
        };
        let stats = self
            .listeners
            .get_or_insert_mut(key, ConnectionStats::default);
        stats.touch(event);
        stats.late_request_resets += 1;
        let server_timeout = stats.local_idle_timeout(jiffy).map(|e| e.timeout_ms);
        let count = stats.late_request_resets;
        let after_close = reset.since_close_ms.unwrap_or(0.0);
        let comm = if stats.comm.is_empty() {
            "this server"
        } else {
            stats.comm.as_str()
        };
        let knob = server_idle_knob(comm)
            .map(|knob| format!(" ({knob})"))
            .unwrap_or_default();
        let recommendation = match server_timeout {
            Some(timeout) => format!(
                "Clients sent requests on connections {comm} had closed after {} idle; {comm} \
                 answered them with a reset ({count} so far). Clients behind port {} must \
                 close idle pooled connections before {}, or raise {comm}'s keep-alive \
                 timeout{knob} above the clients' pool idle timeout.",
                human_ms(timeout),
                event.lport,
                human_ms(safe_below(timeout)),
            ),
            None => format!(
                "Clients sent requests on connections {comm} had already closed; {comm} \
                 answered them with a reset ({count} so far). Clients of port {} must close \
                 idle pooled connections before the server does, or the server's keep-alive \
                 timeout{knob} must be longer than theirs.",
                event.lport
            ),
        };
        let finding = Finding {
            raddr: Some(event.raddr),
            rport: Some(event.rport),
            count,
            evidence: json!({
                "local_port": event.lport,
                "last_client": endpoint(event.raddr, event.rport),
                "after_close_ms": after_close,
                "server_idle_timeout_ms": server_timeout,
            }),
            recommendation,
            ..Finding::about_port(
                FindingKind::LateRequestReset,
                Severity::Warning,
                event.ts,
                &ListenerKey {
                    pid: event.pid,
                    lport: event.lport,
                },
                stats.comm,
            )
        };
        let materiality = finding.materiality(count, server_timeout.into_iter().collect());
        self.book.update(finding, materiality)
    }
}

/// Where well-known servers set their keep-alive timeout.
fn server_idle_knob(comm: &str) -> Option<&'static str> {
    match comm {
        "nginx" => Some("nginx: `keepalive_timeout`, default 75 s"),
        "haproxy" => Some("HAProxy: `timeout http-keep-alive`"),
        "apache2" | "httpd" => Some("Apache: `KeepAliveTimeout`, default 5 s"),
        _ => None,
    }
}
