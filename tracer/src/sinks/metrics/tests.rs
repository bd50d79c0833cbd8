//! Metrics from hand-built events, rendered and read back.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::*;
use crate::{
    diagnosis::{self, Diagnoser},
    event::{Close, ClosedBy, Direction, Open},
    kernel::tables::CloseWaitEntry,
};

/// A scan as the pipeline hands it out, of what `d` holds now.
fn scan(
    d: &Diagnoser,
    pools: Vec<PoolCounters>,
    close_waits: Vec<CloseWaitEntry>,
    ring_buffer_peak: u64,
) -> Scan {
    Scan {
        pools,
        close_waits,
        gauges: d.gauges(),
        stats: Stats::default(),
        ring_buffer_peak,
    }
}

fn metrics(max_destinations: usize) -> Metrics {
    Metrics::new(
        MetricsOptions {
            max_destinations,
            max_processes: 100,
            min_idle: Duration::from_millis(250),
            ring_buffer_bytes: 8 << 20,
            tracked_limit: 262_144,
        },
        &AttachReport {
            state_mode: "tp_btf",
            attached: vec!["tp_btf/sock_send_length".into()],
            degraded: Vec::new(),
        },
    )
}

fn event(remote_port: u16, detail: Detail) -> Event {
    Event {
        ts: SystemTime::now(),
        kind: detail.kind(),
        pid: 0,
        comm: "client".into(),
        laddr: IpAddr::from([127, 0, 0, 1]),
        lport: 40_000,
        raddr: IpAddr::from([127, 0, 0, 1]),
        rport: remote_port,
        role: Role::Client,
        detail,
    }
}

fn peer_close(idle_ms: u64) -> Detail {
    Detail::Close(Close {
        duration_ms: Some(2000.0),
        bytes_sent: 1,
        bytes_received: 1,
        closed_by: ClosedBy::Peer,
        idle_ms: Some(idle_ms),
        close_wait_ms: Some(0.1),
        error: None,
        awaiting_reply: false,
        srtt_us: 10,
        retransmits: 0,
    })
}

fn text(m: &Metrics) -> String {
    String::from_utf8(m.render(MetricsFormat::PrometheusText)).unwrap()
}

/// The value of the sample line starting with `prefix`.
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn kept_series_count_each_kind_apart() {
    let m = metrics(20);
    let reset = |direction| {
        Detail::Reset(crate::event::Reset {
            direction,
            state: "ESTABLISHED",
            idle_ms: Some(10),
            since_close_ms: None,
            closed_by: None,
            awaiting_reply: true,
        })
    };
    let close_by = |closed_by| {
        let mut close = peer_close(1000);
        if let Detail::Close(c) = &mut close {
            c.closed_by = closed_by;
        }
        close
    };
    // Repeated, so that the later ones go through the kept handles.
    for _ in 0..3 {
        m.observe_event(&event(8080, close_by(ClosedBy::Peer)));
        m.observe_event(&event(8080, close_by(ClosedBy::Local)));
        m.observe_event(&event(8080, reset(Direction::In)));
    }
    m.observe_event(&event(8080, reset(Direction::Out)));
    // Another destination of the same process has series of its own.
    m.observe_event(&event(9090, close_by(ClosedBy::Peer)));
    let text = text(&m);
    let labels = |port| {
        format!(
            "comm=\"client\",container_id=\"\",pod_uid=\"\",role=\"client\",remote=\"127.0.0.1:{port}\",port=\"\""
        )
    };
    let closed = |port, by| {
        value(
            &text,
            &format!(
                "tcptracer_connections_closed_total{{{},closed_by=\"{by}\"}}",
                labels(port)
            ),
        )
    };
    assert_eq!(closed(8080, "peer"), Some(3.0));
    assert_eq!(closed(8080, "local"), Some(3.0));
    assert_eq!(closed(9090, "peer"), Some(1.0));
    let resets = |direction| {
        value(
            &text,
            &format!(
                "tcptracer_resets_total{{{},direction=\"{direction}\"}}",
                labels(8080)
            ),
        )
    };
    assert_eq!(resets("in"), Some(3.0));
    assert_eq!(resets("out"), Some(1.0));
    assert_eq!(
        value(
            &text,
            &format!(
                "tcptracer_connection_idle_at_close_seconds_count{{{},closed_by=\"local\"}}",
                labels(8080)
            )
        ),
        Some(3.0)
    );
}

#[test]
fn a_first_open_creates_the_problem_counters_at_zero_and_a_close_alone_does_not() {
    let m = metrics(20);
    let server = |port, detail| {
        let mut e = event(40_001, detail);
        e.role = Role::Server;
        e.lport = port;
        e
    };
    let open = Detail::Open(Open {
        connect_us: None,
        accept_wait_us: Some(30),
    });
    m.observe_event(&server(8443, open));
    // A connection older than the agent: its close is its first event.
    m.observe_event(&server(9443, peer_close(1000)));
    let text = text(&m);
    let late = |port| {
        value(
            &text,
            &format!(
                "tcptracer_late_request_resets_total{{comm=\"client\",container_id=\"\",pod_uid=\"\",port=\"{port}\"}}"
            ),
        )
    };
    assert_eq!(late(8443), Some(0.0), "{text}");
    assert_eq!(late(9443), None, "{text}");
    assert!(
        !text.contains("tcptracer_connections_opened_total{comm=\"client\",container_id=\"\",pod_uid=\"\",role=\"server\",remote=\"\",port=\"9443\"}"),
        "{text}"
    );
}

