//! `s3://bucket/key` URIs: objects in AWS S3 or an S3-compatible store (MinIO, SeaweedFS, Ceph,
//! moto, ...), read with the Arrow project's [`object_store`].
//!
//! object_store is async. Rather than make the fetch path async, the process keeps one small
//! private tokio runtime (one worker thread, started on the first `s3://` fetch) that runs the
//! HTTP connections; each decode thread blocks on its own request, as it does for http(s). The
//! runtime lives as long as the process.
//!
//! One store client per bucket, shared by all clones of a [`Fetcher`](super::Fetcher), so
//! connections are pooled. Retries are dlpipe's own (the same limits, backoff and transient
//! statuses as http(s): 5xx, 429, timeouts and connection errors, which covers S3's 503
//! SlowDown); object_store's are turned off so that attempts are counted in one place. The
//! address policy of `fetch.allowed_networks` applies to the store's endpoint, by name (every
//! resolved address is checked) and by literal IP address alike.

use super::address::{AddressPolicy, REFUSED};
use super::{FetchConfig, FetchError, FetchOutcome};
use crate::config::ConfigError;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{DnsFuture, DnsResolver, HttpErrorKind};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::debug;

/// Settings for `s3://` URIs (`[fetch.s3]`). Every field is optional; unset credentials come
/// from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, web identity, ECS/EKS container
/// credentials, then the instance metadata service).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL of an S3-compatible store, e.g. `"http://127.0.0.1:9000"`; unset, AWS
    /// (`https://s3.<region>.amazonaws.com`). An internal address must be listed in
    /// `fetch.allowed_networks`. Default unset.
    pub endpoint: Option<String>,
    /// Region requests are signed for; unset, `AWS_REGION` or else `us-east-1`.
    pub region: Option<String>,
    /// Bucket in the path (`endpoint/bucket/key`) rather than in the host name
    /// (`bucket.endpoint/key`); S3-compatible stores mostly need it. Default true.
    pub path_style: bool,
    /// Access key id; `${NAME}` names an environment variable. Default unset (environment).
    pub access_key_id: Option<String>,
    /// Secret access key, best as `"${NAME}"`; never logged or shown. Default unset.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials, best as `"${NAME}"`. Default unset.
    pub session_token: Option<String>,
    /// Send unsigned requests (public buckets), ignoring any credentials. Default false.
    pub anonymous: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            anonymous: false,
        }
    }
}

impl S3Config {
    /// Expands `${NAME}` in the endpoint, region and credentials from `env`; an unset variable
    /// is an error naming it.
    pub fn resolve_env(&mut self, env: &std::collections::BTreeMap<String, String>) -> Result<(), ConfigError> {
        let fields = [
            ("endpoint", &mut self.endpoint),
            ("region", &mut self.region),
            ("access_key_id", &mut self.access_key_id),
            ("secret_access_key", &mut self.secret_access_key),
            ("session_token", &mut self.session_token),
        ];
        for (name, value) in fields {
            if let Some(text) = value {
                *text = crate::config::expand_env(&format!("fetch.s3.{name}"), text, env)?;
            }
        }
        Ok(())
    }
}

