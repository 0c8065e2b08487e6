//! Prometheus metrics of `dlpipe run`: their definitions, the process's registry, the handles
//! the pipeline and its operators update, and (in [`server`]) the HTTP endpoint that serves
//! `/metrics`, `/healthz` and `/readyz`.
//!
//! Every metric is defined once, in [`DEFINITIONS`]: name, type, labels and meaning. The
//! registry is built from that table, `docs/metrics.md` documents exactly that table (a test
//! compares the two), and the dashboards and alerts in `grafana/` only use names from it (another
//! test checks). Names follow Prometheus' conventions: a `dlpipe_` prefix, `_total` for
//! counters, base units (`_seconds`, `_bytes`, `_ratio`) in the name.
//!
//! Label cardinality is bounded by the deployment, never by the data: `worker` by the number of
//! timely workers, `partition` by the input topic's partitions, `reason` and `kind` by the fixed
//! lists of error kinds, `scheme` by the fixed list of [`UriScheme`](crate::fetch::UriScheme)s,
//! `class` by `learner.max_classes`, `device` by `model.devices`.

pub mod devices;
pub mod kafka;
pub mod server;

use dlpipe_operators::{
    CounterByLabel, FeaturizeMetrics, FeedbackJoinMetrics, FetchDecodeMetrics, LearnPredictMetrics, SinkMetrics,
    SourceMetrics,
};
use prometheus::core::Collector;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

pub use server::{serve, NotReady, Readiness, ServeError};

/// The Prometheus type of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    /// The name Prometheus' text format uses (`# TYPE name counter`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Bucket layouts of the histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buckets {
    None,
    /// 1 ms to about 33 s, doubling: per-record and per-batch work.
    Seconds,
    /// 10 ms to about 20 min, doubling: latencies that include waiting in Kafka.
    LongSeconds,
    /// 1 to 1024 records, doubling: batch sizes.
    Records,
}

impl Buckets {
    fn bounds(self) -> Vec<f64> {
        let doubling = |start: f64, count: usize| (0..count).map(|i| start * 2f64.powi(i as i32)).collect();
        match self {
            Buckets::None => Vec::new(),
            Buckets::Seconds => doubling(0.001, 16),
            Buckets::LongSeconds => doubling(0.01, 18),
            Buckets::Records => doubling(1.0, 11),
        }
    }
}

/// One metric: what `docs/metrics.md` documents and the registry exports.
#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub buckets: Buckets,
    pub help: &'static str,
}

const fn def(
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    buckets: Buckets,
    help: &'static str,
) -> MetricDef {
    MetricDef { name, kind, labels, buckets, help }
}

use Buckets as B;
use Kind::{Counter as C, Gauge as G, Histogram as H};

