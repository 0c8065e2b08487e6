//! Fetching the bytes behind an image URI.
//!
//! In: a URI taken from an image record, and the largest number of bytes the caller accepts (the
//! decoder's encoded-size limit). Out: the raw, still-encoded bytes, or a [`FetchError`] whose
//! [`kind`](FetchError::kind) is a short label for dead-letter records and metrics.
//!
//! Supported URIs:
//! - `http://` and `https://`: fetched with [`ureq`] under the configured timeouts and a body
//!   size limit, with bounded, exponentially backed-off retries of transient failures (timeouts,
//!   connection errors, HTTP 5xx and 429). Proxies are taken from the usual environment variables
//!   (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, ...).
//! - `file:///abs/path` and `file://localhost/abs/path` (percent-encoded), and plain paths (any
//!   string without a `scheme:` prefix), unless [`FetchConfig::allow_file`] is off.
//! - `data:` URIs (RFC 2397), the image bytes in the URI itself, e.g.
//!   `data:image/png;base64,iVBOR...`. The media type is ignored (the decoder sniffs the format);
//!   the size limit is checked on the length of the text, before anything is decoded.
//! - `s3://bucket/key`, `gs://bucket/key` and `az://container/blob`: objects in AWS S3 (or an
//!   S3-compatible store), Google Cloud Storage and Azure Blob Storage, read with object_store
//!   under the same limits and retries ([`store`], settings `[fetch.stores.*]`).
//!
//! A [`Fetcher`] is cheap to clone and safe to share: the decode threads of a worker all use one,
//! so they share its pool of keep-alive connections.

use crate::config::ConfigError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

pub mod address;
pub mod auth;
pub mod store;

/// How URIs are fetched. Every field is optional in configuration files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Limit on one whole HTTP request, from DNS lookup to the last body byte, in milliseconds.
    /// Each retry gets the full limit again. At least 1 (without it a stalled server would hold
    /// a fetch thread forever). Default 10000.
    pub timeout_ms: u64,
    /// Limit on establishing a connection (TCP and TLS handshakes), in milliseconds; at least 1.
    /// Default 3000.
    pub connect_timeout_ms: u64,
    /// Retries after a failed HTTP request, for timeouts, connection errors, 5xx and 429 only;
    /// other failures are final at once. 0 disables retries. Default 3.
    pub max_retries: u32,
    /// Limit on all attempts at one URI together, backoffs included, in milliseconds: no retry
    /// starts that could not finish within it. A record's epoch waits for its fetch, so this
    /// bounds how long one slow server can hold back the predictions behind it. Default 15000.
    pub total_timeout_ms: u64,
    /// Wait before the first retry, in milliseconds; it doubles for each further retry. The
    /// actual wait is randomised between half and all of it, so that many threads failing
    /// together do not retry in lockstep. Default 100.
    pub backoff_initial_ms: u64,
    /// Cap on the wait between retries, in milliseconds; also caps how long a server's
    /// `Retry-After` header is honoured. Default 2000.
    pub backoff_max_ms: u64,
    /// `User-Agent` header sent with HTTP requests. Default `dlpipe/<version>`.
    pub user_agent: String,
    /// Whether `file://` URIs and plain paths may be read. A deployment that takes URIs from
    /// untrusted producers should turn this off, or any readable file on the machine could be
    /// requested. Default true.
    pub allow_file: bool,
    /// Folder that relative plain paths resolve against; unset, they resolve against the current
    /// directory. A base, not a sandbox: `file_roots` confines. Default unset.
    pub file_root: Option<PathBuf>,
    /// Folders that local files named by records must be in, after resolving `..` and symbolic
    /// links: a producer cannot make dlpipe read (or dead-letter the start of) any other file.
    /// Each must exist when `allow_file` is on. `[]` allows any regular file except under /proc,
    /// /sys and /dev (always refused). The batch commands read whatever files their user names.
    /// Default `["data"]` (the clone's data folder; `configs/local.toml` says `"../data"`).
    pub file_roots: Vec<PathBuf>,
    /// Internal networks (CIDR, e.g. `"10.1.0.0/16"`, or single addresses) that http(s) URIs
    /// may reach. Loopback, private, link-local (169.254.169.254: cloud metadata), CGNAT,
    /// multicast and reserved addresses are otherwise refused, so a URI cannot turn dlpipe
    /// into a probe of the network it runs in. Default empty.
    pub allowed_networks: Vec<String>,
    /// Requests at once to one host (host and port), across all fetch threads of a process; more
    /// wait their turn, so that a burst of records cannot overload one image server. At least 1.
    /// Default 8.
    pub max_per_host: usize,
    /// Credentials for http(s) hosts, one `[[fetch.http_auth]]` table each; the first whose
    /// `host` matches is sent. Secrets come from the environment or files, never the config
    /// file; see [`auth::HttpAuthRule`]. Default none.
    pub http_auth: Vec<auth::HttpAuthRule>,
    /// Object stores: `s3://`, `gs://` and `az://` URIs, one table each (`[fetch.stores.s3]`,
    /// `[fetch.stores.gcs]`, `[fetch.stores.azure]`; see [`store::StoresConfig`]).
    pub stores: store::StoresConfig,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            max_retries: 3,
            total_timeout_ms: 15_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 2_000,
            user_agent: concat!("dlpipe/", env!("CARGO_PKG_VERSION")).to_owned(),
            allow_file: true,
            file_root: None,
            file_roots: vec![PathBuf::from("data")],
            allowed_networks: Vec::new(),
            max_per_host: 8,
            http_auth: Vec::new(),
            stores: store::StoresConfig::default(),
        }
    }
}

/// Why a URI could not be fetched. Every message names the URI; [`kind`](FetchError::kind) gives
/// the cause as a label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// `unsupported_scheme`: a scheme other than http, https, s3, gs, az, data or file.
    #[error("{uri}: unsupported URI scheme `{scheme}:`; supported: {supported}")]
    UnsupportedScheme { uri: String, scheme: String, supported: &'static str },

    /// `invalid_uri`: empty, unparsable, a file URI naming a remote host, or a `data:` URI
    /// without a comma or with invalid base64.
    #[error("{uri} is not a valid URI: {reason}")]
    InvalidUri { uri: String, reason: String },

    /// `forbidden_local_file`: a file URI or path while [`FetchConfig::allow_file`] is off, or
    /// one outside [`FetchConfig::file_roots`] (the message says no more about the file: whether
    /// it exists, or how large it is, is nobody's business outside the roots).
    #[error("{uri}: {reason}")]
    ForbiddenLocalFile { uri: String, reason: String },

    /// `forbidden_address`: an http(s) host that resolves to an internal address.
    #[error("{uri}: refused: {reason}")]
    ForbiddenAddress { uri: String, reason: String },

    /// `not_found`: no file at the path.
    #[error("{uri}: no such file {}{}", path.display(), relative_hint(path))]
    FileNotFound { uri: String, path: PathBuf },

    /// `not_found`: HTTP 404 or 410.
    #[error("{uri}: the server has no such resource (HTTP {}); check the URI", status_text(*status))]
    HttpNotFound { uri: String, status: u16 },

    /// `unauthorized`: HTTP 401 or 403: the credentials sent (or their absence) were refused.
    #[error("{uri}: the server refused access (HTTP {}) {}", status_text(*status), unauthorized_hint(host, rule.as_deref()))]
    Unauthorized {
        uri: String,
        status: u16,
        /// The host that refused (after redirects).
        host: String,
        /// The host pattern of the `fetch.http_auth` rule whose credentials were sent, if any.
        rule: Option<String>,
    },

    /// `unreadable`: the path exists but cannot be read (permissions, a directory, I/O error).
    #[error("{uri}: cannot read {}: {source}", path.display())]
    Unreadable {
        uri: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `too_large`: more than the caller's `max_bytes`.
    #[error("{}", too_large_message(uri, *size, *limit))]
    TooLarge {
        uri: String,
        /// The size announced (`Content-Length`), found (file metadata) or computed from the
        /// length of a `data:` URI's text; `None` when the data ran past the limit while being
        /// read.
        size: Option<u64>,
        limit: u64,
    },

    /// `http_status`: any other non-success status, including 5xx and 429 still failing after
    /// all retries, and a redirect chain longer than ureq follows.
    #[error("{uri}: the server answered HTTP {}{}", status_text(*status), after_attempts(*attempts))]
    HttpStatus { uri: String, status: u16, attempts: u32 },

    /// `timeout`: the connect or whole-request limit ran out, on every attempt.
    #[error(
        "{uri}: {} within {limit_ms} ms{}; if the server is merely slow, raise {setting}",
        if *phase == "connect" { "could not connect" } else { "no complete response" },
        after_attempts(*attempts)
    )]
    Timeout {
        uri: String,
        /// `"connect"` or `"request"` (anything after connecting, up to the last body byte).
        phase: &'static str,
        limit_ms: u64,
        /// The configuration key that set the limit.
        setting: &'static str,
        attempts: u32,
    },

    /// An `s3://`, `gs://` or `az://` object that could not be read: `not_found`,
    /// `unauthorized`, `forbidden`, `http_status`, `network`, `timeout` or `store_config` (see
    /// [`store::StoreError`]).
    #[error(transparent)]
    Store(#[from] store::StoreError),

    /// `network`: DNS, refused or reset connections, TLS, malformed HTTP.
    #[error("{uri}: network error{}: {source}; check that the host is reachable from here", after_attempts(*attempts))]
    Network {
        uri: String,
        attempts: u32,
        #[source]
        source: ureq::Error,
    },
}

