//! The rules on hand-built event sequences.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::{
    figures::{human_ms, safe_below},
    finding::Severity,
    *,
};
use crate::{
    event::{Close, ClosedBy, Detail, Direction, Event, Open, Reset, Retransmit, Reuse, Role},
    kernel::tables::CloseWaitEntry,
};

const CLIENT: u32 = 100;
const SERVER: u32 = 200;
const SERVER_PORT: u16 = 8080;

fn at(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms)
}

fn localhost() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// An event on the client side of the connection from local port `port`.
fn client(ts: u64, port: u16, detail: Detail) -> Event {
    Event {
        ts: at(ts),
        kind: detail.kind(),
        pid: CLIENT,
        comm: "client".into(),
        laddr: localhost(),
        lport: port,
        raddr: localhost(),
        rport: SERVER_PORT,
        role: Role::Client,
        detail,
    }
}

/// An event on the server side of the connection from client port `port`.
fn server(ts: u64, port: u16, detail: Detail) -> Event {
    Event {
        pid: SERVER,
        comm: "server".into(),
        lport: SERVER_PORT,
        rport: port,
        role: Role::Server,
        ..client(ts, port, detail)
    }
}

fn open() -> Detail {
    Detail::Open(Open {
        connect_us: Some(50),
        accept_wait_us: None,
    })
}

fn close(closed_by: ClosedBy, idle_ms: u64) -> Close {
    Close {
        duration_ms: Some(10_000.0),
        bytes_sent: 100,
        bytes_received: 200,
        closed_by,
        idle_ms: Some(idle_ms),
        close_wait_ms: None,
        error: None,
        awaiting_reply: false,
        srtt_us: 50,
        retransmits: 0,
    }
}

fn reuse(idle_ms: u64, peer_closed: bool) -> Detail {
    Detail::Reuse(Reuse {
        idle_ms,
        bytes: 40,
        state: "ESTABLISHED",
        peer_closed,
    })
}

fn reset(direction: Direction, closed_by: Option<ClosedBy>) -> Detail {
    Detail::Reset(Reset {
        direction,
        state: "ESTABLISHED",
        idle_ms: Some(0),
        since_close_ms: closed_by.map(|_| 500.0),
        closed_by,
        awaiting_reply: direction == Direction::In,
    })
}

fn diagnoser() -> Diagnoser {
    Diagnoser::new(Config::default())
}

/// Feeds `events`, returning every finding reported along the way.
fn feed(diagnoser: &mut Diagnoser, events: &[Event]) -> Vec<Finding> {
    events.iter().flat_map(|e| diagnoser.observe(e)).collect()
}

fn kinds(findings: &[Finding]) -> Vec<FindingKind> {
    findings.iter().map(|f| f.kind).collect()
}

/// `n` connections the server closed after `idle_ms` each.
fn peer_closes(n: u16, idle_ms: &[u64]) -> Vec<Event> {
    (0..n)
        .flat_map(|i| {
            let port = 40_000 + i;
            let t = u64::from(i) * 2_000;
            [
                client(t, port, open()),
                client(
                    t + 1_000,
                    port,
                    Detail::Close(close(ClosedBy::Peer, idle_ms[i as usize % idle_ms.len()])),
                ),
            ]
        })
        .collect()
}

#[test]
fn repeated_peer_closes_after_the_same_idle_are_a_mismatch() {
    let mut d = diagnoser();
    let findings = feed(&mut d, &peer_closes(3, &[1000, 1004, 996]));
    assert_eq!(kinds(&findings), [FindingKind::IdleTimeoutMismatch]);
    let finding = &findings[0];
    assert_eq!(finding.severity, Severity::Warning);
    assert_eq!((finding.pid, finding.rport), (CLIENT, Some(SERVER_PORT)));
    assert_eq!(finding.evidence["peer_idle_timeout_ms"], 1000.0);
    assert_eq!(finding.evidence["peer_idle_closes"], 3);
    assert!(
        finding.recommendation.contains("below 900 ms"),
        "{}",
        finding.recommendation
    );
}

