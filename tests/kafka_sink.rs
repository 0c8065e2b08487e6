//! The `kafka_sink` operator on its own, in a timely dataflow, against the real broker: in both
//! delivery modes an epoch's positions come out only once its outputs are readable (acknowledged,
//! or committed for `read_committed` consumers), every outcome is published once and replays
//! not at all, and the group's offsets end after the last record.

mod common;

use dlpipe_operators::records::{ClassScore, DeadLetter, Epoch, ImageRecord, ModelId, Outcome, Position, Prediction};
use dlpipe_operators::{Delivery, KafkaSink, SharedBacklog, SinkContext, SinkSpec, TxnProducer};
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::InputHandle;

/// Topics and group of one test.
struct Topics {
    input: String,
    predictions: String,
    dead_letters: String,
    group: String,
}

impl Topics {
    fn new(name: &str) -> Topics {
        let topics = Topics {
            input: common::unique(&format!("{name}-in")),
            predictions: common::unique(&format!("{name}-out")),
            dead_letters: common::unique(&format!("{name}-dlq")),
            group: common::unique(&format!("{name}-group")),
        };
        // Offsets 0..6 exist in both input partitions, so the group may commit up to 6.
        let messages: Vec<_> = (0..12).map(|i| (i % 2, format!("k{i}"), "{}".to_owned())).collect();
        common::produce(&topics.input, 2, &messages);
        let spec = dlpipe::kafka::TopicSpec { partitions: 1, replication_factor: 1, configs: &[] };
        for topic in [&topics.predictions, &topics.dead_letters] {
            dlpipe::kafka::ensure_topic(&common::kafka_config(), topic, spec).unwrap();
        }
        topics
    }

    fn spec(&self, starts: Vec<Position>) -> SinkSpec {
        SinkSpec {
            input_topic: self.input.clone(),
            predictions_topic: self.predictions.clone(),
            dead_letter_topic: self.dead_letters.clone(),
            model: ModelId { name: "efficientnet_lite0".into(), sha256: "abc".into() },
            features_topic: None,
            starts,
            give_up_after: Duration::from_secs(30),
            transaction_timeout: Duration::from_secs(60),
            partial_commit_after: None,
        }
    }

    fn consumer(&self) -> Arc<BaseConsumer> {
        let consumer: BaseConsumer = dlpipe::kafka::client_config(&common::kafka_config())
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        Arc::new(consumer)
    }

    /// The group's committed offset of each input partition.
    fn committed(&self) -> BTreeMap<i32, i64> {
        let mut list = TopicPartitionList::new();
        list.add_partition(&self.input, 0);
        list.add_partition(&self.input, 1);
        let committed = self.consumer().committed_offsets(list, Duration::from_secs(10)).unwrap();
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }

    /// The keys on the predictions and dead-letter topics, as a `read_committed` consumer
    /// sees them, read to the end.
    fn published(&self) -> Vec<String> {
        let consumer: BaseConsumer = dlpipe::kafka::client_config(&common::kafka_config())
            .set("group.id", common::unique("reader"))
            .set("isolation.level", "read_committed")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&self.predictions, 0, Offset::Beginning).unwrap();
        list.add_partition_offset(&self.dead_letters, 0, Offset::Beginning).unwrap();
        consumer.assign(&list).unwrap();
        let mut keys = Vec::new();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                keys.push(String::from_utf8(message.key().unwrap().to_vec()).unwrap());
                quiet_since = Instant::now();
            }
        }
        keys.sort();
        keys
    }
}

/// Record `offset` of `partition`: a prediction, or a dead letter for odd offsets.
fn outcome(partition: i32, offset: i64) -> Outcome {
    let id = format!("p{partition}-o{offset}");
    if offset % 2 == 1 {
        return Outcome::Dead(DeadLetter::of_message(
            "undecodable",
            "a test",
            b"{}",
            Some(id.as_bytes()),
            partition,
            offset,
        ));
    }
    let record =
        ImageRecord { id, uri: "file:///x.png".into(), label: None, partition, offset, kafka_ts_ms: None, image: None };
    let top_k = vec![ClassScore { class: "cat".into(), probability: 0.9 }];
    let classifier = dlpipe_operators::ClassifierId::new_learner();
    Outcome::Predicted(Prediction {
        record,
        top_k,
        classifier,
        model_version: 0,
        predicted_at_ms: 0,
        features: Vec::new(),
    })
}

