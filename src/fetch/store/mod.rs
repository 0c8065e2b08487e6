//! Object-store URIs, read with the Arrow project's [`object_store`]:
//!
//! | file | what it owns |
//! |---|---|
//! | `mod.rs` | [`StoresConfig`] (`[fetch.stores]`), URI parsing, the client map, the runtime, retries, size limit, error classification, the address policy on endpoints |
//! | `s3.rs` | `s3://bucket/key`: AWS S3 and S3-compatible stores, [`S3Config`] |
//! | `gcs.rs` | `gs://bucket/key`: Google Cloud Storage, [`GcsConfig`] |
//! | `azure.rs` | `az://container/blob`: Azure Blob Storage, [`AzureConfig`] |
//!
//! object_store is async. Rather than make the fetch path async, the process keeps one small
//! private tokio runtime (one worker thread, started on the first store fetch) that runs the
//! HTTP connections; each decode thread blocks on its own request, as it does for http(s). The
//! runtime lives as long as the process.
//!
//! One client per (scheme, bucket), in one map shared by all clones of a
//! [`Fetcher`](super::Fetcher), so connections are pooled. Retries are dlpipe's own (the same
//! limits, backoff and transient statuses as http(s): 5xx, 429, timeouts and connection errors,
//! which covers S3's 503 SlowDown and Azure's 503 ServerBusy); object_store's are turned off so
//! that attempts are counted in one place. The address policy of `fetch.allowed_networks`
//! applies to every store's endpoint, by name (every resolved address is checked) and by literal
//! IP address alike.

mod azure;
mod gcs;
mod s3;

pub use azure::AzureConfig;
pub use gcs::GcsConfig;
pub use s3::S3Config;

use super::address::{AddressPolicy, REFUSED};
use super::{FetchConfig, FetchError, FetchOutcome};
use crate::config::ConfigError;
use object_store::client::{DnsFuture, DnsResolver, HttpErrorKind};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tracing::debug;

/// Settings of the object stores, one table each (`[fetch.stores.s3]`, `[fetch.stores.gcs]`,
/// `[fetch.stores.azure]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoresConfig {
    /// `s3://` URIs: endpoint, region, credentials.
    pub s3: S3Config,
    /// `gs://` URIs: base URL, service account.
    pub gcs: GcsConfig,
    /// `az://` URIs: account, key, endpoint.
    pub azure: AzureConfig,
}

impl StoresConfig {
    /// Expands `${NAME}` in every store's settings from `env`; an unset variable is an error
    /// naming the key and the variable.
    pub fn resolve_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        self.s3.resolve_env(env)?;
        self.gcs.resolve_env(env)?;
        self.azure.resolve_env(env)
    }
}

/// Expands `${NAME}` in each set field of `[fetch.stores.<store>]`.
fn expand_fields<const N: usize>(
    store: &str,
    fields: [(&str, &mut Option<String>); N],
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (name, value) in fields {
        if let Some(text) = value {
            *text = crate::config::expand_env(&format!("fetch.stores.{store}.{name}"), text, env)?;
        }
    }
    Ok(())
}

/// The object stores dlpipe reads, by URI scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `s3://bucket/key`
    S3,
    /// `gs://bucket/key`
    Gcs,
    /// `az://container/blob`
    Azure,
}

impl Scheme {
    /// The scheme of a URI's scheme name, any case (`s3`, `gs`, `az`).
    pub fn from_name(name: &str) -> Option<Scheme> {
        [Scheme::S3, Scheme::Gcs, Scheme::Azure].into_iter().find(|s| s.name().eq_ignore_ascii_case(name))
    }

    /// The URI scheme's name, as in `s3://`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Gcs => "gs",
            Scheme::Azure => "az",
        }
    }

    /// Where its credentials are set, for error messages.
    fn settings(self) -> &'static str {
        match self {
            Scheme::S3 => "fetch.stores.s3 or the AWS_* environment",
            Scheme::Gcs => "fetch.stores.gcs or the GOOGLE_* environment",
            Scheme::Azure => "fetch.stores.azure or the AZURE_STORAGE_* environment",
        }
    }

    /// Whether a 403 with error `code` and `body` means rejected credentials rather than missing
    /// permission.
    fn credentials_rejected(self, code: &str, body: &str) -> bool {
        match self {
            Scheme::S3 => s3::credentials_rejected(code),
            // GCS answers rejected credentials with 401, which object_store already tells apart.
            Scheme::Gcs => false,
            Scheme::Azure => azure::credentials_rejected(code, body),
        }
    }
}

