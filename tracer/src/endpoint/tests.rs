//! The endpoint's tests: real servers on loopback, driven by raw HTTP/1.1 and
//! TLS clients, plus content negotiation on its own.

use std::{
    fs,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
};

use base64::Engine as _;
use hyper::header::{self, HeaderMap, HeaderValue};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
    time::Instant,
};

use super::{http::negotiate_format, *};

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
        &format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n"),
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

const GET_METRICS: &str = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

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