/// Runs the sink over `epochs` of outcomes; after each epoch is published (the sink's frontier
/// passed it) calls `published(epoch)`. Returns the positions the sink reported, by epoch.
fn run_sink(
    delivery: impl FnOnce() -> Delivery<DefaultConsumerContext> + Send + Sync + 'static,
    spec: SinkSpec,
    epochs: Vec<(Epoch, Vec<Outcome>)>,
    mut published: impl FnMut(Epoch) + Send + Sync + 'static,
) -> Vec<(Epoch, Position)> {
    timely::execute_directly(move |worker| {
        let delivery = delivery();
        let positions: Rc<RefCell<Vec<(Epoch, Position)>>> = Rc::default();
        let seen = Rc::clone(&positions);
        let mut input = InputHandle::new();
        let fatal: dlpipe_operators::Fatal = Rc::default();
        let f = Rc::clone(&fatal);
        let probe = worker.dataflow::<Epoch, _, _>(|scope| {
            let outcomes = scope.input_from(&mut input);
            let sink = outcomes.kafka_sink(delivery, spec, SharedBacklog::default(), f, Default::default());
            let sink = sink.inspect_core(move |event| {
                if let Ok((stamp, positions)) = event {
                    let epoch = *stamp.elements().first().expect("a stamp has a time");
                    seen.borrow_mut().extend(positions.iter().map(|p| (epoch, *p)));
                }
            });
            sink.probe().0
        });
        let step_until = |worker: &mut timely::worker::Worker, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done() {
                assert!(Instant::now() < deadline, "the sink did not get there within 60 s");
                assert!(fatal.borrow().is_none(), "the sink failed: {:?}", fatal.borrow());
                worker.step_or_park(Some(Duration::from_millis(5)));
            }
        };
        for (epoch, outcomes) in epochs {
            input.advance_to(epoch);
            for outcome in outcomes {
                input.send(outcome);
            }
            input.advance_to(epoch + 1);
            step_until(worker, &|| !probe.less_equal(&epoch));
            published(epoch);
        }
        input.close();
        step_until(worker, &|| probe.done());
        let positions = positions.borrow().clone();
        positions
    })
}

/// Two epochs over two partitions: offsets 0..3 in epoch 1, 3..6 in epoch 2.
fn two_epochs() -> Vec<(Epoch, Vec<Outcome>)> {
    let epoch =
        |offsets: std::ops::Range<i64>| (0..2).flat_map(|p| offsets.clone().map(move |o| outcome(p, o))).collect();
    vec![(1, epoch(0..3)), (2, epoch(3..6))]
}

fn keys(partitions: std::ops::Range<i32>, offsets: std::ops::Range<i64>) -> Vec<String> {
    let mut keys: Vec<String> = partitions.flat_map(|p| offsets.clone().map(move |o| format!("p{p}-o{o}"))).collect();
    keys.sort();
    keys
}

#[test]
fn at_least_once_reports_an_epoch_only_once_its_outputs_are_acknowledged_and_commits_after_them() {
    let topics = Arc::new(Topics::new("sink-alo"));
    let (t, spec) = (Arc::clone(&topics), topics.spec(Vec::new()));
    let delivery = move || {
        let producer: BaseProducer<SinkContext> = dlpipe::kafka::client_config(&common::kafka_config())
            .set("linger.ms", "20")
            .create_with_context(SinkContext::default())
            .unwrap();
        Delivery::AtLeastOnce { producer, committer: Some(t.consumer()) }
    };
    let t = Arc::clone(&topics);
    let positions = run_sink(delivery, spec, two_epochs(), move |epoch| {
        let topics = &t;
        // Everything of the epoch is on the topics when the sink says so.
        let expected = keys(0..2, 0..3 * epoch as i64);
        assert_eq!(topics.published(), expected, "epoch {epoch}");
    });
    assert_eq!(
        positions,
        vec![
            (1, Position { partition: 0, learned: 3, published: 3 }),
            (1, Position { partition: 1, learned: 3, published: 3 }),
            (2, Position { partition: 0, learned: 6, published: 6 }),
            (2, Position { partition: 1, learned: 6, published: 6 }),
        ]
    );
    assert_eq!(topics.published(), keys(0..2, 0..6), "each output once");
    assert_eq!(topics.committed(), BTreeMap::from([(0, 6), (1, 6)]));
}