#[test]
fn connections_and_idle_closes_are_counted() {
    let m = metrics(20);
    let open = Detail::Open(Open {
        connect_us: Some(80),
        accept_wait_us: None,
    });
    m.observe_event(&event(8080, open));
    m.observe_event(&event(8080, peer_close(1000)));
    let text = text(&m);
    let labels = "comm=\"client\",container_id=\"\",pod_uid=\"\",role=\"client\",remote=\"127.0.0.1:8080\",port=\"\"";
    assert_eq!(
        value(
            &text,
            &format!("tcptracer_connections_opened_total{{{labels}}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("tcptracer_connections_closed_total{{{labels},closed_by=\"peer\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "tcptracer_idle_timeout_mismatches_total{comm=\"client\",container_id=\"\",pod_uid=\"\",remote=\"127.0.0.1:8080\"}"
        ),
        Some(1.0)
    );
    assert!(
        text.contains("# TYPE tcptracer_connections_opened_total counter"),
        "{text}"
    );
    assert!(text.contains("tcptracer_connection_idle_at_close_seconds_bucket{"));
    assert!(text.contains("tcptracer_build_info{version="));
    assert!(!text.contains("# EOF"));
}

#[test]
fn problem_counters_start_at_zero_when_a_connection_opens() {
    let m = metrics(20);
    let open = || {
        Detail::Open(Open {
            connect_us: None,
            accept_wait_us: None,
        })
    };
    m.observe_event(&event(8080, open()));
    let mut accepted = event(40_001, open());
    accepted.role = Role::Server;
    accepted.lport = 8081;
    m.observe_event(&accepted);
    let text = text(&m);
    let remote = "{comm=\"client\",container_id=\"\",pod_uid=\"\",remote=\"127.0.0.1:8080\"}";
    for name in [
        "stale_reuses",
        "idle_timeout_mismatches",
        "silent_drops",
        "close_wait_leaks",
    ] {
        assert_eq!(
            value(&text, &format!("tcptracer_{name}_total{remote}")),
            Some(0.0),
            "{name}: {text}"
        );
    }
    let port = "{comm=\"client\",container_id=\"\",pod_uid=\"\",port=\"8081\"}";
    for name in ["late_request_resets", "listen_drops"] {
        assert_eq!(
            value(&text, &format!("tcptracer_{name}_total{port}")),
            Some(0.0),
            "{name}: {text}"
        );
    }
}

#[test]
fn openmetrics_ends_with_eof() {
    let m = metrics(20);
    let text = String::from_utf8(m.render(MetricsFormat::OpenMetrics)).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn thousands_of_destinations_stay_within_the_budget() {
    let m = metrics(20);
    for port in 1..=5000 {
        m.observe_event(&event(port, peer_close(1000)));
    }
    let text = text(&m);
    let series = text
        .lines()
        .filter(|l| l.starts_with("tcptracer_connections_closed_total{"))
        .count();
    assert_eq!(series, 21, "20 destinations and `other`");
    assert_eq!(
        value(
            &text,
            "tcptracer_connections_closed_total{comm=\"client\",container_id=\"\",pod_uid=\"\",role=\"client\",remote=\"other\",port=\"\",closed_by=\"peer\"}"
        ),
        Some(4980.0)
    );
}

#[test]
fn inferred_timeouts_are_gauges_that_go_away_with_their_destination() {
    let m = metrics(20);
    let mut d = Diagnoser::new(diagnosis::Config::default());
    for port in [41_000, 41_001, 41_002] {
        let mut e = event(8080, peer_close(1000));
        e.lport = port;
        d.observe(&e);
    }
    m.observe_scan(&scan(&d, Vec::new(), Vec::new(), 4096));
    let text = text(&m);
    assert_eq!(
        value(
            &text,
            "tcptracer_peer_idle_timeout_seconds{comm=\"client\",container_id=\"\",pod_uid=\"\",remote=\"127.0.0.1:8080\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&text, "tcptracer_ringbuf_pending_bytes"),
        Some(4096.0)
    );
    // A fresh diagnosis without that destination: the gauge is removed.
    m.observe_scan(&scan(
        &Diagnoser::new(diagnosis::Config::default()),
        Vec::new(),
        Vec::new(),
        0,
    ));
    assert!(!text_contains(&m, "tcptracer_peer_idle_timeout_seconds{"));
}

fn text_contains(m: &Metrics, needle: &str) -> bool {
    text(m).contains(needle)
}

/// Every metric the shipped alert rules and dashboard query is one these
/// metrics export, so renaming a metric cannot silently disarm an alert or
/// blank a panel.
#[test]
fn the_alert_rules_and_the_dashboard_query_only_exported_metrics() {
    let exported = text(&every_family_populated());
    for (file, text) in [
        (
            "alerts.yml",
            include_str!("../../../../deploy/prometheus/alerts.yml"),
        ),
        (
            "dashboard.json",
            include_str!("../../../../deploy/grafana/dashboard.json"),
        ),
    ] {
        let queried = metric_names(text);
        assert!(queried.len() >= 10, "{file}: {queried:?}");
        for name in queried {
            assert!(
                exported
                    .lines()
                    .any(|line| line.starts_with(&format!("{name}{{"))
                        || line.starts_with(&format!("{name} "))),
                "{file} queries {name}, which is not exported:\n{exported}"
            );
        }
    }
}

/// `names` holds every metric exported, and only those, as the text format
/// names them.
#[test]
fn names_are_the_exported_metrics() {
    let exported = text(&every_family_populated());
    let mut families: Vec<&str> = exported
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_once(' '))
        .map(|(family, _kind)| family)
        .collect();
    families.sort_unstable();
    assert_eq!(metric_names(include_str!("names.rs")), families);
}

/// The distinct `tcptracer_*` identifiers in `text`.
fn metric_names(text: &str) -> Vec<&str> {
    let mut names: Vec<&str> = text
        .match_indices("tcptracer_")
        .map(|(at, _)| {
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| name.len() > "tcptracer_".len())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Metrics that have seen every kind of event, finding and scan.
fn every_family_populated() -> Metrics {
    let m = metrics(20);
    let mut d = Diagnoser::new(diagnosis::Config::default());
    let open = |accept_wait_us| {
        Detail::Open(Open {
            connect_us: Some(80),
            accept_wait_us,
        })
    };
    let mut accepted = event(40_001, open(Some(30)));
    accepted.role = Role::Server;
    let mut events = vec![
        event(8080, open(None)),
        accepted,
        event(
            9,
            Detail::ConnectError(crate::event::ConnectError {
                error: "ECONNREFUSED".into(),
                connect_us: 40,
            }),
        ),
        event(
            8080,
            Detail::Reset(crate::event::Reset {
                direction: Direction::In,
                state: "ESTABLISHED",
                idle_ms: Some(10),
                since_close_ms: None,
                closed_by: None,
                awaiting_reply: true,
            }),
        ),
        event(
            8080,
            Detail::Retransmit(crate::event::Retransmit {
                state: "ESTABLISHED",
                idle_ms: Some(30_000),
                retransmits: 1,
            }),
        ),
    ];
    // Three idle closes by each side: both idle timeouts are inferred.
    for (port, closed_by) in (41_000..).zip([ClosedBy::Peer, ClosedBy::Local].repeat(3)) {
        let mut close = peer_close(1000);
        if let Detail::Close(c) = &mut close {
            c.closed_by = closed_by;
        }
        let mut e = event(8080, close);
        e.lport = port;
        events.push(e);
    }
    for e in &events {
        m.observe_event(e);
        d.observe(e);
    }
    d.listener_scan(
        SystemTime::now(),
        &[crate::host::listeners::ListenerSample {
            pid: 0,
            comm: "client".into(),
            lport: 40_000,
            depth: 3,
            limit: 511,
            netns_drops: 0,
            somaxconn: Some(4096),
        }],
    );
    let destination = crate::event::DestinationKey {
        pid: 0,
        raddr: IpAddr::from([127, 0, 0, 1]),
        rport: 8080,
    };
    let pool = |requests| PoolCounters {
        pool: PoolRef::Destination(destination.clone()),
        busy: 1,
        requests,
        responses: requests,
        busy_ns: 0,
        gaps: Vec::new(),
    };
    let close_wait = CloseWaitEntry {
        sock: 1,
        pid: 0,
        comm: "client".into(),
        laddr: destination.raddr,
        raddr: destination.raddr,
        rport: 8080,
        lport: 40_000,
        waiting: Duration::from_secs(120),
    };
    m.observe_scan(&scan(&d, vec![pool(1)], Vec::new(), 0));
    m.observe_scan(&scan(&d, vec![pool(5)], vec![close_wait], 0));
    m.observe_occurrence(&Occurrence {
        kind: FindingKind::PoolSaturation,
        pid: 0,
        comm: "client".into(),
        remote: Some((destination.raddr, 8080)),
        lport: None,
        amount: 1.5,
    });
    m.observe_finding(&Finding {
        ts: SystemTime::now(),
        event_type: "finding",
        kind: FindingKind::PoolSaturation,
        severity: diagnosis::finding::Severity::Warning,
        pid: 0,
        comm: "client".into(),
        raddr: Some(destination.raddr),
        rport: Some(8080),
        lport: None,
        count: 1,
        evidence: serde_json::Value::Null,
        recommendation: String::new(),
    });
    m
}