impl FetchError {
    /// A short, stable label of the cause, for dead-letter records and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::UnsupportedScheme { .. } => "unsupported_scheme",
            FetchError::InvalidUri { .. } => "invalid_uri",
            FetchError::ForbiddenLocalFile { .. } => "forbidden_local_file",
            FetchError::ForbiddenAddress { .. } => "forbidden_address",
            FetchError::FileNotFound { .. } | FetchError::HttpNotFound { .. } => "not_found",
            FetchError::Unauthorized { .. } => "unauthorized",
            FetchError::Unreadable { .. } => "unreadable",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::HttpStatus { .. } => "http_status",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Network { .. } => "network",
            FetchError::Store(error) => error.kind(),
        }
    }

    /// The URI that failed.
    pub fn uri(&self) -> &str {
        match self {
            FetchError::UnsupportedScheme { uri, .. }
            | FetchError::InvalidUri { uri, .. }
            | FetchError::ForbiddenLocalFile { uri, .. }
            | FetchError::ForbiddenAddress { uri, .. }
            | FetchError::FileNotFound { uri, .. }
            | FetchError::HttpNotFound { uri, .. }
            | FetchError::Unauthorized { uri, .. }
            | FetchError::Unreadable { uri, .. }
            | FetchError::TooLarge { uri, .. }
            | FetchError::HttpStatus { uri, .. }
            | FetchError::Timeout { uri, .. }
            | FetchError::Network { uri, .. } => uri,
            FetchError::Store(error) => error.uri(),
        }
    }
}

/// "503 Service Unavailable", or just the code when it has no standard reason phrase.
fn status_text(status: u16) -> String {
    match ureq::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// Mentions the attempts only when there were retries, where it tells the user that retrying
/// by hand soon is unlikely to help.
fn after_attempts(attempts: u32) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

/// What to check after a 401 or 403: the credentials sent, or the missing rule.
fn unauthorized_hint(host: &str, rule: Option<&str>) -> String {
    match rule {
        Some(pattern) => format!(
            "to the credentials of the fetch.http_auth rule for {pattern}; check that its secret is current and \
             grants access to this resource"
        ),
        None => format!("and no fetch.http_auth rule matches host {host}; add one if the server needs credentials"),
    }
}

/// Relative paths resolve against the current directory, which is easily not the one expected.
fn relative_hint(path: &Path) -> &'static str {
    if path.is_relative() {
        " (relative to the current directory; set file_root to resolve relative paths elsewhere)"
    } else {
        ""
    }
}

fn too_large_message(uri: &str, size: Option<u64>, limit: u64) -> String {
    match size {
        Some(size) => format!(
            "{uri} is {size} bytes, over the limit of {limit} bytes; raise the limit if images this large are expected"
        ),
        None => format!(
            "{uri} is over the limit of {limit} bytes (reading stopped there); raise the limit if images this large \
             are expected"
        ),
    }
}

/// A fetch's result together with the number of attempts it took, for retry metrics.
#[derive(Debug)]
pub struct FetchOutcome {
    pub result: Result<Vec<u8>, FetchError>,
    /// HTTP requests sent, including retries; 1 for a local file or a decoded `data:` URI; 0 when
    /// the URI was rejected before any I/O (unsupported scheme, invalid URI, local files
    /// disabled, a `data:` URI too large or malformed).
    pub attempts: u32,
}

impl FetchOutcome {
    /// Attempts beyond the first.
    pub fn retries(&self) -> u32 {
        self.attempts.saturating_sub(1)
    }
}

/// Fetches URIs; see the [module documentation](self). Clones share one connection pool.
#[derive(Clone, Debug)]
pub struct Fetcher {
    agent: ureq::Agent,
    config: Arc<FetchConfig>,
    /// `config.file_roots`, canonicalised once.
    roots: Arc<Vec<PathBuf>>,
    /// `config.http_auth` with the secrets read.
    credentials: Arc<auth::Credentials>,
    /// `config.max_per_host`, shared by all clones.
    per_host: Arc<auth::HostLimiter>,
    /// The address policy, for object-store endpoints (ureq's resolver holds its own copy).
    policy: Arc<address::AddressPolicy>,
    /// Clients of the object-store buckets seen so far.
    stores: Arc<store::Stores>,
}

/// Folders no image is read from, whatever `file_roots` says: kernel and device files.
const SYSTEM_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

impl Fetcher {
    /// A fetcher with its own connection pool; create one per process and clone it. Fails on
    /// a `file_roots` folder that does not exist, an `allowed_networks` entry that is not
    /// a network, or an `http_auth` rule whose secret cannot be read.
    pub fn new(config: FetchConfig) -> Result<Fetcher, ConfigError> {
        Fetcher::with_agent_config(config, |builder| builder)
    }

    fn with_agent_config(
        config: FetchConfig,
        adjust: impl FnOnce(
            ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
        ) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    ) -> Result<Fetcher, ConfigError> {
        let allowed = config
            .allowed_networks
            .iter()
            .map(|n| n.parse::<address::Network>().map_err(ConfigError::AllowedNetwork))
            .collect::<Result<Vec<_>, _>>()?;
        // Roots matter (and must exist) only where local files may be read at all.
        let roots = config
            .file_roots
            .iter()
            .filter(|_| config.allow_file)
            .map(|r| std::fs::canonicalize(r).map_err(|error| ConfigError::FileRoot { path: r.clone(), error }))
            .collect::<Result<Vec<_>, _>>()?;
        let credentials = auth::Credentials::resolve(&config.http_auth, |name| std::env::var(name).ok())?;
        let per_host = Arc::new(auth::HostLimiter::new(config.max_per_host));
        let policy = address::AddressPolicy { allowed, allow_all: false };
        let resolver = address::CheckedResolver::new(policy.clone());
        let agent_config = adjust(agent_config(&config)).build();
        let agent =
            ureq::Agent::with_parts(agent_config, ureq::unversioned::transport::DefaultConnector::default(), resolver);
        Ok(Fetcher {
            agent,
            config: Arc::new(config),
            roots: Arc::new(roots),
            credentials: Arc::new(credentials),
            per_host,
            policy: Arc::new(policy),
            stores: Arc::default(),
        })
    }

