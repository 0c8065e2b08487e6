//! The classifiers behind the `learn_predict` operator.

use crate::learn::{LearnError, Prequential, SoftmaxRegression};
use crate::metrics::LearnerMetrics;
use crate::model::top_k;
use dlpipe_operators::{ClassScore, Epoch, Featured, Head, LabelledExample};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The pretrained model's own classes, from its logits. Learns nothing.
pub struct ImagenetHead {
    pub class_names: Vec<String>,
}

impl Head for ImagenetHead {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        let Some(logits) = &record.logits else { return Vec::new() };
        top_k(logits, k, &self.class_names)
            .into_iter()
            .map(|c| ClassScore { class: c.name.unwrap_or_else(|| c.class.to_string()), probability: c.probability })
            .collect()
    }

    fn learn(&mut self, _epoch: Epoch, _examples: &[LabelledExample]) {}

    fn version(&self) -> u64 {
        0
    }
}

/// Where snapshots of the online classifier go; only one worker writes them.
pub struct Snapshots {
    pub every_epochs: u64,
    pub dir: PathBuf,
    pub topic: String,
    pub producer: BaseProducer,
    /// Metadata stored with each snapshot (the featurizer's name and sha256, ...).
    pub metadata: BTreeMap<String, String>,
}

/// Online softmax regression on the CNN features, test-then-train.
pub struct OnlineLrHead {
    pub model: SoftmaxRegression,
    pub metrics: Prequential,
    pub snapshots: Option<Snapshots>,
    epochs_since_snapshot: u64,
    last_snapshot_version: u64,
    /// Labels refused (too many classes, wrong dimension), counted and logged once each.
    pub refused: u64,
    /// Per-class Prometheus counters of what is learned, when the pipeline exports metrics.
    pub counters: Option<LearnerMetrics>,
}

impl OnlineLrHead {
    pub fn new(model: SoftmaxRegression, window: usize, snapshots: Option<Snapshots>) -> OnlineLrHead {
        let version = model.updates();
        OnlineLrHead {
            model,
            metrics: Prequential::new(window),
            snapshots,
            epochs_since_snapshot: 0,
            last_snapshot_version: version,
            refused: 0,
            counters: None,
        }
    }

    /// Writes a snapshot now if there are updates it does not have.
    pub fn snapshot(&mut self) {
        let Some(s) = &self.snapshots else { return };
        let version = self.model.updates();
        if version == self.last_snapshot_version {
            return;
        }
        let mut metadata = s.metadata.clone();
        metadata.insert("trained_by".into(), "stream".into());
        if let Some(acc) = self.metrics.accuracy() {
            metadata.insert("prequential_accuracy".into(), format!("{acc:.6}"));
        }
        let bytes = match self.model.to_bytes(&metadata) {
            Ok(bytes) => bytes,
            Err(error) => return tracing::warn!(%error, "cannot encode a classifier snapshot"),
        };
        if let Err(error) = std::fs::create_dir_all(&s.dir).and_then(|_| {
            let path = s.dir.join(format!("classifier-v{version:012}.safetensors"));
            std::fs::write(&path, &bytes)?;
            std::fs::write(s.dir.join("latest.safetensors.tmp"), &bytes)?;
            std::fs::rename(s.dir.join("latest.safetensors.tmp"), s.dir.join("latest.safetensors"))
        }) {
            tracing::warn!(%error, dir = %s.dir.display(), "cannot write a classifier snapshot file");
        }
        let key = "online_lr";
        if let Err((error, _)) = s.producer.send(BaseRecord::to(&s.topic).key(key).payload(&bytes)) {
            tracing::warn!(%error, topic = s.topic, "cannot publish a classifier snapshot");
        }
        s.producer.poll(Duration::ZERO);
        self.last_snapshot_version = version;
        tracing::debug!(version, "classifier snapshot written");
    }

    /// Flushes snapshots still queued for the model topic (at shutdown).
    pub fn flush(&mut self) {
        self.snapshot();
        if let Some(s) = &self.snapshots {
            let _ = s.producer.flush(Duration::from_secs(10));
        }
    }
}

impl Head for OnlineLrHead {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        match self.model.top_k(&record.features, k) {
            Ok(top) => top
                .into_iter()
                .map(|(class, probability)| ClassScore { class: self.model.classes()[class].clone(), probability })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, id = record.record.id, "cannot classify the record");
                Vec::new()
            }
        }
    }

    fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
        for example in examples {
            let classes = self.model.num_classes();
            match self.model.learn(&example.features, &example.label) {
                Ok(outcome) => {
                    // A feed of made-up labels would otherwise fill max_classes unnoticed:
                    // every discovery is logged, and reaching the limit is a warning.
                    let now = self.model.num_classes();
                    if now > classes {
                        let max = self.model.config().max_classes;
                        tracing::info!(label = example.label, classes = now, max_classes = max, "new class discovered");
                        if now == max {
                            tracing::warn!(max_classes = max, "the classifier has max_classes classes: labels of any other class will be refused (learner.classes fixes the list)");
                        }
                    }
                    self.metrics.record(outcome);
                    if let Some(c) = &mut self.counters {
                        c.examples.with(&example.label).inc();
                        // Touched for every class, so per-class accuracy exists from the first example.
                        let correct = c.correct.with(&example.label);
                        if outcome.correct {
                            correct.inc();
                        }
                    }
                }
                Err(error) => {
                    self.refused += 1;
                    if let Some(c) = &self.counters {
                        c.refused.inc();
                    }
                    if self.refused <= 10 || matches!(error, LearnError::Dimension { .. }) {
                        tracing::warn!(%error, partition = example.partition, offset = example.offset, "label not learned");
                    }
                }
            }
        }
        self.epochs_since_snapshot += 1;
        if self.snapshots.as_ref().is_some_and(|s| self.epochs_since_snapshot >= s.every_epochs) {
            self.epochs_since_snapshot = 0;
            self.snapshot();
        }
    }

    fn version(&self) -> u64 {
        self.model.updates()
    }
}
