//! Metric handles the operators update: counters, gauges and histograms of the `prometheus`
//! crate, passed in by whoever builds the dataflow.
//!
//! The operators know nothing about metric names, registries or HTTP: the caller (the `dlpipe`
//! library) creates the metrics, fixes their labels (worker, topic, ...), registers and serves
//! them, and hands the operators ready-to-use handles. Every struct here has a `Default` of
//! unregistered handles, which work but are never exported, so an operator can be used without
//! metrics at no cost beyond a few atomic increments.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use std::collections::HashMap;

/// A counter family with every label but the last fixed by the caller; the operator fills in
/// the last one (a partition, a dead-letter reason, a topic) as values turn up.
#[derive(Clone)]
pub struct CounterByLabel {
    family: IntCounterVec,
    fixed: Vec<String>,
    cache: HashMap<String, IntCounter>,
}

impl CounterByLabel {
    /// `family` must have `fixed.len() + 1` labels.
    pub fn new(family: IntCounterVec, fixed: Vec<String>) -> CounterByLabel {
        CounterByLabel { family, fixed, cache: HashMap::new() }
    }

    /// The counter for `value` of the open label (looked up once, then cached).
    pub fn with(&mut self, value: &str) -> &IntCounter {
        if !self.cache.contains_key(value) {
            let mut values: Vec<&str> = self.fixed.iter().map(String::as_str).collect();
            values.push(value);
            let counter = self.family.with_label_values(&values);
            self.cache.insert(value.to_owned(), counter);
        }
        &self.cache[value]
    }
}

impl Default for CounterByLabel {
    fn default() -> Self {
        let family = IntCounterVec::new(Opts::new("unregistered", "not exported"), &["value"]).expect("valid");
        CounterByLabel::new(family, Vec::new())
    }
}

fn counter() -> IntCounter {
    IntCounter::new("unregistered", "not exported").expect("valid")
}

/// One operator instance's share of a gauge that several instances add to (the labelled and
/// unlabelled lanes of a worker report into the same stage's gauge): the instance sets its own
/// value, and the gauge holds the sum.
pub struct GaugeShare {
    gauge: IntGauge,
    mine: i64,
}

impl GaugeShare {
    pub fn new(gauge: IntGauge) -> GaugeShare {
        GaugeShare { gauge, mine: 0 }
    }

    pub fn set(&mut self, value: i64) {
        self.gauge.add(value - self.mine);
        self.mine = value;
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.sub(self.mine);
    }
}

fn gauge() -> IntGauge {
    IntGauge::new("unregistered", "not exported").expect("valid")
}

fn histogram() -> Histogram {
    Histogram::with_opts(HistogramOpts::new("unregistered", "not exported")).expect("valid")
}

/// [`kafka_source`](crate::kafka_source()): messages read, by partition.
#[derive(Clone, Default)]
pub struct SourceMetrics {
    /// Messages taken from the consumer; the open label is the partition.
    pub consumed: CounterByLabel,
}

/// [`fetch_decode`](crate::fetch_decode()): records waiting for the pool, and on it.
#[derive(Clone)]
pub struct FetchDecodeMetrics {
    pub queued: IntGauge,
    pub in_flight: IntGauge,
}

impl Default for FetchDecodeMetrics {
    fn default() -> Self {
        FetchDecodeMetrics { queued: gauge(), in_flight: gauge() }
    }
}

/// [`featurize`](crate::featurize()): records waiting for their micro-batch.
#[derive(Clone)]
pub struct FeaturizeMetrics {
    pub waiting: IntGauge,
}

impl Default for FeaturizeMetrics {
    fn default() -> Self {
        FeaturizeMetrics { waiting: gauge() }
    }
}

/// [`learn_predict`](crate::learn_predict()): predictions made, time spent predicting and
/// learning (per epoch), records held until their epoch's labels are complete.
#[derive(Clone)]
pub struct LearnPredictMetrics {
    pub predicted: IntCounter,
    pub predict_seconds: Histogram,
    pub learn_seconds: Histogram,
    pub waiting: IntGauge,
    /// Frozen copies of the classifier kept for records that come late.
    pub frozen: IntGauge,
}

impl Default for LearnPredictMetrics {
    fn default() -> Self {
        LearnPredictMetrics {
            predicted: counter(),
            predict_seconds: histogram(),
            learn_seconds: histogram(),
            waiting: gauge(),
            frozen: gauge(),
        }
    }
}

/// [`kafka_sink`](crate::kafka_sink()): what was published and how long the broker took.
#[derive(Clone)]
pub struct SinkMetrics {
    /// Dead letters handed to the producer; the open label is the error kind.
    pub dead_lettered: CounterByLabel,
    /// Messages the broker acknowledged; the open label is the topic.
    pub published: CounterByLabel,
    /// Messages the broker refused for good (the worker stops on them).
    pub failed: IntCounter,
    /// From handing a message to the producer to its acknowledgement.
    pub produce_seconds: Histogram,
    /// From an input record's Kafka timestamp to its prediction's acknowledgement.
    pub end_to_end_seconds: Histogram,
    /// Messages handed to the producer or waiting for it, not yet acknowledged.
    pub unacked: IntGauge,
}

impl Default for SinkMetrics {
    fn default() -> Self {
        SinkMetrics {
            dead_lettered: CounterByLabel::default(),
            published: CounterByLabel::default(),
            failed: counter(),
            produce_seconds: histogram(),
            end_to_end_seconds: histogram(),
            unacked: gauge(),
        }
    }
}

/// [`feedback_join`](crate::feedback_join()): pairs joined, how late labels came, and what
/// the join holds.
#[derive(Clone)]
pub struct FeedbackJoinMetrics {
    /// (image, label) pairs that became complete (or were corrected) and go to the learner.
    pub joined: IntCounter,
    /// From the image record's Kafka timestamp to the moment its label joined it, per pair.
    pub label_delay_seconds: Histogram,
    /// Images whose features wait for a label (this worker's share of the ids).
    pub retained_images: IntGauge,
    /// Bytes of their features (ids and the arrangements' overhead come on top).
    pub retained_bytes: IntGauge,
}

impl Default for FeedbackJoinMetrics {
    fn default() -> Self {
        FeedbackJoinMetrics {
            joined: counter(),
            label_delay_seconds: histogram(),
            retained_images: gauge(),
            retained_bytes: gauge(),
        }
    }
}