    /// Checks a local path against the roots: the canonical path (`..` and links resolved) must
    /// be inside one of them and outside the system folders. Missing files inside the roots are
    /// `not_found` as usual; outside, every path gets the same answer.
    fn confine(&self, uri: &str, path: &Path) -> Result<PathBuf, FetchError> {
        let outside = |reason: &str| FetchError::ForbiddenLocalFile { uri: uri.into(), reason: reason.into() };
        let canonical = match std::fs::canonicalize(path) {
            Ok(canonical) => canonical,
            // Unresolvable: missing (say so only inside the roots) or unreadable. Its folder is
            // resolved as the roots are, so that a root reached through a link still counts.
            Err(_) => {
                let folder = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
                let resolved = folder.zip(path.file_name()).map(|(folder, name)| folder.join(name));
                let inside =
                    |r: &PathBuf| lexically_inside(path, r) || resolved.as_ref().is_some_and(|p| p.starts_with(r));
                if self.roots.is_empty() || self.roots.iter().any(inside) {
                    return Ok(path.to_owned());
                }
                return Err(outside(OUTSIDE_ROOTS));
            }
        };
        if SYSTEM_DIRS.iter().any(|d| canonical.starts_with(d)) {
            return Err(outside("system files (/proc, /sys, /dev) are never read"));
        }
        if !self.roots.is_empty() && !self.roots.iter().any(|r| canonical.starts_with(r)) {
            return Err(outside(OUTSIDE_ROOTS));
        }
        Ok(canonical)
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// The bytes behind `uri`, refusing more than `max_bytes`. Blocks for up to
    /// `(max_retries + 1) × timeout_ms` plus backoffs: call it from a thread that may wait.
    pub fn fetch(&self, uri: &str, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        self.fetch_with_attempts(uri, max_bytes).result
    }

    /// Like [`fetch`](Self::fetch), also reporting how many attempts it took.
    pub fn fetch_with_attempts(&self, uri: &str, max_bytes: u64) -> FetchOutcome {
        match self.target(uri) {
            Ok(Target::Http) => self.fetch_http(uri, max_bytes),
            Ok(Target::Store) => self.stores.fetch(uri, max_bytes, &self.config, &self.policy),
            Ok(Target::Data) => {
                let result = data_uri_bytes(uri, max_bytes);
                // Nothing to retry; a refused URI, as elsewhere, counts no attempt.
                let attempts = u32::from(result.is_ok());
                FetchOutcome { result, attempts }
            }
            Ok(Target::File(path)) => match self.confine(uri, &path) {
                Ok(path) => FetchOutcome { result: read_file(uri, &path, max_bytes), attempts: 1 },
                Err(error) => FetchOutcome { result: Err(error), attempts: 0 },
            },
            Err(error) => FetchOutcome { result: Err(error), attempts: 0 },
        }
    }

    /// Whether `uri` can be fetched at all, decided from the URI alone (its scheme, whether local
    /// files are allowed) with no I/O: a list of URIs is checked line by line with this before
    /// anything is published.
    pub fn check(&self, uri: &str) -> Result<(), FetchError> {
        self.target(uri).map(|_| ())
    }

    /// The URIs of the objects under an object-store prefix (`s3://bucket/photos/`,
    /// `gs://bucket/photos/`, `az://container/photos/`), recursively, sorted by key; see
    /// [`store::Stores::list`]. Other schemes cannot be listed.
    pub fn list(&self, prefix_uri: &str) -> Result<Vec<String>, FetchError> {
        match self.target(prefix_uri)? {
            Target::Store => self.stores.list(prefix_uri, &self.config, &self.policy),
            _ => Err(FetchError::UnsupportedScheme {
                uri: prefix_uri.into(),
                scheme: scheme(prefix_uri).unwrap_or("file").into(),
                supported: "s3://, gs:// and az:// (object-store prefixes; list local folders as paths)",
            }),
        }
    }

    /// Writes `bytes` as the object-store object `uri` (`dlpipe bench --store` uploads its photos
    /// with it); one request, not retried. Other schemes cannot be written.
    pub fn put(&self, uri: &str, bytes: Vec<u8>) -> Result<(), FetchError> {
        match self.target(uri)? {
            Target::Store => self.stores.put(uri, bytes, &self.config, &self.policy),
            _ => Err(FetchError::UnsupportedScheme {
                uri: uri.into(),
                scheme: scheme(uri).unwrap_or("file").into(),
                supported: "s3://, gs:// and az:// (objects are written to object stores only)",
            }),
        }
    }

    /// Decides from the URI alone what to do with it, so that refused URIs cost no I/O.
    fn target(&self, uri: &str) -> Result<Target, FetchError> {
        if uri.is_empty() {
            return Err(FetchError::InvalidUri { uri: uri.into(), reason: "the URI is empty".into() });
        }
        let scheme = scheme(uri);
        match scheme {
            Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => return Ok(Target::Http),
            Some(s) if s.eq_ignore_ascii_case("data") => return Ok(Target::Data),
            Some(s) if store::Scheme::from_name(s).is_some() => return Ok(Target::Store),
            Some(s) if !s.eq_ignore_ascii_case("file") => {
                let supported = if self.config.allow_file {
                    "http://, https://, s3://, gs://, az://, data:, file:// and plain file paths"
                } else {
                    "http://, https://, s3://, gs://, az:// and data: (local files are disabled)"
                };
                return Err(FetchError::UnsupportedScheme { uri: uri.into(), scheme: s.into(), supported });
            }
            _ => {}
        }
        if !self.config.allow_file {
            let reason = "local files are disabled (fetch.allow_file = false); send http:// or https:// URIs instead";
            return Err(FetchError::ForbiddenLocalFile { uri: uri.into(), reason: reason.into() });
        }
        let path = match scheme {
            Some(_) => file_uri_path(uri)?,
            None => match &self.config.file_root {
                Some(root) if Path::new(uri).is_relative() => root.join(uri),
                _ => PathBuf::from(uri),
            },
        };
        Ok(Target::File(path))
    }

    fn fetch_http(&self, uri: &str, max_bytes: u64) -> FetchOutcome {
        let max_attempts = self.config.max_retries.saturating_add(1);
        let deadline = std::time::Instant::now() + Duration::from_millis(self.config.total_timeout_ms);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.http_attempt(uri, max_bytes) {
                Ok(bytes) => return FetchOutcome { result: Ok(bytes), attempts },
                Err(failure) => failure,
            };
            if attempts >= max_attempts || !failure.is_transient() {
                let error = failure.into_error(uri, attempts, &self.config);
                // ureq refuses a malformed URI before sending anything: no attempt was made.
                let attempts = if matches!(error, FetchError::InvalidUri { .. }) { attempts - 1 } else { attempts };
                return FetchOutcome { result: Err(error), attempts };
            }
            let delay = retry_delay(&self.config, attempts - 1, failure.retry_after(), jitter());
            // A retry that would run past the total limit is not started.
            let next_ends = std::time::Instant::now() + delay + Duration::from_millis(self.config.timeout_ms);
            if next_ends > deadline {
                return FetchOutcome { result: Err(failure.into_error(uri, attempts, &self.config)), attempts };
            }
            debug!(uri, attempt = attempts, ?delay, failure = %failure, "retrying fetch");
            std::thread::sleep(delay);
        }
    }

    /// One attempt: the request and its redirects, each hop under its own host's limit and with
    /// its own host's credentials. Redirects are followed here, not by ureq, which would carry
    /// a custom header (an API key) on to whatever host a redirect names.
    fn http_attempt(&self, uri: &str, max_bytes: u64) -> Result<Vec<u8>, HttpFailure> {
        let mut current = uri.to_owned();
        // Once a redirect leaves https for http, no credentials go out in clear text.
        let mut downgraded = false;
        let mut hops = 0;
        loop {
            let (host, host_port) = host_and_port(&current);
            let credentials = if downgraded { None } else { self.credentials.for_host(&host) };
            let _permit = self.per_host.acquire(&host_port);
            let mut request = self.agent.get(&current);
            if let Some((name, value, _)) = credentials {
                request = request.header(name.clone(), value.clone());
            }
            let mut response = request.call().map_err(HttpFailure::from)?;
            let status = response.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) && hops < MAX_REDIRECTS {
                let location = response.headers().get(ureq::http::header::LOCATION).and_then(|l| l.to_str().ok());
                if let Some(next) = location.and_then(|l| redirect_target(&current, l)) {
                    downgraded |= is_scheme(&current, "https") && is_scheme(&next, "http");
                    (current, hops) = (next, hops + 1);
                    continue;
                }
            }
            if !response.status().is_success() {
                let retry_after = response
                    .headers()
                    .get(ureq::http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let rule = credentials.map(|(_, _, pattern)| pattern.to_string());
                // The response is dropped unread: the connection is closed rather than pooled,
                // which is cheaper than draining an error page we do not need.
                return Err(HttpFailure::Status { status, retry_after, host, rule });
            }
            // ureq reports no length for compressed bodies, whose Content-Length is not the size
            // of the data we get; those, and chunked bodies, are caught by the read limit below.
            if let Some(size) = response.body().content_length() {
                if size > max_bytes {
                    return Err(HttpFailure::TooLarge { size: Some(size), limit: max_bytes });
                }
            }
            return response.body_mut().with_config().limit(max_bytes).read_to_vec().map_err(HttpFailure::from);
        }
    }
}

/// Redirects followed before a 3xx is taken as the answer (as many as ureq's default).
const MAX_REDIRECTS: u32 = 10;

/// The host of an http(s) URI (for credentials) and `host:port` (for the per-host limit);
/// empty for a URI ureq will refuse anyway.
fn host_and_port(uri: &str) -> (String, String) {
    let Ok(parsed) = uri.parse::<ureq::http::Uri>() else { return Default::default() };
    let host = parsed.host().unwrap_or("").to_ascii_lowercase();
    let port = parsed.port_u16().unwrap_or(if parsed.scheme_str() == Some("https") { 443 } else { 80 });
    let host_port = format!("{host}:{port}");
    (host, host_port)
}

fn is_scheme(uri: &str, want: &str) -> bool {
    scheme(uri).is_some_and(|s| s.eq_ignore_ascii_case(want))
}

/// The absolute URI a `Location` header names, relative to `base` (RFC 3986 §5.2, without
/// dot-segment removal, which servers resolve themselves).
fn redirect_target(base: &str, location: &str) -> Option<String> {
    if scheme(location).is_some() {
        return Some(location.to_owned());
    }
    let parsed = base.parse::<ureq::http::Uri>().ok()?;
    let (scheme, authority) = (parsed.scheme_str()?, parsed.authority()?.as_str());
    Some(if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = parsed.path();
        let folder = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let folder = if folder.is_empty() { "/" } else { folder };
        format!("{scheme}://{authority}{folder}{location}")
    })
}

/// Agent settings from a [`FetchConfig`]; separate so tests can adjust them (e.g. the proxy).
fn agent_config(config: &FetchConfig) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope> {
    let limit = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    ureq::Agent::config_builder()
        .timeout_global(limit(config.timeout_ms))
        .timeout_connect(limit(config.connect_timeout_ms))
        .user_agent(config.user_agent.as_str())
        // Statuses are classified here (retry or not, not_found or http_status).
        .http_status_as_error(false)
        // Redirects are followed by `http_attempt`, hop by hop; a redirect loop then ends as an
        // ordinary `http_status` error naming the 3xx status.
        .max_redirects(0)
        .max_redirects_will_error(false)
}

const OUTSIDE_ROOTS: &str = "the file is outside fetch.file_roots";