#[test]
fn a_single_close_or_two_are_no_mismatch() {
    let mut d = diagnoser();
    assert!(feed(&mut d, &peer_closes(2, &[1000])).is_empty());
}

#[test]
fn closes_while_a_request_was_outstanding_are_ignored() {
    let mut d = diagnoser();
    let events: Vec<Event> = peer_closes(5, &[1000])
        .into_iter()
        .map(|mut e| {
            if let Detail::Close(c) = &mut e.detail {
                c.awaiting_reply = true;
            }
            e
        })
        .collect();
    assert!(feed(&mut d, &events).is_empty());
    let report = d.report(Duration::from_secs(10));
    assert_eq!(
        report.processes[0].destinations[0].mid_request_peer_closes,
        5
    );
}

#[test]
fn graceful_connection_close_is_not_a_mismatch() {
    // keepalive_requests: the server closes right after its response.
    let mut d = diagnoser();
    assert!(feed(&mut d, &peer_closes(10, &[0, 1, 4])).is_empty());
    let report = d.report(Duration::from_secs(10));
    assert_eq!(report.processes[0].destinations[0].graceful_peer_closes, 10);
}

#[test]
fn a_pool_that_closes_first_is_fine() {
    let mut d = diagnoser();
    let events: Vec<Event> = (0..10)
        .flat_map(|i| {
            let port = 41_000 + i;
            [
                client(u64::from(i) * 1000, port, open()),
                client(
                    u64::from(i) * 1000 + 600,
                    port,
                    Detail::Close(close(ClosedBy::Local, 500)),
                ),
                server(
                    u64::from(i) * 1000 + 600,
                    port,
                    Detail::Close(close(ClosedBy::Peer, 500)),
                ),
            ]
        })
        .collect();
    assert!(feed(&mut d, &events).is_empty());
    let report = d.report(Duration::from_secs(10));
    let client = report.processes.iter().find(|p| p.pid == CLIENT).unwrap();
    assert_eq!(
        client.destinations[0]
            .local_idle_timeout
            .unwrap()
            .timeout_ms,
        500.0
    );
}

#[test]
fn send_after_the_peers_fin_is_a_stale_reuse_and_upgrades_the_mismatch() {
    let mut d = diagnoser();
    let mut findings = feed(&mut d, &peer_closes(3, &[1000]));
    // Loopback order: the peer's reset and the close are processed inside the
    // send, so they arrive before the reuse event.
    findings.extend(feed(
        &mut d,
        &[
            client(10_000, 42_000, open()),
            client(11_500, 42_000, reset(Direction::In, None)),
            client(11_500, 42_000, Detail::Close(close(ClosedBy::Peer, 1000))),
            client(11_501, 42_000, reuse(1500, true)),
        ],
    ));
    let stale = findings
        .iter()
        .find(|f| f.kind == FindingKind::StaleReuse)
        .expect("stale_reuse");
    assert_eq!(stale.evidence["idle_before_reuse_ms"], 1500);
    assert_eq!(stale.evidence["came_back"], "RST");
    assert_eq!(stale.evidence["peer_closed_before_send"], true);
    assert_eq!(stale.evidence["peer_idle_timeout_ms"], 1000.0);
    let upgraded = findings
        .iter()
        .rfind(|f| f.kind == FindingKind::IdleTimeoutMismatch)
        .unwrap();
    assert_eq!(upgraded.severity, Severity::Error);
    assert_eq!(upgraded.evidence["max_reuse_idle_ms"], 1500.0);
    assert!(
        upgraded.recommendation.contains("up to 1.5 s"),
        "{}",
        upgraded.recommendation
    );
}

