//! `s3://bucket/key`: AWS S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph, moto, ...),
//! settings `[fetch.stores.s3]`.

use super::{expand_fields, Built};
use crate::config::ConfigError;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientOptions, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Settings for `s3://` URIs (`[fetch.stores.s3]`). Every field is optional; unset credentials
/// come from the standard AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
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
    pub fn resolve_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let fields = [
            ("endpoint", &mut self.endpoint),
            ("region", &mut self.region),
            ("access_key_id", &mut self.access_key_id),
            ("secret_access_key", &mut self.secret_access_key),
            ("session_token", &mut self.session_token),
        ];
        expand_fields("s3", fields, env)
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

/// S3 error codes that mean the credentials themselves were not accepted (as opposed to valid
/// credentials lacking permission).
const CREDENTIAL_CODES: &[&str] =
    &["SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"];

/// Whether a 403 with error `code` rejected the credentials.
pub(super) fn credentials_rejected(code: &str) -> bool {
    CREDENTIAL_CODES.contains(&code)
}

pub(super) fn build(
    bucket: &str,
    s3: &S3Config,
    options: ClientOptions,
    retry: RetryConfig,
) -> object_store::Result<Built> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_skip_signature(s3.anonymous)
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
    // The endpoint in effect, from the config or AWS_ENDPOINT_URL.
    let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
    let options = options.with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    let store = builder.with_client_options(options).build()?;
    Ok(Built { store: std::sync::Arc::new(store), endpoint })
}