// Written out so that a config printed with `{:?}` never shows a secret.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Why an `s3://` object could not be read; [`kind`](StoreError::kind) is its dead-letter label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `not_found`: no such bucket or object.
    #[error("{uri}: the store has no such object (HTTP 404); check the bucket and key")]
    NotFound { uri: String },
    /// `unauthorized`: the store rejected the credentials (unknown key id, wrong secret,
    /// expired token), or none were found.
    #[error("{uri}: the store rejected dlpipe's credentials ({code}); check fetch.s3 or the AWS_* environment")]
    Unauthorized { uri: String, code: String },
    /// `forbidden`: valid credentials without permission to read the object.
    #[error("{uri}: access denied ({code}); the credentials may not read this object")]
    Forbidden { uri: String, code: String },
    /// `http_status`: any other failure status, including 5xx and 429 after all retries.
    #[error("{uri}: the store answered HTTP {status}{}", super::after_attempts(*attempts))]
    Status { uri: String, status: u16, attempts: u32 },
    /// `network` (or `timeout`): the store could not be reached or did not answer in time.
    #[error("{uri}: cannot reach the store{}: {source}", super::after_attempts(*attempts))]
    Network {
        uri: String,
        attempts: u32,
        timed_out: bool,
        #[source]
        source: object_store::Error,
    },
    /// `store_config`: the store client could not be set up from `[fetch.s3]`.
    #[error("{uri}: cannot set up the S3 client from fetch.s3: {source}")]
    Config {
        uri: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// A short, stable label of the cause, for dead-letter records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::Unauthorized { .. } => "unauthorized",
            StoreError::Forbidden { .. } => "forbidden",
            StoreError::Status { .. } => "http_status",
            StoreError::Network { timed_out: true, .. } => "timeout",
            StoreError::Network { .. } => "network",
            StoreError::Config { .. } => "store_config",
        }
    }

    /// The URI that failed.
    pub fn uri(&self) -> &str {
        match self {
            StoreError::NotFound { uri }
            | StoreError::Unauthorized { uri, .. }
            | StoreError::Forbidden { uri, .. }
            | StoreError::Status { uri, .. }
            | StoreError::Network { uri, .. }
            | StoreError::Config { uri, .. } => uri,
        }
    }
}

/// The process's runtime for store I/O: one worker thread runs the connections; callers block
/// on their own requests.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dlpipe-store-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime for object stores")
    })
}

/// The S3 clients of one [`Fetcher`](super::Fetcher), one per bucket, created on first use.
#[derive(Debug, Default)]
pub struct S3Stores {
    buckets: Mutex<HashMap<String, Arc<AmazonS3>>>,
}

