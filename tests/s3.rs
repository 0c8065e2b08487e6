//! `s3://` URIs against a real S3-compatible server: moto's standalone server, started by
//! `scripts/s3 start`, which enforces signed requests with an access key of its own IAM.

mod common;

use common::run::{file_name, messages, predictions_by_id, read_topic, with_uris, Run};
use common::s3::{bucket_with, signed as server};
use common::{fashion, produce};
use dlpipe::fetch::store::{S3Config, StoresConfig};
use dlpipe::fetch::{FetchConfig, Fetcher};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn s3_config(secret: &str) -> S3Config {
    let s = server();
    S3Config {
        endpoint: Some(s.endpoint.clone()),
        access_key_id: Some(s.key_id.clone()),
        secret_access_key: Some(secret.to_owned()),
        ..S3Config::default()
    }
}

#[test]
fn objects_are_fetched_and_failures_get_distinct_kinds() {
    let images = fashion(3, 0);
    let objects: Vec<(String, PathBuf)> =
        images.iter().enumerate().map(|(i, (p, c))| (format!("{c}/{i}.png"), p.clone())).collect();
    let bucket = bucket_with(server(), "fetch", &objects);
    let config = |secret: &str, allowed: &[&str]| FetchConfig {
        stores: StoresConfig { s3: s3_config(secret), ..StoresConfig::default() },
        allowed_networks: allowed.iter().map(|a| a.to_string()).collect(),
        max_retries: 0,
        ..FetchConfig::default()
    };
    let fetcher = Fetcher::new(config(&server().secret, &["127.0.0.1"])).unwrap();
    for (key, path) in &objects {
        let outcome = fetcher.fetch_with_attempts(&format!("s3://{bucket}/{key}"), 1 << 20);
        assert_eq!(outcome.result.unwrap(), std::fs::read(path).unwrap(), "{key}");
        assert_eq!(outcome.attempts, 1);
    }
    let kind = |fetcher: &Fetcher, uri: &str, max: u64| fetcher.fetch(uri, max).unwrap_err().kind();
    let first = format!("s3://{bucket}/{}", objects[0].0);
    assert_eq!(kind(&fetcher, &format!("s3://{bucket}/missing.png"), 1 << 20), "not_found");
    assert_eq!(kind(&fetcher, "s3://no-such-bucket-dlpipe/x.png", 1 << 20), "not_found");
    assert_eq!(kind(&fetcher, &first, 10), "too_large");
    let wrong = Fetcher::new(config("not-the-secret", &["127.0.0.1"])).unwrap();
    let error = wrong.fetch(&first, 1 << 20).unwrap_err();
    assert_eq!(error.kind(), "unauthorized", "{error}");
    assert!(!error.to_string().contains("not-the-secret"), "{error}");
    // The endpoint is on loopback: refused unless allowed, before any request.
    let closed = Fetcher::new(config(&server().secret, &[])).unwrap();
    let outcome = closed.fetch_with_attempts(&first, 1 << 20);
    assert_eq!(outcome.result.unwrap_err().kind(), "forbidden_address");
    assert_eq!(outcome.attempts, 0);
}

#[test]
fn a_store_endpoint_by_name_obeys_the_address_policy() {
    let s3 = S3Config { endpoint: Some(server().endpoint.replace("127.0.0.1", "localhost")), ..s3_config("x") };
    let stores = StoresConfig { s3, ..StoresConfig::default() };
    let fetcher = Fetcher::new(FetchConfig { stores, max_retries: 0, ..FetchConfig::default() }).unwrap();
    let error = fetcher.fetch("s3://any-bucket/x.png", 1 << 20).unwrap_err();
    assert_eq!(error.kind(), "forbidden_address", "{error}");
}

/// The stream from `s3://` URIs predicts exactly as from the same files by `file://`; a missing
/// object and a wrong secret are dead-lettered, each with its own kind.
#[test]
fn s3_uris_predict_exactly_as_the_files_they_name() {
    let images = fashion(30, 300);
    let objects: Vec<(String, PathBuf)> =
        images.iter().map(|(p, c)| (format!("{c}/{}", file_name(p)), p.clone())).collect();
    let bucket = bucket_with(server(), "stream", &objects);
    let by_file = messages(&images, "r", 2, |i| i % 3 != 2);
    let by_s3 = with_uris(&by_file, objects.iter().map(|(key, _)| format!("s3://{bucket}/{key}")));
    let missing = serde_json::json!({"id": "missing", "uri": format!("s3://{bucket}/none.png")}).to_string();
    let by_s3 = [by_s3, vec![(0, "missing".into(), missing)]].concat();
    let s = server();
    let store = |secret: &str| {
        format!(
            "epochs = {{ by = \"offsets\", records = 4 }}\n[fetch.stores.s3]\nendpoint = \"{}\"\naccess_key_id = \"{}\"\n\
             secret_access_key = \"{secret}\"\n",
            s.endpoint, s.key_id
        )
    };
    let run = |name: &str, messages: &[(i32, String, String)], extra: &str| {
        let input = common::unique(name);
        produce(&input, 2, messages);
        let run = Run::new(name, &input, extra);
        run.to_end(&[]);
        run
    };
    let file_run = run("s3file", &by_file, &store(&s.secret));
    let s3_run = run("s3store", &by_s3, &store(&s.secret));
    let reference = predictions_by_id(&file_run.predictions, images.len());
    assert_eq!(reference.len(), images.len());
    assert!(reference.values().any(|(_, v)| *v > 0), "later records are predicted by a model that has learned");
    assert_eq!(predictions_by_id(&s3_run.predictions, images.len() + 1), reference);
    let dead = read_topic(&s3_run.dead, 2, Duration::from_secs(5));
    let kinds: Vec<(&str, &str)> =
        dead.iter().map(|d| (d["id"].as_str().unwrap(), d["error_kind"].as_str().unwrap())).collect();
    assert_eq!(kinds, [("missing", "not_found")]);

    let wrong = run("s3wrong", &by_s3[..2], &store("not-the-secret"));
    let dead = read_topic(&wrong.dead, 3, Duration::from_secs(5));
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_eq!(d["error_kind"], "unauthorized", "{d}");
        assert!(!d.to_string().contains("not-the-secret"), "{d}");
    }
}

