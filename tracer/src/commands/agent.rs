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
    sinks::{
        metrics::{Metrics, MetricsOptions},
        stream::Stream,
    },
};

use super::stream;
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

    let mut log = Stream::new(
        std::io::BufWriter::new(std::io::stdout().lock()),
        args.format,
        args.events,
        true,
    );
    let mut metrics_sink = Arc::clone(&metrics);
    let outcome = stream::run(pipeline, None, &mut [&mut metrics_sink, &mut log]).await;
    attached.store(false, Ordering::Relaxed);
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    outcome.map(drop)
}
