//! Kafka itself failing under a running pipeline: a three-broker KRaft cluster of the test's own
//! (`scripts/kafka start --brokers 3`, topics with 3 replicas and min.insync.replicas 2). While
//! records arrive at a steady pace and `dlpipe run` predicts them, the test kills (SIGKILL) the
//! leader of an input partition, then the leader of an output partition, each restarted once
//! the pipeline has gone on without it, then restarts all three brokers in turn (a rolling
//! upgrade). Every record must be predicted, exactly once under exactly-once (read_committed),
//! and the longest pause a reader of the predictions sees is measured and printed.
//!
//! `make test` runs an exactly-once pipeline; `make soak` also an at-least-once one, and both
//! delivery modes at once, each with its own topics and group on the same cluster, so that
//! every failure hits both.

mod common;

use common::broker::Broker;
use common::run::{read_topic_on, record, Run};
use common::{fashion, KillOnDrop};
use dlpipe_operators::transactions::RESTART_EXIT_CODE;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Records per second fed to each pipeline: a steady trickle, so that a gap between
/// predictions is a pause of the pipeline, not a backlog it works through.
const RATE: f64 = 5.0;

/// One pipeline under test: its run, the records fed to it, and what a reader saw.
struct Pipeline {
    delivery: &'static str,
    run: Run,
    input: String,
    child: KillOnDrop,
    /// The log of each run, the current one last.
    logs: Vec<PathBuf>,
    /// Ids sent so far (acknowledged or not), filled by the feeder.
    sent: Arc<Mutex<Vec<String>>>,
    feeder: Option<JoinHandle<u64>>,
    /// When a read_committed reader saw each prediction (id, time).
    seen: Arc<Mutex<Vec<(String, Instant)>>>,
    /// Restarts after a transactional call overran (exit code 75), as an orchestrator does.
    restarts: usize,
}

