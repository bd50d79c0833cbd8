//! The web config file of Prometheus's exporter-toolkit (`--web.config.file`
//! of node_exporter and the others), so that the TLS certificates and basic
//! auth users an operator already has for their exporters work here as they are:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative paths: from this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
//!   client_ca_file: clients.pem
//!   min_version: TLS12           # optional: TLS12 (default) or TLS13
//! http_server_config:
//!   headers:
//!     X-Content-Type-Options: nosniff
//! basic_auth_users:
//!   prometheus: $2y$10$...       # bcrypt, e.g. from `htpasswd -nBC 10 ""`
//! ```
//!
//! Differences from exporter-toolkit, all of them errors rather than silent:
//! a key the format does not have is refused, naming it (a typo must not turn
//! TLS or authentication off); the keys this agent does not implement
//! (`cipher_suites`, `curve_preferences`, inline `cert`/`key`/`client_ca`,
//! `client_allowed_sans`, `rate_limit`, TLS 1.0 and 1.1, client certificates
//! accepted without verification) are refused with the reason. The file is
//! read once, when the endpoint is bound, not on every request: a renewed
//! certificate takes a restart. `http_server_config.http2` is accepted and has
//! no effect: the endpoint speaks HTTP/1.1.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use base64::Engine as _;
use hyper::header::{HeaderName, HeaderValue};
use ring::digest;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::{Deserialize, de::IgnoredAny};

use super::EndpointError;

/// A loaded web config: what [`super::Endpoint`] serves with.
#[derive(Default)]
pub(super) struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub basic_auth: Option<BasicAuth>,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tls_server_config: Option<RawTls>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, String>>,
    rate_limit: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
    prefer_server_cipher_suites: Option<bool>,
    // Known to exporter-toolkit, refused here (see the module's doc).
    cert: Option<IgnoredAny>,
    key: Option<IgnoredAny>,
    client_ca: Option<IgnoredAny>,
    client_allowed_sans: Option<IgnoredAny>,
    cipher_suites: Option<IgnoredAny>,
    curve_preferences: Option<IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    /// Accepted for compatibility; the endpoint is HTTP/1.1 only.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// The response headers exporter-toolkit lets a config set, with the values
/// allowed when they are an enumeration (none: any value).
const CONFIGURABLE_HEADERS: &[(&str, &[&str])] = &[
    ("Content-Security-Policy", &[]),
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
];

