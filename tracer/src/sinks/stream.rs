//! Writing events for people (aligned text, like tcplife) and for tools (JSON lines).

use std::{
    fmt::Write as _,
    io::{self, Write},
    time::SystemTime,
};

use super::Sink;
use crate::{
    diagnosis::{figures::endpoint, finding::Finding},
    event::{Detail, Event, Role, rfc3339},
    pipeline::Batch,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Text,
    /// One JSON object per line (docs/events.md).
    Json,
}

pub struct EventWriter<W: Write> {
    out: W,
    format: Format,
    header_written: bool,
}

impl<W: Write> EventWriter<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self {
            out,
            format,
            header_written: false,
        }
    }

    pub fn write(&mut self, event: &Event) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, event)?;
                self.out.write_all(b"\n")
            }
            Format::Text => {
                if !self.header_written {
                    self.header_written = true;
                    writeln!(
                        self.out,
                        "{:<15} {:<13} {:>7} {:<15} {:<7} {:<28} {:<28} DETAILS",
                        "TIME(UTC)", "TYPE", "PID", "COMM", "ROLE", "LOCAL", "REMOTE"
                    )?;
                }
                writeln!(self.out, "{}", text_line(event))
            }
        }
    }

    /// A finding: one JSON line, or for people a marked line with the
    /// recommendation below it.
    pub fn write_finding(&mut self, finding: &Finding) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, finding)?;
                self.out.write_all(b"\n")
            }
            Format::Text => {
                let time = time_of_day(finding.ts);
                writeln!(
                    self.out,
                    "{time} FINDING {} {} {} (pid {}) {} ×{}\n    {}",
                    finding.severity.name().to_ascii_uppercase(),
                    finding.kind.name(),
                    finding.comm,
                    finding.pid,
                    finding.place(),
                    finding.count,
                    finding.recommendation
                )
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The stream as a sink: a batch's events and findings, each only when asked
/// for.
pub struct Stream<W: Write> {
    writer: EventWriter<W>,
    events: bool,
    findings: bool,
}

impl<W: Write> Stream<W> {
    pub fn new(out: W, format: Format, events: bool, findings: bool) -> Self {
        Self {
            writer: EventWriter::new(out, format),
            events,
            findings,
        }
    }
}

impl<W: Write> Sink for Stream<W> {
    fn take(&mut self, batch: &Batch) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.events {
            for event in &batch.events {
                self.writer.write(event)?;
            }
        }
        if self.findings {
            for finding in &batch.findings {
                self.writer.write_finding(finding)?;
            }
        }
        self.writer.flush()
    }
}

/// `22:04:01.123456` of `2026-11-28T22:04:01.123456Z`.
fn time_of_day(ts: SystemTime) -> String {
    let time = rfc3339(ts).to_string();
    time.get(11..26).map(str::to_owned).unwrap_or(time)
}

fn text_line(event: &Event) -> String {
    let time = time_of_day(event.ts);
    let role = match event.role {
        Role::Unknown => "-",
        role => role.name(),
    };
    let comm = if event.comm.is_empty() {
        "?"
    } else {
        &event.comm
    };
    format!(
        "{:<15} {:<13} {:>7} {:<15} {:<7} {:<28} {:<28} {}",
        time,
        event.kind,
        event.pid,
        comm,
        role,
        endpoint(event.laddr, event.lport),
        endpoint(event.raddr, event.rport),
        details(&event.detail)
    )
}

