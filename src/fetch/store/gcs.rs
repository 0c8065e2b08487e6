//! `gs://bucket/key`: Google Cloud Storage (or an emulator such as fake-gcs-server), settings
//! `[fetch.stores.gcs]`.

use super::{expand_fields, Built};
use crate::config::ConfigError;
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{ClientOptions, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Settings for `gs://` URIs (`[fetch.stores.gcs]`). Every field is optional; unset
/// credentials come from the standard Google environment: `GOOGLE_SERVICE_ACCOUNT` (or
/// `SERVICE_ACCOUNT`, a key file's path), `GOOGLE_SERVICE_ACCOUNT_KEY` (the key's JSON),
/// `GOOGLE_APPLICATION_CREDENTIALS` (application default credentials, else
/// `~/.config/gcloud/application_default_credentials.json`), then the metadata server of a
/// GCE/GKE machine.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcsConfig {
    /// Base URL of the JSON/XML API, e.g. `"http://127.0.0.1:4443"` for an emulator; unset,
    /// `GOOGLE_BASE_URL` or else `https://storage.googleapis.com`. An internal address must be
    /// listed in `fetch.allowed_networks`. Default unset.
    pub base_url: Option<String>,
    /// Path of a service account's JSON key file; `${NAME}` names an environment variable.
    /// Default unset (environment).
    pub service_account: Option<String>,
    /// The JSON key itself, best as `"${NAME}"`; never logged or shown. At most one of
    /// `service_account` and `service_account_key`. Default unset.
    pub service_account_key: Option<String>,
    /// Send requests without credentials (public buckets, emulators). Default false.
    pub anonymous: bool,
}

impl GcsConfig {
    /// Expands `${NAME}` in the URL and credentials from `env`; an unset variable is an error
    /// naming it.
    pub fn resolve_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let fields = [
            ("base_url", &mut self.base_url),
            ("service_account", &mut self.service_account),
            ("service_account_key", &mut self.service_account_key),
        ];
        expand_fields("gcs", fields, env)
    }
}

// Written out so that a config printed with `{:?}` never shows a secret.
impl std::fmt::Debug for GcsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsConfig")
            .field("base_url", &self.base_url)
            .field("service_account", &self.service_account)
            .field("service_account_key", &self.service_account_key.as_ref().map(|_| "<redacted>"))
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

pub(super) fn build(
    bucket: &str,
    gcs: &GcsConfig,
    options: ClientOptions,
    retry: RetryConfig,
) -> object_store::Result<Built> {
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_skip_signature(gcs.anonymous)
        .with_retry(retry);
    if let Some(url) = &gcs.base_url {
        builder = builder.with_base_url(url);
    }
    if gcs.anonymous {
        // No credentials are read or fetched: an emulator or a public bucket needs none, and the
        // metadata server must not be asked.
        builder = builder.with_bearer_token("");
    } else {
        if let Some(path) = &gcs.service_account {
            builder = builder.with_service_account_path(path);
        }
        if let Some(key) = &gcs.service_account_key {
            builder = builder.with_service_account_key(key);
        }
    }
    // The base URL in effect, from the config or GOOGLE_BASE_URL.
    let endpoint = builder.get_config_value(&GoogleConfigKey::BaseUrl);
    let options = options.with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    let store = builder.with_client_options(options).build()?;
    Ok(Built { store: std::sync::Arc::new(store), endpoint })
}
