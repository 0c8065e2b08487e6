//! The sink's messages: an outcome encoded as what the producer sends, what each message
//! carries to its delivery report, and the reports themselves.

use super::SinkSpec;
use crate::metrics::SinkMetrics;
use crate::records::{now_ms, DeadLetter, Epoch, Outcome};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, Message};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One message for the producer: a prediction, a dead letter or a record's features, encoded.
pub(crate) struct Outgoing {
    pub(crate) sent: Sent,
    pub(crate) payload: String,
}

impl Outgoing {
    /// Encodes one outcome of `epoch` as its messages: the prediction (and, with a features
    /// topic, the record's features) or the dead letter. Counts dead letters by kind.
    pub(crate) fn encode(
        epoch: Epoch,
        outcome: Outcome,
        spec: &SinkSpec,
        metrics: &mut SinkMetrics,
        mut give: impl FnMut(Outgoing),
    ) {
        let (partition, offset) = match &outcome {
            Outcome::Predicted(p) => (p.record.partition, p.record.offset),
            Outcome::Dead(d) | Outcome::FeedbackDead(d) => (d.partition, d.offset),
        };
        let sent = |kind, key: &str| Sent { epoch, kind, key: key.to_owned(), partition, offset, replacement: false };
        let input = outcome.input_position().is_some();
        match outcome {
            Outcome::Predicted(p) => {
                let ts = p.record.kafka_ts_ms;
                give(Outgoing {
                    sent: sent(MessageKind::Prediction { input_ts_ms: ts }, &p.record.id),
                    payload: p.to_json(&spec.model),
                });
                if spec.features_topic.is_some() {
                    let payload = p.features_json(&spec.model);
                    give(Outgoing { sent: sent(MessageKind::Features, &p.record.id), payload });
                }
            }
            Outcome::Dead(d) | Outcome::FeedbackDead(d) => {
                metrics.dead_lettered.with(&d.error_kind).inc();
                // The one place every dead letter passes (fetch, decode, parse, label errors):
                // one log line each, with the fields a log pipeline finds the record by.
                tracing::warn!(
                    id = d.id.as_deref(),
                    partition,
                    offset,
                    source = if input { "input" } else { "feedback" },
                    uri = d.uri.as_deref(),
                    error_kind = d.error_kind,
                    error = d.error,
                    "dead letter"
                );
                let kind = if input { MessageKind::DeadLetter } else { MessageKind::FeedbackDeadLetter };
                give(Outgoing { sent: sent(kind, d.id.as_deref().unwrap_or_default()), payload: d.to_json() });
            }
        }
    }
}

/// Which output a message is, and so its topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageKind {
    /// With the input record's Kafka timestamp, for the end-to-end latency.
    Prediction {
        input_ts_ms: Option<i64>,
    },
    DeadLetter,
    /// A second message of a predicted record: its features.
    Features,
    /// A feedback record's dead letter (`partition` and `offset` are the feedback's).
    FeedbackDeadLetter,
}

/// What the sink needs to know of a message again when its delivery report comes back (the
/// payload stays behind: the producer has copied it).
#[derive(Clone)]
pub(crate) struct Sent {
    pub(crate) epoch: Epoch,
    pub(crate) kind: MessageKind,
    pub(crate) key: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// A small dead letter standing in for an output the broker refused as too large.
    pub(crate) replacement: bool,
}

impl Sent {
    /// The topic this message goes to.
    pub(crate) fn topic<'a>(&self, spec: &'a SinkSpec) -> &'a str {
        match self.kind {
            _ if self.replacement => &spec.dead_letter_topic,
            MessageKind::Prediction { .. } => &spec.predictions_topic,
            MessageKind::DeadLetter | MessageKind::FeedbackDeadLetter => &spec.dead_letter_topic,
            MessageKind::Features => {
                spec.features_topic.as_ref().expect("features are only sent with a features topic")
            }
        }
    }

    /// What this message answers, for errors: "record P:O" (input) or "feedback P:O".
    pub(crate) fn source(&self) -> String {
        let what = if self.kind == MessageKind::FeedbackDeadLetter { "feedback" } else { "record" };
        format!("{what} {}:{}", self.partition, self.offset)
    }

    /// Whether this is an input record's one prediction or dead letter (what the backlog
    /// counts), rather than its features or a feedback record's dead letter.
    pub(crate) fn is_record_output(&self) -> bool {
        matches!(self.kind, MessageKind::Prediction { .. } | MessageKind::DeadLetter)
    }

    /// The small dead letter that replaces this message when the broker refuses its size
    /// (for features: the record has its prediction, and this says its features are missing).
    pub(crate) fn replaced(&self, error: &str) -> Outgoing {
        let what = if self.kind == MessageKind::Features { "features" } else { "output" };
        let dead = DeadLetter::output_too_large(&self.key, self.partition, self.offset, what, error);
        let sent = Sent {
            epoch: self.epoch,
            // A replaced features message or feedback dead letter still is not an input
            // record's output (it goes to the dead-letter topic as every replacement does).
            kind: if self.is_record_output() { MessageKind::DeadLetter } else { self.kind },
            key: dead.id.clone().unwrap_or_default(),
            partition: self.partition,
            offset: self.offset,
            replacement: true,
        };
        Outgoing { sent, payload: dead.to_json() }
    }
}

/// What the sink attaches to each message it sends, and gets back with its delivery report.
pub struct MessageInFlight {
    pub(crate) at: Instant,
    pub(crate) message: Sent,
}

/// One delivery report.
pub(crate) struct Report {
    /// Why the message was not delivered, if it was not: the error code and the message.
    pub(crate) outcome: Result<(), (Option<RDKafkaErrorCode>, String)>,
    pub(crate) topic: String,
    /// Seconds from send to acknowledgement.
    pub(crate) produce_seconds: f64,
    pub(crate) message: Sent,
}

impl Report {
    /// Counts a delivered message: by topic, its produce time and, for a prediction, the
    /// end-to-end latency from its input's Kafka timestamp.
    pub(crate) fn observe_published(&self, metrics: &mut SinkMetrics) {
        metrics.published.with(&self.topic).inc();
        metrics.produce_seconds.observe(self.produce_seconds);
        if let MessageKind::Prediction { input_ts_ms: Some(ts) } = self.message.kind {
            metrics.end_to_end_seconds.observe((now_ms() - ts).max(0) as f64 / 1000.0);
        }
    }
}

/// Delivery reports, collected by the producer's callbacks during `poll`.
#[derive(Clone, Default)]
pub struct SinkContext {
    pub(crate) reports: Arc<Mutex<Vec<Report>>>,
}

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Box<MessageInFlight>;

    fn delivery(&self, result: &DeliveryResult<'_>, delivery: Box<MessageInFlight>) {
        let (outcome, topic) = match result {
            Ok(message) => (Ok(()), message.topic().to_owned()),
            Err((error, message)) => (
                Err((error.rdkafka_error_code(), format!("delivery to topic {} failed: {error}", message.topic()))),
                message.topic().to_owned(),
            ),
        };
        let MessageInFlight { at, message } = *delivery;
        let report = Report { outcome, topic, produce_seconds: at.elapsed().as_secs_f64(), message };
        self.reports.lock().expect("not poisoned").push(report);
    }
}

/// Whether the broker (or the producer's own check) refused a message for its size.
pub(crate) fn too_large(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::MessageBatchTooLarge
        )
    )
}
