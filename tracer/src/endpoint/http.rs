//! One accepted connection of the endpoint, from the TLS handshake to its
//! close: hyper's HTTP/1.1 with the header timeout and no keep-alive, the
//! request timeout of each exchange, and the answer to a request: basic auth,
//! routing, the negotiated format (`Accept`) and gzip (`Accept-Encoding`).

use std::{
    io::{self, Write as _},
    net::SocketAddr,
    sync::Arc,
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
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{
    MetricsFormat, MetricsSource,
    deadline::{DeadlineIo, WriteDeadline},
    web_config,
};

/// What every connection shares.
pub(super) struct Shared {
    pub(super) source: Arc<dyn MetricsSource>,
    pub(super) auth: Option<Arc<web_config::BasicAuth>>,
    /// Extra response headers from `http_server_config.headers`.
    pub(super) headers: Vec<(header::HeaderName, HeaderValue)>,
    pub(super) request_timeout: Duration,
}

/// One connection, from the TLS handshake to its close. Errors end here.
pub(super) async fn connection(
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

/// Gzip at the fastest level: exposition text repeats itself so much that even
/// that level shrinks it many times over, and the agent's CPU is not for its
/// scrapers.
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
pub(super) fn negotiate_format(headers: &HeaderMap) -> MetricsFormat {
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
