//! `gs://` and `az://` URIs against real servers: fake-gcs-server (`scripts/gcs start`) and
//! Azurite's blob service (`scripts/azure start`), started on first use. Objects are uploaded
//! through each server's own HTTP API (Python's standard library: fake-gcs-server's JSON upload,
//! Azurite's Put Container and Put Blob signed with SharedKey), not through the code under test.
//! Azurite enforces shared-key signatures, so a wrong key is tested; fake-gcs-server checks no
//! credentials at all, so Google authentication is not.

mod common;

use common::run::{file_name, messages, predictions_by_id, read_topic, with_uris, Run};
use common::{fashion, produce};
use dlpipe::fetch::store::{AzureConfig, GcsConfig, StoresConfig};
use dlpipe::fetch::{FetchConfig, Fetcher};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The key Microsoft publishes for Azurite's development account; not a secret.
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// A well-formed key that is not the account's.
const WRONG_KEY: &str = "bm90LXRoZS1hY2NvdW50LWtleQ==";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Gcs,
    Azure,
}

impl Store {
    fn scheme(self) -> &'static str {
        match self {
            Store::Gcs => "gs",
            Store::Azure => "az",
        }
    }

    /// The server's base URL (GCS) or account endpoint (Azure), starting it on first use.
    fn url(self) -> &'static str {
        static GCS: OnceLock<String> = OnceLock::new();
        static AZURE: OnceLock<String> = OnceLock::new();
        let (cell, script) = match self {
            Store::Gcs => (&GCS, "scripts/gcs"),
            Store::Azure => (&AZURE, "scripts/azure"),
        };
        cell.get_or_init(|| {
            let script = common::root().join(script);
            let status = Command::new(&script).arg("start").status().expect("run the server script");
            assert!(status.success(), "{} start failed; see its output above", script.display());
            let url = Command::new(&script).arg("url").output().unwrap().stdout;
            String::from_utf8(url).unwrap().trim().to_owned()
        })
    }

    /// dlpipe's settings for the server; for Azure, signed with `key`.
    fn config(self, key: &str) -> StoresConfig {
        let url = self.url().to_owned();
        match self {
            Store::Gcs => StoresConfig {
                gcs: GcsConfig { base_url: Some(url), anonymous: true, ..GcsConfig::default() },
                ..StoresConfig::default()
            },
            Store::Azure => StoresConfig {
                azure: AzureConfig {
                    endpoint: Some(url),
                    use_emulator: true,
                    access_key: Some(key.to_owned()),
                    ..AzureConfig::default()
                },
                ..StoresConfig::default()
            },
        }
    }

    /// The same settings as a `[fetch.stores.*]` table of a config file.
    fn config_toml(self, key: &str) -> String {
        match self {
            Store::Gcs => format!("[fetch.stores.gcs]\nbase_url = \"{}\"\nanonymous = true\n", self.url()),
            Store::Azure => format!(
                "[fetch.stores.azure]\nendpoint = \"{}\"\nuse_emulator = true\naccess_key = \"{key}\"\n",
                self.url()
            ),
        }
    }
}

const UPLOAD: &str = r#"
import sys, json, hmac, hashlib, base64, email.utils, urllib.parse, urllib.request
kind, url, bucket, key, objects = sys.argv[1:6]

def send(method, target, body, headers):
    request = urllib.request.Request(target, data=body, method=method, headers=headers)
    urllib.request.urlopen(request).read()