impl S3Stores {
    /// The bytes of `s3://bucket/key`, refusing more than `max_bytes`.
    pub(super) fn fetch(
        &self,
        uri: &str,
        max_bytes: u64,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> FetchOutcome {
        let (bucket, key) = match parse_s3_uri(uri) {
            Ok(parts) => parts,
            Err(error) => return FetchOutcome { result: Err(error), attempts: 0 },
        };
        if let Some(reason) = config.s3.endpoint.as_deref().and_then(|e| literal_refusal(e, policy)) {
            return FetchOutcome { result: Err(FetchError::ForbiddenAddress { uri: uri.into(), reason }), attempts: 0 };
        }
        let store = match self.store(bucket, config, policy) {
            Ok(store) => store,
            Err(source) => {
                return FetchOutcome { result: Err(StoreError::Config { uri: uri.into(), source }.into()), attempts: 0 }
            }
        };
        fetch_with_retries(&store, uri, &key, max_bytes, config)
    }

    /// The `s3://` URIs of every object under `prefix_uri` (`s3://bucket/photos/`, or
    /// `s3://bucket` for all of it), recursively, sorted by key. The prefix is a folder:
    /// `photos/` lists `photos/cat/1.png` but not `photos2/1.png`. Each URI is the prefix as
    /// given, then the rest of the key percent-encoded (anything but letters, digits, `-._~/`),
    /// so that fetching it reads that very key. A listing is one request per 1000 keys, not
    /// retried: it runs once, from the command line.
    pub(super) fn list(
        &self,
        prefix_uri: &str,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> Result<Vec<String>, FetchError> {
        use futures_util::TryStreamExt;
        let (bucket, prefix) = parse_s3_prefix(prefix_uri)?;
        if let Some(reason) = config.s3.endpoint.as_deref().and_then(|e| literal_refusal(e, policy)) {
            return Err(FetchError::ForbiddenAddress { uri: prefix_uri.into(), reason });
        }
        let store = self
            .store(bucket, config, policy)
            .map_err(|source| StoreError::Config { uri: prefix_uri.into(), source })?;
        let listing = store.list((!prefix.is_root()).then_some(&prefix)).try_collect::<Vec<_>>();
        let objects = runtime().block_on(listing).map_err(|error| match status_of(&error) {
            // A listing's 404 is a missing bucket (object_store reports it as a generic error).
            Some(404) => StoreError::NotFound { uri: prefix_uri.into() }.into(),
            _ => classify(prefix_uri, error, 1),
        })?;
        let mut keys: Vec<String> = objects.into_iter().map(|o| o.location.as_ref().to_owned()).collect();
        keys.sort_unstable();
        let base = prefix_uri.trim_end_matches('/');
        let below = |key: &str| key.strip_prefix(prefix.as_ref()).unwrap_or(key).trim_start_matches('/').to_owned();
        Ok(keys.iter().map(|key| format!("{base}/{}", encode_key(&below(key)))).collect())
    }

    fn store(&self, bucket: &str, config: &FetchConfig, policy: &AddressPolicy) -> object_store::Result<Arc<AmazonS3>> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(store) = buckets.get(bucket) {
            return Ok(Arc::clone(store));
        }
        let store = Arc::new(build_store(bucket, config, policy)?);
        buckets.insert(bucket.to_owned(), Arc::clone(&store));
        Ok(store)
    }
}

fn build_store(bucket: &str, config: &FetchConfig, policy: &AddressPolicy) -> object_store::Result<AmazonS3> {
    // reqwest is built without a crypto provider (it would bring aws-lc-rs); ring is the one
    // ureq already links. Installing fails only when one is installed already, as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let s3 = &config.s3;
    let limit = |ms: u64| Duration::from_millis(ms.max(1));
    let mut options = ClientOptions::new()
        .with_timeout(limit(config.timeout_ms))
        .with_connect_timeout(limit(config.connect_timeout_ms))
        .with_dns_resolver(Arc::new(CheckedDns(policy.clone())));
    if let Ok(agent) = config.user_agent.parse() {
        options = options.with_user_agent(agent);
    }
    if let Some(endpoint) = &s3.endpoint {
        options = options.with_allow_http(endpoint.starts_with("http://"));
    }
    let retry = RetryConfig { max_retries: 0, retry_timeout: limit(config.total_timeout_ms), ..RetryConfig::default() };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_skip_signature(s3.anonymous)
        .with_client_options(options)
        .with_retry(retry);
    let region = s3.region.clone().or_else(|| std::env::var("AWS_REGION").ok());
    builder = builder.with_region(region.unwrap_or_else(|| "us-east-1".into()));
    if let Some(endpoint) = &s3.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(id) = &s3.access_key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(token) = &s3.session_token {
        builder = builder.with_token(token);
    }
    builder.build()
}

fn fetch_with_retries(store: &AmazonS3, uri: &str, key: &Path, max_bytes: u64, config: &FetchConfig) -> FetchOutcome {
    let max_attempts = config.max_retries.saturating_add(1);
    let deadline = Instant::now() + Duration::from_millis(config.total_timeout_ms);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match runtime().block_on(get_limited(store, uri, key, max_bytes)) {
            Ok(bytes) => return FetchOutcome { result: Ok(bytes), attempts },
            Err(Failure::Final(error)) => return FetchOutcome { result: Err(error), attempts },
            Err(Failure::Store(error)) => error,
        };
        let transient = is_transient(&error);
        let delay = super::retry_delay(config, attempts - 1, None, super::jitter());
        let next_ends = Instant::now() + delay + Duration::from_millis(config.timeout_ms);
        if !transient || attempts >= max_attempts || next_ends > deadline {
            return FetchOutcome { result: Err(classify(uri, error, attempts)), attempts };
        }
        debug!(uri, attempt = attempts, ?delay, failure = %error, "retrying store fetch");
        std::thread::sleep(delay);
    }
}

enum Failure {
    /// Not worth retrying, already a fetch error (too large).
    Final(FetchError),
    Store(object_store::Error),
}

