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

mod web_config;

use std::{
    future::Future,
    io::{self, Write as _},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderMap, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;

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
    /// when the server starts waiting for them: on a new connection (after the
    /// TLS handshake, which has the same bound) or after the previous response
    /// on a keep-alive one. So it is also the idle timeout of keep-alive
    /// connections (a scraper's Go client retries a GET whose idle connection
    /// the server closed just as it was reused).
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

/// What every connection shares.
struct Shared {
    source: Arc<dyn MetricsSource>,
    auth: Option<Arc<web_config::BasicAuth>>,
    /// Extra response headers from `http_server_config.headers`.
    headers: Vec<(header::HeaderName, HeaderValue)>,
    request_timeout: Duration,
}

/// One connection, from the TLS handshake to its close. Errors end here.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
    stop: watch::Receiver<bool>,
) {
    // Responses are written in one go; nothing gains from Nagle's delay.
    let _ = stream.set_nodelay(true);
    let deadline = WriteDeadline::default();
    let io = DeadlineIo::new(stream, deadline.clone());
    let result = match tls {
        None => serve_http(io, shared, header_timeout, deadline, stop).await,
        // hyper's header timeout starts only once TLS is up: the handshake
        // gets the same bound, else a client that sends nothing after
        // connecting would hold its slot forever.
        Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(io)).await {
            Ok(Ok(io)) => serve_http(io, shared, header_timeout, deadline, stop).await,
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the TLS handshake timed out".into()),
        },
    };
    if let Err(e) = result {
        debug!("metrics endpoint: connection from {peer}: {}", chain(&*e));
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve_http<I>(
    io: I,
    shared: Arc<Shared>,
    header_timeout: Duration,
    deadline: WriteDeadline,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        // The headers are in: the exchange's clock starts.
        let until = Instant::now() + shared.request_timeout;
        deadline.set(until);
        async move {
            match tokio::time::timeout_at(until, respond(&shared, request)).await {
                Ok(response) => Ok(response),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the response was not ready within the request timeout",
                )),
            }
        }
    });
    // No keep-alive: an idle connection kept open between scrapes would be
    // closed by header_timeout just as the next scrape reuses it — the very
    // race this tool diagnoses in others. One connection per scrape costs
    // nothing at scrape rates.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result.map_err(Into::into),
        () = stopping(&mut stop) => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await.map_err(Into::into)
}

async fn stopping(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop as well.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// "error: cause: cause", as hyper and rustls keep the cause out of Display.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

async fn respond(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut response = route(shared, &request).await;
    let headers = response.headers_mut();
    for (name, value) in &shared.headers {
        headers.insert(name.clone(), value.clone());
    }
    response
}

async fn route(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    // Authentication first: an unauthenticated client learns nothing, not
    // even which paths exist.
    if let Some(auth) = &shared.auth
        && !auth
            .check(request.headers().get(header::AUTHORIZATION))
            .await
    {
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tracer\""),
        );
        return response;
    }
    let path = request.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let source = Arc::clone(&shared.source);
    if path == "/healthz" {
        return match tokio::task::spawn_blocking(move || source.healthy()).await {
            Ok(true) => text(StatusCode::OK, "ok\n"),
            Ok(false) => text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n"),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "health check failed\n"),
        };
    }

    let format = negotiate_format(request.headers());
    let gzip = accepts_gzip(request.headers());
    let rendered = tokio::task::spawn_blocking(move || {
        let body = source.render(format);
        if gzip {
            compress(&body).map_err(|_| body)
        } else {
            Err(body)
        }
    })
    .await;
    let (body, gzipped) = match rendered {
        Ok(Ok(compressed)) => (compressed, true),
        Ok(Err(plain)) => (plain, false),
        // The source panicked: this scrape fails, the server goes on.
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot render metrics\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Gzip at the fastest level: exposition text shrinks about tenfold even so,
/// and the agent's CPU is not for its scrapers.
fn compress(body: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// OpenMetrics when the client's `Accept` rates `application/openmetrics-text`
/// (any version) above zero and no lower than `text/plain`; the Prometheus
/// text format otherwise, including without an `Accept` header or with only
/// `*/*`.
///
/// Prometheus sends e.g. `application/openmetrics-text;version=1.0.0,
/// application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
fn negotiate_format(headers: &HeaderMap) -> MetricsFormat {
    let mut openmetrics = 0.0f32;
    let mut text = 0.0f32;
    for (media, q) in weighted_values(headers, header::ACCEPT) {
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            openmetrics = openmetrics.max(q);
        } else if media.eq_ignore_ascii_case("text/plain") {
            text = text.max(q);
        }
    }
    if openmetrics > 0.0 && openmetrics >= text {
        MetricsFormat::OpenMetrics
    } else {
        MetricsFormat::PrometheusText
    }
}

/// Whether `Accept-Encoding` allows gzip (Prometheus sends `gzip`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for (coding, q) in weighted_values(headers, header::ACCEPT_ENCODING) {
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(gzip.unwrap_or(0.0f32).max(q));
        } else if coding == "*" {
            any = Some(q);
        }
    }
    gzip.or(any).is_some_and(|q| q > 0.0)
}

