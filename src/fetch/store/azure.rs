//! `az://container/blob`: Azure Blob Storage (or Azurite), settings `[fetch.stores.azure]`.

use super::{expand_fields, Built};
use crate::config::ConfigError;
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::{ClientOptions, RetryConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Settings for `az://` URIs (`[fetch.stores.azure]`). Every field is optional; unset ones come
/// from the standard Azure environment: `AZURE_STORAGE_ACCOUNT_NAME`,
/// `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_ENDPOINT`, `AZURE_STORAGE_SAS_KEY`, a service
/// principal (`AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`, `AZURE_TENANT_ID`), workload identity
/// (`AZURE_FEDERATED_TOKEN_FILE`), then the managed identity of an Azure machine.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AzureConfig {
    /// Storage account name; unset, `AZURE_STORAGE_ACCOUNT_NAME` (with `use_emulator`,
    /// Azurite's `devstoreaccount1`). Default unset.
    pub account: Option<String>,
    /// The account's shared key, best as `"${NAME}"`; never logged or shown. Unset,
    /// `AZURE_STORAGE_ACCOUNT_KEY` or the other credentials above (with `use_emulator`,
    /// Azurite's well-known key). Default unset.
    pub access_key: Option<String>,
    /// The account's blob service URL, e.g. `"http://127.0.0.1:10000/devstoreaccount1"`
    /// (Azurite); unset, `AZURE_STORAGE_ENDPOINT` or else
    /// `https://<account>.blob.core.windows.net`. An internal address must be listed in
    /// `fetch.allowed_networks`. Default unset.
    pub endpoint: Option<String>,
    /// Azurite with its well-known development account: the defaults of `account`,
    /// `access_key` and `endpoint` become `devstoreaccount1`, its key and
    /// `http://127.0.0.1:10000/<account>`. Default false.
    pub use_emulator: bool,
    /// Send unsigned requests (containers with public read access). Default false.
    pub anonymous: bool,
}

impl AzureConfig {
    /// Expands `${NAME}` in the account, key and endpoint from `env`; an unset variable is an
    /// error naming it.
    pub fn resolve_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let fields =
            [("account", &mut self.account), ("access_key", &mut self.access_key), ("endpoint", &mut self.endpoint)];
        expand_fields("azure", fields, env)
    }
}

// Written out so that a config printed with `{:?}` never shows a secret.
impl std::fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConfig")
            .field("account", &self.account)
            .field("access_key", &self.access_key.as_ref().map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("use_emulator", &self.use_emulator)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Azure error codes that mean the credentials themselves were not accepted (wrong key, bad or
/// expired token) rather than lacking permission (`AuthorizationPermissionMismatch`, ...).
const CREDENTIAL_CODES: &[&str] = &["AuthenticationFailed", "InvalidAuthenticationInfo", "NoAuthenticationInformation"];

/// Whether a 403 with error `code` and `body` rejected the credentials. Azure answers a wrong key
/// with AuthenticationFailed, "Server failed to authenticate the request..."; Azurite says the
/// same words under the code AuthorizationFailure, which Azure itself keeps for requests it
/// authenticated but does not allow (firewall rules, a SAS without the permission: "This request
/// is not authorized to perform this operation."). So the words decide as well as the code.
pub(super) fn credentials_rejected(code: &str, body: &str) -> bool {
    CREDENTIAL_CODES.contains(&code) || body.contains("failed to authenticate the request")
}

/// Azurite's development account and its key, published by Microsoft for every installation
/// (<https://learn.microsoft.com/azure/storage/common/storage-use-azurite>); not a secret.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub(super) fn build(
    container: &str,
    azure: &AzureConfig,
    options: ClientOptions,
    retry: RetryConfig,
) -> object_store::Result<Built> {
    let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(container).with_retry(retry);
    let emulator = azure.use_emulator
        || builder.get_config_value(&AzureConfigKey::UseEmulator).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    // object_store's own emulator mode takes its URL from AZURITE_BLOB_STORAGE_URL alone; the
    // emulator is an ordinary account at an endpoint here, so that `endpoint` and the address
    // policy apply to it as to any other.
    builder = builder.with_use_emulator(false);
    let default = |value: Option<String>, emulated: &dyn Fn() -> String| value.or_else(|| emulator.then(emulated));
    let account = default(azure.account.clone(), &|| EMULATOR_ACCOUNT.into())
        .or_else(|| builder.get_config_value(&AzureConfigKey::AccountName));
    if let Some(account) = &account {
        builder = builder.with_account(account);
    }
    let endpoint = azure.endpoint.clone().or_else(|| builder.get_config_value(&AzureConfigKey::Endpoint));
    let account_name = account.clone().unwrap_or_default();
    let endpoint = default(endpoint, &|| format!("http://127.0.0.1:10000/{account_name}"));
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    if let Some(key) = default(azure.access_key.clone(), &|| EMULATOR_KEY.into()) {
        builder = builder.with_access_key(key);
    }
    builder = builder.with_skip_signature(azure.anonymous);
    let options = options.with_allow_http(endpoint.as_deref().is_some_and(|e| e.starts_with("http://")));
    let store = builder.with_client_options(options).build()?;
    Ok(Built { store: std::sync::Arc::new(store), endpoint })
}
