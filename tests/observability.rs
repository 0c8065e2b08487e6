//! Observability end to end, against the real services: Prometheus (Debian's package, started
//! by `scripts/prometheus` on its own port and folder) scrapes a running `dlpipe run` that reads
//! labelled Fashion-MNIST records and some bad ones from the real Kafka; then every PromQL
//! expression of every Grafana dashboard panel must return data, and every alerting rule must
//! be loaded, evaluate without error, and parse as a query. The counters Prometheus scraped must
//! match what was produced. The rules also pass `promtool check rules` and their unit tests.

mod common;

use common::KillOnDrop;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Grafana variables of the dashboards, as the test sets them: every process, and a rate
/// window that covers the whole test's traffic.
const VARIABLES: [(&str, &str); 2] = [("$__rate_interval", "1m"), ("$instance", ".*")];

/// Panels whose description carries this marker only have data on CUDA devices.
const GPU_MARKER: &str = "requires gpu";

struct Panel {
    dashboard: String,
    title: String,
    gpu_only: bool,
    exprs: Vec<String>,
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = common::root().join("grafana/dashboards");
    let mut out: Vec<(PathBuf, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn panels() -> Vec<Panel> {
    let mut panels = Vec::new();
    for (path, json) in dashboards() {
        for panel in json["panels"].as_array().unwrap() {
            let exprs: Vec<String> = panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["expr"].as_str().expect("every target has an expr").to_owned())
                .collect();
            panels.push(Panel {
                dashboard: path.file_name().unwrap().to_string_lossy().into_owned(),
                title: panel["title"].as_str().unwrap().to_owned(),
                gpu_only: panel["description"].as_str().unwrap_or("").to_lowercase().contains(GPU_MARKER),
                exprs,
            });
        }
    }
    panels
}

/// A dashboard expression with the Grafana variables replaced; panics on one it does not know.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (name, value) in VARIABLES {
        out = out.replace(name, value);
    }
    assert!(!out.contains('$'), "unknown Grafana variable in {expr}");
    out
}

/// `promtool`'s exit status and output.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(common::root().join("grafana"))
        .output()
        .expect("run promtool (Debian's prometheus package; scripts/prometheus install)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok, "promtool check rules grafana/alerts.yml:\n{out}");
    let rules = std::fs::read_to_string(common::root().join("grafana/alerts.yml")).unwrap();
    let alerts = rules.matches("- alert:").count();
    assert!(out.contains(&format!("SUCCESS: {alerts} rules found")), "{out}");
    for name in [
        "DlpipeConsumerLagGrowing",
        "DlpipeDeadLetterRateHigh",
        "DlpipeAccuracyDropping",
        "DlpipeFrontierStalled",
        "DlpipePipelineStalled",
    ] {
        assert!(rules.contains(&format!("- alert: {name}")), "alerts.yml lacks {name}");
    }
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(ok, "promtool test rules grafana/alerts.test.yml:\n{out}");
}

#[test]
fn dashboards_use_a_prometheus_datasource_variable_and_are_provisioned() {
    let dashboards = dashboards();
    assert_eq!(dashboards.len(), 3, "overview, model quality, devices");
    for (path, json) in &dashboards {
        let name = path.display();
        let vars = json["templating"]["list"].as_array().unwrap();
        let ds =
            vars.iter().find(|v| v["type"] == "datasource").unwrap_or_else(|| panic!("{name}: no datasource variable"));
        assert_eq!(ds["query"], "prometheus", "{name}");
        let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());
        let uids: std::collections::BTreeSet<String> = json["panels"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| {
                let mut uids = vec![p["datasource"]["uid"].as_str().unwrap_or("none").to_owned()];
                uids.extend(
                    p["targets"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t["datasource"]["uid"].as_str().unwrap_or("none").to_owned()),
                );
                uids
            })
            .collect();
        assert_eq!(
            uids.into_iter().collect::<Vec<_>>(),
            vec![ds_ref],
            "{name}: every panel and target uses the variable"
        );
        assert!(json["uid"].is_string() && json["title"].is_string(), "{name}");
    }
    let provisioning = common::root().join("grafana/provisioning");
    let dashboards_yml = std::fs::read_to_string(provisioning.join("dashboards/dlpipe.yml")).unwrap();
    assert!(dashboards_yml.contains("path: ${DLPIPE_GRAFANA_DIR}/dashboards"), "{dashboards_yml}");
    let datasource_yml = std::fs::read_to_string(provisioning.join("datasources/dlpipe.yml")).unwrap();
    assert!(datasource_yml.contains("type: prometheus") && datasource_yml.contains("url: http://127.0.0.1:9090"));
    // Every panel has a query, and GPU-only panels are marked as such in their description.
    for p in panels() {
        assert!(!p.exprs.is_empty(), "{}: panel {:?} has no query", p.dashboard, p.title);
        if p.exprs.iter().any(|e| e.contains("dlpipe_device_")) {
            assert!(p.gpu_only, "{}: panel {:?} shows GPU metrics without the marker", p.dashboard, p.title);
        }
    }
}

