//! The `diagnose` report for people: per process its findings, then per
//! destination and listening port what the connections did.

use std::fmt::Write as _;

use crate::{
    diagnosis::{
        figures::{endpoint, human_ms},
        report::{Report, Traffic},
        samples::Summary,
    },
    event::Role,
};

/// The report as people read it.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let findings: usize = report.processes.iter().map(|p| p.findings.len()).sum();
    let _ = writeln!(
        out,
        "Connection report: {:.0} s, {} process{}, {} finding{}",
        report.duration_s,
        report.processes.len(),
        if report.processes.len() == 1 {
            ""
        } else {
            "es"
        },
        findings,
        if findings == 1 { "" } else { "s" }
    );
    for process in &report.processes {
        let _ = writeln!(out, "\n{} (pid {})", process.comm, process.pid);
        for finding in &process.findings {
            let _ = writeln!(
                out,
                "  {} {} {} (×{})\n    {}",
                finding.severity.name().to_ascii_uppercase(),
                finding.kind.name(),
                finding.place(),
                finding.count,
                wrap(&finding.recommendation, 4, 88)
            );
        }
        for traffic in &process.destinations {
            let target = match (traffic.raddr, traffic.rport) {
                (Some(addr), Some(port)) => endpoint(addr, port),
                _ => "?".into(),
            };
            let role = match traffic.role {
                Some(role @ (Role::Client | Role::Server)) => role.name(),
                _ => "pre-existing",
            };
            let _ = writeln!(out, "  → {target} ({role})");
            write_traffic(&mut out, traffic);
        }
        for traffic in &process.listeners {
            let _ = writeln!(
                out,
                "  ← clients on port {} (server)",
                traffic.lport.unwrap_or(0)
            );
            write_traffic(&mut out, traffic);
        }
    }
    out
}

fn write_traffic(out: &mut String, traffic: &Traffic) {
    let closed = &traffic.closed;
    let _ = writeln!(
        out,
        "      {} opened, {} closed: by peer {}, by this side {}, reset by peer {}, reset by \
         this side {}, timed out {}",
        traffic.connections_opened,
        closed.total(),
        closed.peer,
        closed.local,
        closed.reset_peer,
        closed.reset_local,
        closed.timeout
    );
    let line = |out: &mut String, label: &str, summary: &Option<Summary>| {
        if let Some(s) = summary {
            let _ = writeln!(
                out,
                "      {label:<28} p50 {}  p90 {}  max {}  (n={})",
                human_ms(s.p50_ms),
                human_ms(s.p90_ms),
                human_ms(s.max_ms),
                s.count
            );
        }
    };
    line(out, "idle when the peer closed", &traffic.peer_close_idle);
    line(out, "idle when this side closed", &traffic.local_close_idle);
    line(out, "idle before reuse", &traffic.reuse_idle);
    line(out, "in CLOSE_WAIT", &traffic.close_wait);
    line(out, "connection lifetime", &traffic.lifetime);
    line(out, "connect (SYN to established)", &traffic.connect_time);
    line(out, "wait to be accepted", &traffic.accept_wait);
    if !traffic.connect_errors.is_empty() {
        let errors: Vec<String> = traffic
            .connect_errors
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect();
        let _ = writeln!(out, "      connect errors: {}", errors.join(", "));
    }
    if let Some(pool) = &traffic.pool {
        let _ = writeln!(
            out,
            "      last {} s: {} open, {} busy now, busy {:.0}% of the time, {:.1} requests/s, \
             {:.1} new connections/s{}{}{}",
            pool.seconds,
            pool.open_now,
            pool.busy_now,
            pool.busy_fraction * 100.0,
            pool.requests_per_s,
            pool.new_connections_per_s,
            pool.mean_response_ms
                .map(|ms| format!(", response {}", human_ms(ms)))
                .unwrap_or_default(),
            pool.median_gap_us
                .map(|us| format!(", next request {us:.0} µs after a response"))
                .unwrap_or_default(),
            if pool.saturated_s > 0.0 {
                format!(", saturated {:.0} s in all", pool.saturated_s)
            } else {
                String::new()
            },
        );
    }
    if traffic.graceful_peer_closes > 0 {
        let _ = writeln!(
            out,
            "      {} graceful peer closes right after a response (Connection: close, request limits)",
            traffic.graceful_peer_closes
        );
    }
    if traffic.mid_request_peer_closes > 0 {
        let _ = writeln!(
            out,
            "      {} peer closes while a request was outstanding",
            traffic.mid_request_peer_closes
        );
    }
    if let Some(e) = traffic.peer_idle_timeout {
        let _ = writeln!(
            out,
            "      peer idle timeout: {} (from {} of {} idle closes)",
            human_ms(e.timeout_ms),
            e.samples,
            e.considered
        );
    }
    if let Some(e) = traffic.local_idle_timeout {
        let _ = writeln!(
            out,
            "      this side's idle timeout: {} (from {} of {} closes)",
            human_ms(e.timeout_ms),
            e.samples,
            e.considered
        );
    }
}

/// Wraps `text` at `width` columns, indenting continuation lines by `indent`.
/// A unit stays with its number ("1.5 s" never breaks).
fn wrap(text: &str, indent: usize, width: usize) -> String {
    let mut words: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        let unit = matches!(
            word.trim_end_matches([',', '.', ')', ';', ':']),
            "s" | "ms" | "min"
        );
        match words.last_mut() {
            Some(last) if unit && last.ends_with(|c: char| c.is_ascii_digit()) => {
                last.push(' ');
                last.push_str(word);
            }
            _ => words.push(word.to_string()),
        }
    }
    let mut out = String::new();
    let mut column = indent;
    for word in words {
        if column + word.len() + 1 > width && column > indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            column = indent;
        } else if column > indent {
            out.push(' ');
            column += 1;
        }
        column += word.len();
        out.push_str(&word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_long_recommendations() {
        let text = "one two three four five six seven eight nine ten";
        assert_eq!(
            wrap(text, 2, 16),
            "one two three\n  four five six\n  seven eight\n  nine ten"
        );
    }
}