fn details(detail: &Detail) -> String {
    let mut s = String::new();
    let ms = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.1}ms"));
    match detail {
        Detail::Open(open) => {
            if let Some(us) = open.connect_us {
                let _ = write!(s, "connect={:.3}ms", us as f64 / 1000.0);
            }
            if let Some(us) = open.accept_wait_us {
                let _ = write!(s, "accept_wait={:.3}ms", us as f64 / 1000.0);
            }
        }
        Detail::Close(close) => {
            let _ = write!(
                s,
                "by={} dur={} idle={} tx={} rx={}",
                close.closed_by.name(),
                ms(close.duration_ms),
                close.idle_ms.map_or("-".to_string(), |v| format!("{v}ms")),
                close.bytes_sent,
                close.bytes_received
            );
            if let Some(wait) = close.close_wait_ms {
                let _ = write!(s, " close_wait={wait:.1}ms");
            }
            if let Some(error) = &close.error {
                let _ = write!(s, " error={error}");
            }
            if close.retransmits != 0 {
                let _ = write!(s, " retrans={}", close.retransmits);
            }
        }
        Detail::Reset(reset) => {
            let _ = write!(s, "{} in {}", reset.direction.name(), reset.state);
            if let Some(idle) = reset.idle_ms {
                let _ = write!(s, " idle={idle}ms");
            }
            if let (Some(since), Some(by)) = (reset.since_close_ms, &reset.closed_by) {
                let _ = write!(s, " {since:.1}ms after close by {}", by.name());
            }
        }
        Detail::Reuse(reuse) => {
            let _ = write!(s, "after idle={}ms bytes={}", reuse.idle_ms, reuse.bytes);
            if reuse.peer_closed {
                let _ = write!(s, " PEER HAD CLOSED");
            }
        }
        Detail::Retransmit(retransmit) => {
            let _ = write!(
                s,
                "in {} total={}",
                retransmit.state, retransmit.retransmits
            );
            if let Some(idle) = retransmit.idle_ms {
                let _ = write!(s, " peer_silent={idle}ms");
            }
        }
        Detail::ConnectError(error) => {
            let _ = write!(
                s,
                "{} after {:.3}ms",
                error.error,
                error.connect_us as f64 / 1000.0
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{
        net::IpAddr,
        time::{Duration, SystemTime},
    };

    use super::*;
    use crate::event::{Close, ClosedBy, ConnectError};

    fn close_event() -> Event {
        Event {
            ts: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_367_441_123_456),
            kind: "close",
            pid: 1234,
            comm: "curl".into(),
            laddr: IpAddr::from([127, 0, 0, 1]),
            lport: 40000,
            raddr: IpAddr::from([127, 0, 0, 1]),
            rport: 8080,
            role: Role::Client,
            detail: Detail::Close(Close {
                duration_ms: Some(301.25),
                bytes_sent: 10,
                bytes_received: 20,
                closed_by: ClosedBy::Local,
                idle_ms: Some(300),
                close_wait_ms: None,
                error: None,
                awaiting_reply: false,
                srtt_us: 40,
                retransmits: 0,
            }),
        }
    }

    #[test]
    fn text_is_one_aligned_line_per_event() {
        let mut out = Vec::new();
        let mut writer = EventWriter::new(&mut out, Format::Text);
        writer.write(&close_event()).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("TIME(UTC)"));
        assert_eq!(
            lines[1],
            "22:04:01.123456 close            1234 curl            client  127.0.0.1:40000              \
             127.0.0.1:8080               by=local dur=301.2ms idle=300ms tx=10 rx=20"
        );
    }

    #[test]
    fn json_is_one_object_per_line() {
        let mut out = Vec::new();
        let mut writer = EventWriter::new(&mut out, Format::Json);
        writer.write(&close_event()).unwrap();
        let mut error = close_event();
        error.kind = "connect_error";
        error.detail = Detail::ConnectError(ConnectError {
            error: "ECONNREFUSED".into(),
            connect_us: 42,
        });
        writer.write(&error).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["ts"], "2025-11-28T22:04:01.123456Z");
        assert_eq!(lines[0]["idle_ms"], 300);
        assert_eq!(lines[1]["type"], "connect_error");
        assert_eq!(lines[1]["error"], "ECONNREFUSED");
        assert_eq!(lines[1]["connect_us"], 42);
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        assert_eq!(endpoint("::1".parse().unwrap(), 443), "[::1]:443");
    }
}
