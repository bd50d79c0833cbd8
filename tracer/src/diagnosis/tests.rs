//! The rules on hand-built event sequences.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::*;
use crate::event::{
    Close, ClosedBy, Detail, Direction, Event, Open, Reset, Retransmit, Reuse, Role,
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
fn a_path_that_answers_with_a_reset_is_a_stale_reuse_not_a_silent_drop() {
    let mut d = diagnoser();
    let mut reset_close = close(ClosedBy::ResetPeer, 5_000);
    reset_close.error = Some("ECONNRESET".into());
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
        pid: CLIENT,
        comm: "leaky".into(),
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
    let text = report.to_text();
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