#[test]
fn a_reset_right_after_a_reuse_is_a_stale_reuse() {
    let mut d = diagnoser();
    let findings = feed(
        &mut d,
        &[
            client(0, 43_000, open()),
            client(5_000, 43_000, reuse(4_900, false)),
            client(5_030, 43_000, reset(Direction::In, None)),
        ],
    );
    assert_eq!(kinds(&findings), [FindingKind::StaleReuse]);
    assert_eq!(findings[0].evidence["came_back"], "RST");
}

#[test]
fn a_reset_after_the_response_came_back_is_not_a_stale_reuse() {
    // A 401 with `Connection: close` and an unread body ends in a RST, after the
    // reply: the request did not fail for staleness.
    let mut d = diagnoser();
    let mut answered = reset(Direction::In, None);
    if let Detail::Reset(r) = &mut answered {
        r.awaiting_reply = false;
    }
    let findings = feed(
        &mut d,
        &[
            client(0, 43_050, open()),
            client(5_000, 43_050, reuse(4_900, false)),
            client(5_030, 43_050, answered),
        ],
    );
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn a_reused_port_starts_a_new_connection() {
    let mut d = diagnoser();
    let stale_on = |d: &mut Diagnoser, t: u64| {
        feed(
            d,
            &[
                client(t, 43_060, open()),
                client(t + 5_000, 43_060, reuse(4_900, false)),
                client(t + 5_010, 43_060, reset(Direction::In, None)),
                client(
                    t + 5_010,
                    43_060,
                    Detail::Close(close(ClosedBy::ResetPeer, 0)),
                ),
            ],
        )
    };
    assert_eq!(kinds(&stale_on(&mut d, 0)), [FindingKind::StaleReuse]);
    // The same local port to the same destination, a minute later.
    assert_eq!(kinds(&stale_on(&mut d, 60_000)), [FindingKind::StaleReuse]);
    assert_eq!(d.findings()[0].count, 2);
}

#[test]
fn a_clients_reset_after_its_own_close_is_not_a_late_request() {
    // The server sent late data to a client's TIME_WAIT remnant.
    let mut d = diagnoser();
    let findings = feed(
        &mut d,
        &[
            client(0, 43_070, open()),
            client(1_000, 43_070, Detail::Close(close(ClosedBy::Local, 900))),
            client(1_500, 43_070, reset(Direction::Out, Some(ClosedBy::Local))),
        ],
    );
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn a_reset_long_after_a_reuse_or_after_a_short_pause_is_not() {
    let mut d = diagnoser();
    let findings = feed(
        &mut d,
        &[
            client(0, 43_100, open()),
            client(5_000, 43_100, reuse(4_900, false)),
            client(7_000, 43_100, reset(Direction::In, None)),
            client(0, 43_101, open()),
            // Not idle long enough to be a reuse: a busy connection's reset.
            client(5_000, 43_101, reuse(100, false)),
            client(5_010, 43_101, reset(Direction::In, None)),
        ],
    );
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn a_fin_answering_a_reused_request_is_a_stale_reuse() {
    let mut d = diagnoser();
    let mut fin = close(ClosedBy::Peer, 0);
    fin.awaiting_reply = true;
    fin.close_wait_ms = Some(1.0);
    let findings = feed(
        &mut d,
        &[
            client(0, 43_200, open()),
            client(3_000, 43_200, reuse(2_500, false)),
            client(3_010, 43_200, Detail::Close(fin)),
        ],
    );
    assert_eq!(kinds(&findings), [FindingKind::StaleReuse]);
    assert_eq!(findings[0].evidence["came_back"], "FIN");
}

#[test]
fn a_reset_from_a_closed_server_connection_is_a_late_request() {
    let mut d = diagnoser();
    let mut events = Vec::new();
    for i in 0..3 {
        let port = 44_000 + i;
        let t = u64::from(i) * 3_000;
        events.push(server(t, port, open()));
        events.push(server(
            t + 1_000,
            port,
            Detail::Close(close(ClosedBy::Local, 1000)),
        ));
        events.push(server(
            t + 1_500,
            port,
            reset(Direction::Out, Some(ClosedBy::Local)),
        ));
    }
    let findings = feed(&mut d, &events);
    let late: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.kind == FindingKind::LateRequestReset)
        .collect();
    assert!(!late.is_empty());
    let last = late.last().unwrap();
    assert_eq!((last.pid, last.lport), (SERVER, Some(SERVER_PORT)));
    assert_eq!(last.evidence["server_idle_timeout_ms"], 1000.0);
    assert_eq!(d.findings()[0].count, 3);
}

#[test]
fn a_reset_after_an_abortive_close_is_not_a_late_request() {
    let mut d = diagnoser();
    let findings = feed(
        &mut d,
        &[
            server(0, 44_100, open()),
            server(100, 44_100, Detail::Close(close(ClosedBy::ResetLocal, 50))),
            server(
                100,
                44_100,
                reset(Direction::Out, Some(ClosedBy::ResetLocal)),
            ),
        ],
    );
    assert!(findings.is_empty());
}

#[test]
fn unanswered_first_send_after_idle_is_a_silent_drop() {
    let mut d = diagnoser();
    let mut timeout = close(ClosedBy::Timeout, 0);
    timeout.error = Some("ETIMEDOUT".into());
    timeout.awaiting_reply = true;
    let retransmit = || {
        Detail::Retransmit(Retransmit {
            state: "ESTABLISHED",
            idle_ms: Some(6_000),
            retransmits: 1,
        })
    };
    let findings = feed(
        &mut d,
        &[
            client(0, 45_000, open()),
            client(5_000, 45_000, reuse(5_000, false)),
            client(5_200, 45_000, retransmit()),
            client(5_600, 45_000, retransmit()),
            client(6_400, 45_000, retransmit()),
            client(8_000, 45_000, Detail::Close(timeout)),
        ],
    );
    assert_eq!(kinds(&findings), [FindingKind::SilentDrop]);
    let evidence = &findings[0].evidence;
    assert_eq!(evidence["idle_before_send_ms"], 5000);
    assert_eq!(evidence["retransmits"], 3);
    assert_eq!(evidence["ended_with"], "ETIMEDOUT");
    assert_eq!(evidence["failed_after_ms"], 3000.0);
}

#[test]
fn a_retransmission_that_recovered_is_no_silent_drop() {
    // One retransmission, the response arrived, and a load balancer reset the
    // connection a minute later: nothing was outstanding.
    let mut d = diagnoser();
    let mut reset_close = close(ClosedBy::ResetPeer, 60_000);
    reset_close.error = Some("ECONNRESET".into());
    let findings = feed(
        &mut d,
        &[
            client(0, 45_050, open()),
            client(5_000, 45_050, reuse(5_000, false)),
            client(
                5_200,
                45_050,
                Detail::Retransmit(Retransmit {
                    state: "ESTABLISHED",
                    idle_ms: Some(5_200),
                    retransmits: 1,
                }),
            ),
            client(65_000, 45_050, Detail::Close(reset_close)),
        ],
    );
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn a_path_that_answers_with_a_reset_is_a_stale_reuse_not_a_silent_drop() {
    let mut d = diagnoser();
    let mut reset_close = close(ClosedBy::ResetPeer, 5_000);
    reset_close.error = Some("ECONNRESET".into());
    reset_close.awaiting_reply = true;
    let findings = feed(
        &mut d,
        &[
            client(0, 45_100, open()),
            client(5_000, 45_100, reuse(5_000, false)),
            client(5_001, 45_100, reset(Direction::In, None)),
            client(5_001, 45_100, Detail::Close(reset_close)),
        ],
    );
    assert_eq!(kinds(&findings), [FindingKind::StaleReuse]);
}

#[test]
fn close_wait_leaks_are_counted_per_destination_and_process() {
    let mut d = diagnoser();
    let entry = |lport: u16, rport: u16, waiting_s: u64| CloseWaitEntry {
        sock: u64::from(lport),
        pid: CLIENT,
        comm: "leaky".into(),
        laddr: localhost(),
        raddr: localhost(),
        rport,
        lport,
        waiting: Duration::from_secs(waiting_s),
    };
    // Under the 10 s threshold: nothing yet.
    assert!(d.close_wait_scan(at(0), &[entry(1, 80, 5)]).is_empty());
    let findings = d.close_wait_scan(
        at(7_000),
        &[
            entry(1, 80, 12),
            entry(2, 80, 11),
            entry(3, 443, 30),
            entry(4, 443, 2),
        ],
    );
    assert_eq!(findings.len(), 2);
    let to_80 = findings.iter().find(|f| f.rport == Some(80)).unwrap();
    assert_eq!(to_80.count, 2);
    assert_eq!(to_80.evidence["connections_in_process"], 3);
    assert_eq!(to_80.evidence["oldest_close_wait_s"], 12.0);
    // The same leak a second later is not reported again...
    assert!(
        d.close_wait_scan(at(8_000), &[entry(1, 80, 13), entry(2, 80, 12)])
            .is_empty()
    );
    // ...until it grows.
    let grown = d.close_wait_scan(
        at(9_000),
        &[
            entry(1, 80, 14),
            entry(2, 80, 13),
            entry(5, 80, 10),
            entry(6, 80, 10),
        ],
    );
    assert_eq!(grown.len(), 1);
    assert_eq!(grown[0].count, 4);
}

#[test]
fn findings_are_not_repeated_for_every_event() {
    let mut d = diagnoser();
    let findings = feed(&mut d, &peer_closes(5, &[1000]));
    // Reported at 3 closes; 4 and 5 do not double the count.
    assert_eq!(findings.len(), 1);
    let findings = feed(&mut d, &peer_closes(6, &[1000]));
    // Now 11 closes: reported again once the count doubled (at 6).
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].count, 6);
}

#[test]
fn the_report_has_the_latest_evidence_of_findings_not_reported_again() {
    let mut d = diagnoser();
    let reported = feed(&mut d, &peer_closes(5, &[1000]));
    assert_eq!(reported[0].count, 3);
    let last = reported[0].ts;
    // Closes 4 and 5 changed nothing material: not reported, but the report
    // counts them, as of the last one.
    let report = d.findings();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].count, 5);
    assert_eq!(report[0].evidence["peer_idle_closes"], 5);
    assert!(report[0].ts > last);
}

