//! Checks of deploy/: what each pod of the Kubernetes StatefulSet runs, and the compose stack.
//! Here, beside the CLI, so that the pods' arguments go through dlpipe's own parser and peer
//! list; no cluster or container engine is needed.

use super::run::{timely_config, RunArgs};
use super::{Cli, Command};
use clap::Parser;
use dlpipe::config::Config;
use serde::Deserialize;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of the files in `dir`, as JSON values.
fn documents(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            docs.push(Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display())));
        }
    }
    docs
}

/// The one object of `kind` (and `name`, if given).
fn object<'a>(docs: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> =
        docs.iter().filter(|d| d["kind"] == kind && name.is_none_or(|n| d["metadata"]["name"] == n)).collect();
    assert_eq!(found.len(), 1, "one {kind} {name:?} in deploy/kubernetes, found {}", found.len());
    found[0]
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_else(|| panic!("not a string: {value}"))
}

/// The `dlpipe run` arguments of a container's command line, through dlpipe's parser.
fn parse_run(command_line: &[String]) -> RunArgs {
    match Cli::try_parse_from(command_line).unwrap_or_else(|e| panic!("{command_line:?}: {e}")).command {
        Command::Run(args) => args,
        other => panic!("{command_line:?} is not dlpipe run but {other:?}"),
    }
}

/// Strings of a JSON array.
fn strings(value: &Value) -> Vec<String> {
    value.as_array().unwrap_or_else(|| panic!("not a list: {value}")).iter().map(|v| text(v).to_owned()).collect()
}

/// The container port named `name` (or numbered so).
fn container_port(container: &Value, name: &Value) -> u64 {
    if let Some(number) = name.as_u64() {
        return number;
    }
    let ports = container["ports"].as_array().unwrap();
    let port = ports.iter().find(|p| p["name"] == *name).unwrap_or_else(|| panic!("no container port {name}"));
    port["containerPort"].as_u64().unwrap()
}

/// The status line of `GET path` on `address`.
fn http_status(address: std::net::SocketAddr, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn each_statefulset_pod_is_the_timely_process_of_its_ordinal() {
    let docs = documents(&repo().join("deploy/kubernetes"));
    let set = object(&docs, "StatefulSet", None);
    let spec = &set["spec"];
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], format!("dlpipe:{}", env!("CARGO_PKG_VERSION")));
    let command_line: Vec<String> =
        strings(&container["command"]).into_iter().chain(strings(&container["args"])).collect();
    assert_eq!(command_line[0], "/opt/dlpipe/bin/dlpipe");
    let args = parse_run(&command_line);
    let replicas = spec["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, args.processes, "the StatefulSet's replicas and its pods' -n must be the same");
    // With OrderedReady, pod 1 would wait for pod 0 to be ready, which needs pod 1.
    assert_eq!(spec["podManagementPolicy"], "Parallel");
    // A rolling update would stop at its first pod, unready among peers of the old revision.
    assert_eq!(spec["updateStrategy"]["type"], "OnDelete");

    // The peers each pod dials are the names the headless service gives the pods.
    let service_name = text(&spec["serviceName"]);
    let service = object(&docs, "Service", Some(service_name));
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true, "peers connect before any pod is ready");
    let labels = &spec["template"]["metadata"]["labels"];
    for selector in [&spec["selector"]["matchLabels"], &service["spec"]["selector"]] {
        assert!(selector.as_object().unwrap().iter().all(|(k, v)| labels[k] == *v), "{selector} selects no pod");
    }
    let set_name = text(&set["metadata"]["name"]);
    let timely_port = service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "timely").unwrap();
    let port = container_port(container, &timely_port["targetPort"]);
    assert_eq!(timely_port["port"].as_u64(), Some(port));
    for ordinal in 0..replicas {
        let hostname = format!("{set_name}-{ordinal}");
        let (timely, metrics_offset) = timely_config(&args, &|| Ok(hostname.clone())).unwrap();
        assert_eq!(metrics_offset, 0, "one metrics port for every pod");
        let timely::CommunicationConfig::Cluster { process, addresses, .. } = timely.communication else {
            panic!("pod {ordinal} runs no cluster: {:?}", timely.communication)
        };
        assert_eq!(process, ordinal);
        for (peer, address) in addresses.iter().enumerate() {
            let (host, address_port) = address.rsplit_once(':').unwrap();
            assert_eq!(address_port, port.to_string(), "{hostname} -> {address}");
            if peer == ordinal {
                assert_eq!(host, "0.0.0.0", "{hostname} listens on its own pod");
                continue;
            }
            let dns = format!("{set_name}-{peer}.{service_name}");
            assert!(host == dns || host.starts_with(&format!("{dns}.")), "{hostname} dials {address}, not pod {peer}");
        }
    }
    let config = pod_config(&docs, container, &command_line);
    pod_probes(container, &config, &args);
    let budget = object(&docs, "PodDisruptionBudget", None);
    let selector = budget["spec"]["selector"]["matchLabels"].as_object().unwrap();
    assert!(selector.iter().all(|(k, v)| labels[k] == *v), "the disruption budget selects no pod");
    network_policy(&docs, labels);
}