/// Whether `path`, with `.` and `..` resolved as text, is inside `root` (for paths that do
/// not exist, which `canonicalize` cannot resolve).
fn lexically_inside(path: &Path, root: &Path) -> bool {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                normal.pop();
            }
            std::path::Component::CurDir => {}
            other => normal.push(other),
        }
    }
    normal.is_absolute() && normal.starts_with(root)
}

enum Target {
    Http,
    /// `s3://`, `gs://` or `az://`.
    Store,
    Data,
    File(PathBuf),
}

/// The bytes of a `data:[<media type>][;base64],<data>` URI (RFC 2397): base64 (standard
/// alphabet, padding optional) after `;base64`, percent-encoded octets otherwise. The decoded
/// size follows from the length of the text, so an oversized URI is refused before decoding.
fn data_uri_bytes(uri: &str, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    use base64::Engine;
    let invalid = |reason: &str| FetchError::InvalidUri { uri: uri.into(), reason: reason.into() };
    let too_large = |size| FetchError::TooLarge { uri: uri.into(), size: Some(size), limit: max_bytes };
    let (header, text) = uri["data:".len()..]
        .split_once(',')
        .ok_or_else(|| invalid("a data: URI needs a comma before its data, e.g. data:image/png;base64,iVBOR..."))?;
    let is_base64 = header.rsplit(';').next().is_some_and(|p| p.eq_ignore_ascii_case("base64"));
    if !is_base64 {
        // Each `%XY` is one octet, every other character one.
        let size = (text.len() - 2 * text.bytes().filter(|&b| b == b'%').count().min(text.len() / 3)) as u64;
        if size > max_bytes {
            return Err(too_large(size));
        }
        return percent_decode(text).ok_or_else(|| invalid("`%` must be followed by two hex digits"));
    }
    // Four characters carry three bytes; padding carries none.
    let size = (text.trim_end_matches('=').len() as u64).saturating_mul(3) / 4;
    if size > max_bytes {
        return Err(too_large(size));
    }
    base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT
        .decode(text)
        .map_err(|e| invalid(&format!("its data is not valid base64 ({e})")))
}

/// Where an image comes from, for metrics: one of a fixed list, so that labels stay bounded
/// whatever URIs producers send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UriScheme {
    File,
    Http,
    Https,
    S3,
    Gs,
    Az,
    Data,
    /// Bytes carried in the record itself (a base64 `image` field or a raw message value).
    Inline,
    /// Any other scheme (refused as unsupported).
    Other,
}

impl UriScheme {
    /// Every scheme, in the order of [`index`](Self::index).
    pub const ALL: [UriScheme; 9] = [
        UriScheme::File,
        UriScheme::Http,
        UriScheme::Https,
        UriScheme::S3,
        UriScheme::Gs,
        UriScheme::Az,
        UriScheme::Data,
        UriScheme::Inline,
        UriScheme::Other,
    ];

    /// The scheme of a URI; plain paths are files.
    pub fn of(uri: &str) -> UriScheme {
        let Some(s) = scheme(uri) else { return UriScheme::File };
        let is = |name: &str| s.eq_ignore_ascii_case(name);
        match () {
            _ if is("file") => UriScheme::File,
            _ if is("http") => UriScheme::Http,
            _ if is("https") => UriScheme::Https,
            _ if is("s3") => UriScheme::S3,
            _ if is("gs") => UriScheme::Gs,
            _ if is("az") => UriScheme::Az,
            _ if is("data") => UriScheme::Data,
            _ => UriScheme::Other,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            UriScheme::File => "file",
            UriScheme::Http => "http",
            UriScheme::Https => "https",
            UriScheme::S3 => "s3",
            UriScheme::Gs => "gs",
            UriScheme::Az => "az",
            UriScheme::Data => "data",
            UriScheme::Inline => "inline",
            UriScheme::Other => "other",
        }
    }

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The scheme of `uri` per RFC 3986 (a letter, then letters, digits, `+`, `-` or `.`, then
/// `:`), or `None` for a plain path.
fn scheme(uri: &str) -> Option<&str> {
    let end = uri.find(':')?;
    let candidate = &uri[..end];
    let mut chars = candidate.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some(candidate)
}

/// The local path of a `file:` URI (RFC 8089): `file:///p`, `file://localhost/p` or `file:/p`.
/// `?` and `#` are kept as part of the path: file URIs have no use for queries or fragments,
/// while file names do contain these characters.
fn file_uri_path(uri: &str) -> Result<PathBuf, FetchError> {
    let invalid = |reason: String| FetchError::InvalidUri { uri: uri.into(), reason };
    let rest = &uri["file:".len()..];
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => {
            let split = authority_and_path.find('/').unwrap_or(authority_and_path.len());
            let (host, path) = authority_and_path.split_at(split);
            if !host.is_empty() && !host.eq_ignore_ascii_case("localhost") {
                return Err(invalid(format!(
                    "file URIs can only name local files (file:///path or file://localhost/path), not files on host \
                     `{host}`"
                )));
            }
            path
        }
        None => rest,
    };
    if !path.starts_with('/') {
        return Err(invalid("a file URI needs an absolute path, e.g. file:///data/cat.jpg".into()));
    }
    let bytes = percent_decode(path)
        .ok_or_else(|| invalid("`%` must be followed by two hex digits (write a literal % as %25)".into()))?;
    if bytes.contains(&0) {
        return Err(invalid("the path contains a NUL byte (%00)".into()));
    }
    path_from_bytes(bytes).ok_or_else(|| invalid("the percent-decoded path is not UTF-8".into()))
}

/// `text` with each `%XY` decoded; `None` where a `%` is not followed by two hex digits.
pub fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex = |b: Option<u8>| b.and_then(|b| (b as char).to_digit(16));
        match (hex(bytes.next()), hex(bytes.next())) {
            (Some(hi), Some(lo)) => out.push((hi * 16 + lo) as u8),
            _ => return None,
        }
    }
    Some(out)
}

/// The path named by `bytes`; `None` where the platform's file names cannot hold them.
#[cfg(unix)]
fn path_from_bytes(bytes: Vec<u8>) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    // Unix file names are bytes, so any decoded sequence is a valid name.
    Some(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: Vec<u8>) -> Option<PathBuf> {
    String::from_utf8(bytes).map(PathBuf::from).ok()
}

fn read_file(uri: &str, path: &Path, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
    let io_error = |source: io::Error| match source.kind() {
        // NotADirectory: a path like `cat.jpg/x`, which is simply absent.
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
            FetchError::FileNotFound { uri: uri.into(), path: path.into() }
        }
        _ => FetchError::Unreadable { uri: uri.into(), path: path.into(), source },
    };
    // Checked before opening: opening a FIFO would block until a writer appears, and the size
    // check spares reading a huge file only to refuse it.
    let metadata = std::fs::metadata(path).map_err(io_error)?;
    if !metadata.is_file() {
        let what = if metadata.is_dir() { "it is a directory" } else { "it is not a regular file" };
        return Err(io_error(io::Error::new(io::ErrorKind::InvalidInput, what)));
    }
    if metadata.len() > max_bytes {
        return Err(FetchError::TooLarge { uri: uri.into(), size: Some(metadata.len()), limit: max_bytes });
    }
    // The file may have grown since: read at most one byte past the limit to notice.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    File::open(path)
        .and_then(|file| file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(io_error)?;
    if bytes.len() as u64 > max_bytes {
        return Err(FetchError::TooLarge { uri: uri.into(), size: None, limit: max_bytes });
    }
    Ok(bytes)
}

/// One failed HTTP attempt, before it is known whether it is retried.
enum HttpFailure {
    /// `host` answered `status`; `rule` is the host pattern whose credentials were sent.
    Status {
        status: u16,
        retry_after: Option<Duration>,
        host: String,
        rule: Option<String>,
    },
    TooLarge {
        size: Option<u64>,
        limit: u64,
    },
    Ureq(ureq::Error),
}

impl From<ureq::Error> for HttpFailure {
    fn from(error: ureq::Error) -> Self {
        match error {
            ureq::Error::BodyExceedsLimit(limit) => HttpFailure::TooLarge { size: None, limit },
            error => HttpFailure::Ureq(error),
        }
    }
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpFailure::Status { status, .. } => write!(f, "HTTP {}", status_text(*status)),
            HttpFailure::TooLarge { .. } => f.write_str("body over the size limit"),
            HttpFailure::Ureq(error) => error.fmt(f),
        }
    }
}