/// `tools/fault_proxy.py` in front of the server: the first `fail_first` requests for each
/// object are answered `503 SlowDown`, as S3 throttles, and the rest are forwarded unchanged.
struct SlowDown {
    child: std::process::Child,
    endpoint: String,
}

impl SlowDown {
    fn start(fail_first: u32) -> SlowDown {
        let mut child = Command::new(common::python())
            .arg(common::root().join("tools/fault_proxy.py"))
            .arg(&server().endpoint)
            .args(["--fail-first", &fail_first.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start tools/fault_proxy.py");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let port = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("fault proxy said {line:?}"));
        SlowDown { child, endpoint: format!("http://127.0.0.1:{port}") }
    }
}

impl Drop for SlowDown {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store that throttles (`503 SlowDown`) is retried with backoff until it answers, within
/// `fetch.max_retries`; past them the record is dead-lettered `http_status`, naming the status.
/// In the stream every throttled record is still predicted.
#[test]
fn a_throttling_store_is_retried_and_the_stream_loses_nothing() {
    let images = fashion(6, 600);
    let objects: Vec<(String, PathBuf)> =
        images.iter().map(|(p, c)| (format!("{c}/{}", file_name(p)), p.clone())).collect();
    let bucket = bucket_with(server(), "slowdown", &objects);
    let proxy = SlowDown::start(2);
    let config = |max_retries| FetchConfig {
        stores: StoresConfig {
            s3: S3Config { endpoint: Some(proxy.endpoint.clone()), ..s3_config(&server().secret) },
            ..StoresConfig::default()
        },
        allowed_networks: vec!["127.0.0.1".into()],
        max_retries,
        backoff_initial_ms: 20,
        ..FetchConfig::default()
    };
    let fetcher = Fetcher::new(config(3)).unwrap();
    let (key, path) = &objects[0];
    let outcome = fetcher.fetch_with_attempts(&format!("s3://{bucket}/{key}"), 1 << 20);
    assert_eq!(outcome.result.unwrap(), std::fs::read(path).unwrap());
    assert_eq!(outcome.attempts, 3, "two 503 SlowDown answers, then the object");
    let outcome =
        Fetcher::new(config(1)).unwrap().fetch_with_attempts(&format!("s3://{bucket}/{}", objects[1].0), 1 << 20);
    let error = outcome.result.unwrap_err();
    assert_eq!((error.kind(), outcome.attempts), ("http_status", 2), "{error}");
    assert!(error.to_string().contains("503"), "{error}");

    // The stream (default retries, 3): the objects not fetched above are throttled twice each.
    let records: Vec<(i32, String, String)> = objects
        .iter()
        .enumerate()
        .map(|(i, (key, _))| {
            let id = format!("t{i}");
            let uri = format!("s3://{bucket}/{key}");
            (i as i32 % 2, id.clone(), serde_json::json!({"id": id, "uri": uri}).to_string())
        })
        .collect();
    let s = server();
    let extra = format!(
        "[fetch.stores.s3]\nendpoint = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        proxy.endpoint, s.key_id, s.secret
    );
    let input = common::unique("s3slow");
    produce(&input, 2, &records);
    let run = Run::new("s3slow", &input, &extra);
    run.to_end(&[]);
    let predicted = read_topic(&run.predictions, records.len(), Duration::from_secs(5));
    let mut ids: Vec<&str> = predicted.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["t0", "t1", "t2", "t3", "t4", "t5"]);
    assert!(read_topic(&run.dead, 1, Duration::from_secs(2)).is_empty());
}

/// With no credentials in the config or the environment, they come from a profile of the shared
/// credentials file, as `aws configure` writes it: `dlpipe predict` reads the object with the
/// right secret there, and is refused (`unauthorized`) with a wrong one.
#[test]
fn credentials_come_from_an_aws_profile() {
    let (path, class) = fashion(1, 700).remove(0);
    let bucket = bucket_with(server(), "profile", &[(format!("{class}/0.png"), path)]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let s = server();
    std::fs::write(
        &config,
        format!("[fetch]\nallowed_networks = [\"127.0.0.1\"]\n[fetch.stores.s3]\nendpoint = \"{}\"\n", s.endpoint),
    )
    .unwrap();
    let predict = |secret: &str| {
        let credentials = dir.path().join("credentials");
        let profile = format!("[dlpipe-test]\naws_access_key_id = {}\naws_secret_access_key = {secret}\n", s.key_id);
        std::fs::write(&credentials, profile).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_dlpipe"))
            .arg("-c")
            .arg(&config)
            .args(["predict", "--json", &format!("s3://{bucket}/{class}/0.png")])
            .current_dir(common::root())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env("HOME", dir.path())
            .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
            .env("AWS_PROFILE", "dlpipe-test")
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned();
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("{e}: {line}\n{}", String::from_utf8_lossy(&out.stderr)))
    };
    let good = predict(&s.secret);
    assert!(good["top_k"].as_array().is_some_and(|t| !t.is_empty()), "{good}");
    let wrong = predict("not-the-secret");
    assert_eq!(wrong["error_kind"], "unauthorized", "{wrong}");
}