async fn get_limited(store: &AmazonS3, uri: &str, key: &Path, max_bytes: u64) -> Result<Vec<u8>, Failure> {
    let too_large = |size| Failure::Final(FetchError::TooLarge { uri: uri.into(), size, limit: max_bytes });
    let result = store.get(key).await.map_err(Failure::Store)?;
    // The size comes with the response headers (the body cannot outgrow its Content-Length):
    // an oversized object is refused unread.
    if result.meta.size > max_bytes {
        return Err(too_large(Some(result.meta.size)));
    }
    let bytes = result.bytes().await.map_err(Failure::Store)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(None));
    }
    Ok(bytes.to_vec())
}

/// The HTTP status of a failed request. object_store keeps its request errors private; their
/// text carries the status.
fn status_of(error: &object_store::Error) -> Option<u16> {
    let chain = error_chain(error);
    let at = chain.find(STATUS_TEXT)? + STATUS_TEXT.len();
    chain.get(at..at + 3)?.parse().ok()
}

const STATUS_TEXT: &str = "non-2xx status code: ";

/// What went wrong below HTTP (connecting, timing out), if that is what failed.
fn http_kind(error: &object_store::Error) -> Option<HttpErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(s) = source {
        if let Some(http) = s.downcast_ref::<object_store::client::HttpError>() {
            return Some(http.kind());
        }
        source = s.source();
    }
    None
}

/// The same statuses and failures http(s) retries: 5xx (S3's 503 SlowDown), 429, timeouts and
/// connection errors; never a refused address.
fn is_transient(error: &object_store::Error) -> bool {
    if let Some(status) = status_of(error) {
        return status == 429 || (500..=599).contains(&status);
    }
    !is_refused(error)
        && matches!(
            http_kind(error),
            Some(HttpErrorKind::Connect | HttpErrorKind::Request | HttpErrorKind::Timeout | HttpErrorKind::Interrupted)
        )
}

fn is_refused(error: &object_store::Error) -> bool {
    error_chain(error).contains(REFUSED)
}

