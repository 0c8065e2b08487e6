//! The metric definitions against the registry, the reference in docs/metrics.md, the code that
//! names metrics, and the dashboards and alerts that query them; and the HTTP endpoint.

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn defined() -> BTreeSet<&'static str> {
    DEFINITIONS.iter().map(|d| d.name).collect()
}

/// Rows of docs/metrics.md's reference table: name → (type, labels).
fn documented() -> BTreeMap<String, (String, Vec<String>)> {
    let text = std::fs::read_to_string(root().join("docs/metrics.md")).expect("docs/metrics.md");
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[0].starts_with("`dlpipe_") {
            continue;
        }
        let name = cells[0].trim_matches('`').to_owned();
        let labels = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "—")
            .collect();
        assert!(rows.insert(name.clone(), (cells[1].to_owned(), labels)).is_none(), "{name} documented twice");
    }
    rows
}

#[test]
fn every_definition_is_registered_once_and_follows_the_naming_conventions() {
    let metrics = Metrics::new();
    let registered: BTreeSet<&str> = metrics.registered.iter().copied().collect();
    assert_eq!(registered.len(), metrics.registered.len(), "a metric registered twice");
    assert_eq!(registered, defined(), "registered metrics and DEFINITIONS differ");
    for d in DEFINITIONS {
        assert!(d.name.starts_with("dlpipe_"), "{}", d.name);
        assert_eq!(d.kind == Kind::Counter, d.name.ends_with("_total"), "{}: only counters end in _total", d.name);
        if d.kind == Kind::Histogram {
            assert!(d.buckets != Buckets::None, "{} needs buckets", d.name);
            assert!(
                ["_seconds", "_bytes", "_records"].iter().any(|u| d.name.ends_with(u)),
                "{}: a histogram names its unit",
                d.name
            );
        }
        for label in d.labels {
            assert!(
                [
                    "worker",
                    "device",
                    "topic",
                    "partition",
                    "model",
                    "reason",
                    "class",
                    "stage",
                    "operator",
                    "window",
                    "version",
                    "scheme",
                    "kind"
                ]
                .contains(label),
                "{}: label {label} is not one of the documented ones",
                d.name
            );
        }
    }
}

#[test]
fn the_reference_documents_exactly_the_metrics_in_code_with_their_types_and_labels() {
    let documented = documented();
    let names: BTreeSet<&str> = documented.keys().map(String::as_str).collect();
    let missing: Vec<_> = defined().difference(&names).copied().collect();
    let stale: Vec<_> = names.difference(&defined()).copied().collect();
    assert!(missing.is_empty(), "metrics in code but not in docs/metrics.md: {missing:?}");
    assert!(stale.is_empty(), "metrics in docs/metrics.md but not in code: {stale:?}");
    for d in DEFINITIONS {
        let (kind, labels) = &documented[d.name];
        assert_eq!(kind, d.kind.as_str(), "{}: documented type", d.name);
        assert_eq!(
            labels,
            &d.labels.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            "{}: documented labels",
            d.name
        );
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `dlpipe_...` names in quotes that look like metric names (a unit or `_total` at the end).
fn quoted_metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("\"dlpipe_") {
        let name: String =
            text[i + 1..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        let metric_like =
            ["_total", "_seconds", "_bytes", "_ratio", "_records", "_info", "_version", "_classes", "_loss"]
                .iter()
                .any(|s| name.ends_with(s));
        if metric_like && text[i + 1 + name.len()..].starts_with('"') {
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_metric_name_in_the_code_is_defined_and_documented() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    rust_files(&root().join("operators/src"), &mut files);
    let documented = documented();
    for file in files {
        for name in quoted_metric_names(&std::fs::read_to_string(&file).unwrap()) {
            assert!(defined().contains(name.as_str()), "{}: {name} is not in metrics::DEFINITIONS", file.display());
            assert!(documented.contains_key(&name), "{}: {name} is not in docs/metrics.md", file.display());
        }
    }
}

/// Every `dlpipe_*` name in a query, with histogram suffixes removed.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in expr.match_indices("dlpipe_") {
        if i > 0 && expr.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| definition_exists(b) && !definition_exists(&name)))
            .map(str::to_owned)
            .unwrap_or(name);
        names.insert(base);
    }
    names
}

fn definition_exists(name: &str) -> bool {
    DEFINITIONS.iter().any(|d| d.name == name)
}

#[test]
fn dashboards_and_alerts_query_only_defined_metrics() {
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(root().join("grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in json["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push((path.display().to_string(), target["expr"].as_str().unwrap().to_owned()));
            }
        }
    }
    let alerts = std::fs::read_to_string(root().join("grafana/alerts.yml")).unwrap();
    exprs.push(("grafana/alerts.yml".into(), alerts));
    let mut used = BTreeSet::new();
    for (file, expr) in &exprs {
        for name in names_in(expr) {
            assert!(definition_exists(&name), "{file}: {name} is not a dlpipe metric (in {expr})");
            used.insert(name);
        }
    }
    let unused: Vec<_> = defined().into_iter().filter(|n| !used.contains(*n)).collect();
    assert!(unused.is_empty(), "metrics no dashboard or alert shows: {unused:?}");
}