impl HttpFailure {
    /// Whether a later attempt may succeed. Other 4xx statuses, TLS, protocol and URI errors
    /// would fail the same way again.
    fn is_transient(&self) -> bool {
        match self {
            HttpFailure::Status { status, .. } => *status == 429 || (500..=599).contains(status),
            HttpFailure::TooLarge { .. } => false,
            // A refused address is final: asking again gets the same answer.
            HttpFailure::Ureq(ureq::Error::Io(e)) if e.kind() == io::ErrorKind::PermissionDenied => false,
            HttpFailure::Ureq(error) => matches!(
                error,
                ureq::Error::Timeout(_)
                    | ureq::Error::Io(_)
                    | ureq::Error::HostNotFound
                    | ureq::Error::ConnectionFailed
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpFailure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn into_error(self, uri: &str, attempts: u32, config: &FetchConfig) -> FetchError {
        let uri = uri.to_owned();
        match self {
            HttpFailure::Status { status: status @ (404 | 410), .. } => FetchError::HttpNotFound { uri, status },
            HttpFailure::Status { status: status @ (401 | 403), host, rule, .. } => {
                FetchError::Unauthorized { uri, status, host, rule }
            }
            HttpFailure::Status { status, .. } => FetchError::HttpStatus { uri, status, attempts },
            HttpFailure::TooLarge { size, limit } => FetchError::TooLarge { uri, size, limit },
            HttpFailure::Ureq(ureq::Error::Timeout(timeout)) => {
                let (phase, limit_ms, setting) = match timeout {
                    ureq::Timeout::Connect => ("connect", config.connect_timeout_ms, "connect_timeout_ms"),
                    _ => ("request", config.timeout_ms, "timeout_ms"),
                };
                FetchError::Timeout { uri, phase, limit_ms, setting, attempts }
            }
            HttpFailure::Ureq(error @ (ureq::Error::BadUri(_) | ureq::Error::Http(_))) => {
                FetchError::InvalidUri { uri, reason: error.to_string() }
            }
            HttpFailure::Ureq(ureq::Error::Io(e))
                if e.kind() == io::ErrorKind::PermissionDenied && e.to_string().starts_with(address::REFUSED) =>
            {
                FetchError::ForbiddenAddress { uri, reason: e.to_string()[address::REFUSED.len()..].to_owned() }
            }
            HttpFailure::Ureq(source) => FetchError::Network { uri, attempts, source },
        }
    }
}

/// The wait before retry number `retry` (0 for the first): exponential from
/// `backoff_initial_ms`, capped at `backoff_max_ms`, then scaled into [½, 1] by `jitter`
/// (in [0, 1)). A server's `Retry-After`, capped the same way, is a floor.
fn retry_delay(config: &FetchConfig, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let cap = Duration::from_millis(config.backoff_max_ms);
    let factor = 1u64.checked_shl(retry).unwrap_or(u64::MAX);
    let base = Duration::from_millis(config.backoff_initial_ms.saturating_mul(factor)).min(cap);
    let delay = base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    delay.max(retry_after.unwrap_or_default().min(cap))
}

/// A random number in [0, 1) without a dependency on a random number crate: each `RandomState`
/// is freshly keyed, so the hash of nothing is unpredictable.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Instant;

    /// What the test server does with one request.
    enum Reply {
        /// Write these bytes (a whole HTTP response) and close.
        Raw(Vec<u8>),
        /// Say nothing for this long, then close.
        Stall(Duration),
    }

    /// An HTTP/1.1 response with `Connection: close` and a Content-Length.
    fn response(status: &str, headers: &[&str], body: &[u8]) -> Reply {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        Reply::Raw(bytes)
    }

    /// A 200 response with a chunked body of `chunks` chunks of `chunk_len` bytes.
    fn chunked(chunks: usize, chunk_len: usize) -> Reply {
        let mut bytes = b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..chunks {
            bytes.extend_from_slice(format!("{chunk_len:x}\r\n").as_bytes());
            bytes.extend(std::iter::repeat_n(b'x', chunk_len));
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"0\r\n\r\n");
        Reply::Raw(bytes)
    }

    /// A scripted HTTP server on 127.0.0.1: `reply(n)` answers the n-th request (from 0).
    /// Its threads are left running; they end with the test process.
    struct Server {
        addr: SocketAddr,
        hits: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl Server {
        fn start(reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Server {
            Server::start_on("127.0.0.1", reply)
        }

        /// [`Server::start`] on another loopback address, e.g. to be another host.
        fn start_on(ip: &str, reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Server {
            let listener = TcpListener::bind((ip, 0)).unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let reply = Arc::new(reply);
            let (thread_hits, thread_requests) = (hits.clone(), requests.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let (hits, requests, reply) = (thread_hits.clone(), thread_requests.clone(), reply.clone());
                    // A thread per connection, so that a stalled reply does not hold up retries.
                    std::thread::spawn(move || serve(stream, &hits, &requests, &*reply));
                }
            });
            Server { addr, hits, requests }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    fn serve(mut stream: TcpStream, hits: &AtomicUsize, requests: &Mutex<Vec<String>>, reply: &dyn Fn(usize) -> Reply) {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Read the whole request head before answering: closing with unread data would reset
        // the connection instead of delivering the response.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        requests.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
        let n = hits.fetch_add(1, Ordering::SeqCst);
        match reply(n) {
            Reply::Raw(bytes) => {
                let _ = stream.write_all(&bytes);
            }
            Reply::Stall(duration) => std::thread::sleep(duration),
        }
    }

    /// Settings that keep the suite fast: tiny backoffs, short timeouts.
    fn fast_config() -> FetchConfig {
        FetchConfig {
            timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            max_retries: 3,
            backoff_initial_ms: 1,
            backoff_max_ms: 5,
            // These tests read files in temporary folders; the roots have tests of their own.
            file_roots: Vec::new(),
            ..FetchConfig::default()
        }
    }

    /// A fetcher that ignores proxy environment variables, which would otherwise send requests
    /// for the local test server to a proxy.
    fn fetcher(config: FetchConfig) -> Fetcher {
        // The test servers listen on loopback, which the fetch policy refuses by default.
        let config = FetchConfig { allowed_networks: vec!["127.0.0.0/8".into()], ..config };
        Fetcher::with_agent_config(config, |b| b.proxy(None)).unwrap()
    }

    fn fetch_err(fetcher: &Fetcher, uri: &str, max_bytes: u64) -> (FetchError, u32) {
        let outcome = fetcher.fetch_with_attempts(uri, max_bytes);
        let error = outcome.result.expect_err("the fetch should fail");
        assert!(error.to_string().contains(uri), "message does not name the URI: {error}");
        assert_eq!(error.uri(), uri);
        (error, outcome.attempts)
    }

    #[test]
    fn http_200_returns_the_body_and_sends_the_user_agent() {
        let server = Server::start(|_| response("200 OK", &["Content-Type: image/jpeg"], b"jpeg bytes"));
        let outcome = fetcher(fast_config()).fetch_with_attempts(&server.url("/cat.jpg"), 1024);
        assert_eq!((outcome.attempts, outcome.retries()), (1, 0));
        assert_eq!(outcome.result.unwrap(), b"jpeg bytes");
        let request = server.requests.lock().unwrap()[0].to_ascii_lowercase();
        assert!(request.starts_with("get /cat.jpg http/1.1"), "{request}");
        assert!(request.contains(concat!("user-agent: dlpipe/", env!("CARGO_PKG_VERSION"))), "{request}");
    }

    #[test]
    fn http_body_exactly_at_the_limit_is_accepted() {
        let server = Server::start(|_| response("200 OK", &[], &[7; 100]));
        assert_eq!(fetcher(fast_config()).fetch(&server.url("/"), 100).unwrap(), vec![7; 100]);
        let server = Server::start(|_| chunked(4, 25));
        assert_eq!(fetcher(fast_config()).fetch(&server.url("/"), 100).unwrap(), vec![b'x'; 100]);
    }

    #[test]
    fn http_404_and_410_are_not_found_without_retry() {
        for status in ["404 Not Found", "410 Gone"] {
            let server = Server::start(move |_| response(status, &[], b"no such image"));
            let (error, attempts) = fetch_err(&fetcher(fast_config()), &server.url("/missing.jpg"), 1024);
            assert_eq!(error.kind(), "not_found");
            assert!(error.to_string().contains(status), "{error}");
            assert_eq!((attempts, server.hits()), (1, 1));
        }
    }

    #[test]
    fn other_4xx_fail_at_once_with_the_status() {
        let server = Server::start(|_| response("418 I'm a teapot", &[], b""));
        let (error, attempts) = fetch_err(&fetcher(fast_config()), &server.url("/secret.jpg"), 1024);
        assert_eq!(error.kind(), "http_status");
        assert!(error.to_string().contains("HTTP 418 I'm a teapot"), "{error}");
        assert!(matches!(error, FetchError::HttpStatus { status: 418, attempts: 1, .. }));
        assert_eq!((attempts, server.hits()), (1, 1));
    }

    fn api_key_rule(host: &str) -> auth::HttpAuthRule {
        auth::HttpAuthRule {
            host: host.into(),
            kind: auth::AuthKind::Header,
            user: None,
            header: Some("X-Api-Key".into()),
            secret_env: None,
            secret_file: None,
        }
    }

    /// A fetcher whose only rule sends `X-Api-Key: key-123` to `host`.
    fn fetcher_with_key(host: &str) -> Fetcher {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "key-123\n").unwrap();
        let rule = auth::HttpAuthRule { secret_file: Some(file), ..api_key_rule(host) };
        fetcher(FetchConfig { http_auth: vec![rule], ..fast_config() })
    }

    #[test]
    fn http_401_and_403_are_unauthorized_without_retry_naming_the_rule() {
        for status in ["401 Unauthorized", "403 Forbidden"] {
            let server = Server::start(move |_| response(status, &[], b"go away"));
            let (error, attempts) = fetch_err(&fetcher_with_key("127.0.0.1"), &server.url("/a.jpg"), 1024);
            assert_eq!(error.kind(), "unauthorized");
            let message = error.to_string();
            assert!(message.contains(status) && message.contains("rule for 127.0.0.1"), "{message}");
            assert!(!message.contains("key-123"), "{message}");
            assert_eq!((attempts, server.hits()), (1, 1));
            let request = server.requests.lock().unwrap()[0].to_ascii_lowercase();
            assert!(request.contains("x-api-key: key-123"), "{request}");
            // Without a rule the message says so.
            let (error, _) = fetch_err(&fetcher(fast_config()), &server.url("/a.jpg"), 1024);
            assert!(error.to_string().contains("no fetch.http_auth rule matches host 127.0.0.1"), "{error}");
        }
    }

    #[test]
    fn credentials_follow_redirects_only_to_their_own_host() {
        // 127.0.0.1 has the key; it redirects first within itself (relative Location), then to
        // 127.0.0.2, another host, which must not see the key.
        let other = Server::start_on("127.0.0.2", |_| response("200 OK", &[], b"image"));
        let elsewhere = format!("Location: http://127.0.0.2:{}/b.jpg", other.addr.port());
        let keyed = Server::start(move |n| match n {
            0 => response("302 Found", &["Location: next/a.jpg"], b""),
            _ => response("301 Moved Permanently", &[elsewhere.as_str()], b""),
        });
        let outcome = fetcher_with_key("127.0.0.1").fetch_with_attempts(&keyed.url("/dir/a.jpg"), 1024);
        assert_eq!(outcome.result.unwrap(), b"image");
        assert_eq!(outcome.attempts, 1, "redirects are hops of one attempt");
        let requests = keyed.requests.lock().unwrap().clone();
        assert!(requests[1].starts_with("GET /dir/next/a.jpg "), "{requests:?}");
        assert!(requests.iter().all(|r| r.to_ascii_lowercase().contains("x-api-key: key-123")), "{requests:?}");
        let forwarded = other.requests.lock().unwrap()[0].to_ascii_lowercase();
        assert!(!forwarded.contains("x-api-key") && !forwarded.contains("key-123"), "{forwarded}");
    }

    #[test]
    fn a_redirect_loop_ends_as_http_status_after_max_redirects() {
        let server = Server::start(|_| response("302 Found", &["Location: /again"], b""));
        let (error, attempts) = fetch_err(&fetcher(fast_config()), &server.url("/start"), 1024);
        assert!(matches!(error, FetchError::HttpStatus { status: 302, .. }), "{error}");
        assert_eq!((attempts, server.hits()), (1, MAX_REDIRECTS as usize + 1));
    }

    #[test]
    fn redirect_targets_resolve_against_the_current_uri() {
        let base = "https://h.example:8443/a/b/c.jpg?x=1";
        assert_eq!(redirect_target(base, "http://o/p").unwrap(), "http://o/p");
        assert_eq!(redirect_target(base, "//cdn.example/p").unwrap(), "https://cdn.example/p");
        assert_eq!(redirect_target(base, "/root.jpg").unwrap(), "https://h.example:8443/root.jpg");
        assert_eq!(redirect_target(base, "d.jpg").unwrap(), "https://h.example:8443/a/b/d.jpg");
        assert_eq!(host_and_port(base), ("h.example".into(), "h.example:8443".into()));
        assert_eq!(host_and_port("https://H.example/x").1, "h.example:443");
        assert_eq!(host_and_port("http://h.example/x").1, "h.example:80");
    }

    #[test]
    fn requests_to_one_host_wait_for_a_place_under_max_per_host() {
        let (active, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, p) = (Arc::clone(&active), Arc::clone(&peak));
        let server = Server::start(move |_| {
            let now = a.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(40));
            a.fetch_sub(1, Ordering::SeqCst);
            response("200 OK", &[], b"x")
        });
        let fetcher = fetcher(FetchConfig { max_per_host: 3, ..fast_config() });
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (fetcher, uri) = (fetcher.clone(), server.url("/x"));
                std::thread::spawn(move || fetcher.fetch(&uri, 10).unwrap())
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3, "at most max_per_host requests at once, and that many");
    }

    #[test]
    fn http_5xx_is_retried_until_success() {
        let server = Server::start(|n| match n {
            0 | 1 => response("500 Internal Server Error", &[], b"oops"),
            _ => response("200 OK", &[], b"finally"),
        });
        let outcome = fetcher(fast_config()).fetch_with_attempts(&server.url("/flaky.jpg"), 1024);
        assert_eq!((outcome.attempts, outcome.retries()), (3, 2));
        assert_eq!(outcome.result.unwrap(), b"finally");
        assert_eq!(server.hits(), 3);
    }

    #[test]
    fn http_429_is_retried_honouring_retry_after_up_to_the_cap() {
        let server = Server::start(|n| match n {
            0 => response("429 Too Many Requests", &["Retry-After: 60"], b""),
            _ => response("200 OK", &[], b"ok"),
        });
        let started = Instant::now();
        let outcome = fetcher(fast_config()).fetch_with_attempts(&server.url("/"), 1024);
        assert_eq!(outcome.result.unwrap(), b"ok");
        assert_eq!(outcome.attempts, 2);
        // Retry-After: 60 is capped at backoff_max_ms (5 ms).
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn persistent_5xx_gives_http_status_after_all_attempts() {
        let server = Server::start(|_| response("503 Service Unavailable", &[], b""));
        let config = FetchConfig { max_retries: 2, ..fast_config() };
        let (error, attempts) = fetch_err(&fetcher(config), &server.url("/down.jpg"), 1024);
        assert_eq!(error.kind(), "http_status");
        assert!(matches!(error, FetchError::HttpStatus { status: 503, attempts: 3, .. }));
        let message = error.to_string();
        assert!(message.contains("HTTP 503 Service Unavailable after 3 attempts"), "{message}");
        assert_eq!((attempts, server.hits()), (3, 3));
    }

    #[test]
    fn stalled_response_times_out() {
        let server = Server::start(|_| Reply::Stall(Duration::from_secs(3)));
        let config = FetchConfig { timeout_ms: 200, max_retries: 1, ..fast_config() };
        let started = Instant::now();
        let (error, attempts) = fetch_err(&fetcher(config), &server.url("/slow.jpg"), 1024);
        assert_eq!(error.kind(), "timeout");
        assert!(error.to_string().contains("200 ms"), "{error}");
        assert_eq!(attempts, 2);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn a_tarpit_is_given_up_on_at_the_total_limit_however_many_retries_are_allowed() {
        // A server that accepts and never answers: 10 retries of 400 ms each would take 4.4 s;
        // the total limit of 1 s allows two attempts.
        let server = Server::start(|_| Reply::Stall(Duration::from_secs(30)));
        let config = FetchConfig { timeout_ms: 400, max_retries: 10, total_timeout_ms: 1_000, ..fast_config() };
        let started = Instant::now();
        let (error, attempts) = fetch_err(&fetcher(config), &server.url("/tarpit.jpg"), 1024);
        assert_eq!(error.kind(), "timeout");
        assert_eq!(attempts, 2);
        assert!(started.elapsed() < Duration::from_millis(1_500), "{:?}", started.elapsed());
    }

    #[test]
    fn content_length_over_the_limit_is_refused_unread() {
        let server = Server::start(|_| response("200 OK", &[], &[0; 1000]));
        let (error, attempts) = fetch_err(&fetcher(fast_config()), &server.url("/huge.jpg"), 100);
        assert_eq!(error.kind(), "too_large");
        assert!(matches!(error, FetchError::TooLarge { size: Some(1000), limit: 100, .. }), "{error:?}");
        assert_eq!((attempts, server.hits()), (1, 1));
    }

    #[test]
    fn chunked_body_over_the_limit_is_cut_off() {
        let server = Server::start(|_| chunked(10, 50));
        let (error, attempts) = fetch_err(&fetcher(fast_config()), &server.url("/huge.jpg"), 100);
        assert_eq!(error.kind(), "too_large");
        assert!(matches!(error, FetchError::TooLarge { size: None, limit: 100, .. }), "{error:?}");
        assert_eq!((attempts, server.hits()), (1, 1));
    }

    #[test]
    fn connection_refused_is_a_network_error_after_retries() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // The listener is dropped: nothing listens on that port any more.
        let uri = format!("http://{addr}/cat.jpg");
        let config = FetchConfig { max_retries: 2, ..fast_config() };
        let (error, attempts) = fetch_err(&fetcher(config), &uri, 1024);
        assert_eq!(error.kind(), "network");
        assert!(matches!(error, FetchError::Network { attempts: 3, .. }), "{error:?}");
        assert_eq!(attempts, 3);
    }

    #[test]
    fn malformed_http_uri_is_invalid_without_a_request() {
        for uri in ["http://", "http://exa mple.com/cat.jpg", "https://[::1/cat.jpg"] {
            let (error, attempts) = fetch_err(&fetcher(fast_config()), uri, 1024);
            assert_eq!(error.kind(), "invalid_uri", "{uri}: {error}");
            assert_eq!(attempts, 0);
        }
    }

    #[test]
    fn plain_paths_absolute_and_relative_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cat.jpg"), b"meow").unwrap();
        let absolute = dir.path().join("cat.jpg");
        let outcome = fetcher(fast_config()).fetch_with_attempts(absolute.to_str().unwrap(), 4);
        assert_eq!(outcome.result.unwrap(), b"meow");
        assert_eq!(outcome.attempts, 1);

        let rooted = fetcher(FetchConfig { file_root: Some(dir.path().into()), ..fast_config() });
        assert_eq!(rooted.fetch("cat.jpg", 1024).unwrap(), b"meow");
        assert_eq!(rooted.fetch("./cat.jpg", 1024).unwrap(), b"meow");
    }

    #[test]
    fn file_uris_are_percent_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a cat#1.jpg");
        std::fs::write(&path, b"meow").unwrap();
        let dir_text = dir.path().to_str().unwrap();
        assert!(dir_text.starts_with('/'));
        let fetcher = fetcher(fast_config());
        for uri in [
            format!("file://{dir_text}/a%20cat%231.jpg"),
            format!("FILE://localhost{dir_text}/a%20cat#1.jpg"),
            format!("file:{dir_text}/a cat#1.jpg"),
        ] {
            assert_eq!(fetcher.fetch(&uri, 1024).unwrap(), b"meow", "{uri}");
        }
    }

    #[test]
    fn bad_file_uris_are_invalid() {
        let fetcher = fetcher(fast_config());
        for uri in ["file://fileserver/share/cat.jpg", "file://", "file:cat.jpg", "file:///cat%2.jpg", "file:///a%00b"]
        {
            let (error, attempts) = fetch_err(&fetcher, uri, 1024);
            assert_eq!(error.kind(), "invalid_uri", "{uri}: {error}");
            assert_eq!(attempts, 0);
        }
        let (error, _) = fetch_err(&fetcher, "", 1024);
        assert_eq!(error.kind(), "invalid_uri");
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let fetcher = fetcher(fast_config());
        for missing in [dir.path().join("nope.jpg"), dir.path().join("nope/deeper.jpg")] {
            let uri = missing.to_str().unwrap();
            let (error, _) = fetch_err(&fetcher, uri, 1024);
            assert_eq!(error.kind(), "not_found", "{error}");
            let (error, _) = fetch_err(&fetcher, &format!("file://{uri}"), 1024);
            assert_eq!(error.kind(), "not_found", "{error}");
        }
        let (error, _) = fetch_err(&fetcher, "no-such-dir-dlpipe/cat.jpg", 1024);
        assert_eq!(error.kind(), "not_found");
        assert!(error.to_string().contains("relative to the current directory"), "{error}");
        // A path below a file (ENOTDIR) is just as absent.
        std::fs::write(dir.path().join("cat.jpg"), b"meow").unwrap();
        let below_a_file = dir.path().join("cat.jpg/x");
        let (error, _) = fetch_err(&fetcher, below_a_file.to_str().unwrap(), 1024);
        assert_eq!(error.kind(), "not_found", "{error}");
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.jpg");
        std::fs::write(&path, [0u8; 101]).unwrap();
        let (error, _) = fetch_err(&fetcher(fast_config()), path.to_str().unwrap(), 100);
        assert_eq!(error.kind(), "too_large");
        assert!(matches!(error, FetchError::TooLarge { size: Some(101), limit: 100, .. }));
        assert_eq!(fetcher(fast_config()).fetch(path.to_str().unwrap(), 101).unwrap().len(), 101);
    }

    #[test]
    fn directory_is_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let (error, _) = fetch_err(&fetcher(fast_config()), dir.path().to_str().unwrap(), 1024);
        assert_eq!(error.kind(), "unreadable");
        assert!(error.to_string().contains("directory"), "{error}");
    }

