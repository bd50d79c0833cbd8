//! Rendering the registry as OpenMetrics, or as the Prometheus text format for
//! scrapers that do not ask for OpenMetrics.

use prometheus_client::{encoding::text::encode, registry::Registry};

pub use crate::endpoint::MetricsFormat;

pub fn render(registry: &Registry, format: MetricsFormat) -> Vec<u8> {
    let mut text = String::new();
    if encode(&mut text, registry).is_err() {
        // Encoding into a String cannot fail; an empty answer beats a panic.
        return Vec::new();
    }
    match format {
        MetricsFormat::OpenMetrics => text.into_bytes(),
        MetricsFormat::PrometheusText => to_prometheus_text(&text).into_bytes(),
    }
}

/// OpenMetrics differs from the Prometheus text format (0.0.4) in three ways
/// that matter here: counters are described under the name without `_total`
/// (their samples have it), metadata may carry `# UNIT`, and the exposition
/// ends with `# EOF`. Everything else this registry produces is the same.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // Held back until the TYPE line says whether the name changes.
            if let Some(previous) = help.replace(rest) {
                out.push_str("# HELP ");
                out.push_str(previous);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(previous) = help.take() {
            out.push_str("# HELP ");
            out.push_str(previous);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_take_their_total_name_and_openmetrics_markers_go() {
        let openmetrics = "# HELP tcptracer_events Events read.\n\
                           # TYPE tcptracer_events counter\n\
                           tcptracer_events_total 5\n\
                           # HELP tcptracer_pool_connections Open.\n\
                           # TYPE tcptracer_pool_connections gauge\n\
                           tcptracer_pool_connections{comm=\"a\"} 2\n\
                           # EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP tcptracer_events_total Events read.\n\
             # TYPE tcptracer_events_total counter\n\
             tcptracer_events_total 5\n\
             # HELP tcptracer_pool_connections Open.\n\
             # TYPE tcptracer_pool_connections gauge\n\
             tcptracer_pool_connections{comm=\"a\"} 2\n"
        );
    }
}
