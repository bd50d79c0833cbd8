//! `tracer agent` (the default): diagnose continuously, log findings as they
//! happen, and serve Prometheus metrics.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use tracer::{
    endpoint::{self, EndpointConfig, MetricsFormat, MetricsSource},
    pipeline::{Batch, Pipeline},
    sinks::metrics::{Metrics, MetricsOptions},
};

use super::stream::{self, Show};
use crate::cli::{AgentArgs, KernelArgs};

/// What `/metrics` and `/healthz` answer with.
struct AgentSource {
    metrics: Arc<Metrics>,
    /// The programs are attached.
    attached: Arc<AtomicBool>,
}

impl MetricsSource for AgentSource {
    fn render(&self, format: MetricsFormat) -> Vec<u8> {
        self.metrics.render(format)
    }

    fn healthy(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }
}

pub async fn run(kernel: &KernelArgs, args: &AgentArgs) -> anyhow::Result<()> {
    let mut config = EndpointConfig::new(args.metrics_addr);
    config.web_config.clone_from(&args.web_config);
    // Configuration mistakes (a port in use, a bad web config) stop the agent
    // before it loads anything.
    let endpoint = endpoint::bind(config)
        .await
        .context("cannot serve metrics")?;
    let pipeline = stream::start(kernel, &args.filter, &args.diagnosis)?;
    let metrics = Arc::new(Metrics::new(
        MetricsOptions {
            max_destinations: args.metrics_max_destinations,
            max_processes: args.metrics_max_processes,
            min_idle: kernel.min_idle.into(),
            ring_buffer_bytes: u64::from(kernel.ring_buffer_size),
            tracked_limit: u64::from(kernel.max_connections),
        },
        pipeline.session().report(),
    ));
    let attached = Arc::new(AtomicBool::new(true));
    eprintln!(
        "tracer: metrics on {}://{}/metrics",
        if endpoint.tls_enabled() {
            "https"
        } else {
            "http"
        },
        endpoint.local_addr()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(endpoint.run(
        Arc::new(AgentSource {
            metrics: Arc::clone(&metrics),
            attached: Arc::clone(&attached),
        }),
        async {
            let _ = stopped.await;
        },
    ));

    let show = Show {
        format: args.format,
        events: args.events,
        findings: true,
    };
    let observe = |pipeline: &Pipeline, batch: &Batch| record(&metrics, pipeline, batch);
    let outcome = stream::run_pipeline(pipeline, show, None, observe).await;
    attached.store(false, Ordering::Relaxed);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    outcome.map(drop)
}

fn record(metrics: &Metrics, pipeline: &Pipeline, batch: &Batch) {
    for event in &batch.events {
        metrics.observe_event(event);
    }
    for finding in &batch.findings {
        metrics.observe_finding(finding);
    }
    for occurrence in &batch.occurrences {
        metrics.observe_occurrence(occurrence);
    }
    if let Some(scan) = &batch.scan {
        metrics.observe_scan(
            pipeline.diagnoser(),
            &scan.pools,
            &scan.close_waits,
            pipeline.stats(),
            scan.ring_buffer_peak,
        );
    }
}