fn get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[test]
fn the_endpoint_serves_metrics_health_and_readiness() {
    let metrics = Arc::new(Metrics::new());
    let handles = metrics.for_worker(3, "images");
    handles.learn_predict.predicted.inc_by(5);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readiness = Arc::new(Readiness::new(2, Arc::clone(&stop)));
    let address = serve("127.0.0.1:0".parse().unwrap(), Arc::clone(&metrics), Arc::clone(&readiness)).unwrap();

    let (status, body) = get(address, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE dlpipe_records_predicted_total counter"), "{body}");
    assert!(body.contains("dlpipe_records_predicted_total{worker=\"3\"} 5"), "{body}");
    assert!(body.contains(&format!("dlpipe_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{body}");
    assert_eq!(get(address, "/healthz").0, 200);
    assert_eq!(get(address, "/readyz").0, 503, "no worker is ready yet");
    readiness.worker_ready();
    assert_eq!(get(address, "/readyz").0, 503, "one of two workers is ready");
    readiness.worker_ready();
    assert_eq!(get(address, "/readyz"), (200, "ready\n".into()));
    // A stalled worker makes the process unready, saying what it waits for, until it moves.
    readiness.set_stalled(1, Some("epoch 4: partitions not yet read past it: partition 3 from offset 130;".into()));
    let (status, body) = get(address, "/readyz");
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready: stalled: worker 1 waits for epoch 4: partitions not yet read past it: partition 3 from offset 130;\n"
    );
    readiness.set_stalled(1, None);
    assert_eq!(get(address, "/readyz"), (200, "ready\n".into()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(get(address, "/readyz").0, 503, "stopping");
    assert_eq!(get(address, "/nothing").0, 404);
    let failed = Arc::new(Readiness::new(1, Arc::new(std::sync::atomic::AtomicBool::new(false))));
    failed.worker_ready();
    assert!(failed.is_ready());
    failed.fail();
    assert!(!failed.is_ready(), "a failed worker makes the process unready");
}

/// Threads of this process with the given name.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == name)
        .count()
}

#[test]
fn clients_cannot_hold_the_endpoint_with_many_slow_or_huge_requests() {
    use super::server::{MAX_CONNECTIONS, REQUEST_DEADLINE};
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new(1, Arc::new(std::sync::atomic::AtomicBool::new(false))));
    let address = serve("127.0.0.1:0".parse().unwrap(), metrics, readiness).unwrap();

    // A request head of 100 KiB: refused with 431, not read to its end.
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n", "a".repeat(100 * 1024));
    let _ = stream.write_all(huge.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 431"), "{}", &response[..response.len().min(100)]);

    // 100 clients that connect and send a byte now and then (slowloris): no more than
    // MAX_CONNECTIONS threads serve them, and each is dropped after the deadline.
    let started = std::time::Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..100).map(|_| std::net::TcpStream::connect(address).unwrap()).collect();
    for stream in &mut idle {
        let _ = stream.write_all(b"G");
    }
    std::thread::sleep(Duration::from_millis(500));
    let serving = threads_named("metrics-conn");
    assert!(serving <= MAX_CONNECTIONS, "{serving} connection threads for 100 idle clients");
    for stream in &mut idle {
        let _ = stream.write_all(b"E");
    }
    // Past the deadline every slow client has been disconnected: a read sees the end.
    std::thread::sleep(REQUEST_DEADLINE + Duration::from_secs(1));
    for stream in &mut idle {
        stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        assert!(matches!(stream.read(&mut buf), Ok(0) | Err(_)), "a slow client was kept");
    }
    assert_eq!(threads_named("metrics-conn"), 0);
    // And the endpoint answers again.
    assert_eq!(get(address, "/healthz").0, 200);
    assert!(started.elapsed() < REQUEST_DEADLINE * 3);
}

#[test]
fn process_n_listens_on_port_plus_n_and_a_taken_port_is_an_error_naming_the_key() {
    assert_eq!(server::address_for("127.0.0.1:9898", 0).unwrap(), "127.0.0.1:9898".parse().unwrap());
    assert_eq!(server::address_for("127.0.0.1:9898", 2).unwrap(), "127.0.0.1:9900".parse().unwrap());
    assert_eq!(server::address_for("127.0.0.1:0", 2).unwrap().port(), 0);
    assert!(server::address_for("no port", 0).is_err());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let error = serve(taken.local_addr().unwrap(), Arc::new(Metrics::new()), Arc::new(Readiness::new(1, stop)))
        .unwrap_err()
        .to_string();
    assert!(error.contains("[metrics] listen"), "{error}");
}

#[test]
fn nvidia_smi_output_and_cuda_devices_are_read() {
    let samples = devices::parse_nvidia_smi("0, 1024, 81559, 37\n1, 0, 81559, 0\ngarbage\n");
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].memory_used_bytes, 1024 * 1024 * 1024);
    assert_eq!(samples[0].memory_total_bytes, 81559 * 1024 * 1024);
    assert!((samples[0].utilization_ratio - 0.37).abs() < 1e-12);
    let devices: Vec<String> = ["cpu", "cuda:1", "cuda", "cuda:1"].iter().map(|s| s.to_string()).collect();
    assert_eq!(devices::cuda_ordinals(&devices), vec![0, 1]);
    assert!(devices::cuda_ordinals(&["cpu".to_string()]).is_empty());
}