#[test]
fn report_groups_by_process_then_destination() {
    let mut d = diagnoser();
    feed(&mut d, &peer_closes(4, &[1000]));
    let report = d.report(Duration::from_secs(60));
    assert_eq!(report.processes.len(), 1);
    let process = &report.processes[0];
    assert_eq!((process.pid, process.comm.as_str()), (CLIENT, "client"));
    assert_eq!(process.findings.len(), 1);
    let destination = &process.destinations[0];
    assert_eq!(destination.connections_opened, 4);
    assert_eq!(destination.closed.peer, 4);
    let text = crate::sinks::report::text(&report);
    assert!(text.contains("client (pid 100)"), "{text}");
    assert!(text.contains("→ 127.0.0.1:8080 (client)"), "{text}");
    assert!(
        text.contains("peer idle timeout: 1.0 s (from 4 of 4 idle closes)"),
        "{text}"
    );
    assert!(
        text.contains("WARNING idle_timeout_mismatch 127.0.0.1:8080 (×4)"),
        "{text}"
    );
}

#[test]
fn safe_pool_timeouts_and_durations_read_well() {
    assert_eq!(safe_below(1000.0), 900.0);
    assert_eq!(safe_below(5000.0), 4500.0);
    assert_eq!(safe_below(75_000.0), 67_000.0);
    assert_eq!(safe_below(200.0), 100.0);
    assert_eq!(human_ms(900.0), "900 ms");
    assert_eq!(human_ms(1500.0), "1.5 s");
    assert_eq!(human_ms(75_000.0), "75 s");
    assert_eq!(human_ms(600_000.0), "10 min");
}

