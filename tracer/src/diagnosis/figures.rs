//! How findings write their numbers and places: durations people read, a
//! timeout safely below another, `addr:port`.

use std::{net::IpAddr, time::Duration};

/// A duration in milliseconds.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A pool idle timeout safely below a peer's `timeout_ms`: 10% under it, at
/// least a jiffy-proof 100 ms under for short timeouts, rounded down to a figure
/// people write in configuration files.
pub fn safe_below(timeout_ms: f64) -> f64 {
    let target = (timeout_ms * 0.9)
        .min(timeout_ms - 100.0)
        .max(timeout_ms / 2.0);
    let step = if target >= 10_000.0 {
        1000.0
    } else if target >= 1000.0 {
        100.0
    } else {
        10.0
    };
    (target / step).floor() * step
}

/// `950 ms`, `1.2 s`, `75 s`, `5 min`.
pub fn human_ms(value_ms: f64) -> String {
    if value_ms < 1000.0 {
        format!("{value_ms:.0} ms")
    } else if value_ms < 10_000.0 {
        format!("{:.1} s", value_ms / 1000.0)
    } else if value_ms < 600_000.0 {
        format!("{:.0} s", value_ms / 1000.0)
    } else {
        format!("{:.0} min", value_ms / 60_000.0)
    }
}

/// `192.0.2.1:80`, `[2001:db8::1]:80`.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// `850 µs`, then as [`human_ms`].
pub fn human_us(value_us: f64) -> String {
    if value_us < 1000.0 {
        format!("{value_us:.0} µs")
    } else {
        human_ms(value_us / 1000.0)
    }
}

/// Rounded to two decimals, for evidence.
pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// `Text` from `text`.
pub fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
