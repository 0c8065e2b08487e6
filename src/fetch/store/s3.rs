//! `s3://bucket/key`: AWS S3 and S3-compatible stores (MinIO, SeaweedFS, Ceph, moto, ...),
//! settings `[fetch.stores.s3]`.

use super::{expand_fields, Built};
use crate::config::ConfigError;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientOptions, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Settings for `s3://` URIs (`[fetch.stores.s3]`). Every field is optional; unset credentials
/// come from the standard AWS chain: the environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`), the shared
/// credentials and config files (`~/.aws/credentials` and `~/.aws/config`, or
/// `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`; profile `AWS_PROFILE`, else `default`),
/// web identity, ECS/EKS container credentials, then the instance metadata service.
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
    let env = |name: &str| std::env::var(name).ok();
    let profile = Profile::read(&env);
    let region = s3.region.clone().or_else(|| env("AWS_REGION")).or(profile.region);
    builder = builder.with_region(region.unwrap_or_else(|| "us-east-1".into()));
    // The profile's keys stand in for the environment's, below the config's.
    if builder.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_none() {
        if let (Some(id), Some(secret)) = (profile.access_key_id, profile.secret_access_key) {
            builder = builder.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(token) = profile.session_token {
                builder = builder.with_token(token);
            }
        }
    }
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

/// What the shared AWS files say of one profile. object_store reads the environment but not
/// these files, which is where a developer's `aws configure` puts credentials.
#[derive(Debug, Default, PartialEq, Eq)]
struct Profile {
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    region: Option<String>,
}

impl Profile {
    /// The profile `AWS_PROFILE` (else `default`) of the credentials and config files; files
    /// that are missing or unreadable count as empty.
    fn read(env: &dyn Fn(&str) -> Option<String>) -> Profile {
        let home = env("HOME").unwrap_or_default();
        let file = |var: &str, default: &str| {
            let path = env(var).unwrap_or_else(|| format!("{home}/.aws/{default}"));
            std::fs::read_to_string(path).unwrap_or_default()
        };
        let name = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let mut credentials = ini_section(&file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &name);
        // ~/.aws/config names profiles `[profile x]`, except `[default]`.
        let config_section = if name == "default" { name.clone() } else { format!("profile {name}") };
        let mut config = ini_section(&file("AWS_CONFIG_FILE", "config"), &config_section);
        let mut take = |key: &str| credentials.remove(key).or_else(|| config.remove(key));
        Profile {
            access_key_id: take("aws_access_key_id"),
            secret_access_key: take("aws_secret_access_key"),
            session_token: take("aws_session_token"),
            region: take("region"),
        }
    }
}

/// The `key = value` lines of section `[name]` of an INI text (comments `#` and `;`).
fn ini_section(text: &str, name: &str) -> BTreeMap<String, String> {
    let mut inside = false;
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == name;
        } else if inside && !line.starts_with(['#', ';']) {
            if let Some((key, value)) = line.split_once('=') {
                out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_the_shared_files() {
        let dir = tempfile::tempdir().unwrap();
        let credentials = dir.path().join("credentials");
        let config = dir.path().join("config");
        std::fs::write(
            &credentials,
            "[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n# a comment\n[ci]\n\
             aws_access_key_id=AKCI\naws_secret_access_key=s2\naws_session_token=t2\n",
        )
        .unwrap();
        std::fs::write(&config, "[default]\nregion = eu-west-1\n[profile ci]\nregion = us-west-2\n").unwrap();
        let env = |profile: Option<&str>| {
            let (credentials, config) = (credentials.display().to_string(), config.display().to_string());
            let profile = profile.map(str::to_owned);
            move |name: &str| match name {
                "AWS_SHARED_CREDENTIALS_FILE" => Some(credentials.clone()),
                "AWS_CONFIG_FILE" => Some(config.clone()),
                "AWS_PROFILE" => profile.clone(),
                _ => None,
            }
        };
        let default = Profile::read(&env(None));
        assert_eq!(
            default,
            Profile {
                access_key_id: Some("AKDEFAULT".into()),
                secret_access_key: Some("s1".into()),
                session_token: None,
                region: Some("eu-west-1".into())
            }
        );
        let ci = Profile::read(&env(Some("ci")));
        assert_eq!((ci.access_key_id.as_deref(), ci.session_token.as_deref()), (Some("AKCI"), Some("t2")));
        assert_eq!(ci.region.as_deref(), Some("us-west-2"));
        assert_eq!(Profile::read(&env(Some("absent"))), Profile::default());
        assert_eq!(Profile::read(&|_: &str| Some("/no/such/file".to_owned())), Profile::default());
    }
}