/// Only dlpipe's pods may open timely connections to them; their metrics port is open.
fn network_policy(docs: &[Value], labels: &Value) {
    let policy = &object(docs, "NetworkPolicy", None)["spec"];
    let selects = |selector: &Value| selector["matchLabels"].as_object().unwrap().iter().all(|(k, v)| labels[k] == *v);
    assert!(selects(&policy["podSelector"]), "the network policy selects no pod");
    let rules = policy["ingress"].as_array().unwrap();
    let allows = |port: &'static str| {
        let rules = rules.iter().filter(move |r| r["ports"].as_array().unwrap().iter().any(|p| p["port"] == port));
        rules.collect::<Vec<_>>()
    };
    assert!(!allows("timely").is_empty() && !allows("metrics").is_empty(), "{policy}");
    for rule in allows("timely") {
        let from = rule["from"].as_array().expect("timely's port is open only to some pods");
        assert!(from.iter().all(|f| selects(&f["podSelector"]) && f["namespaceSelector"].is_null()), "{rule}");
    }
}

/// The configuration a pod runs with: the ConfigMap's file at `-c`, under the container's
/// environment (secrets from the Secret); checked as `dlpipe config check` does.
fn pod_config(docs: &[Value], container: &Value, command_line: &[String]) -> Config {
    let cli = Cli::try_parse_from(command_line).unwrap();
    let path = cli.config.expect("the pod names its config file with -c");
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| path.starts_with(text(&m["mountPath"]))).expect("-c is in a mounted volume");
    let volumes = docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap()["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
    let map = object(docs, "ConfigMap", Some(text(&volume["configMap"]["name"])));
    let key = path.strip_prefix(text(&mount["mountPath"])).unwrap().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlpipe.toml");
    std::fs::write(&file, text(&map["data"][key])).unwrap();

    let mut env = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let value = match &var["valueFrom"]["secretKeyRef"] {
            Value::Null => text(&var["value"]).to_owned(),
            secret => {
                let data = &object(docs, "Secret", Some(text(&secret["name"])))["stringData"];
                text(&data[text(&secret["key"])]).to_owned()
            }
        };
        env.push((text(&var["name"]).to_owned(), value));
    }
    let layered = Config::load_layered(Some(&file), env.clone()).unwrap_or_else(|e| panic!("{e}"));
    layered.config.validate_run().unwrap_or_else(|e| panic!("config check: {e}"));
    // Every variable took part: the secrets reach the Kafka clients.
    let mut names: Vec<String> = env.iter().map(|(name, _)| name.clone()).collect();
    names.sort();
    assert_eq!(layered.env_names, names);
    let secret = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(Some(layered.config.kafka.brokers.clone()), secret("DLPIPE__KAFKA__BROKERS"));
    assert_eq!(layered.config.kafka.properties.get("sasl.password").cloned(), secret("DLPIPE_KAFKA__SASL_PASSWORD"));
    layered.config
}

/// The readiness and liveness probes ask the metrics server of `config` what it answers.
fn pod_probes(container: &Value, config: &Config, args: &RunArgs) {
    let listen = dlpipe::metrics::server::address_for(&config.metrics.listen, 0).unwrap();
    assert!(listen.ip().is_unspecified(), "{listen}: the kubelet probes the pod's address");
    let ready = &container["readinessProbe"]["httpGet"];
    let live = &container["livenessProbe"]["httpGet"];
    for probe in [ready, live] {
        assert_eq!(container_port(container, &probe["port"]), u64::from(listen.port()), "{probe}");
    }
    let readiness = Arc::new(dlpipe::metrics::Readiness::new(args.workers, Arc::new(AtomicBool::new(false))));
    let metrics = Arc::new(dlpipe::metrics::Metrics::new());
    let bound = dlpipe::metrics::serve("127.0.0.1:0".parse().unwrap(), metrics, Arc::clone(&readiness)).unwrap();
    assert!(http_status(bound, text(&ready["path"])).contains(" 503 "), "unready before the workers start");
    assert!(http_status(bound, text(&live["path"])).contains(" 200 "));
    for _ in 0..args.workers {
        readiness.worker_ready();
    }
    assert!(http_status(bound, text(&ready["path"])).contains(" 200 "));
}

/// One YAML file as JSON.
fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A compose service's bind mounts: (the repository path, the path in the container).
fn bind_mounts(service: &Value, compose_dir: &Path) -> Vec<(PathBuf, String)> {
    let volumes = service["volumes"].as_array().map_or(&[][..], Vec::as_slice);
    volumes
        .iter()
        .map(text)
        .filter(|v| v.starts_with('.'))
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (compose_dir.join(parts[0]), parts[1].to_owned())
        })
        .collect()
}