impl Pipeline {
    fn start(broker: &Broker, delivery: &'static str, stop: &Arc<AtomicBool>) -> Pipeline {
        let kafka = broker.kafka_config();
        let input = common::unique(&format!("failover-{delivery}-images"));
        let spec =
            dlpipe::kafka::TopicSpec { partitions: 2, replication_factor: 3, configs: &[("min.insync.replicas", "2")] };
        dlpipe::kafka::ensure_topic(&kafka, &input, spec).unwrap();
        let extra = format!(
            "delivery = \"{delivery}\"\ntopic_replication_factor = 3\ntopic_min_insync_replicas = 2\n\
             epochs = {{ by = \"time\", millis = 500 }}\ncheckpoint_every_epochs = 4\n"
        );
        let run = Run::on(&broker.plaintext(), &format!("failover-{delivery}"), &input, &extra);
        let sent = Arc::new(Mutex::new(Vec::new()));
        let feeder = Some(feed(kafka.clone(), input.clone(), delivery, Arc::clone(&sent), Arc::clone(stop)));
        let (child, log) = run.spawn(&["-w", "2"]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        read_live(kafka, run.predictions.clone(), Arc::clone(&seen), Arc::clone(stop));
        Pipeline { delivery, run, input, child, logs: vec![log], sent, feeder, seen, restarts: 0 }
    }

    /// Fails the test if the run stopped, except where a transactional call overran its bound
    /// (librdkafka#5456): the run exits 75 to be restarted, and is, as an orchestrator would.
    fn supervise(&mut self, what: &str) {
        let Some(status) = self.child.0.try_wait().unwrap() else { return };
        let log = self.log();
        assert_eq!(status.code(), Some(RESTART_EXIT_CODE), "{}: the run stopped {what}:\n{log}", self.delivery);
        self.restarts += 1;
        eprintln!("{}: a transactional call overran {what}; restarting the run", self.delivery);
        let (child, log) = self.run.spawn(&["-w", "2"]);
        self.child = child;
        self.logs.push(log);
    }

    fn seen(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every run's log, in order.
    fn log(&self) -> String {
        common::run::logs(&self.logs)
    }

    /// Waits until the reader has seen `more` predictions beyond `from` (the pipeline goes on).
    fn wait_for_more(&mut self, from: usize, more: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(150);
        while self.seen() < from + more {
            self.supervise(what);
            assert!(Instant::now() < deadline, "{}: no predictions for 150 s {what}:\n{}", self.delivery, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Publishes labelled Fashion-MNIST records to `input` at [`RATE`] until `stop`; returns how
/// many the brokers acknowledged (all of them, or the test fails).
fn feed(
    kafka: dlpipe::config::KafkaConfig,
    input: String,
    delivery: &'static str,
    sent: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    std::thread::spawn(move || {
        let publisher = dlpipe::kafka::Publisher::new(&kafka).unwrap();
        let images = fashion(600, 3000);
        let started = Instant::now();
        for (i, (path, label)) in images.iter().cycle().enumerate() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let id = format!("{delivery}-{i}");
            publisher.send(&input, &id, &record(&id, path, Some(label))).unwrap();
            sent.lock().unwrap().push(id);
            let next = started + Duration::from_secs_f64((i + 1) as f64 / RATE);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        publisher.finish(Duration::from_secs(120)).unwrap()
    })
}

/// Reads `topic` (read_committed, librdkafka's default) as it fills, noting when each prediction
/// became visible, until `stop`.
fn read_live(
    kafka: dlpipe::config::KafkaConfig,
    topic: String,
    seen: Arc<Mutex<Vec<(String, Instant)>>>,
    stop: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = dlpipe::kafka::client_config(&kafka)
            .set("group.id", common::unique("failover-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        // The pipeline creates its output topics at start-up.
        let partitions = loop {
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10));
            let ids: Vec<i32> = metadata
                .iter()
                .flat_map(|m| m.topics())
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if !ids.is_empty() {
                break ids;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut assignment = rdkafka::TopicPartitionList::new();
        for partition in partitions {
            assignment.add_partition_offset(&topic, partition, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&assignment).unwrap();
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
                seen.lock().unwrap().push((value["id"].as_str().unwrap().to_owned(), Instant::now()));
            }
        }
    });
}

/// Where each message of `topic` is, by key (partition, offset), read at `isolation`.
fn keys_at(kafka: &dlpipe::config::KafkaConfig, topic: &str, isolation: &str) -> BTreeMap<String, (i32, i64)> {
    let consumer: BaseConsumer = dlpipe::kafka::client_config(kafka)
        .set("group.id", common::unique("failover-keys"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut at = BTreeMap::new();
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_secs(5) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            at.insert(key, (m.partition(), m.offset()));
            idle_since = Instant::now();
        }
    }
    at
}

/// The offsets `group` has committed for the partitions of `topic`.
fn group_offsets(kafka: &dlpipe::config::KafkaConfig, group: &str, topic: &str) -> Vec<(i32, rdkafka::Offset)> {
    let consumer: BaseConsumer = dlpipe::kafka::client_config(kafka).set("group.id", group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..2 {
        list.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    committed.elements().iter().map(|e| (e.partition(), e.offset())).collect()
}

/// The node that leads partition `partition` of `topic` now.
fn leader(broker: &Broker, topic: &str, partition: i32) -> i32 {
    let consumer: BaseConsumer = dlpipe::kafka::client_config(&broker.kafka_config()).create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let topic = metadata.topics().iter().find(|t| t.name() == topic).unwrap();
    topic.partitions().iter().find(|p| p.id() == partition).unwrap().leader()
}

/// The longest gap between predictions a reader saw in `[from, to)`, in seconds.
fn longest_gap(seen: &[(String, Instant)], from: Instant, to: Instant) -> f64 {
    let times: Vec<Instant> = seen.iter().map(|(_, t)| *t).filter(|t| *t >= from && *t < to).collect();
    let mut gap = times.first().map_or(to - from, |first| *first - from);
    for pair in times.windows(2) {
        gap = gap.max(pair[1] - pair[0]);
    }
    gap.as_secs_f64()
}

/// Kills node `node`, waits until every pipeline goes on without it, then starts it again.
fn kill_until_the_pipelines_go_on(broker: &Broker, pipelines: &mut [Pipeline], node: i32, what: &str) {
    let before: Vec<usize> = pipelines.iter().map(Pipeline::seen).collect();
    broker.kill_node(node);
    eprintln!("killed node {node}, the leader of {what}");
    for (pipeline, from) in pipelines.iter_mut().zip(before) {
        pipeline.wait_for_more(from, 5, &format!("after node {node} ({what}) was killed"));
    }
    broker.start_node(node);
}

/// The at-least-once pipeline alone (about 2.5 minutes here): `make soak` (a broker killed
/// under an at-least-once run is also in `tests/recovery.rs`).
#[test]
#[ignore = "make soak: make test runs the exactly-once variant"]
fn broker_failures_and_a_rolling_restart_under_at_least_once_lose_nothing() {
    failover(&["at_least_once"]);
}

/// `make test`: the exactly-once pipeline (2.5-4 minutes here). In about half the runs a worker
/// blocks inside librdkafka's `send_offsets_to_transaction` once the group's coordinator is
/// killed (confluentinc/librdkafka#5456 and #5511: the call's timeout is never checked, a dead
/// coordinator stays cached); the watchdog then exits the run with code 75 and the test
/// restarts it, as an orchestrator would, and counts the restart. A failure names each missing
/// record's input offset, whether a transaction holds its output, and the group's offsets: that
/// found the source skipping a partition's first records (`tests/liveness.rs`).
#[test]
fn broker_failures_and_a_rolling_restart_under_exactly_once_lose_nothing_and_publish_nothing_twice() {
    failover(&["exactly_once"]);
}

/// `make soak`: both delivery modes at once on the same failing cluster (~5 minutes here).
#[test]
#[ignore = "long (about 5 minutes): make soak"]
fn broker_failures_and_a_rolling_restart_in_both_delivery_modes_lose_nothing() {
    failover(&["at_least_once", "exactly_once"]);
}

/// Runs one pipeline per delivery mode through the failures and checks them.
fn failover(deliveries: &[&'static str]) {
    let broker = Broker::cluster(3);
    broker.start();
    let stop = Arc::new(AtomicBool::new(false));
    let mut pipelines: Vec<Pipeline> = deliveries.iter().map(|d| Pipeline::start(&broker, d, &stop)).collect();
    for p in pipelines.iter_mut() {
        p.wait_for_more(0, 20, "before any failure");
    }
    // The steady pace before any failure: from the first prediction on.
    let first = pipelines.iter().map(|p| p.seen.lock().unwrap()[0].1).min().unwrap();
    let mut phases = vec![("steady", first)];
    let input_leader = leader(&broker, &pipelines[0].input, 0);
    phases.push(("input leader killed", Instant::now()));
    kill_until_the_pipelines_go_on(&broker, &mut pipelines, input_leader, "input partition 0");
    // Kill the leader of predictions partition 0 of the last pipeline (the exactly-once one,
    // when there is one: its transactions write there), whichever node leads it now.
    let output_leader = leader(&broker, &pipelines[pipelines.len() - 1].run.predictions, 0);
    phases.push(("output leader killed", Instant::now()));
    kill_until_the_pipelines_go_on(&broker, &mut pipelines, output_leader, "predictions partition 0");
    phases.push(("rolling restart", Instant::now()));
    broker.rolling_restart();
    phases.push(("after", Instant::now()));
    let counts: Vec<usize> = pipelines.iter().map(Pipeline::seen).collect();
    for (p, from) in pipelines.iter_mut().zip(counts) {
        p.wait_for_more(from, 5, "after the rolling restart");
    }
    phases.push(("end", Instant::now()));

    // Stop feeding, then wait for every record's prediction.
    stop.store(true, Ordering::Relaxed);
    for p in pipelines.iter_mut() {
        let acked = p.feeder.take().unwrap().join().unwrap();
        let sent: BTreeSet<String> = p.sent.lock().unwrap().iter().cloned().collect();
        assert_eq!(acked as usize, sent.len(), "{}: records the brokers acknowledged", p.delivery);
        check(p, &broker, &sent, &phases);
    }
}

/// Every record in `sent` was predicted (exactly once under exactly-once); prints the pauses.
fn check(p: &mut Pipeline, broker: &Broker, sent: &BTreeSet<String>, phases: &[(&str, Instant)]) {
    let kafka = broker.kafka_config();
    let deadline = Instant::now() + Duration::from_secs(150);
    let outputs = loop {
        let outputs = read_topic_on(&kafka, &p.run.predictions, usize::MAX, Duration::from_secs(3));
        let ids: BTreeSet<String> = outputs.iter().map(|o| o["id"].as_str().unwrap().to_owned()).collect();
        if sent.is_subset(&ids) {
            break outputs;
        }
        let missing: Vec<&String> = sent.difference(&ids).collect();
        if Instant::now() >= deadline {
            // What became of them: dead-lettered, or nowhere (read the tail of the log too).
            let dead = read_topic_on(&kafka, &p.run.dead, usize::MAX, Duration::from_secs(3));
            let dead: Vec<&Value> =
                dead.iter().filter(|d| missing.iter().any(|m| d.to_string().contains(*m))).collect();
            // Where they are in the input, whether an uncommitted (aborted or open) transaction
            // holds their outputs, and where the group's offsets stand.
            let at = keys_at(&kafka, &p.input, "read_committed");
            let uncommitted = keys_at(&kafka, &p.run.predictions, "read_uncommitted");
            let missing: Vec<_> = missing.into_iter().map(|m| (m, at.get(m), uncommitted.get(m))).collect();
            panic!(
                "{}: {} records never predicted (id, input (partition, offset), output read uncommitted): \
                 {missing:?}; their dead letters: {dead:?}; the group's offsets: {:?}\n{}",
                p.delivery,
                missing.len(),
                group_offsets(&kafka, &p.run.group, &p.input),
                p.log()
            );
        }
        p.supervise("while the last records were predicted");
    };
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &outputs {
        *times.entry(o["id"].as_str().unwrap()).or_default() += 1;
    }
    let twice = times.values().filter(|n| **n > 1).count();
    let seen = p.seen.lock().unwrap().clone();
    let pauses: Vec<String> = phases
        .windows(2)
        .map(|w| {
            let (gap, span) = (longest_gap(&seen, w[0].1, w[1].1), (w[1].1 - w[0].1).as_secs_f64());
            format!("{} {gap:.1} s (of {span:.0} s)", w[0].0)
        })
        .collect();
    println!(
        "kafka failover ({}): {} records, {} predictions ({twice} ids published more than once), {} restarts; \
         longest gap between predictions: {}",
        p.delivery,
        sent.len(),
        outputs.len(),
        p.restarts,
        pauses.join(", ")
    );
    if p.delivery == "exactly_once" {
        assert_eq!(twice, 0, "predictions published twice under exactly-once");
    }
    let log = p.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    let skipped = log.lines().filter(|l| l.contains("offsets skipped")).count();
    println!(
        "kafka failover ({}): {} warnings in the log, the first: {:?}; {skipped} input gaps logged (debug)",
        p.delivery,
        warnings.len(),
        warnings.first()
    );
}