mod pools {
    use super::*;
    use crate::{
        host::{listeners::ListenerSample, surroundings::Surroundings},
        kernel::tables::{PoolCounters, PoolRef},
    };

    fn pool_key() -> DestinationKey {
        DestinationKey {
            pid: CLIENT,
            raddr: localhost(),
            rport: SERVER_PORT,
        }
    }

    /// Opens `n` client connections to the destination.
    fn open_connections(d: &mut Diagnoser, n: u16) {
        for port in 0..n {
            d.observe(&client(0, 46_000 + port, open()));
        }
    }

    /// Kernel counters after `seconds` of traffic on `size` connections, each
    /// busy `busy` of the time, serving 50 ms requests with gaps in `gap_bucket`.
    fn counters(seconds: u64, size: u64, busy: f64, gap_bucket: usize) -> PoolCounters {
        let busy_ns = (seconds as f64 * size as f64 * busy * 1e9) as u64;
        let responses = busy_ns / 50_000_000;
        let mut gaps = vec![0; 20];
        gaps[gap_bucket] = responses;
        PoolCounters {
            pool: PoolRef::Destination(pool_key()),
            busy: size,
            requests: responses + size,
            responses,
            busy_ns,
            gaps,
        }
    }

    fn scan_seconds(
        d: &mut Diagnoser,
        seconds: std::ops::RangeInclusive<u64>,
        counters_at: impl Fn(u64) -> PoolCounters,
    ) -> Vec<Finding> {
        seconds
            .flat_map(|s| d.pool_scan(at(s * 1000), &[counters_at(s)], &Surroundings::default()))
            .collect()
    }