#[test]
fn the_compose_stack_wires_kafka_dlpipe_prometheus_and_grafana() {
    let dir = repo().join("deploy");
    let compose = yaml_file(&dir.join("compose.yaml"));
    let services = &compose["services"];
    for (name, service) in services.as_object().unwrap() {
        for (source, target) in bind_mounts(service, &dir) {
            assert!(source.exists(), "{name} mounts {} at {target}: not in the repository", source.display());
        }
    }
    let published = |service: &Value, port: u16| strings(&service["ports"]).contains(&format!("{port}:{port}"));

    // The broker: the Kafka version scripts/kafka runs, in KRaft mode, with a listener for the
    // other containers and one for the host.
    let kafka = &services["kafka"];
    let pom = std::fs::read_to_string(repo().join("scripts/kafka-dist/pom.xml")).unwrap();
    let version = pom.split("<kafka.version>").nth(1).and_then(|v| v.split('<').next()).unwrap();
    assert_eq!(kafka["image"], format!("apache/kafka:{version}"));
    assert!(text(&kafka["environment"]["KAFKA_PROCESS_ROLES"]).contains("controller"), "KRaft: its own controller");
    let advertised = text(&kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]);
    assert!(advertised.contains("//localhost:9092") && published(kafka, 9092), "{advertised}");

    // dlpipe: its command line through dlpipe's parser, its config (the image's copy of a file
    // of configs/) under its environment through `config check`'s checks.
    let dlpipe = &services["dlpipe"];
    assert_eq!(dlpipe["image"], format!("dlpipe:{}", env!("CARGO_PKG_VERSION")));
    let command_line: Vec<String> =
        strings(&dlpipe["entrypoint"]).into_iter().chain(strings(&dlpipe["command"])).collect();
    let args = parse_run(&command_line);
    assert_eq!(args.processes, 1);
    let config_path = Cli::try_parse_from(&command_line).unwrap().config.unwrap();
    let in_repo = repo().join(config_path.strip_prefix("/opt/dlpipe").expect("a config the image carries"));
    let env: Vec<(String, String)> = dlpipe["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, value)| (name.clone(), text(value).to_owned()))
        .collect();
    let config = Config::load_layered(Some(&in_repo), env).unwrap_or_else(|e| panic!("{e}")).config;
    config.validate_run().unwrap_or_else(|e| panic!("config check: {e}"));
    let brokers = format!("//{}", config.kafka.brokers);
    assert!(advertised.split(',').any(|l| l.ends_with(&brokers)), "dlpipe's brokers are not a listener of kafka");
    let metrics_port = dlpipe::metrics::server::address_for(&config.metrics.listen, 0).unwrap().port();
    assert!(published(dlpipe, metrics_port));

    // Prometheus scrapes dlpipe's metrics port and loads dlpipe's alerts.
    let prometheus = &services["prometheus"];
    let mounts = bind_mounts(prometheus, &dir);
    let in_container = |repo_path: &Path| {
        let canonical = repo_path.canonicalize().unwrap();
        mounts.iter().find(|(s, _)| s.canonicalize().unwrap() == canonical).map(|(_, t)| t.clone())
    };
    let scrape_config = &mounts.iter().find(|(_, t)| t == "/etc/prometheus/prometheus.yml").unwrap().0;
    let scrape = yaml_file(scrape_config);
    let targets = strings(&scrape["scrape_configs"][0]["static_configs"][0]["targets"]);
    assert_eq!(targets, [format!("dlpipe:{metrics_port}")]);
    assert_eq!(strings(&scrape["rule_files"]), [in_container(&repo().join("grafana/alerts.yml")).unwrap()]);
    assert!(published(prometheus, 9090));

    // Grafana: dlpipe's dashboards where its provisioning looks for them, and the repository's
    // datasource with the Prometheus service's address.
    let grafana = &services["grafana"];
    let mounts = bind_mounts(grafana, &dir);
    let target_of = |repo_path: &str| {
        let canonical = repo().join(repo_path).canonicalize().unwrap();
        mounts.iter().find(|(s, _)| s.canonicalize().unwrap() == canonical).map(|(_, t)| t.clone())
    };
    let grafana_dir = text(&grafana["environment"]["DLPIPE_GRAFANA_DIR"]);
    assert_eq!(target_of("grafana/dashboards"), Some(format!("{grafana_dir}/dashboards")));
    assert_eq!(target_of("grafana/provisioning/dashboards").as_deref(), Some("/etc/grafana/provisioning/dashboards"));
    let ours = yaml_file(&repo().join("grafana/provisioning/datasources/dlpipe.yml"))["datasources"][0].clone();
    let source = mounts.iter().find(|(_, t)| t.starts_with("/etc/grafana/provisioning/datasources/")).unwrap();
    let compose_source = yaml_file(&source.0)["datasources"][0].clone();
    for key in ["name", "uid", "type"] {
        assert_eq!(compose_source[key], ours[key], "{key}");
    }
    assert_eq!(compose_source["url"], "http://prometheus:9090");
    assert!(published(grafana, 3000));
}