/// The `value;q=N` items of every `name` header, with their weight (1 when
/// not given). Items with an unreadable weight are skipped, as RFC 9110 lets
/// a server do with malformed ones.
fn weighted_values(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> impl Iterator<Item = (&str, f32)> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';');
            let value = parts.next()?.trim();
            if value.is_empty() {
                return None;
            }
            let mut q = 1.0;
            for parameter in parts {
                if let Some((key, weight)) = parameter.split_once('=')
                    && key.trim().eq_ignore_ascii_case("q")
                {
                    q = weight
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))?;
                }
            }
            Some((value, q))
        })
}

/// The instant by which the current exchange's response must be written.
/// The service sets it when a request's headers have been read; the
/// connection's IO enforces it.
#[derive(Clone, Default)]
struct WriteDeadline(Arc<Mutex<Option<Instant>>>);

impl WriteDeadline {
    fn set(&self, deadline: Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(deadline);
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The socket, under TLS if any, failing writes that stay blocked past the
/// exchange's [`WriteDeadline`]: a client that stops reading (its receive
/// window closes) or reads a trickle gets disconnected, as with Go's
/// `WriteTimeout`. Only a write that would block is checked, so the deadline
/// of an exchange long finished does no harm: a later write that goes through
/// at once (closing an idle connection) is not failed.
struct DeadlineIo<T> {
    inner: T,
    deadline: WriteDeadline,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> DeadlineIo<T> {
    fn new(inner: T, deadline: WriteDeadline) -> Self {
        DeadlineIo {
            inner,
            deadline,
            timer: None,
        }
    }

    /// The inner write is blocked: wait for the deadline, if any.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(deadline) = self.deadline.get() else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response within the request timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.blocked(cx).map(Err),
            ready => ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use base64::Engine as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::oneshot,
        task::JoinHandle,
    };

    use super::*;

    const OPENMETRICS_BODY: &str = "# TYPE up gauge\nup 1\n# EOF\n";
    const TEXT_BODY: &str = "# TYPE up gauge\nup 1\n";
    /// Bounds every read of a test, so that a bug fails instead of hanging.
    const PATIENCE: Duration = Duration::from_secs(3);

    #[derive(Default)]
    struct FakeSource {
        unhealthy: AtomicBool,
        /// Bytes appended to the text body.
        padding: usize,
        render_delay: Duration,
    }

    impl MetricsSource for FakeSource {
        fn render(&self, format: MetricsFormat) -> Vec<u8> {
            std::thread::sleep(self.render_delay);
            let mut body = match format {
                MetricsFormat::OpenMetrics => OPENMETRICS_BODY,
                MetricsFormat::PrometheusText => TEXT_BODY,
            }
            .as_bytes()
            .to_vec();
            body.resize(body.len() + self.padding, b'#');
            body
        }

        fn healthy(&self) -> bool {
            !self.unhealthy.load(Ordering::Relaxed)
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(config: EndpointConfig, source: Arc<FakeSource>) -> Server {
            let endpoint = bind(config).await.unwrap();
            let addr = endpoint.local_addr();
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(endpoint.run(source, async {
                let _ = stopped.await;
            }));
            Server {
                addr,
                stop: Some(stop),
                task,
            }
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(PATIENCE, &mut self.task)
                .await
                .expect("the server stops")
                .unwrap();
        }
    }

    fn test_config() -> EndpointConfig {
        EndpointConfig {
            header_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..EndpointConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn body(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    fn parse_reply(bytes: &[u8]) -> Reply {
        let text = String::from_utf8_lossy(bytes);
        let end = text.find("\r\n\r\n").expect("a complete response head");
        let mut lines = text[..end].split("\r\n");
        let status = lines.next().unwrap()[9..12].parse().unwrap();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        Reply {
            status,
            headers,
            body: bytes[end + 4..].to_vec(),
        }
    }

    /// Sends `request` (which should close the connection) and reads all of
    /// the answer.
    async fn exchange(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), request: &str) -> Reply {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut bytes = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut bytes))
            .await
            .expect("the server answers")
            .unwrap();
        parse_reply(&bytes)
    }

    async fn request(addr: SocketAddr, method: &str, path: &str, headers: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        exchange(
            &mut stream,
            &format!(
                "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"
            ),
        )
        .await
    }

    async fn get(addr: SocketAddr, path: &str, headers: &str) -> Reply {
        request(addr, "GET", path, headers).await
    }

    /// Reads until the server closes the connection; how long that took.
    async fn time_to_close(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "the server closed the connection");
        started.elapsed()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "tracer-endpoint-test-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn negotiates_the_format_from_accept() {
        let format = |accept: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in accept {
                headers.append(header::ACCEPT, HeaderValue::from_str(value).unwrap());
            }
            negotiate_format(&headers)
        };
        use MetricsFormat::*;
        assert_eq!(format(&[]), PrometheusText);
        assert_eq!(format(&["*/*"]), PrometheusText);
        assert_eq!(format(&[PROMETHEUS_ACCEPT]), OpenMetrics);
        assert_eq!(
            format(&["Application/OpenMetrics-Text; version=0.0.1"]),
            OpenMetrics
        );
        assert_eq!(
            format(&["text/plain", "application/openmetrics-text"]),
            OpenMetrics
        );
        assert_eq!(
            format(&["application/openmetrics-text;q=0.2, text/plain;q=0.9"]),
            PrometheusText
        );
        assert_eq!(
            format(&["application/openmetrics-text;q=0"]),
            PrometheusText
        );
        assert_eq!(
            format(&["application/openmetrics-text;q=high"]),
            PrometheusText
        );
        assert_eq!(
            format(&[
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,application/openmetrics-text;q=0.6,text/plain;q=0.5"
            ]),
            OpenMetrics
        );
    }

    #[tokio::test]
    async fn metrics_answer_in_the_negotiated_format() {
        let server = Server::start(test_config(), Arc::default()).await;

        let reply = get(server.addr, "/metrics", "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert_eq!(reply.body(), TEXT_BODY);

        let reply = get(
            server.addr,
            "/metrics",
            &format!("Accept: {PROMETHEUS_ACCEPT}\r\n"),
        )
        .await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        assert_eq!(reply.body(), OPENMETRICS_BODY);

        // Query strings do not matter; gzip when asked for.
        let reply = get(server.addr, "/metrics?x=1", "Accept-Encoding: gzip\r\n").await;
        assert_eq!(reply.header("content-encoding"), Some("gzip"));
        let mut body = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(&reply.body[..]),
            &mut body,
        )
        .unwrap();
        assert_eq!(body, TEXT_BODY);
        server.stop().await;
    }

    #[tokio::test]
    async fn healthz_follows_the_source() {
        let source = Arc::new(FakeSource::default());
        let server = Server::start(test_config(), Arc::clone(&source)).await;
        let reply = get(server.addr, "/healthz", "").await;
        assert_eq!((reply.status, reply.body()), (200, "ok\n"));
        source.unhealthy.store(true, Ordering::Relaxed);
        let reply = get(server.addr, "/healthz", "").await;
        assert_eq!(reply.status, 503);
        server.stop().await;
    }

    #[tokio::test]
    async fn serves_nothing_else() {
        let server = Server::start(test_config(), Arc::default()).await;
        assert_eq!(get(server.addr, "/", "").await.status, 404);
        assert_eq!(get(server.addr, "/metrics/", "").await.status, 404);
        let reply = request(server.addr, "POST", "/metrics", "Content-Length: 0\r\n").await;
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        assert_eq!(
            request(server.addr, "DELETE", "/healthz", "").await.status,
            405
        );
        assert_eq!(
            request(server.addr, "POST", "/nowhere", "").await.status,
            404
        );

        let reply = request(server.addr, "HEAD", "/metrics", "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-length"),
            Some(TEXT_BODY.len().to_string().as_str())
        );
        assert!(reply.body.is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn closes_each_connection_after_its_response() {
        let server = Server::start(test_config(), Arc::default()).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let reply = exchange(
            &mut stream,
            "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\nGET /healthz HTTP/1.1\r\nHost: test\r\n\r\n",
        )
        .await;
        assert_eq!(reply.status, 200);
        assert!(reply.body().starts_with(TEXT_BODY), "{}", reply.body());
        // The second, pipelined request is not answered: the server closed.
        assert!(
            !reply.body().contains("HTTP/1.1 200 OK"),
            "{}",
            reply.body()
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn drops_a_client_that_sends_nothing() {
        let config = EndpointConfig {
            header_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let server = Server::start(config, Arc::default()).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let waited = time_to_close(&mut stream).await;
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_millis(1000),
            "{waited:?}"
        );
        // And a keep-alive connection idle for that long, after a response.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let waited = time_to_close(&mut stream).await;
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn cuts_off_a_slowloris_client() {
        let config = EndpointConfig {
            header_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let server = Server::start(config, Arc::default()).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let trickle = tokio::spawn(async move {
            // 36 bytes at one per 100 ms: 3.6 s for the whole head.
            for byte in b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n" {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = Instant::now();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer))
            .await
            .expect("the server closed the connection");
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        assert!(!answer.starts_with(b"HTTP/1.1 200"));
        trickle.abort();
        server.stop().await;
    }

    #[tokio::test]
    async fn cuts_off_a_client_that_does_not_read() {
        let config = EndpointConfig {
            request_timeout: Duration::from_millis(300),
            ..test_config()
        };
        // More than loopback's socket buffers can hold.
        let padding = 32 << 20;
        let source = Arc::new(FakeSource {
            padding,
            ..FakeSource::default()
        });
        let server = Server::start(config, source).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // What the kernel had buffered still arrives, then the connection ends.
        let mut received = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received))
            .await
            .expect("the server closed the connection");
        assert!(received.len() < padding, "{}", received.len());
        server.stop().await;
    }

    #[tokio::test]
    async fn bounds_a_slow_render() {
        let config = EndpointConfig {
            request_timeout: Duration::from_millis(200),
            ..test_config()
        };
        let source = Arc::new(FakeSource {
            render_delay: Duration::from_millis(500),
            ..FakeSource::default()
        });
        let server = Server::start(config, source).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let waited = time_to_close(&mut stream).await;
        assert!(waited < Duration::from_millis(450), "{waited:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn queues_connections_beyond_the_limit() {
        let config = EndpointConfig {
            max_connections: 2,
            ..test_config()
        };
        let server = Server::start(config, Arc::default()).await;
        // Two idle connections take both slots (accepted in this order: the
        // kernel's accept queue is first in, first out).
        let first = TcpStream::connect(server.addr).await.unwrap();
        let second = TcpStream::connect(server.addr).await.unwrap();
        let mut third = TcpStream::connect(server.addr).await.unwrap();
        third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // The third waits, connected but not accepted...
        let mut byte = [0; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), third.read(&mut byte)).await;
        assert!(early.is_err(), "answered beyond the limit: {early:?}");
        // ...until a slot frees.
        drop(first);
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_millis(1000), third.read_to_end(&mut answer))
            .await
            .expect("served once a slot freed")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        drop(second);
        // Nothing is left held.
        for _ in 0..3 {
            assert_eq!(get(server.addr, "/healthz", "").await.status, 200);
        }
        server.stop().await;
    }

    fn basic(credentials: &str) -> String {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    #[tokio::test]
    async fn basic_auth_guards_every_path() {
        let dir = TempDir::new();
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let web_config = dir.write(
            "web.yml",
            &format!("basic_auth_users:\n  alice: '{hash}'\n"),
        );
        let config = EndpointConfig {
            web_config: Some(web_config),
            ..test_config()
        };
        let server = Server::start(config, Arc::default()).await;
        for path in ["/metrics", "/healthz", "/nowhere"] {
            let reply = get(server.addr, path, "").await;
            assert_eq!(reply.status, 401, "{path}");
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Basic realm=\"tracer\"")
            );
        }
        assert_eq!(
            get(server.addr, "/metrics", &basic("alice:wrong"))
                .await
                .status,
            401
        );
        assert_eq!(
            get(server.addr, "/metrics", &basic("bob:s3cret"))
                .await
                .status,
            401
        );
        let reply = get(server.addr, "/metrics", &basic("alice:s3cret")).await;
        assert_eq!((reply.status, reply.body()), (200, TEXT_BODY));
        assert_eq!(
            get(server.addr, "/healthz", &basic("alice:s3cret"))
                .await
                .status,
            200
        );
        assert_eq!(
            get(server.addr, "/nowhere", &basic("alice:s3cret"))
                .await
                .status,
            404
        );
        server.stop().await;
    }

    struct TestCert {
        cert_pem: String,
        key_pem: String,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    }

    fn certificate(
        name: &str,
        issuer: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
        ca: bool,
    ) -> (TestCert, rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        } else if issuer.is_some() {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = match issuer {
            Some((issuer, issuer_key)) => params.signed_by(&key, issuer, issuer_key),
            None => params.self_signed(&key),
        }
        .unwrap();
        let test = TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        };
        (test, cert, key)
    }

    async fn tls_connect(
        addr: SocketAddr,
        trusted: &CertificateDer<'static>,
        client: Option<&TestCert>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut config = match client {
            Some(client) => builder
                .with_client_auth_cert(vec![client.cert.clone()], client.key.clone_key())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let stream = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), stream)
            .await
    }

    const GET_METRICS: &str =
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn serves_over_tls() {
        let dir = TempDir::new();
        let (server_cert, _, _) = certificate("localhost", None, false);
        dir.write("server.crt", &server_cert.cert_pem);
        dir.write("server.key", &server_cert.key_pem);
        // Relative paths: from the config's directory, not the working one.
        let web_config = dir.write(
            "web.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n",
        );
        let config = EndpointConfig {
            web_config: Some(web_config),
            header_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let endpoint = bind(config.clone()).await.unwrap();
        assert!(endpoint.tls_enabled());
        drop(endpoint);
        let server = Server::start(config, Arc::default()).await;

        let mut stream = tls_connect(server.addr, &server_cert.cert, None)
            .await
            .unwrap();
        let reply = exchange(&mut stream, GET_METRICS).await;
        assert_eq!((reply.status, reply.body()), (200, TEXT_BODY));
        // Offered h2 too, the client is told to speak HTTP/1.1.
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

        // Plain HTTP gets no answer; a client that never starts the handshake
        // is dropped after header_timeout.
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let waited = time_to_close(&mut stream).await;
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn requires_verified_client_certificates() {
        let dir = TempDir::new();
        let (server_cert, _, _) = certificate("localhost", None, false);
        let (ca, ca_cert, ca_key) = certificate("tracer test CA", None, true);
        let (client, _, _) = certificate("prometheus", Some((&ca_cert, &ca_key)), false);
        let (stranger, _, _) = certificate("prometheus", None, false);
        dir.write("server.crt", &server_cert.cert_pem);
        dir.write("server.key", &server_cert.key_pem);
        dir.write("ca.crt", &ca.cert_pem);
        let web_config = dir.write(
            "web.yml",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
             client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n",
        );
        let config = EndpointConfig {
            web_config: Some(web_config),
            ..test_config()
        };
        let server = Server::start(config, Arc::default()).await;

        let mut stream = tls_connect(server.addr, &server_cert.cert, Some(&client))
            .await
            .unwrap();
        assert_eq!(exchange(&mut stream, GET_METRICS).await.status, 200);

        // Refused: in TLS 1.3 the client learns it at its first read.
        for who in [None, Some(&stranger)] {
            let refused = async {
                let mut stream = tls_connect(server.addr, &server_cert.cert, who).await?;
                stream.write_all(GET_METRICS.as_bytes()).await?;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await?;
                Ok::<_, io::Error>(answer)
            };
            let answer = tokio::time::timeout(PATIENCE, refused).await.unwrap();
            assert!(answer.is_err(), "{answer:?}");
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn tls_errors_name_the_files() {
        let dir = TempDir::new();
        let (one, _, _) = certificate("localhost", None, false);
        let (other, _, _) = certificate("localhost", None, false);
        dir.write("server.crt", &one.cert_pem);
        dir.write("other.key", &other.key_pem);
        dir.write("empty.key", "");
        let bind_with = |yaml: &str| {
            let config = EndpointConfig {
                web_config: Some(dir.write("web.yml", yaml)),
                ..test_config()
            };
            async move { bind(config).await.err().unwrap().to_string() }
        };
        let error =
            bind_with("tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n").await;
        assert!(
            error.starts_with("cannot use the TLS certificate"),
            "{error}"
        );
        assert!(
            error.contains("server.crt") && error.contains("other.key"),
            "{error}"
        );
        let error =
            bind_with("tls_server_config:\n  cert_file: server.crt\n  key_file: empty.key\n").await;
        assert!(error.contains("empty.key holds no private key"), "{error}");
    }

    #[tokio::test]
    async fn web_config_errors_name_the_file_and_key() {
        let dir = TempDir::new();
        let web_config = dir.write(
            "web.yml",
            "tls_server_config:\n  cert_file: a\n  keyfile: b\n",
        );
        let config = EndpointConfig {
            web_config: Some(web_config.clone()),
            ..test_config()
        };
        let error = bind(config).await.err().unwrap();
        let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(
            message.contains(&web_config.display().to_string()),
            "{message}"
        );
        assert!(message.contains("unknown field `keyfile`"), "{message}");

        let missing = dir.0.join("missing.yml");
        let config = EndpointConfig {
            web_config: Some(missing.clone()),
            ..test_config()
        };
        let error = bind(config).await.err().unwrap().to_string();
        assert_eq!(
            error,
            format!("cannot read the web config {}", missing.display())
        );
    }

    #[tokio::test]
    async fn bind_errors_name_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = bind(EndpointConfig::new(addr))
            .await
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            error,
            format!(
                "cannot listen on {addr}: the port is in use (is another agent or exporter running?)"
            )
        );
        let config = EndpointConfig {
            max_connections: 0,
            ..test_config()
        };
        assert!(matches!(bind(config).await, Err(EndpointError::Config(_))));
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_returns() {
        let server = Server::start(test_config(), Arc::default()).await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let mut kept = TcpStream::connect(server.addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0; 12];
        kept.read_exact(&mut head).await.unwrap();
        let addr = server.addr;
        let started = Instant::now();
        server.stop().await;
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(time_to_close(&mut idle).await < Duration::from_millis(500));
        assert!(time_to_close(&mut kept).await < Duration::from_millis(500));
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }
}
