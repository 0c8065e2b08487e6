//! The transactional watchdog (`dlpipe_operators::transactions::bounded`) ends a process whose
//! librdkafka call hangs with exit code 75, for an orchestrator to restart it, and not with a
//! signal, while the model and a Kafka client are busy in other threads, as in a worker. The
//! test runs itself as that process.

mod common;

use dlpipe::model::Featurizer;
use dlpipe_operators::transactions::{bounded, OVERDUE_AFTER, RESTART_EXIT_CODE};
use rdkafka::producer::BaseProducer;
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD: &str = "DLPIPE_WATCHDOG_TEST_CHILD";
const NAME: &str = "a_hung_transactional_call_ends_a_busy_process_with_the_overdue_code";

#[test]
fn a_hung_transactional_call_ends_a_busy_process_with_the_overdue_code() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    let started = Instant::now();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(RESTART_EXIT_CODE), "{:?}\n{stderr}", output.status);
    assert!(took >= OVERDUE_AFTER && took < OVERDUE_AFTER + Duration::from_secs(30), "took {took:?}");
}

/// A worker's state: libtorch running the model in a loop, a Kafka client with its threads;
/// then a call that never returns.
fn child() {
    let manifest = common::model_manifest("efficientnet_lite0");
    let featurizer = Featurizer::load(&manifest, tch::Device::Cpu).unwrap();
    std::thread::spawn(move || {
        let input = vec![140u8; 2 * featurizer.preprocess().crop_len()];
        loop {
            featurizer.forward(&input, 2).unwrap();
        }
    });
    let _producer: BaseProducer = dlpipe::kafka::client_config(&common::kafka_config())
        .set("transactional.id", "watchdog-test")
        .create()
        .unwrap();
    bounded("a call that never returns", Duration::ZERO, || std::thread::sleep(Duration::from_secs(3600)));
    unreachable!("the watchdog ends the process first");
}