impl WebConfig {
    pub fn load(path: &Path) -> Result<Self, EndpointError> {
        let text = fs::read_to_string(path).map_err(|source| EndpointError::ReadWebConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// `path` names the file in errors and anchors its relative paths.
    fn parse(text: &str, path: &Path) -> Result<Self, EndpointError> {
        // An empty file (or one of comments only) is an empty config: plain
        // HTTP, no authentication.
        let raw: Option<RawConfig> =
            serde_norway::from_str(text).map_err(|source| EndpointError::ParseWebConfig {
                path: path.to_owned(),
                source,
            })?;
        let raw = raw.unwrap_or_default();
        let invalid = |key: &str, reason: String| EndpointError::InvalidWebConfig {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        if raw.rate_limit.is_some() {
            return Err(invalid(
                "rate_limit",
                "not supported by this agent (max_connections bounds the load)".into(),
            ));
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        let tls = match raw.tls_server_config {
            Some(tls) => Some(Arc::new(tls_config(tls, dir, &invalid)?)),
            None => None,
        };

        let mut headers = Vec::new();
        for (name, value) in raw
            .http_server_config
            .and_then(|http| http.headers)
            .unwrap_or_default()
        {
            let key = format!("http_server_config.headers.{name}");
            let Some((_, allowed)) = CONFIGURABLE_HEADERS.iter().find(|(n, _)| *n == name) else {
                let names: Vec<_> = CONFIGURABLE_HEADERS.iter().map(|(n, _)| *n).collect();
                return Err(invalid(
                    &key,
                    format!("this header cannot be set; these can: {}", names.join(", ")),
                ));
            };
            // "Unset if blank", as exporter-toolkit documents.
            if value.is_empty() {
                continue;
            }
            if !allowed.is_empty() && !allowed.contains(&value.as_str()) {
                return Err(invalid(
                    &key,
                    format!("{value:?} is not one of {}", allowed.join(", ")),
                ));
            }
            let value = HeaderValue::from_str(&value)
                .map_err(|_| invalid(&key, format!("{value:?} is not a valid header value")))?;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(&key, "not a valid header name".into()))?;
            headers.push((name, value));
        }

        let users = raw.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            let key = format!("basic_auth_users.{user}");
            if user.contains(':') {
                return Err(invalid(
                    &key,
                    "a basic auth user name cannot contain ':'".into(),
                ));
            }
            bcrypt::HashParts::from_str(hash).map_err(|e| {
                invalid(
                    &key,
                    format!("not a bcrypt hash ({e}); make one with `htpasswd -nBC 10 \"\"`"),
                )
            })?;
        }
        // No users: no authentication, as in exporter-toolkit.
        let basic_auth = (!users.is_empty()).then(|| BasicAuth::new(users.into_iter().collect()));

        Ok(WebConfig {
            tls,
            basic_auth,
            headers,
        })
    }
}

fn tls_config(
    raw: RawTls,
    dir: &Path,
    invalid: &dyn Fn(&str, String) -> EndpointError,
) -> Result<ServerConfig, EndpointError> {
    let unsupported = [
        (
            "cert",
            raw.cert.is_some(),
            "inline certificates are not supported: use cert_file",
        ),
        (
            "key",
            raw.key.is_some(),
            "inline keys are not supported: use key_file",
        ),
        (
            "client_ca",
            raw.client_ca.is_some(),
            "inline CAs are not supported: use client_ca_file",
        ),
        (
            "client_allowed_sans",
            raw.client_allowed_sans.is_some(),
            "not supported by this agent",
        ),
        (
            "cipher_suites",
            raw.cipher_suites.is_some(),
            "not supported: the agent offers rustls's cipher suites, all of them safe",
        ),
        (
            "curve_preferences",
            raw.curve_preferences.is_some(),
            "not supported: the agent offers rustls's key exchange groups, all of them safe",
        ),
    ];
    if let Some((key, _, why)) = unsupported.iter().find(|(_, set, _)| *set) {
        return Err(invalid(&format!("tls_server_config.{key}"), (*why).into()));
    }

    let (Some(cert_file), Some(key_file)) = (raw.cert_file, raw.key_file) else {
        return Err(invalid(
            "tls_server_config",
            "needs both cert_file and key_file".into(),
        ));
    };
    let cert_file = dir.join(cert_file);
    let key_file = dir.join(key_file);
    let client_ca_file = raw.client_ca_file.map(|file| dir.join(file));

    let min = tls_version(raw.min_version.as_deref(), "min_version", invalid)?.unwrap_or(0);
    let max = tls_version(raw.max_version.as_deref(), "max_version", invalid)?.unwrap_or(1);
    if min > max {
        return Err(invalid(
            "tls_server_config.min_version",
            "is above max_version".into(),
        ));
    }
    let versions: Vec<&'static SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13][min..=max].to_vec();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&versions)
        .map_err(|e| invalid("tls_server_config", e.to_string()))?;

    let client_auth = raw.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let builder = match (client_auth, client_ca_file) {
        ("NoClientCert", None) => builder.with_no_client_auth(),
        ("NoClientCert", Some(_)) => {
            return Err(invalid(
                "tls_server_config.client_ca_file",
                "is set but client_auth_type is NoClientCert: \
                 set client_auth_type: RequireAndVerifyClientCert"
                    .into(),
            ));
        }
        ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven", None) => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                format!("{client_auth} needs client_ca_file"),
            ));
        }
        (mode @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven"), Some(ca_file)) => {
            let roots = client_roots(&ca_file)?;
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
            if mode == "VerifyClientCertIfGiven" {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| EndpointError::TlsClientCa {
                path: ca_file,
                source: e.into(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        (mode @ ("RequestClientCert" | "RequireAnyClientCert"), _) => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                format!(
                    "{mode} accepts client certificates without verifying them; not supported: \
                     use RequireAndVerifyClientCert"
                ),
            ));
        }
        (other, _) => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                format!(
                    "unknown value {other:?}: expected NoClientCert, \
                     RequireAndVerifyClientCert or VerifyClientCertIfGiven"
                ),
            ));
        }
    };

    let certs = read_certificates(&cert_file, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => EndpointError::TlsFileEmpty {
            what: "key",
            path: key_file.clone(),
            expected: "private key (PKCS#8, PKCS#1 or SEC1 PEM block)",
        },
        source => EndpointError::TlsFile {
            what: "key",
            path: key_file.clone(),
            source,
        },
    })?;
    let mut config =
        builder
            .with_single_cert(certs, key)
            .map_err(|source| EndpointError::TlsKeyPair {
                cert: cert_file,
                key: key_file,
                source,
            })?;
    // Go's crypto/tls (and so exporter-toolkit) picks in the server's order.
    config.ignore_client_order = raw.prefer_server_cipher_suites.unwrap_or(true);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Index into [TLS 1.2, TLS 1.3] of a `min_version`/`max_version` value.
