//! dlpipe against Kafka brokers as users meet them, each a real broker this test starts with
//! `scripts/kafka` on its own ports and storage:
//! - a broker that has just started (its coordinators still loading) while dlpipe starts too;
//! - a secured listener: SASL_SSL with SCRAM, a CA generated here, the user created with the
//!   broker's own tool, the password only in the environment; zstd-compressed input;
//! - refusals that no wait cures (a wrong password, a missing topic) fail fast and say what to do;
//! - `scripts/kafka reset`: the broker stopped, its topics gone.

mod common;

use common::broker::Broker;
use common::{fashion, root};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A dlpipe config (its own topics and group) for `brokers`, with extra `[kafka]` lines.
fn config(dir: &Path, name: &str, brokers: &str, kafka_extra: &str, pipeline_extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let toml = format!(
        "[model]\ndir = \"{models}\"\nbatch_size = 8\n\n[metrics]\nlisten = \"\"\n\n\
         [fetch]\nfile_roots = [{dir:?}]\n\n\
         [kafka]\nbrokers = \"{brokers}\"\nretry_timeout_secs = 90\n{kafka_extra}\n\n\
         [pipeline]\ninput_topic = \"{name}-images\"\npredictions_topic = \"{name}-predictions\"\n\
         dead_letter_topic = \"{name}-dead-letters\"\nmodel_topic = \"{name}-models\"\ngroup_id = \"{name}\"\n\
         snapshot_dir = \"{snapshots}\"\ntopic_partitions = 2\nepochs = {{ by = \"offsets\", records = 4 }}\n\
         {pipeline_extra}\n",
        models = root().join("models").display(),
        snapshots = dir.join("snapshots").display(),
        dir = dir.display().to_string(),
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs `dlpipe -c CONFIG ARGS` with extra environment variables.
fn dlpipe(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dlpipe"));
    command.arg("-c").arg(config).args(args).current_dir(root()).env_remove("DLPIPE_KAFKA_BROKERS");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run dlpipe")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[track_caller]
fn succeeds(what: &str, output: &Output) {
    assert!(output.status.success(), "{what} failed ({}):\n{}", output.status, text(output));
}

/// `n` labelled Fashion-MNIST images in one folder per class, for `dlpipe produce --labels-from-dirs`.
fn labelled_images(dir: &Path, n: usize) -> PathBuf {
    let images = dir.join("images");
    for (path, class) in fashion(n, 0) {
        std::fs::create_dir_all(images.join(class)).unwrap();
        std::fs::copy(&path, images.join(class).join(path.file_name().unwrap())).unwrap();
    }
    images
}

/// Produce `n` records, run the pipeline to the end, and read the predictions back: each step
/// a separate dlpipe process, as a user runs them.
fn produce_run_tail(config: &Path, images: &Path, n: usize, env: &[(&str, &str)]) -> String {
    let produced = dlpipe(config, &["produce", "--labels-from-dirs", images.to_str().unwrap()], env);
    succeeds("dlpipe produce", &produced);
    let run = dlpipe(config, &["run", "--stop-at-end"], env);
    succeeds("dlpipe run", &run);
    let expect = n.to_string();
    let tail =
        dlpipe(config, &["tail", "--from-beginning", "--idle-timeout", "20", "--expect", &expect, "--json"], env);
    succeeds("dlpipe tail --expect", &tail);
    let predictions = String::from_utf8_lossy(&tail.stdout).lines().count();
    assert_eq!(predictions, n, "{}", text(&tail));
    text(&run)
}

/// The lines of a dlpipe log that say it waited for Kafka, echoed for the test's output.
fn waits(log: &str) -> Vec<String> {
    let waits: Vec<String> =
        log.lines().filter(|l| l.contains("not ready yet") || l.contains("Kafka is ready")).map(String::from).collect();
    for line in &waits {
        eprintln!("  waited: {line}");
    }
    waits
}

#[test]
fn a_pipeline_started_with_its_broker_waits_for_the_coordinators_and_predicts_every_record() {
    // The newcomer's first `make demo` on a fresh machine: the broker has just been started and
    // answers metadata while it is still creating its group coordinator, and `dlpipe run` is the
    // first client to need one. Here dlpipe starts while the broker's JVM is still starting;
    // nothing else touches a consumer group first.
    let broker = Broker::new(None);
    let dir = tempfile::tempdir().unwrap();
    let images = labelled_images(dir.path(), 12);
    let config = config(dir.path(), "fresh", &broker.plaintext(), "", "");
    broker.launch();
    let produced = dlpipe(&config, &["produce", "--labels-from-dirs", images.to_str().unwrap()], &[]);
    succeeds("dlpipe produce while the broker starts", &produced);
    let run = dlpipe(&config, &["run", "--stop-at-end"], &[]);
    succeeds("dlpipe run as the first group member of a new broker", &run);
    let coordinator = waits(&text(&run)).iter().any(|l| l.contains("coordinator"));
    eprintln!(
        "fresh broker: the run {} for the group coordinator",
        if coordinator { "waited" } else { "did not wait" }
    );
    let tail = dlpipe(&config, &["tail", "--from-beginning", "--idle-timeout", "20", "--expect", "12", "--json"], &[]);
    succeeds("dlpipe tail --expect 12", &tail);

    // The broker restarts under a pipeline that starts at the same moment: it waits for the
    // broker to listen, then for the coordinator to reload, and goes on where the group was.
    succeeds("scripts/kafka stop", &broker.script(&["stop"]).output().unwrap());
    let more = dir.path().join("more");
    for (path, class) in fashion(6, 100) {
        std::fs::create_dir_all(more.join(class)).unwrap();
        std::fs::copy(&path, more.join(class).join(path.file_name().unwrap())).unwrap();
    }
    broker.launch();
    succeeds("dlpipe produce", &dlpipe(&config, &["produce", "--labels-from-dirs", more.to_str().unwrap()], &[]));
    broker.script(&["stop"]).output().unwrap();
    broker.launch();
    let run = dlpipe(&config, &["run", "--stop-at-end"], &[]);
    succeeds("dlpipe run while the broker restarts", &run);
    // The broker's JVM takes seconds to listen: dlpipe must have waited for it at least.
    assert!(waits(&text(&run)).iter().any(|l| l.contains("Kafka is ready")), "no wait was logged:\n{}", text(&run));
    broker.start();
    let tail = dlpipe(&config, &["tail", "--from-beginning", "--idle-timeout", "20", "--expect", "18", "--json"], &[]);
    succeeds("dlpipe tail --expect 18", &tail);
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 18, "{}", text(&tail));
}

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl tool:
/// `ca.pem` for clients, `server.pem` (PKCS#8 key + chain) for the broker.
fn make_tls(dir: &Path) -> PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let openssl = |command_line: &str| {
        let args: Vec<&str> = command_line.split_whitespace().collect();
        let out = Command::new("openssl").args(&args).current_dir(&tls).output().expect("openssl (Debian: openssl)");
        assert!(out.status.success(), "openssl {command_line}: {}", text(&out));
    };
    openssl("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=dlpipe-test-ca");
    openssl("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
    std::fs::write(tls.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile san.ext",
    );
    // A CA that signed nothing here: clients that trust only it must refuse the broker.
    openssl("req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=another-ca");
    let key = std::fs::read_to_string(tls.join("server.key")).unwrap();
    assert!(key.contains("BEGIN PRIVATE KEY"), "the broker's PEM keystore wants a PKCS#8 key");
    let chain = std::fs::read_to_string(tls.join("server.crt")).unwrap();
    std::fs::write(tls.join("server.pem"), format!("{key}{chain}")).unwrap();
    tls
}

/// The compression codec of every record batch in a partition's first log segment
/// (attributes bits 0-2 of the v2 batch header: 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd).
fn batch_codecs(segment: &Path) -> Vec<u8> {
    let bytes = std::fs::read(segment).unwrap();
    let mut codecs = Vec::new();
    let mut at = 0;
    // baseOffset i64, batchLength i32, partitionLeaderEpoch i32, magic i8, crc u32, attributes i16.
    while at + 23 <= bytes.len() {
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if length <= 0 {
            break;
        }
        assert_eq!(bytes[at + 16], 2, "record batch magic");
        codecs.push(bytes[at + 22] & 0x07);
        at += 12 + length as usize;
    }
    codecs
}

#[test]
fn sasl_ssl_with_scram_carries_a_full_run_with_zstd_input_and_a_wrong_password_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path());
    let broker = Broker::new(Some(tls.clone()));
    broker.start();
    let password = r#"s3cret, with [spaces] & "quotes" = $HOME \n"#;
    let user =
        broker.script(&["scram-user", "dlpipe-app"]).env("DLPIPE_KAFKA_SCRAM_PASSWORD", password).output().unwrap();
    succeeds("scripts/kafka scram-user", &user);

    // The same properties for dlpipe (TOML) and the scripts' probe (a properties file); the
    // password is in neither, only in the environment.
    let secured = format!("127.0.0.1:{}", broker.sasl_ssl_port.unwrap());
    let ca = tls.join("ca.pem");
    let properties = [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-512"),
        ("sasl.username", "dlpipe-app"),
        ("ssl.ca.location", ca.to_str().unwrap()),
    ];
    let toml_properties: String = properties.iter().map(|(k, v)| format!("\"{k}\" = \"{v}\"\n")).collect();
    let kafka_extra = format!("\n[kafka.properties]\n{toml_properties}\"compression.type\" = \"zstd\"\n");
    let config = config(dir.path(), "secured", &secured, &kafka_extra, "");
    let password_env = [("DLPIPE_KAFKA__SASL_PASSWORD", password)];

    let probe_file = dir.path().join("client.properties");
    std::fs::write(&probe_file, properties.iter().map(|(k, v)| format!("{k}={v}\n")).collect::<String>()).unwrap();
    let status = Command::new(root().join("scripts/kafka"))
        .arg("status")
        .env("DLPIPE_KAFKA_BROKERS", &secured)
        .env("DLPIPE_KAFKA_PROPERTIES", &probe_file)
        .env("DLPIPE_KAFKA__SASL_PASSWORD", password)
        .output()
        .unwrap();
    succeeds("scripts/kafka status over SASL_SSL", &status);

    let images = labelled_images(dir.path(), 12);
    produce_run_tail(&config, &images, 12, &password_env);

    // The input was produced with zstd, and the broker kept it so: every batch says zstd.
    let data = broker.home.path().join(format!("data-{}", broker.port));
    let codecs: Vec<u8> =
        (0..2).flat_map(|p| batch_codecs(&data.join(format!("secured-images-{p}/00000000000000000000.log")))).collect();
    assert!(!codecs.is_empty() && codecs.iter().all(|&c| c == 4), "input batch codecs {codecs:?} (4 = zstd)");

    // A wrong password: refused at once with what to do, not retried for retry_timeout_secs.
    let started = Instant::now();
    let refused =
        dlpipe(&config, &["tail", "--from-beginning", "--max", "1"], &[("DLPIPE_KAFKA__SASL_PASSWORD", "wrong")]);
    let elapsed = started.elapsed();
    assert!(!refused.status.success(), "a wrong password was accepted:\n{}", text(&refused));
    let message = text(&refused);
    assert!(message.contains("sasl.password") && message.contains("DLPIPE_KAFKA__SASL_PASSWORD"), "{message}");
    assert!(elapsed < Duration::from_secs(45), "took {elapsed:?} to refuse a wrong password:\n{message}");

    // The wrong CA: the TLS handshake fails, and the error says where to look.
    let wrong_ca = config.with_file_name("wrong-ca.toml");
    let other_ca = tls.join("other-ca.pem");
    let toml = std::fs::read_to_string(&config).unwrap().replace(ca.to_str().unwrap(), other_ca.to_str().unwrap());
    std::fs::write(&wrong_ca, toml).unwrap();
    let refused = dlpipe(&wrong_ca, &["tail", "--max", "1"], &password_env);
    assert!(!refused.status.success(), "an untrusted certificate was accepted:\n{}", text(&refused));
    assert!(text(&refused).contains("ssl.ca.location"), "{}", text(&refused));
}