/// Prometheus started by `scripts/prometheus` on its own port, data folder and targets; stopped
/// when dropped.
struct Prometheus {
    home: tempfile::TempDir,
    port: u16,
    agent: ureq::Agent,
}

impl Prometheus {
    fn script(&self, command: &str, targets: &str) -> std::process::Output {
        Command::new(common::root().join("scripts/prometheus"))
            .arg(command)
            .env("DLPIPE_PROMETHEUS_PORT", self.port.to_string())
            .env("DLPIPE_PROMETHEUS_HOME", self.home.path())
            .env("DLPIPE_METRICS_TARGETS", targets)
            .env("DLPIPE_SCRAPE_INTERVAL", "1s")
            .output()
            .expect("run scripts/prometheus")
    }

    fn start(targets: &str) -> Prometheus {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let prometheus = Prometheus { home: tempfile::tempdir().unwrap(), port: common::free_port(), agent };
        let out = prometheus.script("start", targets);
        assert!(out.status.success(), "scripts/prometheus start failed:\n{}", String::from_utf8_lossy(&out.stderr));
        prometheus
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = self.agent.get(format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        let mut response = request.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = response.body_mut().read_to_string().unwrap();
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// An instant query: Prometheus' answer (`status`, `data.result`, `error`).
    fn query(&self, expr: &str) -> Value {
        self.get("/api/v1/query", &[("query", expr)])
    }

    /// The single value of a query that returns one series.
    fn value(&self, expr: &str) -> Option<f64> {
        let answer = self.query(expr);
        let result = answer["data"]["result"].as_array()?;
        (result.len() == 1).then(|| result[0]["value"][1].as_str().unwrap().parse().unwrap())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.script("stop", "");
    }
}

fn record(id: &str, path: &Path, label: &str) -> String {
    serde_json::json!({"id": id, "uri": format!("file://{}", path.display()), "label": label}).to_string()
}

/// One wave of traffic: `good` labelled images from the `skip`-th on and three bad records
/// (a missing file, a payload that is not JSON, an unsupported scheme), over two partitions.
fn wave(topic: &str, wave: usize, good: usize, skip: usize) -> (usize, usize) {
    let mut messages: Vec<(i32, String, String)> = common::fashion(good, skip)
        .iter()
        .enumerate()
        .map(|(i, (path, label))| {
            let id = format!("w{wave}-{i}");
            (i as i32 % 2, id.clone(), record(&id, path, label))
        })
        .collect();
    let bad = [
        record(&format!("w{wave}-missing"), &common::root().join("data/no-such-image.png"), "bag"),
        "{\"id\": \"broken".to_owned(),
        serde_json::json!({"id": format!("w{wave}-s3"), "uri": "hdfs://bucket/cat.jpg"}).to_string(),
    ];
    for (i, payload) in bad.iter().enumerate() {
        messages.insert(5 * i + 1, (i as i32 % 2, format!("w{wave}-bad{i}"), payload.clone()));
    }
    common::produce(topic, 2, &messages);
    (good, bad.len())
}

/// `n` images without labels, and then their labels on the feedback topic; returns `n`.
fn late_labels(topic: &str, feedback_topic: &str, n: usize, skip: usize) -> usize {
    let images = common::fashion(n, skip);
    let unlabelled: Vec<(i32, String, String)> = images
        .iter()
        .enumerate()
        .map(|(i, (path, _))| {
            let id = format!("late-{i}");
            let payload = serde_json::json!({"id": id, "uri": format!("file://{}", path.display())}).to_string();
            (i as i32 % 2, id, payload)
        })
        .collect();
    common::produce(topic, 2, &unlabelled);
    std::thread::sleep(Duration::from_secs(1));
    let labels: Vec<(i32, String, String)> = images
        .iter()
        .enumerate()
        .map(|(i, (_, label))| (i as i32 % 2, format!("late-{i}"), serde_json::json!({"label": label}).to_string()))
        .collect();
    common::produce(feedback_topic, 2, &labels);
    n
}

fn get_status(address: &str, path: &str) -> Option<u16> {
    get_response(address, path).map(|(status, _)| status)
}

/// The status and body of `GET path` from the metrics endpoint at `address`.
fn get_response(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
    Some((status, body))
}

#[test]
fn every_dashboard_panel_has_data_and_every_alert_evaluates_against_a_real_prometheus() {
    let started = Instant::now();
    let brokers = common::kafka_brokers();
    let input = common::unique("obs-images");
    let metrics_address = format!("127.0.0.1:{}", common::free_port());
    let prometheus = Prometheus::start(&metrics_address);
    eprintln!("prometheus ready on port {} after {:.1}s", prometheus.port, started.elapsed().as_secs_f64());

    // Records waiting before the pipeline starts (so lag and end-to-end latency have something
    // to show), then more waves while it runs.
    let (mut good, mut bad) = wave(&input, 0, 40, 8000);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ndir = \"{models}\"\n\n[kafka]\nbrokers = \"{brokers}\"\n\n[metrics]\nlisten = \"{metrics_address}\"\n\n\
             [pipeline]\ninput_topic = \"{input}\"\npredictions_topic = \"{input}-pred\"\n\
             dead_letter_topic = \"{input}-dead\"\nmodel_topic = \"{input}-models\"\ngroup_id = \"{input}-group\"\n\
             snapshot_dir = \"{snapshots}\"\ntopic_partitions = 2\nstatus_interval_secs = 2\n\
             epochs = {{ by = \"time\", millis = 500 }}\nfeedback_topic = \"{input}-feedback\"\n",
            models = common::root().join("models").display(),
            snapshots = dir.path().join("snapshots").display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut run = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_dlpipe"))
            .arg("-c")
            .arg(&config)
            .args(["run", "-w", "2"])
            .current_dir(common::root())
            .env_remove("DLPIPE_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let run_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    while get_status(&metrics_address, "/readyz") != Some(200) {
        assert!(run.0.try_wait().unwrap().is_none(), "dlpipe run exited:\n{}", run_log());
        assert!(Instant::now() < deadline, "/readyz not 200 within 60 s:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get_status(&metrics_address, "/healthz"), Some(200));
    eprintln!("pipeline ready after {:.1}s", started.elapsed().as_secs_f64());

    // A challenger in shadow, scored beside the champion from a second from now: the run's own
    // first snapshot.
    let snapshot = dir.path().join("snapshots/latest.safetensors");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !snapshot.exists() {
        assert!(Instant::now() < deadline, "no snapshot within 30 s:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let challenger = dir.path().join("challenger.safetensors");
    std::fs::copy(&snapshot, &challenger).unwrap();
    let (config_arg, challenger_arg) = (config.to_str().unwrap(), challenger.to_str().unwrap());
    let promoted = common::dlpipe(&["-c", config_arg, "promote", challenger_arg, "--shadow", "--in", "1"]);
    assert!(promoted.status.success(), "dlpipe promote:\n{}", String::from_utf8_lossy(&promoted.stderr));

    for w in 1..=2 {
        std::thread::sleep(Duration::from_secs(3));
        let (g, b) = wave(&input, w, 30, 8000 + 100 * w);
        good += g;
        bad += b;
    }
    // Images whose labels come on the feedback topic (keyed by id, the payload without one).
    let late = late_labels(&input, &format!("{input}-feedback"), 10, 8300);
    good += late;
    // The malformed JSON record has no id and no uri: it is dead-lettered all the same.
    let total = good + bad;

    // Wait until Prometheus has scraped every output: the counters must then say exactly what
    // was produced.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let published = prometheus.value("sum(dlpipe_messages_published_total)").unwrap_or(0.0);
        if published as usize == total {
            break;
        }
        assert!(run.0.try_wait().unwrap().is_none(), "dlpipe run exited:\n{}", run_log());
        assert!(Instant::now() < deadline, "Prometheus saw {published} of {total} published:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("all {total} records published and scraped after {:.1}s", started.elapsed().as_secs_f64());
    // Every worker learns every labelled example, the late ones too.
    let labelled = good as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus.value("min(dlpipe_model_version)") != Some(labelled) {
        assert!(Instant::now() < deadline, "the late labels were not all learned:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let checks = [
        ("sum(dlpipe_records_consumed_total)", (total + late) as f64),
        ("sum(dlpipe_feedback_joined_total)", late as f64),
        ("sum(dlpipe_feedback_retained_records)", late as f64),
        ("sum(dlpipe_records_predicted_total)", good as f64),
        ("sum(dlpipe_records_dead_lettered_total)", bad as f64),
        ("sum(dlpipe_records_dead_lettered_total{reason=\"not_found\"})", 3.0),
        ("sum(dlpipe_records_dead_lettered_total{reason=\"malformed_json\"})", 3.0),
        ("sum(dlpipe_records_dead_lettered_total{reason=\"unsupported_scheme\"})", 3.0),
        ("sum(dlpipe_featurize_batch_records_sum)", good as f64),
        ("max(dlpipe_model_version)", labelled),
        ("max(sum by (worker) (dlpipe_learner_examples_total))", labelled),
        ("max(dlpipe_learner_classes)", 10.0),
        ("count(dlpipe_build_info)", 1.0),
        // The shadow's prequential accuracy, both windows, from each worker.
        ("count(dlpipe_online_accuracy_ratio{model=\"shadow\"})", 4.0),
    ];
    for (expr, want) in checks {
        // Gauges refresh once a second: give the last scrape a moment to catch up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = prometheus.value(expr);
        while got != Some(want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            got = prometheus.value(expr);
        }
        assert_eq!(got, Some(want), "{expr}");
    }

    // Every panel's every query returns data (GPU-only panels excepted on a run without CUDA).
    let panels = panels();
    let mut empty: BTreeMap<String, String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut evaluated = 0;
    loop {
        empty.clear();
        for panel in panels.iter().filter(|p| !p.gpu_only) {
            for expr in &panel.exprs {
                let answer = prometheus.query(&substitute(expr));
                assert_eq!(answer["status"], "success", "{} / {}: {expr}: {answer}", panel.dashboard, panel.title);
                evaluated += 1;
                if answer["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                    empty.insert(format!("{} / {}", panel.dashboard, panel.title), expr.clone());
                }
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(empty.is_empty(), "panels without data: {empty:#?}\n{}", run_log());
    let skipped: Vec<&str> = panels.iter().filter(|p| p.gpu_only).map(|p| p.title.as_str()).collect();
    let checked = panels.len() - skipped.len();
    eprintln!("{checked} panels returned data ({evaluated} queries); GPU-only panels not checked on CPU: {skipped:?}");
    assert!(checked >= 25, "only {checked} panels checked");

    // Every alerting rule of grafana/alerts.yml is loaded, has been evaluated without error,
    // and its expression evaluates as a query.
    let file_rules =
        std::fs::read_to_string(common::root().join("grafana/alerts.yml")).unwrap().matches("- alert:").count();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rules = loop {
        let answer = prometheus.get("/api/v1/rules", &[]);
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        if rules.iter().all(|r| r["health"] == "ok") && rules.len() == file_rules || Instant::now() > deadline {
            break rules;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(rules.len(), file_rules, "Prometheus loaded every rule of grafana/alerts.yml");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule {} failed to evaluate: {}", rule["name"], rule["lastError"]);
        let answer = prometheus.query(rule["query"].as_str().unwrap());
        assert_eq!(answer["status"], "success", "rule {}: {answer}", rule["name"]);
    }
    eprintln!("{} alerting rules loaded and evaluated", rules.len());

    // The status line reports throughput, lag and accuracy.
    let status = run_log();
    let line =
        status.lines().rev().find(|l| l.contains(" status ")).unwrap_or_else(|| panic!("no status line:\n{status}"));
    for field in ["throughput", "lag", "accuracy"] {
        assert!(line.contains(field), "status line without {field}: {line}");
    }

    // SIGTERM: the pipeline stops gracefully and exits 0.
    let pid = run.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = run.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "dlpipe run did not stop within 30 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "dlpipe run exited with {status}:\n{}", run_log());
    eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
}

/// A stalled worker is not silent. A labelled record behind a server that does not answer
/// holds its epoch open (the learner must have it before any later prediction); past
/// `stall_after_secs` the worker's `dlpipe_pipeline_stalled_seconds` rises, Prometheus'
/// DlpipePipelineStalled rule becomes active on it, `/readyz` answers 503 naming the partition
/// and offset it waits for, and so does the status line. Once the server answers, the worker
/// is ready again and the run finishes.
#[test]
fn a_stalled_worker_raises_its_gauge_and_alert_and_readyz_and_names_the_record_it_waits_for() {
    let metrics_address = format!("127.0.0.1:{}", common::free_port());
    let prometheus = Prometheus::start(&metrics_address);
    let input = common::unique("stall-images");
    let images = common::fashion(24, 9700);
    let mut messages = common::run::messages(&images, "s", 2, |_| true);
    let release = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let server = common::tarpit_server(std::fs::read(&images[0].0).unwrap(), std::sync::Arc::clone(&release));
    // Message 11: partition 1, offset 5, epoch 1 of offset epochs of 4 records.
    let slow = serde_json::json!({"id": "slow", "uri": format!("{server}/slow.png"), "label": "bag"});
    messages[11] = (1, "slow".into(), slow.to_string());
    common::produce(&input, 2, &messages);
    let run =
        common::run::Run::new("stall", &input, "epochs = { by = \"offsets\", records = 4 }\nstall_after_secs = 2\n");
    let config = std::fs::read_to_string(run.config()).unwrap();
    let config = config
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{metrics_address}\""))
        .replace("[fetch]\n", "[fetch]\ntimeout_ms = 300000\ntotal_timeout_ms = 300000\n");
    std::fs::write(run.config(), config).unwrap();
    let (mut child, log) = run.spawn(&["--stop-at-end", "-w", "1"]);
    let run_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let waits_for = "partition 1 offset 5";
    let deadline = Instant::now() + Duration::from_secs(90);
    let readyz = loop {
        if let Some((503, body)) = get_response(&metrics_address, "/readyz").filter(|(_, b)| b.contains(waits_for)) {
            break body;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "dlpipe run exited:\n{}", run_log());
        assert!(Instant::now() < deadline, "/readyz never reported the stall:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(readyz.contains(&format!("epoch 1: records read and not yet published: {waits_for}")), "{readyz}");
    let (_, metrics) = get_response(&metrics_address, "/metrics").unwrap();
    let stalled: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dlpipe_pipeline_stalled_seconds{worker=\"0\"} "))
        .unwrap_or_else(|| panic!("no stalled gauge:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(stalled >= 2.0, "stalled for {stalled} s");

    // Prometheus, scraping every second, has the alert active (pending for its minute, then firing).
    let deadline = Instant::now() + Duration::from_secs(30);
    let alert = loop {
        let answer = prometheus.get("/api/v1/rules", &[]);
        let rule = answer["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .find(|r| r["name"] == "DlpipePipelineStalled")
            .expect("the rule is loaded");
        if rule["state"] != "inactive" || Instant::now() > deadline {
            break rule;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(["pending", "firing"].contains(&alert["state"].as_str().unwrap()), "{alert}");
    assert_eq!(alert["alerts"][0]["labels"]["worker"], "0", "{alert}");

    let deadline = Instant::now() + Duration::from_secs(20);
    while !run_log().lines().any(|l| l.contains(" status ") && l.contains(waits_for)) {
        assert!(Instant::now() < deadline, "no status line names the record:\n{}", run_log());
        std::thread::sleep(Duration::from_millis(200));
    }

    common::release(&release);
    common::run::succeeds(&mut child, &log, Duration::from_secs(120));
    let predictions = common::run::read_topic(&run.predictions, images.len(), Duration::from_secs(5));
    assert_eq!(predictions.len(), images.len(), "every record predicted once the fetch is answered");
}