    #[test]
    fn local_files_can_be_forbidden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cat.jpg");
        std::fs::write(&path, b"meow").unwrap();
        let fetcher = fetcher(FetchConfig { allow_file: false, ..fast_config() });
        let path = path.to_str().unwrap();
        for uri in [path.to_owned(), format!("file://{path}"), "relative/cat.jpg".to_owned()] {
            let (error, attempts) = fetch_err(&fetcher, &uri, 1024);
            assert_eq!(error.kind(), "forbidden_local_file", "{uri}");
            assert_eq!(attempts, 0);
        }
        let (error, _) = fetch_err(&fetcher, "hdfs://bucket/cat.jpg", 1024);
        assert!(error.to_string().contains("local files are disabled"), "{error}");
    }

    #[test]
    fn unknown_schemes_are_unsupported() {
        let fetcher = fetcher(fast_config());
        for (uri, scheme) in [("hdfs://bucket/cat.jpg", "hdfs"), ("ftp://host/cat.jpg", "ftp")] {
            let (error, attempts) = fetch_err(&fetcher, uri, 1024);
            assert_eq!(error.kind(), "unsupported_scheme");
            assert!(matches!(&error, FetchError::UnsupportedScheme { scheme: s, .. } if s == scheme));
            assert!(error.to_string().contains("http://, https://, s3://, gs://, az://, data:, file://"), "{error}");
            assert_eq!(attempts, 0);
        }
    }

    #[test]
    fn data_uris_carry_their_bytes_in_base64_or_percent_encoded() {
        let png = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist/test/0/00000.png"));
        // Any bytes do; a real PNG when the data folder is there.
        let bytes = png.unwrap_or_else(|_| (0..=255u8).cycle().take(1000).collect());
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
        // Local files disabled: data: URIs need no file access.
        let fetcher = fetcher(FetchConfig { allow_file: false, ..fast_config() });
        for uri in [format!("data:image/png;base64,{text}"), format!("DATA:;BASE64,{}", text.trim_end_matches('='))] {
            let outcome = fetcher.fetch_with_attempts(&uri, bytes.len() as u64);
            assert_eq!(outcome.result.unwrap(), bytes, "{}", &uri[..20]);
            assert_eq!(outcome.attempts, 1);
        }
        let got = fetcher.fetch("data:text/plain,a%2Cb%00c,d", 7).unwrap();
        assert_eq!(got, b"a,b\0c,d");
        assert_eq!(fetcher.fetch("data:,", 0).unwrap(), b"");
    }

    #[test]
    fn data_uris_over_the_limit_are_refused_from_their_length_alone() {
        let fetcher = fetcher(fast_config());
        // 8 characters are 6 bytes; "!" is not base64, so refusing it proves nothing was decoded.
        let (error, attempts) = fetch_err(&fetcher, "data:image/png;base64,!!!!!!!!", 5);
        assert!(matches!(error, FetchError::TooLarge { size: Some(6), limit: 5, .. }), "{error:?}");
        assert_eq!(attempts, 0);
        let (error, _) = fetch_err(&fetcher, "data:image/png;base64,!!!!!!!!", 6);
        assert_eq!(error.kind(), "invalid_uri", "within the limit it is decoded: {error}");
        // Padding carries no bytes: "AAAAAA==" is 4 bytes.
        assert_eq!(fetcher.fetch("data:;base64,AAAAAA==", 4).unwrap(), [0, 0, 0, 0]);
        let (error, _) = fetch_err(&fetcher, "data:;base64,AAAAAA==", 3);
        assert!(matches!(error, FetchError::TooLarge { size: Some(4), limit: 3, .. }), "{error:?}");
        // Percent-encoded: "%41%42c" is 3 bytes.
        assert_eq!(fetcher.fetch("data:,%41%42c", 3).unwrap(), b"ABc");
        let (error, _) = fetch_err(&fetcher, "data:,%41%42c", 2);
        assert!(matches!(error, FetchError::TooLarge { size: Some(3), limit: 2, .. }), "{error:?}");
    }

    #[test]
    fn malformed_data_uris_are_invalid() {
        let fetcher = fetcher(fast_config());
        for (uri, says) in [
            ("data:image/png;base64", "comma"),
            ("data:image/png;base64,iVBO%2BRw", "base64"),
            ("data:image/png;base64,AAAAA", "base64"),
            ("data:,100%", "%"),
        ] {
            let (error, attempts) = fetch_err(&fetcher, uri, 1024);
            assert_eq!(error.kind(), "invalid_uri", "{uri}: {error}");
            assert!(error.to_string().contains(says), "{uri}: {error}");
            assert_eq!(attempts, 0, "{uri}");
        }
    }

    #[test]
    fn scheme_detection_follows_rfc_3986() {
        assert_eq!(scheme("https://x/y"), Some("https"));
        assert_eq!(scheme("svn+ssh://x"), Some("svn+ssh"));
        assert_eq!(scheme("/abs/a:b.jpg"), None);
        assert_eq!(scheme("images/a:b.jpg"), None);
        assert_eq!(scheme("1x:y"), None);
        assert_eq!(scheme(":x"), None);
        assert_eq!(scheme("plain.jpg"), None);
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let config = FetchConfig { backoff_initial_ms: 100, backoff_max_ms: 1_000, ..FetchConfig::default() };
        let ms = |retry, jitter| retry_delay(&config, retry, None, jitter).as_millis();
        assert_eq!([ms(0, 1.0), ms(1, 1.0), ms(2, 1.0), ms(3, 1.0), ms(4, 1.0)], [100, 200, 400, 800, 1_000]);
        assert_eq!([ms(0, 0.0), ms(3, 0.0), ms(40, 0.0), ms(u32::MAX, 0.0)], [50, 400, 500, 500]);
        let floor = |secs| retry_delay(&config, 0, Some(Duration::from_secs(secs)), 0.0).as_millis();
        assert_eq!([floor(0), floor(1), floor(60)], [50, 1_000, 1_000]);
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let config: FetchConfig = serde_json::from_str(r#"{"max_retries": 5, "file_root": "/data"}"#).unwrap();
        assert_eq!(config, FetchConfig { max_retries: 5, file_root: Some("/data".into()), ..FetchConfig::default() });
        let defaults = FetchConfig::default();
        assert_eq!((defaults.timeout_ms, defaults.connect_timeout_ms, defaults.max_retries), (10_000, 3_000, 3));
        assert_eq!((defaults.backoff_initial_ms, defaults.backoff_max_ms), (100, 2_000));
        assert!(defaults.allow_file && defaults.file_root.is_none());
        assert!(defaults.user_agent.starts_with("dlpipe/"));
        let error = serde_json::from_str::<FetchConfig>(r#"{"timeout": 5}"#).unwrap_err();
        assert!(error.to_string().contains("unknown field `timeout`"), "{error}");
    }

    #[test]
    fn fetcher_is_shareable_across_threads() {
        fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
        assert_send_sync_clone::<Fetcher>();
        let server = Server::start(|_| response("200 OK", &[], b"ok"));
        let fetcher = fetcher(fast_config());
        let url = server.url("/");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| assert_eq!(fetcher.clone().fetch(&url, 16).unwrap(), b"ok"));
            }
        });
        assert_eq!(server.hits(), 4);
    }

    #[test]
    fn internal_addresses_are_refused_before_connecting_unless_allowed() {
        // The same server, reached without and with an allow-list entry for loopback.
        let server = Server::start(|_| response("200 OK", &[], b"secret"));
        let url = server.url("/latest/meta-data");
        let strict = Fetcher::with_agent_config(fast_config(), |b| b.proxy(None)).unwrap();
        let (error, attempts) = fetch_err(&strict, &url, 1024);
        assert_eq!((error.kind(), attempts), ("forbidden_address", 1), "{error}");
        assert!(
            error.to_string().contains("loopback") && error.to_string().contains("fetch.allowed_networks"),
            "{error}"
        );
        assert!(server.requests.lock().unwrap().is_empty(), "a refused address must not be contacted");
        // The cloud metadata address is refused the same way, with no connection attempt to
        // time out: the answer does not depend on what listens there.
        let (error, _) = fetch_err(&strict, "http://169.254.169.254/latest/meta-data/", 1024);
        assert_eq!(error.kind(), "forbidden_address", "{error}");
        assert_eq!(fetcher(fast_config()).fetch(&url, 1024).unwrap(), b"secret");
    }

    #[test]
    fn a_redirect_to_an_internal_address_is_refused() {
        // Allowed: 127.0.0.1 only. The allowed server redirects to 127.0.0.2, which is loopback
        // too but not allowed: the hop is checked like the first request.
        let inner = Server::start(|_| response("200 OK", &[], b"internal"));
        let target = format!("http://127.0.0.2:{}/admin", inner.addr.port());
        let location = format!("Location: {target}");
        let outer = Server::start(move |_| response("302 Found", &[location.as_str()], b""));
        let config = FetchConfig { allowed_networks: vec!["127.0.0.1".into()], ..fast_config() };
        let fetcher = Fetcher::with_agent_config(config, |b| b.proxy(None)).unwrap();
        let (error, _) = fetch_err(&fetcher, &outer.url("/image.jpg"), 1024);
        assert_eq!(error.kind(), "forbidden_address", "{error}");
        assert!(inner.requests.lock().unwrap().is_empty());
        assert!(Fetcher::new(FetchConfig { allowed_networks: vec!["10.0.0.0/99".into()], ..fast_config() })
            .unwrap_err()
            .to_string()
            .contains("fetch.allowed_networks"));
    }

    #[test]
    fn files_outside_the_roots_are_refused_whatever_the_path_or_link_says() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("images");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("cat.jpg"), b"cat").unwrap();
        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, b"top secret").unwrap();
        std::os::unix::fs::symlink(&secret, root.join("link.jpg")).unwrap();
        let config = FetchConfig { file_roots: vec![root.clone()], ..fast_config() };
        let confined = Fetcher::new(config).unwrap();
        let uri = |p: &Path| format!("file://{}", p.display());
        assert_eq!(confined.fetch(&uri(&root.join("cat.jpg")), 100).unwrap(), b"cat");
        let missing = confined.fetch(&uri(&root.join("dog.jpg")), 100).unwrap_err();
        assert_eq!(missing.kind(), "not_found", "inside the roots, a missing file is said to be missing");
        // The same through a link to the root folder (a clone whose data/ is a symlink).
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&root, &linked).unwrap();
        let missing = confined.fetch(&uri(&linked.join("dog.jpg")), 100).unwrap_err();
        assert_eq!(missing.kind(), "not_found", "{missing}");
        assert_eq!(confined.fetch(&uri(&linked.join("cat.jpg")), 100).unwrap(), b"cat");
        // Outside: through `..`, a link, an absolute path, a missing file, a system file. Every
        // one gets the same answer, with nothing about the file itself.
        let escapes = [
            root.join("../secret.txt"),
            root.join("link.jpg"),
            secret.clone(),
            dir.path().join("no-such-file"),
            PathBuf::from("/proc/self/environ"),
        ];
        let mut messages = Vec::new();
        for path in &escapes {
            let (error, _) = fetch_err(&confined, &uri(path), 100);
            assert_eq!(error.kind(), "forbidden_local_file", "{}: {error}", path.display());
            messages.push(error.to_string().replace(&uri(path), "URI"));
        }
        assert!(messages[..4].iter().all(|m| m == &messages[0]), "answers differ: {messages:?}");
        // Without roots, system files are still refused.
        let open = fetcher(fast_config());
        let (error, _) = fetch_err(&open, "/proc/self/environ", 1 << 20);
        assert_eq!(error.kind(), "forbidden_local_file", "{error}");
        assert!(Fetcher::new(FetchConfig { file_roots: vec![dir.path().join("nope")], ..fast_config() })
            .unwrap_err()
            .to_string()
            .contains("fetch.file_roots"));
    }

    /// The default confines records to the clone's data folder (tests run in the crate root):
    /// `/etc/passwd` is refused unread, not dead-lettered with its first bytes.
    #[test]
    fn the_default_roots_are_the_data_folder() {
        let defaults = Fetcher::new(FetchConfig::default()).unwrap();
        let sample = std::fs::canonicalize("data/samples/chelsea_cat.jpg").expect("make setup installs the samples");
        assert!(defaults.fetch(&format!("file://{}", sample.display()), 1 << 20).is_ok());
        assert!(defaults.fetch("data/samples/chelsea_cat.jpg", 1 << 20).is_ok());
        for uri in ["file:///etc/passwd", "/etc/passwd", "data/../Cargo.toml"] {
            let error = defaults.fetch(uri, 1 << 20).unwrap_err();
            assert_eq!(error.kind(), "forbidden_local_file", "{uri}: {error}");
            assert!(!error.to_string().contains("root:"), "{error}");
        }
        // A missing default root does not matter where local files are off.
        let elsewhere = FetchConfig { file_roots: vec!["no/such/folder".into()], ..FetchConfig::default() };
        assert!(Fetcher::new(elsewhere.clone()).is_err());
        assert!(Fetcher::new(FetchConfig { allow_file: false, ..elsewhere }).is_ok());
    }

    #[test]
    fn schemes_are_a_fixed_list_for_metrics() {
        for (uri, want) in [
            ("/data/a.png", UriScheme::File),
            ("images/a.png", UriScheme::File),
            ("FILE:///a.png", UriScheme::File),
            ("https://example.com/a.jpg", UriScheme::Https),
            ("s3://bucket/a.jpg", UriScheme::S3),
            ("gs://bucket/a.jpg", UriScheme::Gs),
            ("az://container/a.jpg", UriScheme::Az),
            ("abfs://container/a.jpg", UriScheme::Other),
            ("data:image/png;base64,AA==", UriScheme::Data),
            ("ftp://example.com/a.jpg", UriScheme::Other),
            ("x-unheard-of-scheme-1://a", UriScheme::Other),
        ] {
            assert_eq!(UriScheme::of(uri), want, "{uri}");
        }
        for (i, scheme) in UriScheme::ALL.iter().enumerate() {
            assert_eq!(scheme.index(), i, "{scheme:?}");
        }
    }
}