/// Every metric dlpipe exports.
pub const DEFINITIONS: &[MetricDef] = &[
    def("dlpipe_build_info", G, &["version"], B::None, "Always 1; the version of the running dlpipe."),
    def(
        "dlpipe_records_consumed_total",
        C,
        &["worker", "topic", "partition"],
        B::None,
        "Input messages read from Kafka.",
    ),
    def(
        "dlpipe_records_predicted_total",
        C,
        &["worker"],
        B::None,
        "Records predicted by the classifier (before publishing).",
    ),
    def(
        "dlpipe_records_dead_lettered_total",
        C,
        &["worker", "reason"],
        B::None,
        "Inputs sent to the dead-letter topic, by error kind (`not_found`, `malformed_json`, ...).",
    ),
    def(
        "dlpipe_messages_published_total",
        C,
        &["worker", "topic"],
        B::None,
        "Predictions and dead letters acknowledged by the broker, by output topic.",
    ),
    def(
        "dlpipe_messages_failed_total",
        C,
        &["worker"],
        B::None,
        "Messages the broker refused for good; the worker stops on the first one.",
    ),
    def(
        "dlpipe_fetched_bytes_total",
        C,
        &["worker", "scheme"],
        B::None,
        "Encoded image bytes fetched, by where they came from (`file`, `https`, `s3`, `inline`, ...).",
    ),
    def(
        "dlpipe_fetch_duration_seconds",
        H,
        &["worker", "scheme"],
        B::Seconds,
        "Fetching one image (file read, http or object-store request, with retries), successful or not.",
    ),
    def(
        "dlpipe_fetch_errors_total",
        C,
        &["worker", "scheme", "kind"],
        B::None,
        "Images that could not be fetched, by scheme and error kind (`not_found`, `unauthorized`, ...).",
    ),
    def(
        "dlpipe_fetch_retries_total",
        C,
        &["worker", "scheme"],
        B::None,
        "Requests repeated after a transient failure (timeout, connection error, 5xx, 429).",
    ),
    def(
        "dlpipe_decode_duration_seconds",
        H,
        &["worker"],
        B::Seconds,
        "Decoding, resizing and centre-cropping one fetched image (the model's device normalises the crop).",
    ),
    def(
        "dlpipe_featurize_duration_seconds",
        H,
        &["worker", "device", "model"],
        B::Seconds,
        "One forward pass of the CNN over a micro-batch, normalising its crops on the device included.",
    ),
    def(
        "dlpipe_featurize_batch_records",
        H,
        &["worker", "device", "model"],
        B::Records,
        "Images per forward pass; its `_sum` counts the images featurized.",
    ),
    def(
        "dlpipe_predict_duration_seconds",
        H,
        &["worker"],
        B::Seconds,
        "Classifying the records of one epoch on one worker.",
    ),
    def(
        "dlpipe_learn_duration_seconds",
        H,
        &["worker"],
        B::Seconds,
        "Learning the labelled examples of one epoch (every worker learns every example).",
    ),
    def(
        "dlpipe_produce_duration_seconds",
        H,
        &["worker"],
        B::Seconds,
        "From handing a prediction or dead letter to the producer to the broker's acknowledgement.",
    ),
    def(
        "dlpipe_end_to_end_latency_seconds",
        H,
        &["worker"],
        B::LongSeconds,
        "From the input record's Kafka timestamp to the acknowledgement of its prediction.",
    ),
    def(
        "dlpipe_in_flight_records",
        G,
        &["worker"],
        B::None,
        "Records read from Kafka and not yet acknowledged on an output topic (bounded by pipeline.max_backlog).",
    ),
    def(
        "dlpipe_queue_depth_records",
        G,
        &["worker", "stage"],
        B::None,
        "Records waiting or working in one stage: `decode_queue`, `decoding`, `featurize_batch`, `learn_wait`, \
         `produce_unacked`.",
    ),
    def(
        "dlpipe_consumer_lag_records",
        G,
        &["worker", "topic", "partition"],
        B::None,
        "High watermark minus the group's committed offset: records not yet published and committed.",
    ),
    def(
        "dlpipe_frontier_lag_seconds",
        G,
        &["worker", "operator"],
        B::None,
        "How far an operator's output frontier trails wall-clock time (0 once the operator is done).",
    ),
    def(
        "dlpipe_pipeline_stalled_seconds",
        G,
        &["worker"],
        B::None,
        "How long the worker's published frontier has stood still with records in flight, once that passes \
         pipeline.stall_after_secs (0 otherwise); the status line and /readyz say what it waits for.",
    ),
    def(
        "dlpipe_model_version",
        G,
        &["worker", "model"],
        B::None,
        "Labelled examples the worker's classifier has learned.",
    ),
    def("dlpipe_learner_classes", G, &["worker"], B::None, "Classes the online classifier knows."),
    def(
        "dlpipe_learner_frozen_copies",
        G,
        &["worker"],
        B::None,
        "Copies of the classifier kept to predict records that come after it has learned past their epoch (behind a \
         slow fetch): one per epoch learned since.",
    ),
    def(
        "dlpipe_learner_examples_total",
        C,
        &["worker", "class"],
        B::None,
        "Labelled examples learned, by label; `rate()` of their sum is the model's update rate.",
    ),
    def(
        "dlpipe_learner_correct_total",
        C,
        &["worker", "class"],
        B::None,
        "Labelled examples the classifier predicted right before learning them (prequential), by label.",
    ),
    def(
        "dlpipe_learner_refused_total",
        C,
        &["worker"],
        B::None,
        "Labels not learned (beyond learner.max_classes, or features of the wrong dimension).",
    ),
    def(
        "dlpipe_learner_drifts_total",
        C,
        &["worker"],
        B::None,
        "Drifts the Page-Hinkley detector found in the learner's prequential log-loss ([drift]); each one is \
         logged with its update number and takes drift.action.",
    ),
    def(
        "dlpipe_learner_drift_statistic",
        G,
        &["worker"],
        B::None,
        "The drift detector's statistic as a fraction of drift.threshold, after the last epoch learned: a drift \
         is detected at 1, and the statistic restarts from 0.",
    ),
    def(
        "dlpipe_feedback_joined_total",
        C,
        &["worker"],
        B::None,
        "Labels from the feedback topic joined to their image's features and handed to the learner (a \
         correction counts again). Labels that join nothing are dead letters (`label_too_late`, `unknown_id`).",
    ),
    def(
        "dlpipe_feedback_label_delay_seconds",
        H,
        &["worker"],
        B::LongSeconds,
        "From an image record's Kafka timestamp to the moment its label joined it (the label may have come first).",
    ),
    def(
        "dlpipe_feedback_retained_records",
        G,
        &["worker"],
        B::None,
        "Images whose features the feedback join keeps for a label (this worker's share of the ids).",
    ),
    def(
        "dlpipe_feedback_retained_bytes",
        G,
        &["worker"],
        B::None,
        "Bytes of the features the feedback join keeps (ids and the arrangements' overhead come on top).",
    ),
    def(
        "dlpipe_checkpoints_written_total",
        C,
        &[],
        B::None,
        "Checkpoints of the online learner written to the model topic (by worker 0 of process 0).",
    ),
    def(
        "dlpipe_checkpoint_duration_seconds",
        H,
        &[],
        B::Seconds,
        "Writing one checkpoint: encoding, the model topic's acknowledgement, the snapshot file.",
    ),
    def(
        "dlpipe_online_accuracy_ratio",
        G,
        &["worker", "window", "model"],
        B::None,
        "Prequential accuracy: over the whole run (`window=\"prequential\"`) and the last \
         pipeline.prequential_window examples, 1000 by default (`window=\"recent\"`); of the classifier \
         that predicts (`model=\"champion\"`) and of a challenger in shadow (`model=\"shadow\"`, \
         `dlpipe promote --shadow`).",
    ),
    def(
        "dlpipe_online_log_loss",
        G,
        &["worker", "window", "model"],
        B::None,
        "Mean prequential log-loss (nats), with the same two windows as the accuracy.",
    ),
    def(
        "dlpipe_device_memory_used_bytes",
        G,
        &["device"],
        B::None,
        "GPU memory in use on a CUDA device the pipeline runs on (nvidia-smi; absent on CPU).",
    ),
    def(
        "dlpipe_device_memory_total_bytes",
        G,
        &["device"],
        B::None,
        "GPU memory of a CUDA device the pipeline runs on (nvidia-smi; absent on CPU).",
    ),
    def(
        "dlpipe_device_utilization_ratio",
        G,
        &["device"],
        B::None,
        "Fraction of time a CUDA device was busy over nvidia-smi's last sample period (absent on CPU).",
    ),
];

