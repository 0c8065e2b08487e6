//! A real broker round trip: create a topic, produce 1,000 messages with rdkafka, consume them
//! back, and check that every one arrived exactly once, in order within its partition.

mod common;

use dlpipe::kafka::DeliveryCounts;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn thousand_messages_all_arrive() {
    const N: usize = 1000;
    let kafka = common::kafka_config();
    let topic = common::unique("roundtrip");
    let spec = dlpipe::kafka::TopicSpec { partitions: 3, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(&kafka, &topic, spec).expect("create topic");
    // Creating it again is not an error.
    dlpipe::kafka::ensure_topic(&kafka, &topic, spec).expect("create topic twice");

    let acks = DeliveryCounts::default();
    let producer: ThreadedProducer<DeliveryCounts> = dlpipe::kafka::client_config(&kafka)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create_with_context(acks.clone())
        .expect("producer");
    for i in 0..N {
        let key = format!("id-{i}");
        let payload = format!("{{\"id\":\"{key}\",\"uri\":\"file:///img/{i}.png\"}}");
        producer.send(BaseRecord::<String, String>::to(&topic).key(&key).payload(&payload)).expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    assert_eq!(acks.failed.load(Ordering::SeqCst), 0, "delivery failures");
    assert_eq!(acks.acked.load(Ordering::SeqCst), N as u64, "every message acknowledged by the broker");

    let consumer: BaseConsumer = dlpipe::kafka::client_config(&kafka)
        .set("group.id", common::unique("roundtrip-group"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let mut seen: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    let mut last_offset: BTreeMap<i32, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < N && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.expect("consume");
        let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
        let payload: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
        assert_eq!(payload["id"], key.as_str());
        let previous = last_offset.insert(message.partition(), message.offset());
        assert!(previous.is_none_or(|p| p + 1 == message.offset()), "offsets run on within a partition");
        assert!(seen.insert(key, (message.partition(), message.offset())).is_none(), "no duplicates");
    }
    assert_eq!(seen.len(), N, "all {N} messages consumed within 60 s");
    assert_eq!(last_offset.len(), 3, "keys spread over all 3 partitions: {last_offset:?}");
    let total: i64 = last_offset.values().map(|o| o + 1).sum();
    assert_eq!(total as usize, N);
    println!("kafka round trip: {N} messages through {} on topic {topic}, partitions {last_offset:?}", kafka.brokers);
}

#[test]
fn an_unreachable_cluster_is_a_clear_error() {
    let kafka = dlpipe::config::KafkaConfig { brokers: "127.0.0.1:1".into(), ..Default::default() };
    // Nothing listens there: a retriable error, waited out for retry_timeout_secs, then an
    // error that names the address, what was awaited, and how to start or point at a broker.
    let kafka = dlpipe::config::KafkaConfig { retry_timeout_secs: 3, ..kafka };
    let started = Instant::now();
    let err = dlpipe::kafka::metadata(&kafka, None).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("127.0.0.1:1") && message.contains("scripts/kafka start"), "{message}");
    assert!(message.contains("metadata") && message.contains("retry_timeout_secs"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(15), "gave up after {:?}", started.elapsed());
}
