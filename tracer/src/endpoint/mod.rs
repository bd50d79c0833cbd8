//! The agent's Prometheus endpoint: an HTTP/1.1 server for `/metrics` and
//! `/healthz`, hardened the way Prometheus's exporters are.
//!
//! The endpoint runs inside the agent, next to the loop that drains the kernel's
//! ring buffer, so no client may be able to slow that loop down or exhaust the
//! agent's memory or file descriptors:
//!
//! - a client that opens a connection and sends its request headers slowly, or
//!   nothing at all (slowloris), is disconnected after
//!   [`EndpointConfig::header_timeout`], which also bounds a TLS handshake;
//!   connections are not kept alive after their response;
//! - every exchange, from the moment its headers have been read until its
//!   response is written, is bounded by [`EndpointConfig::request_timeout`]
//!   (rendering included), so a scraper that stops reading cannot hold a
//!   connection either;
//! - at most [`EndpointConfig::max_connections`] connections are served at once.
//!   Further connections are not refused: they wait in the kernel's accept
//!   queue until one closes, so a burst of scrapers is served in turn rather
//!   than failed. The timeouts above free the slot of any idle or stalled
//!   connection; only a client that keeps sending requests keeps its slot;
//! - rendering and bcrypt run on tokio's blocking pool, never on the runtime's
//!   thread (the agent runs a current-thread runtime);
//! - an error on one connection is logged at debug level and ends only that
//!   connection.
//!
//! TLS and basic authentication come from a web config file in the format of
//! Prometheus's exporter-toolkit (`--web.config.file`); the `web_config`
//! module says what of it is supported. With basic auth configured, every
//! path, `/healthz` included, requires it.
//!
//! `/metrics` answers in OpenMetrics or the Prometheus text format as the
//! `Accept` header asks, gzipped when `Accept-Encoding` allows (Prometheus
//! always does). Every other path is a 404, every method but GET and HEAD a 405.
//!
//! This file is the public surface: the configuration, the errors, [`bind`]
//! and [`serve`], and the accept loop that holds to `max_connections`. What
//! happens on a connection once it has been accepted is in `http` (the TLS
//! handshake, hyper, routing, content negotiation, gzip); the write deadline
//! that cuts off a client that does not read is in `deadline`.

mod deadline;
mod http;
#[cfg(test)]
mod tests;
mod web_config;

use std::{
    future::Future, io, net::SocketAddr, path::PathBuf, pin::Pin, sync::Arc, time::Duration,
};

use log::debug;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use http::{Shared, connection};
use web_config::WebConfig;

/// Where and how the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    pub addr: SocketAddr,
    /// A web config file (exporter-toolkit format) enabling TLS and basic auth.
    pub web_config: Option<PathBuf>,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, counted from
    /// when its connection is accepted (after the TLS handshake, which has the
    /// same bound). Every connection carries one request: the endpoint closes
    /// it after the response, so no idle connection races this timeout.
    pub header_timeout: Duration,
    /// How long one exchange may take once its headers have been read:
    /// rendering the metrics and writing the response to the client. Like Go's
    /// `http.Server.WriteTimeout`; with `header_timeout` it bounds a request end
    /// to end.
    pub request_timeout: Duration,
}