def azure(method, path, query, body, headers):
    # SharedKey: HMAC-SHA256 of the canonical request with the account key.
    account = urllib.parse.urlparse(url).path.strip("/")
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06",
               "Content-Type": "application/octet-stream", **headers}
    target = f"{url}/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
    ms = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
    resource = f"/{account}{urllib.parse.urlparse(target).path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    length = str(len(body)) if body else ""
    text = f"{method}\n\n\n{length}\n\n{headers['Content-Type']}\n\n\n\n\n\n\n{ms}{resource}"
    digest = hmac.new(base64.b64decode(key), text.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {account}:{base64.b64encode(digest).decode()}"
    send(method, target, body, headers)

if kind == "gs":
    send("POST", f"{url}/storage/v1/b", json.dumps({"name": bucket}).encode(), {"Content-Type": "application/json"})
else:
    azure("PUT", bucket, {"restype": "container"}, b"", {})
for name, path in json.loads(objects):
    data = open(path, "rb").read()
    if kind == "gs":
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        send("POST", f"{url}/upload/storage/v1/b/{bucket}/o?{query}", data, {"Content-Type": "image/png"})
    else:
        azure("PUT", f"{bucket}/{name}", {}, data, {"x-ms-blob-type": "BlockBlob"})
"#;

/// Creates `bucket` (a container on Azure) and uploads each file under its key.
fn upload(store: Store, bucket: &str, objects: &[(String, PathBuf)]) {
    let list: Vec<Value> = objects.iter().map(|(k, p)| serde_json::json!([k, p])).collect();
    let status = Command::new(common::python())
        .args(["-c", UPLOAD, store.scheme(), store.url(), bucket, AZURITE_KEY])
        .arg(serde_json::to_string(&list).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "uploading to {store:?} {bucket} failed");
}

fn bucket_name(prefix: &str) -> String {
    // Bucket and container names: lower case, digits and dashes, at most 63 characters.
    let unique = common::unique(prefix).to_ascii_lowercase();
    unique[..unique.len().min(63)].to_owned()
}

/// Three objects uploaded under `<class>/<i>.png`: `(bucket, [(key, file)])`.
fn uploaded(store: Store, prefix: &str) -> (String, Vec<(String, PathBuf)>) {
    let bucket = bucket_name(prefix);
    let objects: Vec<(String, PathBuf)> =
        fashion(3, 0).into_iter().enumerate().map(|(i, (p, c))| (format!("{c}/{i}.png"), p)).collect();
    upload(store, &bucket, &objects);
    (bucket, objects)
}

fn fetcher(stores: StoresConfig, allowed: &[&str]) -> Fetcher {
    let allowed_networks = allowed.iter().map(|a| a.to_string()).collect();
    Fetcher::new(FetchConfig { stores, allowed_networks, max_retries: 0, ..FetchConfig::default() }).unwrap()
}

/// Every object comes back byte for byte in one attempt; a missing object or bucket is
/// `not_found`, an oversized one `too_large`, and the loopback endpoint is refused unless allowed.
fn objects_are_fetched(store: Store) -> (String, String) {
    let (bucket, objects) = uploaded(store, &format!("fetch-{}", store.scheme()));
    let scheme = store.scheme();
    let fetcher = fetcher(store.config(AZURITE_KEY), &["127.0.0.1"]);
    for (key, path) in &objects {
        let outcome = fetcher.fetch_with_attempts(&format!("{scheme}://{bucket}/{key}"), 1 << 20);
        assert_eq!(outcome.result.unwrap(), std::fs::read(path).unwrap(), "{key}");
        assert_eq!(outcome.attempts, 1);
    }
    // Listing (what `dlpipe produce gs://bucket/prefix/` publishes) and writing (`dlpipe bench
    // --store`) go through the same clients.
    let mut keys: Vec<&str> = objects.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    let listed = fetcher.list(&format!("{scheme}://{bucket}/")).unwrap();
    let want: Vec<String> = keys.iter().map(|k| format!("{scheme}://{bucket}/{k}")).collect();
    assert_eq!(listed, want);
    // fake-gcs-server takes no XML-API uploads (object_store's GCS put), so writing is tried on
    // Azurite only (and on moto by `dlpipe bench --store`).
    if store == Store::Azure {
        let written = format!("{scheme}://{bucket}/written/a b.png");
        fetcher.put(&written, std::fs::read(&objects[0].1).unwrap()).unwrap();
        let listed = fetcher.list(&format!("{scheme}://{bucket}/written")).unwrap();
        assert_eq!(listed, [format!("{scheme}://{bucket}/written/a%20b.png")]);
        assert_eq!(fetcher.fetch(&listed[0], 1 << 20).unwrap(), std::fs::read(&objects[0].1).unwrap());
    }
    let kind = |fetcher: &Fetcher, uri: &str, max: u64| fetcher.fetch(uri, max).unwrap_err().kind();
    let first = format!("{scheme}://{bucket}/{}", objects[0].0);
    assert_eq!(kind(&fetcher, &format!("{scheme}://{bucket}/missing.png"), 1 << 20), "not_found");
    assert_eq!(kind(&fetcher, &format!("{scheme}://no-such-bucket-dlpipe/x.png"), 1 << 20), "not_found");
    assert_eq!(kind(&fetcher, &first, 10), "too_large");
    let closed = self::fetcher(store.config(AZURITE_KEY), &[]);
    let outcome = closed.fetch_with_attempts(&first, 1 << 20);
    assert_eq!(outcome.result.unwrap_err().kind(), "forbidden_address");
    assert_eq!(outcome.attempts, 0);
    (bucket, first)
}

#[test]
fn gcs_objects_are_fetched_and_failures_get_distinct_kinds() {
    objects_are_fetched(Store::Gcs);
}

#[test]
fn azure_objects_are_fetched_and_a_wrong_key_is_unauthorized() {
    let (_, first) = objects_are_fetched(Store::Azure);
    let wrong = fetcher(Store::Azure.config(WRONG_KEY), &["127.0.0.1"]);
    let error = wrong.fetch(&first, 1 << 20).unwrap_err();
    assert_eq!(error.kind(), "unauthorized", "{error}");
    assert!(!error.to_string().contains(WRONG_KEY), "{error}");
    // A key that is not base64 cannot make a client: a config error, not a request.
    let outcome = fetcher(Store::Azure.config("not base64!"), &["127.0.0.1"]).fetch_with_attempts(&first, 1 << 20);
    assert_eq!((outcome.result.unwrap_err().kind(), outcome.attempts), ("store_config", 0));
}

/// `service_account` (a key file's path) and `service_account_key` (its JSON) are read: a file
/// that is not there cannot make a client, and a key that turns OAuth off (object_store's switch
/// for emulators, since fake-gcs-server could not check a token) reads the objects.
#[test]
fn gcs_service_account_settings_are_read() {
    let (bucket, objects) = uploaded(Store::Gcs, "account");
    let uri = format!("gs://{bucket}/{}", objects[0].0);
    let with = |path: Option<String>, key: Option<String>| {
        let mut stores = Store::Gcs.config("");
        stores.gcs = GcsConfig { service_account: path, service_account_key: key, ..stores.gcs };
        stores.gcs.anonymous = false;
        fetcher(stores, &["127.0.0.1"]).fetch_with_attempts(&uri, 1 << 20)
    };
    let missing = with(Some("/nonexistent/dlpipe-sa.json".into()), None);
    assert_eq!((missing.result.unwrap_err().kind(), missing.attempts), ("store_config", 0));
    let key = serde_json::json!({
        "client_email": "reader@dlpipe.iam.gserviceaccount.com", "private_key": "", "private_key_id": "",
        "disable_oauth": true,
    })
    .to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sa.json");
    std::fs::write(&path, &key).unwrap();
    let image = std::fs::read(&objects[0].1).unwrap();
    assert_eq!(with(Some(path.display().to_string()), None).result.unwrap(), image);
    assert_eq!(with(None, Some(key)).result.unwrap(), image);
}

#[test]
fn a_gcs_base_url_by_name_obeys_the_address_policy() {
    let mut stores = Store::Gcs.config("");
    stores.gcs.base_url = Some(Store::Gcs.url().replace("127.0.0.1", "localhost"));
    let error = fetcher(stores, &[]).fetch("gs://any-bucket/x.png", 1 << 20).unwrap_err();
    assert_eq!(error.kind(), "forbidden_address", "{error}");
}

/// The stream from `gs://` and `az://` URIs predicts exactly as from the same files by
/// `file://`; a missing object is dead-lettered `not_found`, and on Azure a wrong key
/// `unauthorized`.
#[test]
fn store_uris_predict_exactly_as_the_files_they_name() {
    let images = fashion(12, 300);
    let by_file = messages(&images, "r", 2, |i| i % 3 != 2);
    let run = |name: &str, messages: &[(i32, String, String)], stores: &str| {
        let input = common::unique(name);
        produce(&input, 2, messages);
        // Run's config allows 127.0.0.0/8 (the servers' address) in [fetch].
        let run = Run::new(name, &input, &format!("epochs = {{ by = \"offsets\", records = 4 }}\n{stores}"));
        run.to_end(&[]);
        run
    };
    let file_run = run("storesfile", &by_file, "");
    let reference = predictions_by_id(&file_run.predictions, images.len());
    assert_eq!(reference.len(), images.len());
    assert!(reference.values().any(|(_, v)| *v > 0), "later records are predicted by a model that has learned");
    for store in [Store::Gcs, Store::Azure] {
        let scheme = store.scheme();
        let bucket = bucket_name(&format!("stream-{scheme}"));
        let objects: Vec<(String, PathBuf)> =
            images.iter().map(|(p, c)| (format!("{c}/{}", file_name(p)), p.clone())).collect();
        upload(store, &bucket, &objects);
        let by_store = with_uris(&by_file, objects.iter().map(|(key, _)| format!("{scheme}://{bucket}/{key}")));
        let missing = serde_json::json!({"id": "missing", "uri": format!("{scheme}://{bucket}/none.png")}).to_string();
        let by_store = [by_store, vec![(0, "missing".into(), missing)]].concat();
        let store_run = run(&format!("stores{scheme}"), &by_store, &store.config_toml(AZURITE_KEY));
        assert_eq!(predictions_by_id(&store_run.predictions, images.len() + 1), reference, "{scheme}");
        let dead = read_topic(&store_run.dead, 2, Duration::from_secs(5));
        let kinds: Vec<(&str, &str)> =
            dead.iter().map(|d| (d["id"].as_str().unwrap(), d["error_kind"].as_str().unwrap())).collect();
        assert_eq!(kinds, [("missing", "not_found")], "{scheme}");
        if store == Store::Azure {
            let wrong = run("storeswrong", &by_store[..2], &store.config_toml(WRONG_KEY));
            let dead = read_topic(&wrong.dead, 3, Duration::from_secs(5));
            assert_eq!(dead.len(), 2, "{dead:?}");
            for d in &dead {
                assert_eq!(d["error_kind"], "unauthorized", "{d}");
                assert!(!d.to_string().contains(WRONG_KEY), "{d}");
            }
        }
    }
}