/// The definition of `name`; panics for a name not in [`DEFINITIONS`] (a programming error the
/// unit tests catch).
pub fn definition(name: &str) -> &'static MetricDef {
    DEFINITIONS.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("metric {name} is not in DEFINITIONS"))
}

/// Every metric of one process, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub records_consumed: IntCounterVec,
    pub records_predicted: IntCounterVec,
    pub records_dead_lettered: IntCounterVec,
    pub messages_published: IntCounterVec,
    pub messages_failed: IntCounterVec,
    pub fetched_bytes: IntCounterVec,
    pub fetch_seconds: HistogramVec,
    pub fetch_errors: IntCounterVec,
    pub fetch_retries: IntCounterVec,
    pub decode_seconds: HistogramVec,
    pub featurize_seconds: HistogramVec,
    pub featurize_batch: HistogramVec,
    pub predict_seconds: HistogramVec,
    pub learn_seconds: HistogramVec,
    pub produce_seconds: HistogramVec,
    pub end_to_end_seconds: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub frontier_lag: GaugeVec,
    pub pipeline_stalled: GaugeVec,
    pub model_version: IntGaugeVec,
    pub learner_classes: IntGaugeVec,
    pub learner_frozen_copies: IntGaugeVec,
    pub learner_examples: IntCounterVec,
    pub learner_correct: IntCounterVec,
    pub learner_refused: IntCounterVec,
    pub learner_drifts: IntCounterVec,
    pub learner_drift_statistic: GaugeVec,
    pub feedback_joined: IntCounterVec,
    pub feedback_label_delay: HistogramVec,
    pub feedback_retained_records: IntGaugeVec,
    pub feedback_retained_bytes: IntGaugeVec,
    pub checkpoints_written: IntCounterVec,
    pub checkpoint_seconds: HistogramVec,
    pub online_accuracy: GaugeVec,
    pub online_log_loss: GaugeVec,
    pub device_memory_used: IntGaugeVec,
    pub device_memory_total: IntGaugeVec,
    pub device_utilization: GaugeVec,
    /// Names registered, in registration order (the tests compare them with DEFINITIONS).
    pub registered: Vec<&'static str>,
}