    #[test]
    fn a_pool_busy_all_the_time_with_queued_requests_is_saturated() {
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        // Gaps of 64-128 µs: the next caller was waiting.
        let findings = scan_seconds(&mut d, 0..=6, |s| counters(s, 4, 0.99, 6));
        assert_eq!(kinds(&findings), [FindingKind::PoolSaturation]);
        let evidence = &findings[0].evidence;
        assert_eq!(evidence["pool_size"], 4);
        assert!(evidence["busy_fraction"].as_f64().unwrap() >= 0.9);
        assert_eq!(evidence["median_gap_us"], 96.0);
        assert_eq!(evidence["window_s"], 5);
        assert_eq!(evidence["mean_response_ms"], 50.0);
        assert!(
            findings[0]
                .recommendation
                .contains("Raise the pool above 4"),
            "{}",
            findings[0].recommendation
        );
    }

    #[test]
    fn a_client_that_needs_a_millisecond_between_requests_still_saturates_its_pool() {
        // Python's turnaround: 0.5-1 ms from reading a response to sending the
        // next request, against 50 ms exchanges.
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        let findings = scan_seconds(&mut d, 0..=6, |s| counters(s, 4, 0.98, 9));
        assert_eq!(kinds(&findings), [FindingKind::PoolSaturation]);
        let evidence = &findings[0].evidence;
        assert_eq!(evidence["median_gap_us"], 768.0);
        assert_eq!(evidence["max_requests_per_s"], 80.0);
        let rate = evidence["requests_per_s"].as_f64().unwrap();
        assert!((78.0..=80.0).contains(&rate), "{rate}");
        // (50 ms + 0.768 ms) / (4 + 1)
        assert_eq!(evidence["min_queued_ms"], 10.15);
        let advice = &findings[0].recommendation;
        assert!(
            advice.contains("4 connections × 1 / 50 ms = 80 requests/s"),
            "{advice}"
        );
        assert!(advice.contains("HTTP/2"), "{advice}");
    }