#[test]
fn a_missing_input_topic_is_an_error_and_not_created_when_dlpipe_does_not_create_topics() {
    let brokers = common::kafka_brokers();
    let dir = tempfile::tempdir().unwrap();
    let name = common::unique("misspelt");
    let config = config(dir.path(), &name, &brokers, "", "create_topics = false");
    let started = Instant::now();
    let run = dlpipe(&config, &["run", "--stop-at-end"], &[]);
    assert!(!run.status.success(), "dlpipe run started on a missing topic:\n{}", text(&run));
    let message = text(&run);
    assert!(message.contains(&format!("{name}-images")) && message.contains("create_topics"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    let metadata = dlpipe::kafka::metadata(&common::kafka_config(), None).unwrap();
    assert!(
        metadata.topics().iter().all(|t| !t.name().starts_with(&name)),
        "a topic was created: {:?}",
        metadata.topics().iter().map(|t| t.name()).filter(|n| n.starts_with(&name)).collect::<Vec<_>>()
    );
}

/// The topics a cluster has now.
fn topics(kafka: &dlpipe::config::KafkaConfig) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = dlpipe::kafka::client_config(kafka).create().unwrap();
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    metadata.topics().iter().map(|t| t.name().to_owned()).collect()
}

/// `scripts/kafka reset` stops the broker and deletes its data and log: started again, it is a
/// new, empty broker (a clone's broker collects every test's topics, and loads each at start).
#[test]
fn reset_stops_the_broker_and_deletes_its_topics() {
    let broker = Broker::new(None);
    broker.start();
    let kafka = broker.kafka_config();
    let topic = common::unique("reset");
    let spec = dlpipe::kafka::TopicSpec { partitions: 1, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(&kafka, &topic, spec).unwrap();
    assert!(topics(&kafka).contains(&topic));
    let data = broker.home.path().join(format!("data-{}", broker.port));
    assert!(data.is_dir());

    let reset = broker.script(&["reset"]).output().unwrap();
    assert!(reset.status.success(), "scripts/kafka reset failed: {}", text(&reset));
    assert!(!data.exists(), "the data folder is gone: {}", text(&reset));
    let status = broker.script(&["status"]).output().unwrap();
    assert!(!status.status.success(), "no broker answers after a reset: {}", text(&status));

    broker.start();
    assert!(!topics(&kafka).contains(&topic), "a broker started after a reset has none of the old topics");
}