#[test]
fn exactly_once_commits_each_epoch_with_its_offsets_and_sends_no_replay() {
    let topics = Arc::new(Topics::new("sink-eos"));
    let t = Arc::clone(&topics);
    let delivery = move || {
        let id = common::unique("sink-eos-txn");
        let make = move || -> BaseProducer<SinkContext> {
            let producer: BaseProducer<SinkContext> = dlpipe::kafka::client_config(&common::kafka_config())
                .set("transactional.id", &id)
                .create_with_context(SinkContext::default())
                .unwrap();
            producer.init_transactions(Duration::from_secs(30)).unwrap();
            producer
        };
        let producer = TxnProducer { producer: make(), renew: Box::new(move || Ok(make())) };
        Delivery::ExactlyOnce { producer, consumer: t.consumer() }
    };
    // An earlier run published partition 0 up to offset 2 (and learned up to 1): 0:1 is replayed
    // for the learner only.
    let starts = vec![Position { partition: 0, learned: 1, published: 2 }];
    let mut epochs = two_epochs();
    epochs[0].1.retain(|o| o.input_position() != Some((0, 0)));
    let t = Arc::clone(&topics);
    let positions = run_sink(delivery, topics.spec(starts.clone()), epochs, move |epoch| {
        let topics = &t;
        let mut expected: Vec<String> = keys(0..2, 0..3 * epoch as i64);
        expected.retain(|k| k != "p0-o0" && k != "p0-o1");
        assert_eq!(topics.published(), expected, "epoch {epoch}: committed when the sink says so");
    });
    assert_eq!(positions[0], (0, starts[0]), "where the run started, at epoch 0");
    assert_eq!(positions[1], (1, Position { partition: 0, learned: 3, published: 3 }));
    let mut published = keys(0..2, 0..6);
    published.retain(|k| k != "p0-o0" && k != "p0-o1");
    assert_eq!(topics.published(), published, "each output once, replays never");
    assert_eq!(topics.committed(), BTreeMap::from([(0, 6), (1, 6)]));
}

/// A transaction the broker aborted at its `transaction.timeout.ms` and one whose producer was
/// fenced by another of the same id fail alike (fenced); `outlived` tells them apart by how long
/// each was open, and only the first stops a run for a restart (exit 75) instead of for good.
#[test]
fn a_transaction_the_broker_expired_is_told_apart_from_one_another_producer_fenced() {
    use dlpipe_operators::transactions::{is_fenced, outlived};
    let topic = common::unique("txn-expiry");
    let spec = dlpipe::kafka::TopicSpec { partitions: 1, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(&common::kafka_config(), &topic, spec).unwrap();
    let timeout = Duration::from_secs(2);
    let open = |id: &str| {
        let producer: BaseProducer = dlpipe::kafka::client_config(&common::kafka_config())
            .set("transactional.id", id)
            .set("transaction.timeout.ms", timeout.as_millis().to_string())
            .create()
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        producer.begin_transaction().unwrap();
        producer.send(rdkafka::producer::BaseRecord::to(&topic).key("k").payload("v")).unwrap();
        producer.flush(Duration::from_secs(30)).unwrap(); // the partition is in the transaction
        (producer, Instant::now())
    };

    // Fenced by another producer of the id, well within the timeout.
    let id = common::unique("txn-fenced");
    let (first, began) = open(&id);
    let (_second, _) = open(&id);
    let error = first.commit_transaction(Duration::from_secs(30)).unwrap_err();
    assert!(is_fenced(&error), "{error}");
    assert!(!outlived(&error, began.elapsed(), timeout), "fenced after {:?}: {error}", began.elapsed());

    // Left open: the coordinator aborts it once it is older than the timeout (it looks every
    // `transaction.abort.timed.out.transaction.cleanup.interval.ms`, 10 s by default).
    let (producer, began) = open(&common::unique("txn-expired"));
    std::thread::sleep(timeout + Duration::from_secs(12));
    let error = producer.commit_transaction(Duration::from_secs(30)).unwrap_err();
    assert!(is_fenced(&error), "{error}");
    assert!(outlived(&error, began.elapsed(), timeout), "after {:?}: {error}", began.elapsed());
    println!("expired after {:.1} s: {error}", began.elapsed().as_secs_f64());
}