    #[test]
    fn fewer_callers_than_connections_leave_the_pool_unsaturated() {
        // Two callers back to back on a pool of four: two connections idle.
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        assert!(scan_seconds(&mut d, 0..=10, |s| counters(s, 4, 0.49, 9)).is_empty());
    }

    #[test]
    fn a_pool_busy_most_of_the_time_with_callers_not_waiting_is_fine() {
        // Busy 60%: each connection waits about as long as an exchange for
        // its next request (bucket 15: 32-64 ms).
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        assert!(scan_seconds(&mut d, 0..=10, |s| counters(s, 4, 0.6, 15)).is_empty());
    }

    #[test]
    fn a_busy_but_unsaturated_pool_is_fine() {
        let mut d = diagnoser();
        open_connections(&mut d, 16);
        assert!(scan_seconds(&mut d, 0..=10, |s| counters(s, 16, 0.25, 6)).is_empty());
    }

    #[test]
    fn busy_connections_with_slow_callers_are_not_queued_requests() {
        // Busy 95%, but each caller thinks 30 ms before its next request.
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        assert!(scan_seconds(&mut d, 0..=10, |s| counters(s, 4, 0.95, 14)).is_empty());
    }

    #[test]
    fn a_burst_shorter_than_the_window_is_not_saturation() {
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        let findings = scan_seconds(&mut d, 0..=10, |s| {
            // Saturated from second 3 to 5, idle otherwise.
            let saturated = s.clamp(3, 6) - 3;
            let mut c = counters(saturated, 4, 0.99, 6);
            c.busy_ns += (s - saturated) * 4 * 100_000_000;
            c
        });
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn a_growing_pool_is_not_saturated() {
        let mut d = diagnoser();
        open_connections(&mut d, 4);
        let mut findings = Vec::new();
        for s in 0..=8u64 {
            // One more connection every second.
            d.observe(&client(s * 1000, 47_000 + s as u16, open()));
            findings.extend(d.pool_scan(
                at(s * 1000),
                &[counters(s, 4 + s, 0.99, 6)],
                &Surroundings::default(),
            ));
        }
        assert!(findings.is_empty(), "{findings:#?}");
    }

    /// `rate` connections per second to the destination, each serving
    /// `requests` requests and closed by the client after 2 ms.
    fn churn_traffic(d: &mut Diagnoser, seconds: u64, rate: u16, requests: u64) -> Vec<Finding> {
        let mut findings = Vec::new();
        let mut total_requests = 0;
        for s in 0..=seconds {
            for i in 0..rate {
                let port = 20_000 + i;
                let t = s * 1000 + u64::from(i);
                d.observe(&client(t, port, open()));
                let mut c = close(ClosedBy::Local, 0);
                c.duration_ms = Some(2.0);
                d.observe(&client(t + 2, port, Detail::Close(c)));
                total_requests += requests;
            }
            let counters = PoolCounters {
                pool: PoolRef::Destination(pool_key()),
                busy: 0,
                requests: total_requests,
                responses: total_requests,
                busy_ns: total_requests * 1_000_000,
                gaps: vec![0; 20],
            };
            let mut around = Surroundings::default();
            around.time_wait.insert(pool_key(), 1500);
            around.port_range.insert(CLIENT, 28_232);
            findings.extend(d.pool_scan(at(s * 1000 + 999), &[counters], &around));
        }
        findings
    }

    #[test]
    fn one_request_per_connection_at_a_high_rate_is_churn() {
        let mut d = diagnoser();
        let findings = churn_traffic(&mut d, 6, 300, 1);
        assert_eq!(kinds(&findings), [FindingKind::ConnectionChurn]);
        let evidence = &findings[0].evidence;
        assert_eq!(evidence["new_connections_per_s"], 300.0);
        assert_eq!(evidence["requests_per_connection"], 1.0);
        assert_eq!(evidence["time_wait"], 1500);
        assert_eq!(evidence["closed_by_this_side"], 1800);
    }

    #[test]
    fn many_connections_each_well_used_are_not_churn() {
        let mut d = diagnoser();
        assert!(churn_traffic(&mut d, 6, 300, 20).is_empty());
    }

    #[test]
    fn few_new_connections_are_not_churn() {
        let mut d = diagnoser();
        assert!(churn_traffic(&mut d, 6, 20, 1).is_empty());
    }

    #[test]
    fn address_not_available_is_port_exhaustion() {
        let mut d = diagnoser();
        let error = Detail::ConnectError(crate::event::ConnectError {
            error: "EADDRNOTAVAIL".into(),
            connect_us: 3,
        });
        let errors: Vec<Event> = (0..3).map(|t| client(t, 0, error.clone())).collect();
        let findings = feed(&mut d, &errors);
        // Reported at the first error, again when the count doubled, not at the third.
        assert_eq!(
            kinds(&findings),
            [FindingKind::PortExhaustion, FindingKind::PortExhaustion]
        );
        assert_eq!(findings[0].evidence["eaddrnotavail"], 1);
        assert_eq!(d.findings()[0].count, 3);
    }

    fn listener(depth: u32, drops: u64) -> ListenerSample {
        ListenerSample {
            pid: SERVER,
            comm: "server".into(),
            lport: SERVER_PORT,
            depth,
            limit: 4,
            netns_drops: drops,
            somaxconn: Some(4096),
        }
    }

    #[test]
    fn a_full_accept_queue_with_drops_is_an_overflow() {
        let mut d = diagnoser();
        assert!(d.listener_scan(at(0), &[listener(2, 0)]).is_empty());
        let findings = d.listener_scan(at(1000), &[listener(5, 12)]);
        assert_eq!(kinds(&findings), [FindingKind::AcceptQueueOverflow]);
        let evidence = &findings[0].evidence;
        assert_eq!(evidence["backlog_limit"], 4);
        assert_eq!(evidence["peak_depth"], 5);
        assert_eq!(evidence["dropped"], 12);
        assert_eq!(findings[0].severity, Severity::Error);
        assert_eq!(findings[0].lport, Some(SERVER_PORT));
    }

    #[test]
    fn a_queue_that_drains_is_fine() {
        let mut d = diagnoser();
        let findings: Vec<Finding> = (0..10)
            .flat_map(|s| d.listener_scan(at(s * 1000), &[listener((s % 3) as u32, 0)]))
            .collect();
        assert!(findings.is_empty());
    }

    #[test]
    fn queued_connections_behind_idle_keepalive_workers_are_starvation() {
        let mut d = diagnoser();
        // Four accepted connections, idle after one request each.
        for port in 0..4 {
            d.observe(&server(0, 48_000 + port, open()));
        }
        let server_pool = || PoolCounters {
            pool: PoolRef::Listener(ListenerKey {
                pid: SERVER,
                lport: SERVER_PORT,
            }),
            busy: 0,
            requests: 4,
            responses: 4,
            busy_ns: 4_000_000,
            gaps: vec![0; 20],
        };
        let mut findings = Vec::new();
        for s in 0..=4 {
            findings.extend(d.pool_scan(at(s * 1000), &[server_pool()], &Surroundings::default()));
            findings
                .extend(d.listener_scan(at(s * 1000), &[listener(if s >= 1 { 3 } else { 0 }, 0)]));
        }
        assert_eq!(kinds(&findings), [FindingKind::KeepaliveWorkerStarvation]);
        let evidence = &findings[0].evidence;
        assert_eq!(evidence["queued"], 3);
        assert_eq!(evidence["idle_keepalive_connections"], 4);
        assert_eq!(evidence["open_connections"], 4);
    }
}