/// An object's place: `scheme://bucket/key`, the key percent-decoded. The key may be empty only
/// where [`parse`](ObjectUri::parse) is told so (a listing prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectUri<'a> {
    pub scheme: Scheme,
    /// The bucket (S3, GCS) or container (Azure).
    pub bucket: &'a str,
    pub key: Path,
}

impl<'a> ObjectUri<'a> {
    /// Parses `scheme://bucket/key`; `key_required` refuses an empty key.
    pub fn parse(uri: &'a str, key_required: bool) -> Result<ObjectUri<'a>, FetchError> {
        let invalid = |reason: String| FetchError::InvalidUri { uri: uri.into(), reason };
        let (name, rest) = uri.split_once("://").ok_or_else(|| invalid("not a scheme://bucket/key URI".into()))?;
        let scheme = Scheme::from_name(name).ok_or_else(|| invalid(format!("`{name}://` is not an object store")))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() || key_required && key.is_empty() {
            let form = if scheme == Scheme::Azure { "container/blob" } else { "bucket/key" };
            return Err(invalid(format!("an object URI names a {form}: {}://{form}", scheme.name())));
        }
        let key = Path::from_url_path(key).map_err(|e| invalid(format!("bad object key: {e}")))?;
        Ok(ObjectUri { scheme, bucket, key })
    }
}

/// Why an object could not be read; [`kind`](StoreError::kind) is its dead-letter label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `not_found`: no such bucket, container or object.
    #[error("{uri}: the store has no such object (HTTP 404); check the bucket and key")]
    NotFound { uri: String },
    /// `unauthorized`: the store rejected the credentials (unknown key id, wrong secret or key,
    /// expired token), or none were found.
    #[error("{uri}: the store rejected dlpipe's credentials ({code}); check {settings}")]
    Unauthorized { uri: String, code: String, settings: &'static str },
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
    /// `store_config`: the store client could not be set up from `[fetch.stores.*]`.
    #[error("{uri}: cannot set up the store client from {settings}: {source}")]
    Config {
        uri: String,
        settings: &'static str,
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

/// The clients of one [`Fetcher`](super::Fetcher) and its clones, one per (scheme, bucket),
/// created on first use.
#[derive(Debug, Default)]
pub struct Stores {
    clients: Mutex<HashMap<(Scheme, String), Arc<Client>>>,
}

/// One bucket's client, and what the address policy says of its endpoint.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// Why the endpoint, a literal IP address, is refused; checked before every request (no
    /// DNS lookup happens for it, so the resolver cannot).
    refusal: Option<String>,
}

/// What a store's `build` gives: the client and the endpoint in effect, when not the cloud's
/// own (which is reached by name, through the checking resolver).
struct Built {
    store: Arc<dyn ObjectStore>,
    endpoint: Option<String>,
}

impl Stores {
    /// The bytes of `scheme://bucket/key`, refusing more than `max_bytes`.
    pub(super) fn fetch(
        &self,
        uri: &str,
        max_bytes: u64,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> FetchOutcome {
        let refused = |error| FetchOutcome { result: Err(error), attempts: 0 };
        let object = match ObjectUri::parse(uri, true) {
            Ok(object) => object,
            Err(error) => return refused(error),
        };
        let client = match self.client(uri, &object, config, policy) {
            Ok(client) => client,
            Err(error) => return refused(error),
        };
        fetch_with_retries(client.store.as_ref(), uri, object.scheme, &object.key, max_bytes, config)
    }

    /// The URIs of every object under `prefix_uri` (`s3://bucket/photos/`, or `s3://bucket` for
    /// all of it), recursively, sorted by key. The prefix is a folder: `photos/` lists
    /// `photos/cat/1.png` but not `photos2/1.png`. Each URI is the prefix as given, then the rest
    /// of the key percent-encoded (anything but letters, digits, `-._~/`), so that fetching it
    /// reads that very key. A listing is one request per 1000 keys, not retried: it runs once,
    /// from the command line.
    pub(super) fn list(
        &self,
        prefix_uri: &str,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> Result<Vec<String>, FetchError> {
        use futures_util::TryStreamExt;
        let object = ObjectUri::parse(prefix_uri, false)?;
        let client = self.client(prefix_uri, &object, config, policy)?;
        let prefix = &object.key;
        let listing = client.store.list((!prefix.is_root()).then_some(prefix)).try_collect::<Vec<_>>();
        let objects = block_on(listing).map_err(|error| match status_of(&error) {
            // A listing's 404 is a missing bucket (object_store reports it as a generic error).
            Some(404) => StoreError::NotFound { uri: prefix_uri.into() }.into(),
            _ => classify(prefix_uri, object.scheme, error, 1),
        })?;
        let mut keys: Vec<String> = objects.into_iter().map(|o| o.location.as_ref().to_owned()).collect();
        keys.sort_unstable();
        let base = prefix_uri.trim_end_matches('/');
        let below = |key: &str| key.strip_prefix(prefix.as_ref()).unwrap_or(key).trim_start_matches('/').to_owned();
        Ok(keys.iter().map(|key| format!("{base}/{}", encode_key(&below(key)))).collect())
    }

    /// Writes `bytes` as the object `uri`; one request, not retried.
    pub(super) fn put(
        &self,
        uri: &str,
        bytes: Vec<u8>,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> Result<(), FetchError> {
        let object = ObjectUri::parse(uri, true)?;
        let client = self.client(uri, &object, config, policy)?;
        block_on(client.store.put(&object.key, bytes.into())).map(drop).map_err(|e| classify(uri, object.scheme, e, 1))
    }

    /// The client of `object`'s bucket, created on first use. Every request to a store goes
    /// through here (a listing as much as a fetch), so that an endpoint the address policy
    /// refuses is refused before any I/O; run the request with [`block_on`].
    pub(crate) fn client(
        &self,
        uri: &str,
        object: &ObjectUri<'_>,
        config: &FetchConfig,
        policy: &AddressPolicy,
    ) -> Result<Arc<Client>, FetchError> {
        let client = {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            let id = (object.scheme, object.bucket.to_owned());
            match clients.get(&id) {
                Some(client) => Arc::clone(client),
                None => {
                    let client = build_client(object, config, policy).map_err(|source| StoreError::Config {
                        uri: uri.into(),
                        settings: object.scheme.settings(),
                        source,
                    })?;
                    let client = Arc::new(client);
                    clients.insert(id, Arc::clone(&client));
                    client
                }
            }
        };
        if let Some(reason) = &client.refusal {
            return Err(FetchError::ForbiddenAddress { uri: uri.into(), reason: reason.clone() });
        }
        Ok(client)
    }
}

/// Runs a store request on the process's store runtime, blocking the calling thread.
pub(crate) fn block_on<F: std::future::Future>(request: F) -> F::Output {
    runtime().block_on(request)
}

fn build_client(object: &ObjectUri<'_>, config: &FetchConfig, policy: &AddressPolicy) -> object_store::Result<Client> {
    // reqwest is built without a crypto provider (it would bring aws-lc-rs); ring is the one
    // ureq already links. Installing fails only when one is installed already, as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let limit = |ms: u64| Duration::from_millis(ms.max(1));
    let mut options = ClientOptions::new()
        .with_timeout(limit(config.timeout_ms))
        .with_connect_timeout(limit(config.connect_timeout_ms))
        .with_dns_resolver(Arc::new(CheckedDns(policy.clone())));
    if let Ok(agent) = config.user_agent.parse() {
        options = options.with_user_agent(agent);
    }
    let retry = RetryConfig { max_retries: 0, retry_timeout: limit(config.total_timeout_ms), ..RetryConfig::default() };
    let stores = &config.stores;
    let built = match object.scheme {
        Scheme::S3 => s3::build(object.bucket, &stores.s3, options, retry)?,
        Scheme::Gcs => gcs::build(object.bucket, &stores.gcs, options, retry)?,
        Scheme::Azure => azure::build(object.bucket, &stores.azure, options, retry)?,
    };
    let refusal = built.endpoint.as_deref().and_then(|e| literal_refusal(e, object.scheme, policy));
    Ok(Client { store: built.store, refusal })
}

fn fetch_with_retries(
    store: &dyn ObjectStore,
    uri: &str,
    scheme: Scheme,
    key: &Path,
    max_bytes: u64,
    config: &FetchConfig,
) -> FetchOutcome {
    let max_attempts = config.max_retries.saturating_add(1);
    let deadline = Instant::now() + Duration::from_millis(config.total_timeout_ms);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match block_on(get_limited(store, uri, key, max_bytes)) {
            Ok(bytes) => return FetchOutcome { result: Ok(bytes), attempts },
            Err(Failure::Final(error)) => return FetchOutcome { result: Err(error), attempts },
            Err(Failure::Store(error)) => error,
        };
        let transient = is_transient(&error);
        let delay = super::retry_delay(config, attempts - 1, None, super::jitter());
        let next_ends = Instant::now() + delay + Duration::from_millis(config.timeout_ms);
        if !transient || attempts >= max_attempts || next_ends > deadline {
            return FetchOutcome { result: Err(classify(uri, scheme, error, attempts)), attempts };
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

async fn get_limited(store: &dyn ObjectStore, uri: &str, key: &Path, max_bytes: u64) -> Result<Vec<u8>, Failure> {
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

/// The same statuses and failures http(s) retries: 5xx (S3's 503 SlowDown, Azure's 503
/// ServerBusy), 429, timeouts and connection errors; never a refused address.
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

/// The failure as a fetch error with its dead-letter kind. A 403 is `unauthorized` when the
/// store's error code says the credentials were rejected, `forbidden` otherwise.
fn classify(uri: &str, scheme: Scheme, error: object_store::Error, attempts: u32) -> FetchError {
    let uri = uri.to_owned();
    let status = status_of(&error);
    let chain = error_chain(&error);
    let code = error_code(&chain);
    let settings = scheme.settings();
    if is_refused(&error) {
        let reason = chain[chain.find(REFUSED).unwrap_or(0)..].to_owned();
        return FetchError::ForbiddenAddress { uri, reason };
    }
    let error = match (&error, status) {
        (object_store::Error::NotFound { .. }, _) => StoreError::NotFound { uri },
        (object_store::Error::Unauthenticated { .. }, _) => StoreError::Unauthorized { uri, code, settings },
        (object_store::Error::PermissionDenied { .. }, _) if scheme.credentials_rejected(&code, &chain) => {
            StoreError::Unauthorized { uri, code, settings }
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

/// The `<Code>` of an XML error body (S3, GCS's XML API, Azure), e.g. `SignatureDoesNotMatch`.
fn error_code(body: &str) -> String {
    let code = body.split_once("<Code>").and_then(|(_, rest)| rest.split_once("</Code>")).map(|(code, _)| code);
    code.unwrap_or("no error code").trim().to_owned()
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
fn literal_refusal(endpoint: &str, scheme: Scheme, policy: &AddressPolicy) -> Option<String> {
    let after_scheme = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    let ip: IpAddr = host.parse().ok()?;
    let store = scheme.name();
    policy.check(ip).err().map(|refused| format!("the {store}:// store's endpoint {endpoint}: {REFUSED}{refused}"))
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
    fn object_uris_name_a_bucket_and_a_key() {
        let object = ObjectUri::parse("s3://photos/cats/a%20b.png", true).unwrap();
        assert_eq!((object.scheme, object.bucket, object.key.as_ref()), (Scheme::S3, "photos", "cats/a b.png"));
        let object = ObjectUri::parse("GS://photos/a.png", true).unwrap();
        assert_eq!((object.scheme, object.bucket), (Scheme::Gcs, "photos"));
        let object = ObjectUri::parse("az://images/x/y.png", true).unwrap();
        assert_eq!((object.scheme, object.bucket, object.key.as_ref()), (Scheme::Azure, "images", "x/y.png"));
        for bad in ["s3://photos", "s3://photos/", "s3:///key", "gs://b", "az:///blob", "ftp://h/k", "s3:/b/k"] {
            assert_eq!(ObjectUri::parse(bad, true).unwrap_err().kind(), "invalid_uri", "{bad}");
        }
        // A listing's prefix may be empty; the bucket may not.
        assert_eq!(ObjectUri::parse("gs://photos/", false).unwrap().key.as_ref(), "");
        assert!(ObjectUri::parse("gs:///", false).is_err());
    }

    #[test]
    fn prefixes_name_a_bucket_and_listed_keys_round_trip_through_their_uris() {
        let prefix = ObjectUri::parse("s3://photos/a%20b/", false).unwrap();
        assert_eq!((prefix.bucket, prefix.key.as_ref()), ("photos", "a b"));
        assert!(ObjectUri::parse("S3://photos", false).unwrap().key.is_root());
        for bad in ["s3://", "s3:///x", "s3:/photos"] {
            assert_eq!(ObjectUri::parse(bad, false).unwrap_err().kind(), "invalid_uri", "{bad}");
        }
        let key = "cat 1/100%#?é.png";
        let uri = format!("s3://b/{}", encode_key(key));
        assert_eq!(uri, "s3://b/cat%201/100%25%23%3F%C3%A9.png");
        assert_eq!(ObjectUri::parse(&uri, true).unwrap().key.as_ref(), key);
    }

    #[test]
    fn literal_endpoints_obey_the_address_policy() {
        let closed = AddressPolicy::default();
        let refusal = literal_refusal("http://127.0.0.1:9000", Scheme::Gcs, &closed).unwrap();
        assert!(refusal.contains("loopback") && refusal.contains("gs://"), "{refusal}");
        assert!(literal_refusal("http://[::1]:9000/", Scheme::S3, &closed).is_some());
        assert!(literal_refusal("http://127.0.0.1:10000/devstoreaccount1", Scheme::Azure, &closed).is_some());
        assert_eq!(literal_refusal("https://s3.example.com", Scheme::S3, &closed), None);
        let open = AddressPolicy { allowed: vec!["127.0.0.1".parse().unwrap()], allow_all: false };
        assert_eq!(literal_refusal("http://127.0.0.1:9000", Scheme::S3, &open), None);
    }

    /// object_store's error as it reads for a status: "... non-2xx status code: 503 ...: body".
    fn failed(status: &str, code: &str) -> object_store::Error {
        let text = format!(
            "Error performing GET in 1ms - Server returned {STATUS_TEXT}{status}: <Error><Code>{code}</Code></Error>"
        );
        let source: Box<dyn std::error::Error + Send + Sync> = text.into();
        match status {
            "401 Unauthorized" => object_store::Error::Unauthenticated { path: "k".into(), source },
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
        let kind = |scheme, status, code| classify("s3://b/k", scheme, failed(status, code), 4).kind();
        assert_eq!(kind(Scheme::S3, "503 Service Unavailable", "SlowDown"), "http_status");
        assert_eq!(kind(Scheme::S3, "404 Not Found", "NoSuchKey"), "not_found");
        assert_eq!(kind(Scheme::S3, "403 Forbidden", "SignatureDoesNotMatch"), "unauthorized");
        assert_eq!(kind(Scheme::S3, "403 Forbidden", "InvalidAccessKeyId"), "unauthorized");
        assert_eq!(kind(Scheme::S3, "403 Forbidden", "AccessDenied"), "forbidden");
        assert_eq!(kind(Scheme::Azure, "403 Forbidden", "AuthenticationFailed"), "unauthorized");
        assert_eq!(kind(Scheme::Azure, "403 Forbidden", "AuthorizationPermissionMismatch"), "forbidden");
        assert_eq!(kind(Scheme::Gcs, "401 Unauthorized", "AuthenticationRequired"), "unauthorized");
        assert_eq!(kind(Scheme::Gcs, "403 Forbidden", "AccessDenied"), "forbidden");
        // One store's codes do not speak for another's.
        assert_eq!(kind(Scheme::Azure, "403 Forbidden", "SignatureDoesNotMatch"), "forbidden");
        let message = classify("s3://b/k", Scheme::S3, failed("503 Service Unavailable", "SlowDown"), 4).to_string();
        assert!(message.contains("HTTP 503") && message.contains("after 4 attempts"), "{message}");
        // Azurite's code for a wrong key is AuthorizationFailure, with Azure's words for one.
        let words = |message: &str| {
            let text =
                format!("{STATUS_TEXT}403 Forbidden: <Error><Code>AuthorizationFailure</Code><Message>{message}");
            let source: Box<dyn std::error::Error + Send + Sync> = text.into();
            classify("az://c/k", Scheme::Azure, object_store::Error::PermissionDenied { path: "k".into(), source }, 1)
        };
        assert_eq!(words("Server failed to authenticate the request. Make sure ...").kind(), "unauthorized");
        assert_eq!(words("This request is not authorized to perform this operation.").kind(), "forbidden");
        let message = classify("az://c/k", Scheme::Azure, failed("403 Forbidden", "AuthenticationFailed"), 1);
        assert!(message.to_string().contains("fetch.stores.azure"), "{message}");
    }

    #[test]
    fn error_codes_come_from_the_xml_body() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(error_code(body), "SignatureDoesNotMatch");
        assert_eq!(error_code("gateway down"), "no error code");
    }

    #[test]
    fn credentials_may_name_environment_variables() {
        let mut config = StoresConfig::default();
        config.s3.access_key_id = Some("${KEY_ID}".into());
        config.s3.secret_access_key = Some("${SECRET}".into());
        config.azure.access_key = Some("${SECRET}".into());
        config.gcs.service_account = Some("/keys/${KEY_ID}.json".into());
        let env: BTreeMap<String, String> =
            [("KEY_ID".into(), "AKIA1".into()), ("SECRET".into(), "s3cr3t".into())].into();
        config.resolve_env(&env).unwrap();
        assert_eq!(
            (config.s3.access_key_id.as_deref(), config.s3.secret_access_key.as_deref()),
            (Some("AKIA1"), Some("s3cr3t"))
        );
        assert_eq!(config.azure.access_key.as_deref(), Some("s3cr3t"));
        assert_eq!(config.gcs.service_account.as_deref(), Some("/keys/AKIA1.json"));
        for (store, key) in [("s3", "session_token"), ("gcs", "service_account_key"), ("azure", "access_key")] {
            let mut unset = StoresConfig::default();
            match store {
                "s3" => unset.s3.session_token = Some("${NOPE}".into()),
                "gcs" => unset.gcs.service_account_key = Some("${NOPE}".into()),
                _ => unset.azure.access_key = Some("${NOPE}".into()),
            }
            let error = unset.resolve_env(&env).unwrap_err().to_string();
            assert!(error.contains(&format!("fetch.stores.{store}.{key}")) && error.contains("NOPE"), "{error}");
        }
        let secret = |store: &str, key: &str| {
            crate::config::is_secret_key(&["fetch".into(), "stores".into(), store.into(), key.into()])
        };
        assert!(secret("s3", "secret_access_key") && secret("s3", "session_token") && !secret("s3", "endpoint"));
        assert!(secret("gcs", "service_account_key") && !secret("gcs", "service_account"));
        assert!(secret("azure", "access_key") && !secret("azure", "account") && !secret("s3", "access_key_id"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut config = StoresConfig::default();
        config.s3.secret_access_key = Some("hunter2".into());
        config.s3.session_token = Some("tok".into());
        config.gcs.service_account_key = Some("{\"private_key\": \"pem\"}".into());
        config.azure.access_key = Some("azkey".into());
        let shown = format!("{config:?}");
        for secret in ["hunter2", "tok\"", "pem", "azkey"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
}