impl EndpointConfig {
    pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// Plain HTTP on `addr`, with the default limits.
    pub fn new(addr: SocketAddr) -> Self {
        EndpointConfig {
            addr,
            web_config: None,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// The two text formats a scraper can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricsFormat {
    /// OpenMetrics 1.0 (`application/openmetrics-text`), which Prometheus asks
    /// for first: it carries exemplars, units and `_created` series.
    OpenMetrics,
    /// The Prometheus text format 0.0.4, which every scraper understands.
    PrometheusText,
}

impl MetricsFormat {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            MetricsFormat::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What the endpoint serves. Both calls run on tokio's blocking pool: they may
/// take locks and time, but should not wait for the network.
pub trait MetricsSource: Send + Sync + 'static {
    /// Every metric, encoded in `format`.
    fn render(&self, format: MetricsFormat) -> Vec<u8>;
    /// Whether `/healthz` answers 200 (else 503).
    fn healthy(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid metrics endpoint configuration: {0}")]
    Config(&'static str),
    #[error("cannot listen on {addr}{hint}")]
    Bind {
        addr: SocketAddr,
        /// Why, when the error says it plainly (the port is taken, ...).
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the web config {path}")]
    ReadWebConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Malformed YAML, an unknown key (named, with its line), a value of the
    /// wrong type.
    #[error("cannot parse the web config {path}")]
    ParseWebConfig {
        path: PathBuf,
        #[source]
        source: serde_norway::Error,
    },
    /// A key the file format knows but this agent does not implement, or a
    /// value it cannot use.
    #[error("web config {path}: {key}: {reason}")]
    InvalidWebConfig {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("cannot read the TLS {what} file {path}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the TLS {what} file {path} holds no {expected}")]
    TlsFileEmpty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("cannot use the TLS certificate {cert} with the key {key}")]
    TlsKeyPair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot verify client certificates with the CAs of {path}")]
    TlsClientCa {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A bound, not yet serving, endpoint: [`bind`] it, learn [`Endpoint::local_addr`]
/// (when port 0 was asked for), then [`Endpoint::run`] it.
pub struct Endpoint {
    listener: TcpListener,
    local_addr: SocketAddr,
    config: EndpointConfig,
    web: WebConfig,
}

/// Binds the listening socket and loads the web config (certificates, users),
/// so that every configuration error shows up before serving starts.
pub async fn bind(config: EndpointConfig) -> Result<Endpoint, EndpointError> {
    if config.max_connections == 0 {
        return Err(EndpointError::Config(
            "max_connections is 0: no client could ever be served",
        ));
    }
    if config.header_timeout.is_zero() || config.request_timeout.is_zero() {
        return Err(EndpointError::Config(
            "header_timeout and request_timeout must be above 0",
        ));
    }
    let web = match &config.web_config {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    let bind_error = |source: io::Error| EndpointError::Bind {
        addr: config.addr,
        hint: bind_hint(&source),
        source,
    };
    let listener = TcpListener::bind(config.addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    Ok(Endpoint {
        listener,
        local_addr,
        config,
        web,
    })
}

/// [`bind`], then [`Endpoint::run`] until `shutdown` completes.
pub async fn serve(
    config: EndpointConfig,
    source: Arc<dyn MetricsSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), EndpointError> {
    bind(config).await?.run(source, shutdown).await;
    Ok(())
}

fn bind_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::AddrInUse => ": the port is in use (is another agent or exporter running?)",
        io::ErrorKind::AddrNotAvailable => ": the address is not one of this host's",
        io::ErrorKind::PermissionDenied => ": ports below 1024 need root or CAP_NET_BIND_SERVICE",
        _ => "",
    }
}

impl Endpoint {
    /// The address actually bound: the configured one, with the port the
    /// kernel chose when it was 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether the web config enabled TLS (the URL is `https://`).
    pub fn tls_enabled(&self) -> bool {
        self.web.tls.is_some()
    }

    /// Serves until `shutdown` completes. Then it stops accepting, lets each
    /// connection finish the response it is writing (idle ones close at once)
    /// and returns when all have closed, or after `request_timeout` at most,
    /// dropping the stragglers. Nothing that happens on a connection ends it.
    pub async fn run(self, source: Arc<dyn MetricsSource>, shutdown: impl Future<Output = ()>) {
        let Endpoint {
            listener,
            config,
            web,
            ..
        } = self;
        let shared = Arc::new(Shared {
            source,
            auth: web.basic_auth.map(Arc::new),
            headers: web.headers,
            request_timeout: config.request_timeout,
        });
        let tls = web.tls.map(TlsAcceptor::from);
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);

        loop {
            while let Some(finished) = connections.try_join_next() {
                log_panic(finished);
            }
            // The limit: at max_connections, stop accepting until one closes.
            // Clients keep queueing in the kernel's accept queue meanwhile.
            if connections.len() >= config.max_connections {
                tokio::select! {
                    () = &mut shutdown => break,
                    Some(finished) = connections.join_next() => log_panic(finished),
                }
                continue;
            }
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if accept_failed(e, &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            connections.spawn(connection(
                stream,
                peer,
                Arc::clone(&shared),
                tls.clone(),
                config.header_timeout,
                stopped.clone(),
            ));
        }

        // New clients are refused from here on; connections finish what they
        // are doing.
        drop(listener);
        stop.send_replace(true);
        let drained = tokio::time::timeout(config.request_timeout, async {
            while let Some(finished) = connections.join_next().await {
                log_panic(finished);
            }
        })
        .await;
        if drained.is_err() {
            debug!(
                "metrics endpoint: dropping {} connections at shutdown",
                connections.len()
            );
        }
    }
}

/// An accept() error. Those of one connection (it was reset before being
/// accepted, ...) are skipped; running out of file descriptors or memory is
/// waited out a little, as Go's net/http does, instead of spinning. True when
/// `shutdown` completed meanwhile (it must not be polled again).
async fn accept_failed(
    error: io::Error,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let exhausted = matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !exhausted {
        debug!("metrics endpoint: accept: {error}");
        return false;
    }
    log::warn!("metrics endpoint: cannot accept connections: {error}");
    tokio::select! {
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(Duration::from_millis(100)) => false,
    }
}

fn log_panic(finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished
        && e.is_panic()
    {
        debug!("metrics endpoint: a connection task panicked: {e}");
    }
}