fn tls_version(
    value: Option<&str>,
    key: &str,
    invalid: &dyn Fn(&str, String) -> EndpointError,
) -> Result<Option<usize>, EndpointError> {
    let key = format!("tls_server_config.{key}");
    match value {
        None => Ok(None),
        Some("TLS12") => Ok(Some(0)),
        Some("TLS13") => Ok(Some(1)),
        Some(old @ ("TLS10" | "TLS11")) => Err(invalid(
            &key,
            format!("{old} is not supported: TLS 1.2 and 1.3 only"),
        )),
        Some(other) => Err(invalid(
            &key,
            format!("unknown value {other:?}: expected TLS12 or TLS13"),
        )),
    }
}

fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, EndpointError> {
    let error = |source| EndpointError::TlsFile {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(error)?;
    if certs.is_empty() {
        return Err(EndpointError::TlsFileEmpty {
            what,
            path: path.to_owned(),
            expected: "certificate (CERTIFICATE PEM block)",
        });
    }
    Ok(certs)
}

fn client_roots(path: &Path) -> Result<Arc<RootCertStore>, EndpointError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path, "client CA")? {
        roots.add(cert).map_err(|e| EndpointError::TlsClientCa {
            path: path.to_owned(),
            source: e.into(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Credentials verified since the start, at most this many: a scraper sends
/// the same ones every time, so a handful is plenty, and the bound keeps a
/// client cycling through valid passwords from growing the set.
const VERIFIED_CACHE_SIZE: usize = 100;

/// Basic authentication against bcrypt hashes.
///
/// bcrypt is slow on purpose (that is what makes stolen hashes hard to
/// guess), too slow to pay on every scrape: credentials that verified once are
/// remembered (a SHA-256 of user, hash and password, never the password
/// itself) and accepted at once after that, as exporter-toolkit does. Failed
/// attempts are not remembered and each costs a bcrypt; those run one at a
/// time, on the blocking pool, so a client guessing passwords takes one core
/// at most and never the runtime's thread.
pub(super) struct BasicAuth {
    /// User name → bcrypt hash.
    users: HashMap<String, String>,
    /// Unknown users are checked against this hash, of the users' highest
    /// cost, so that timing does not tell which user names exist.
    dummy_cost: u32,
    dummy_hash: OnceLock<String>,
    verified: Mutex<HashSet<[u8; 32]>>,
    one_bcrypt_at_a_time: tokio::sync::Mutex<()>,
}

impl BasicAuth {
    fn new(users: HashMap<String, String>) -> Self {
        let dummy_cost = users
            .values()
            .filter_map(|hash| bcrypt::HashParts::from_str(hash).ok())
            .map(|parts| parts.get_cost())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        BasicAuth {
            users,
            dummy_cost,
            dummy_hash: OnceLock::new(),
            verified: Mutex::new(HashSet::new()),
            one_bcrypt_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether an `Authorization` header holds a configured user's password.
    pub async fn check(self: &Arc<Self>, authorization: Option<&HeaderValue>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let known = self.users.contains_key(&user);
        let key = self.cache_key(&user, &password);
        if known && self.is_verified(&key) {
            return true;
        }
        let _turn = self.one_bcrypt_at_a_time.lock().await;
        // Another request may have verified the same credentials meanwhile.
        if known && self.is_verified(&key) {
            return true;
        }
        let this = Arc::clone(self);
        let ok = tokio::task::spawn_blocking(move || this.verify(&user, &password))
            .await
            .unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if verified.len() >= VERIFIED_CACHE_SIZE {
                verified.clear();
            }
            verified.insert(key);
        }
        ok
    }

    fn is_verified(&self, key: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(key)
    }

    /// The bcrypt check itself: slow.
    fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => bcrypt::verify(password, hash).unwrap_or(false),
            None => {
                let dummy = self.dummy_hash.get_or_init(|| {
                    bcrypt::hash("not a password", self.dummy_cost).unwrap_or_default()
                });
                let _ = bcrypt::verify(password, dummy);
                false
            }
        }
    }

    /// Covers the hash too, so that credentials verified against a user's
    /// old hash could never pass for a new one.
    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let hash = self.users.get(user).map_or("", String::as_str);
        let mut context = digest::Context::new(&digest::SHA256);
        for part in [user.as_bytes(), hash.as_bytes(), password] {
            context.update(&(part.len() as u64).to_le_bytes());
            context.update(part);
        }
        let mut key = [0; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }
}

/// `Basic base64(user:password)` → (user, password). The password is bytes:
/// bcrypt does not care whether it is UTF-8.
fn parse_basic(header: &HeaderValue) -> Option<(String, Vec<u8>)> {
    let value = header.as_bytes();
    let (scheme, credentials) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebConfig, EndpointError> {
        WebConfig::parse(text, Path::new("/etc/tracer/web.yml"))
    }

    /// The error and its causes, as the agent prints them.
    fn message(error: EndpointError) -> String {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text += &format!(": {cause}");
            source = cause.source();
        }
        text
    }

    #[test]
    fn an_empty_file_is_plain_http_without_auth() {
        for text in ["", "# nothing yet\n", "basic_auth_users:\n"] {
            let config = parse(text).unwrap();
            assert!(config.tls.is_none() && config.basic_auth.is_none());
            assert!(config.headers.is_empty());
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let error = message(parse("basic_auth_user:\n  alice: x\n").err().unwrap());
        assert!(error.contains("/etc/tracer/web.yml"), "{error}");
        assert!(error.contains("unknown field `basic_auth_user`"), "{error}");

        let error = message(
            parse("tls_server_config:\n  cert_file: a\n  key_flie: b\n")
                .err()
                .unwrap(),
        );
        assert!(error.contains("unknown field `key_flie`"), "{error}");
        assert!(error.contains("tls_server_config"), "{error}");
    }

    #[test]
    fn unsupported_keys_are_refused_with_the_reason() {
        let error = message(
            parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.starts_with(
                "web config /etc/tracer/web.yml: tls_server_config.cipher_suites: not supported"
            ),
            "{error}"
        );
        let error = message(parse("rate_limit:\n  interval: 1s\n").err().unwrap());
        assert!(error.contains("rate_limit: not supported"), "{error}");
        let error = message(
            parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n")
                .err()
                .unwrap(),
        );
        assert!(error.contains("without verifying"), "{error}");
        let error = message(
            parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: ca.pem\n")
                .err()
                .unwrap(),
        );
        assert!(error.contains("client_ca_file: is set but"), "{error}");
        let error = message(
            parse("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS11\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.contains("min_version: TLS11 is not supported"),
            "{error}"
        );
        let error = message(parse("tls_server_config:\n  cert_file: a\n").err().unwrap());
        assert!(
            error.contains("needs both cert_file and key_file"),
            "{error}"
        );
    }

    #[test]
    fn tls_files_resolve_from_the_config_directory_and_are_named_in_errors() {
        let error = message(
            parse("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.starts_with("cannot read the TLS certificate file /etc/tracer/server.crt"),
            "{error}"
        );
    }

    #[test]
    fn headers_are_checked_as_exporter_toolkit_does() {
        let config = parse(
            "http_server_config:\n  http2: true\n  headers:\n    X-Frame-Options: deny\n    X-XSS-Protection: \"\"\n",
        )
        .unwrap();
        assert_eq!(config.headers.len(), 1);
        assert_eq!(config.headers[0].0, "x-frame-options");
        let error = message(
            parse("http_server_config:\n  headers:\n    X-Frame-Options: allow\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.contains("X-Frame-Options: \"allow\" is not one of"),
            "{error}"
        );
        let error = message(
            parse("http_server_config:\n  headers:\n    Server: tracer\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.contains("headers.Server: this header cannot be set"),
            "{error}"
        );
    }

    #[test]
    fn users_need_bcrypt_hashes() {
        let error = message(
            parse("basic_auth_users:\n  alice: plaintext\n")
                .err()
                .unwrap(),
        );
        assert!(
            error.contains("basic_auth_users.alice: not a bcrypt hash"),
            "{error}"
        );
    }

    #[test]
    fn parses_basic_credentials() {
        let header = |value: &str| HeaderValue::from_str(value).unwrap();
        // "alice:se:cret"
        assert_eq!(
            parse_basic(&header("Basic YWxpY2U6c2U6Y3JldA==")),
            Some(("alice".into(), b"se:cret".to_vec()))
        );
        assert_eq!(
            parse_basic(&header("basic  YWxpY2U6c2U6Y3JldA== ")),
            Some(("alice".into(), b"se:cret".to_vec()))
        );
        assert_eq!(parse_basic(&header("Bearer YWxpY2U6c2U6Y3JldA==")), None);
        assert_eq!(parse_basic(&header("Basic !!!")), None);
        // "alice" without a colon
        assert_eq!(parse_basic(&header("Basic YWxpY2U=")), None);
    }

    #[tokio::test]
    async fn remembers_verified_credentials_only() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = Arc::new(BasicAuth::new(HashMap::from([("alice".into(), hash)])));
        let basic = |credentials: &str| {
            HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(credentials)
            ))
            .unwrap()
        };
        assert!(!auth.check(None).await);
        assert!(!auth.check(Some(&basic("alice:wrong"))).await);
        assert!(!auth.check(Some(&basic("bob:s3cret"))).await);
        assert!(auth.verified.lock().unwrap().is_empty());
        assert!(auth.check(Some(&basic("alice:s3cret"))).await);
        assert!(auth.check(Some(&basic("alice:s3cret"))).await);
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
        // The unknown user was checked against a hash of the same cost.
        assert!(auth.dummy_hash.get().unwrap().starts_with("$2b$04$"));
    }
}