fn error_chain(error: &object_store::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// S3 error codes that mean the credentials themselves were not accepted (as opposed to
/// valid credentials lacking permission).
const CREDENTIAL_CODES: [&str; 5] =
    ["SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"];

fn classify(uri: &str, error: object_store::Error, attempts: u32) -> FetchError {
    let uri = uri.to_owned();
    let status = status_of(&error);
    let code = s3_error_code(&error_chain(&error));
    if is_refused(&error) {
        let chain = error_chain(&error);
        let reason = chain[chain.find(REFUSED).unwrap_or(0)..].to_owned();
        return FetchError::ForbiddenAddress { uri, reason };
    }
    let error = match (&error, status) {
        (object_store::Error::NotFound { .. }, _) => StoreError::NotFound { uri },
        (object_store::Error::Unauthenticated { .. }, _) => StoreError::Unauthorized { uri, code },
        (object_store::Error::PermissionDenied { .. }, _) if CREDENTIAL_CODES.contains(&code.as_str()) => {
            StoreError::Unauthorized { uri, code }
        }
        (object_store::Error::PermissionDenied { .. }, _) => StoreError::Forbidden { uri, code },
        (_, Some(status)) => StoreError::Status { uri, status, attempts },
        _ => {
            let timed_out = matches!(http_kind(&error), Some(HttpErrorKind::Timeout));
            StoreError::Network { uri, attempts, timed_out, source: error }
        }
    };
    error.into()
}

/// The `<Code>` of an S3 XML error body, e.g. `SignatureDoesNotMatch`.
fn s3_error_code(body: &str) -> String {
    let code = body.split_once("<Code>").and_then(|(_, rest)| rest.split_once("</Code>")).map(|(code, _)| code);
    code.unwrap_or("no error code").trim().to_owned()
}

/// `(bucket, key)` of `s3://bucket/key`; the key is percent-decoded.
fn parse_s3_uri(uri: &str) -> Result<(&str, Path), FetchError> {
    let invalid = |reason: &str| FetchError::InvalidUri { uri: uri.into(), reason: reason.into() };
    let rest = uri.get("s3://".len()..).filter(|_| uri[..5].eq_ignore_ascii_case("s3://"));
    let rest = rest.ok_or_else(|| invalid("an S3 URI has the form s3://bucket/key"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || key.is_empty() {
        return Err(invalid("an S3 URI names a bucket and a key: s3://bucket/key"));
    }
    let key = Path::from_url_path(key).map_err(|e| invalid(&format!("bad object key: {e}")))?;
    Ok((bucket, key))
}

/// `(bucket, prefix)` of `s3://bucket/prefix/` (or `s3://bucket`: the root); the prefix is
/// percent-decoded.
fn parse_s3_prefix(uri: &str) -> Result<(&str, Path), FetchError> {
    let invalid = |reason: &str| FetchError::InvalidUri { uri: uri.into(), reason: reason.into() };
    let rest = uri.get("s3://".len()..).filter(|_| uri[..5].eq_ignore_ascii_case("s3://"));
    let (bucket, prefix) = rest.map(|r| r.split_once('/').unwrap_or((r, ""))).unwrap_or_default();
    if bucket.is_empty() {
        return Err(invalid("an S3 prefix names a bucket: s3://bucket/prefix/"));
    }
    let prefix = Path::from_url_path(prefix).map_err(|e| invalid(&format!("bad prefix: {e}")))?;
    Ok((bucket, prefix))
}

/// `key` percent-encoded for a URI path: every byte but letters, digits, `-._~` and `/`.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Why an endpoint given as a literal IP address is refused (no DNS lookup happens for those,
/// so the resolver cannot check them).
fn literal_refusal(endpoint: &str, policy: &AddressPolicy) -> Option<String> {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    let ip: IpAddr = host.parse().ok()?;
    policy.check(ip).err().map(|refused| format!("the fetch.s3 endpoint {endpoint}: {REFUSED}{refused}"))
}

/// Resolves store host names and drops the addresses the policy refuses; refuses the name if
/// none is left.
#[derive(Debug)]
struct CheckedDns(AddressPolicy);

impl DnsResolver for CheckedDns {
    fn resolve(&self, host: &str) -> DnsFuture {
        let policy = self.0.clone();
        let host = host.to_owned();
        Box::pin(async move {
            let lookup = tokio::task::spawn_blocking(move || {
                let addresses: Vec<IpAddr> = (host.as_str(), 0).to_socket_addrs()?.map(|a| a.ip()).collect();
                Ok::<_, std::io::Error>((host, addresses))
            });
            let (host, addresses) = lookup.await??;
            let mut refusal = None;
            let allowed: Vec<IpAddr> = addresses
                .into_iter()
                .filter(|ip| match policy.check(*ip) {
                    Ok(()) => true,
                    Err(refused) => {
                        refusal = Some(refused);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refusal) {
                (true, Some(refused)) => Err(format!("{host}: {REFUSED}{refused}").into()),
                _ => Ok(allowed),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uris_name_a_bucket_and_a_key() {
        let (bucket, key) = parse_s3_uri("s3://photos/cats/a%20b.png").unwrap();
        assert_eq!((bucket, key.as_ref()), ("photos", "cats/a b.png"));
        for bad in ["s3://photos", "s3://photos/", "s3:///key"] {
            assert_eq!(parse_s3_uri(bad).unwrap_err().kind(), "invalid_uri", "{bad}");
        }
    }

    #[test]
    fn prefixes_name_a_bucket_and_listed_keys_round_trip_through_their_uris() {
        let (bucket, prefix) = parse_s3_prefix("s3://photos/a%20b/").unwrap();
        assert_eq!((bucket, prefix.as_ref()), ("photos", "a b"));
        assert!(parse_s3_prefix("S3://photos").unwrap().1.is_root());
        for bad in ["s3://", "s3:///x", "s3:/photos"] {
            assert_eq!(parse_s3_prefix(bad).unwrap_err().kind(), "invalid_uri", "{bad}");
        }
        let key = "cat 1/100%#?é.png";
        let uri = format!("s3://b/{}", encode_key(key));
        assert_eq!(uri, "s3://b/cat%201/100%25%23%3F%C3%A9.png");
        assert_eq!(parse_s3_uri(&uri).unwrap().1.as_ref(), key);
    }

    #[test]
    fn literal_endpoints_obey_the_address_policy() {
        let closed = AddressPolicy::default();
        assert!(literal_refusal("http://127.0.0.1:9000", &closed).unwrap().contains("loopback"));
        assert!(literal_refusal("http://[::1]:9000/", &closed).is_some());
        assert_eq!(literal_refusal("https://s3.example.com", &closed), None);
        let open = AddressPolicy { allowed: vec!["127.0.0.1".parse().unwrap()], allow_all: false };
        assert_eq!(literal_refusal("http://127.0.0.1:9000", &open), None);
    }

    /// object_store's error as it reads for a status: "... non-2xx status code: 503 ...: body".
    fn failed(status: &str, code: &str) -> object_store::Error {
        let text = format!(
            "Error performing GET in 1ms - Server returned {STATUS_TEXT}{status}: <Error><Code>{code}</Code></Error>"
        );
        let source: Box<dyn std::error::Error + Send + Sync> = text.into();
        match status {
            "403 Forbidden" => object_store::Error::PermissionDenied { path: "k".into(), source },
            "404 Not Found" => object_store::Error::NotFound { path: "k".into(), source },
            _ => object_store::Error::Generic { store: "S3", source },
        }
    }

    #[test]
    fn statuses_are_retried_and_classified_as_for_http() {
        assert!(is_transient(&failed("503 Service Unavailable", "SlowDown")));
        assert!(is_transient(&failed("429 Too Many Requests", "")));
        assert!(!is_transient(&failed("400 Bad Request", "InvalidRequest")));
        assert!(!is_transient(&failed("404 Not Found", "NoSuchKey")));
        let kind = |status, code| classify("s3://b/k", failed(status, code), 4).kind();
        assert_eq!(kind("503 Service Unavailable", "SlowDown"), "http_status");
        assert_eq!(kind("404 Not Found", "NoSuchKey"), "not_found");
        assert_eq!(kind("403 Forbidden", "SignatureDoesNotMatch"), "unauthorized");
        assert_eq!(kind("403 Forbidden", "InvalidAccessKeyId"), "unauthorized");
        assert_eq!(kind("403 Forbidden", "AccessDenied"), "forbidden");
        let message = classify("s3://b/k", failed("503 Service Unavailable", "SlowDown"), 4).to_string();
        assert!(message.contains("HTTP 503") && message.contains("after 4 attempts"), "{message}");
    }

    #[test]
    fn error_codes_come_from_the_xml_body() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(s3_error_code(body), "SignatureDoesNotMatch");
        assert_eq!(s3_error_code("gateway down"), "no error code");
    }

    #[test]
    fn credentials_may_name_environment_variables() {
        let mut config = S3Config {
            access_key_id: Some("${KEY_ID}".into()),
            secret_access_key: Some("${SECRET}".into()),
            ..S3Config::default()
        };
        let env: std::collections::BTreeMap<String, String> =
            [("KEY_ID".into(), "AKIA1".into()), ("SECRET".into(), "s3cr3t".into())].into();
        config.resolve_env(&env).unwrap();
        assert_eq!(
            (config.access_key_id.as_deref(), config.secret_access_key.as_deref()),
            (Some("AKIA1"), Some("s3cr3t"))
        );
        let mut unset = S3Config { session_token: Some("${NOPE}".into()), ..S3Config::default() };
        let error = unset.resolve_env(&env).unwrap_err().to_string();
        assert!(error.contains("fetch.s3.session_token") && error.contains("NOPE"), "{error}");
        let secret = |key: &str| crate::config::is_secret_key(&["fetch".into(), "s3".into(), key.into()]);
        assert!(secret("secret_access_key") && secret("session_token") && !secret("endpoint"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let config = S3Config {
            secret_access_key: Some("hunter2".into()),
            session_token: Some("tok".into()),
            ..S3Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("tok\""), "{shown}");
    }
}