/// Creates and registers the metrics of [`DEFINITIONS`], checking each against its kind.
struct Builder {
    registry: Registry,
    registered: Vec<&'static str>,
}

impl Builder {
    fn add<M: Collector + Clone + 'static>(
        &mut self,
        name: &'static str,
        kind: Kind,
        make: impl FnOnce(&MetricDef) -> M,
    ) -> M {
        let def = definition(name);
        assert_eq!(def.kind, kind, "{name} is defined as a {}", def.kind.as_str());
        let metric = make(def);
        self.registry.register(Box::new(metric.clone())).unwrap_or_else(|e| panic!("registering {name}: {e}"));
        self.registered.push(name);
        metric
    }

    fn counter(&mut self, name: &'static str) -> IntCounterVec {
        self.add(name, Kind::Counter, |d| IntCounterVec::new(Opts::new(d.name, d.help), d.labels).expect("valid"))
    }

    fn int_gauge(&mut self, name: &'static str) -> IntGaugeVec {
        self.add(name, Kind::Gauge, |d| IntGaugeVec::new(Opts::new(d.name, d.help), d.labels).expect("valid"))
    }

    fn gauge(&mut self, name: &'static str) -> GaugeVec {
        self.add(name, Kind::Gauge, |d| GaugeVec::new(Opts::new(d.name, d.help), d.labels).expect("valid"))
    }

    fn histogram(&mut self, name: &'static str) -> HistogramVec {
        self.add(name, Kind::Histogram, |d| {
            HistogramVec::new(HistogramOpts::new(d.name, d.help).buckets(d.buckets.bounds()), d.labels).expect("valid")
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut b = Builder { registry: Registry::new(), registered: Vec::new() };
        let metrics = Metrics {
            build_info: b.int_gauge("dlpipe_build_info"),
            records_consumed: b.counter("dlpipe_records_consumed_total"),
            records_predicted: b.counter("dlpipe_records_predicted_total"),
            records_dead_lettered: b.counter("dlpipe_records_dead_lettered_total"),
            messages_published: b.counter("dlpipe_messages_published_total"),
            messages_failed: b.counter("dlpipe_messages_failed_total"),
            fetched_bytes: b.counter("dlpipe_fetched_bytes_total"),
            fetch_seconds: b.histogram("dlpipe_fetch_duration_seconds"),
            fetch_errors: b.counter("dlpipe_fetch_errors_total"),
            fetch_retries: b.counter("dlpipe_fetch_retries_total"),
            decode_seconds: b.histogram("dlpipe_decode_duration_seconds"),
            featurize_seconds: b.histogram("dlpipe_featurize_duration_seconds"),
            featurize_batch: b.histogram("dlpipe_featurize_batch_records"),
            predict_seconds: b.histogram("dlpipe_predict_duration_seconds"),
            learn_seconds: b.histogram("dlpipe_learn_duration_seconds"),
            produce_seconds: b.histogram("dlpipe_produce_duration_seconds"),
            end_to_end_seconds: b.histogram("dlpipe_end_to_end_latency_seconds"),
            in_flight: b.int_gauge("dlpipe_in_flight_records"),
            queue_depth: b.int_gauge("dlpipe_queue_depth_records"),
            consumer_lag: b.int_gauge("dlpipe_consumer_lag_records"),
            frontier_lag: b.gauge("dlpipe_frontier_lag_seconds"),
            pipeline_stalled: b.gauge("dlpipe_pipeline_stalled_seconds"),
            model_version: b.int_gauge("dlpipe_model_version"),
            learner_classes: b.int_gauge("dlpipe_learner_classes"),
            learner_frozen_copies: b.int_gauge("dlpipe_learner_frozen_copies"),
            learner_examples: b.counter("dlpipe_learner_examples_total"),
            learner_correct: b.counter("dlpipe_learner_correct_total"),
            learner_refused: b.counter("dlpipe_learner_refused_total"),
            learner_drifts: b.counter("dlpipe_learner_drifts_total"),
            learner_drift_statistic: b.gauge("dlpipe_learner_drift_statistic"),
            feedback_joined: b.counter("dlpipe_feedback_joined_total"),
            feedback_label_delay: b.histogram("dlpipe_feedback_label_delay_seconds"),
            feedback_retained_records: b.int_gauge("dlpipe_feedback_retained_records"),
            feedback_retained_bytes: b.int_gauge("dlpipe_feedback_retained_bytes"),
            checkpoints_written: b.counter("dlpipe_checkpoints_written_total"),
            checkpoint_seconds: b.histogram("dlpipe_checkpoint_duration_seconds"),
            online_accuracy: b.gauge("dlpipe_online_accuracy_ratio"),
            online_log_loss: b.gauge("dlpipe_online_log_loss"),
            device_memory_used: b.int_gauge("dlpipe_device_memory_used_bytes"),
            device_memory_total: b.int_gauge("dlpipe_device_memory_total_bytes"),
            device_utilization: b.gauge("dlpipe_device_utilization_ratio"),
            registry: b.registry,
            registered: b.registered,
        };
        metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out).expect("text encoding");
        out
    }

    /// Handles of one worker's feedback join.
    pub fn feedback_join(&self, worker: usize) -> FeedbackJoinMetrics {
        let w = [worker.to_string()];
        FeedbackJoinMetrics {
            joined: self.feedback_joined.with_label_values(&w),
            label_delay_seconds: self.feedback_label_delay.with_label_values(&w),
            retained_images: self.feedback_retained_records.with_label_values(&w),
            retained_bytes: self.feedback_retained_bytes.with_label_values(&w),
        }
    }

    /// Handles of one worker's operators.
    pub fn for_worker(&self, worker: usize, input_topic: &str) -> WorkerMetrics {
        let w = worker.to_string();
        let stage = |s: &str| self.queue_depth.with_label_values(&[&w, s]);
        WorkerMetrics {
            source: SourceMetrics {
                consumed: CounterByLabel::new(self.records_consumed.clone(), vec![w.clone(), input_topic.to_owned()]),
            },
            fetch_decode: FetchDecodeMetrics { queued: stage("decode_queue"), in_flight: stage("decoding") },
            featurize: FeaturizeMetrics { waiting: stage("featurize_batch") },
            learn_predict: LearnPredictMetrics {
                predicted: self.records_predicted.with_label_values(&[&w]),
                predict_seconds: self.predict_seconds.with_label_values(&[&w]),
                learn_seconds: self.learn_seconds.with_label_values(&[&w]),
                waiting: stage("learn_wait"),
                frozen: self.learner_frozen_copies.with_label_values(&[&w]),
            },
            sink: SinkMetrics {
                dead_lettered: CounterByLabel::new(self.records_dead_lettered.clone(), vec![w.clone()]),
                published: CounterByLabel::new(self.messages_published.clone(), vec![w.clone()]),
                failed: self.messages_failed.with_label_values(&[&w]),
                produce_seconds: self.produce_seconds.with_label_values(&[&w]),
                end_to_end_seconds: self.end_to_end_seconds.with_label_values(&[&w]),
                unacked: stage("produce_unacked"),
            },
            learner: LearnerMetrics {
                examples: CounterByLabel::new(self.learner_examples.clone(), vec![w.clone()]),
                correct: CounterByLabel::new(self.learner_correct.clone(), vec![w.clone()]),
                refused: self.learner_refused.with_label_values(&[&w]),
                drifts: self.learner_drifts.with_label_values(&[&w]),
                drift_statistic: self.learner_drift_statistic.with_label_values(&[&w]),
            },
        }
    }
}

/// What one worker hands its operators and its classifier.
pub struct WorkerMetrics {
    pub source: SourceMetrics,
    pub fetch_decode: FetchDecodeMetrics,
    pub featurize: FeaturizeMetrics,
    pub learn_predict: LearnPredictMetrics,
    pub sink: SinkMetrics,
    pub learner: LearnerMetrics,
}

/// Per-class counters of the online classifier.
#[derive(Clone)]
pub struct LearnerMetrics {
    pub examples: CounterByLabel,
    pub correct: CounterByLabel,
    pub refused: prometheus::IntCounter,
    pub drifts: prometheus::IntCounter,
    pub drift_statistic: prometheus::Gauge,
}

#[cfg(test)]
mod tests;
