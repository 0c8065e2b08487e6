//! The classifiers behind the `learn_predict` operator.

use crate::learn::{DriftAction, LearnError, PageHinkley, Prequential, SoftmaxRegression};
use crate::metrics::LearnerMetrics;
use crate::model::top_k;
use dlpipe_operators::{ClassScore, Epoch, Featured, Head, LabelledExample, Learner, Predict};

/// The pretrained model's own classes, from its logits. Learns nothing.
#[derive(Clone)]
pub struct ImagenetHead {
    pub class_names: Vec<String>,
}

impl Predict for ImagenetHead {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        let Some(logits) = &record.logits else { return Vec::new() };
        top_k(logits, k, &self.class_names)
            .into_iter()
            .map(|c| ClassScore { class: c.name.unwrap_or_else(|| c.class.to_string()), probability: c.probability })
            .collect()
    }

    fn version(&self) -> u64 {
        0
    }
}

impl Head for ImagenetHead {
    type Frozen = ImagenetHead;

    fn freeze(&self) -> ImagenetHead {
        self.clone()
    }

    fn learn(&mut self, _epoch: Epoch, _examples: &[LabelledExample]) {}
}

/// The online classifier as it was at an epoch boundary: predicts what the head predicted
/// then (see `learn_predict`'s late records).
pub struct FrozenClassifier {
    model: SoftmaxRegression,
}

impl Predict for FrozenClassifier {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        classify(&self.model, record, k)
    }

    fn version(&self) -> u64 {
        self.model.updates()
    }
}

/// The `k` most probable classes of `record` by `model`.
fn classify(model: &SoftmaxRegression, record: &Featured, k: usize) -> Vec<ClassScore> {
    match model.top_k(&record.features, k) {
        Ok(top) => top
            .into_iter()
            .map(|(class, probability)| ClassScore { class: model.classes()[class].clone(), probability })
            .collect(),
        Err(error) => {
            tracing::warn!(%error, id = record.record.id, "cannot classify the record");
            Vec::new()
        }
    }
}

/// The learner's state at a learned frontier (the time it is sent at): what a checkpoint at
/// that frontier holds.
#[derive(Clone)]
pub struct LearnerState {
    pub model: SoftmaxRegression,
    pub prequential: Prequential,
    /// The drift detector, when it is on.
    pub drift: Option<PageHinkley>,
}

/// Online softmax regression on the CNN features, test-then-train.
pub struct OnlineLrHead {
    pub model: SoftmaxRegression,
    pub metrics: Prequential,
    /// The drift detector on each learned example's prequential log-loss (None: off).
    pub drift: Option<PageHinkley>,
    /// What a detection does to the model.
    pub drift_action: DriftAction,
    /// Give the learner's state for a checkpoint every this many epochs (0: never).
    checkpoint_every_epochs: u64,
    /// The learned frontier of the last state given.
    last_state: Option<Epoch>,
    /// Labels refused (too many classes, wrong dimension), counted and logged once each.
    pub refused: u64,
    /// Per-class Prometheus counters of what is learned, when the pipeline exports metrics.
    pub counters: Option<LearnerMetrics>,
}

impl OnlineLrHead {
    pub fn new(model: SoftmaxRegression, metrics: Prequential, checkpoint_every_epochs: u64) -> OnlineLrHead {
        OnlineLrHead {
            model,
            metrics,
            drift: None,
            drift_action: DriftAction::None,
            checkpoint_every_epochs,
            last_state: None,
            refused: 0,
            counters: None,
        }
    }

    /// The head with a drift detector (None: none) that takes `action` on a detection.
    pub fn with_drift(mut self, detector: Option<PageHinkley>, action: DriftAction) -> OnlineLrHead {
        self.drift = detector;
        self.drift_action = action;
        self
    }

    /// Feeds a learned example's loss to the drift detector; on a detection, logs it, counts
    /// it and takes the configured action. Runs after the example is learned, so the action
    /// leaves the model as the stream's next example will find it, at every worker alike.
    fn watch_drift(&mut self, loss: f32) {
        let Some(detector) = &mut self.drift else { return };
        if !detector.observe(loss) {
            return;
        }
        let action = self.drift_action;
        tracing::warn!(
            update = self.model.updates(),
            detections = detector.detections(),
            ?action,
            "drift: the prequential log-loss has risen (Page-Hinkley test on drift.threshold)"
        );
        if let Some(c) = &self.counters {
            c.drifts.inc();
        }
        match action {
            DriftAction::None => {}
            DriftAction::RestartStepSize => self.model.restart_step_size(),
            DriftAction::Reset => self.model.reset(),
        }
    }
}

impl Predict for OnlineLrHead {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        classify(&self.model, record, k)
    }

    fn version(&self) -> u64 {
        self.model.updates()
    }
}

impl Head for OnlineLrHead {
    type Frozen = FrozenClassifier;

    fn freeze(&self) -> FrozenClassifier {
        FrozenClassifier { model: self.model.predictor() }
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
                    self.watch_drift(outcome.loss);
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
        if let Err(error) = self.model.replay() {
            tracing::error!(%error, "replaying recent examples");
        }
        // The state after each epoch has no SGD step pending, so that a checkpoint of it
        // continues exactly as this learner does.
        self.model.flush();
        if let (Some(c), Some(detector)) = (&self.counters, &self.drift) {
            c.drift_statistic.set(detector.statistic_ratio());
        }
    }
}

impl Learner for OnlineLrHead {
    type State = LearnerState;

    fn learned_through(&mut self, frontier: Epoch) -> Option<LearnerState> {
        let every = self.checkpoint_every_epochs;
        let due = frontier == Epoch::MAX || self.last_state.is_none_or(|last| frontier - last >= every);
        if every == 0 || !due {
            return None;
        }
        self.last_state = Some(frontier);
        Some(LearnerState { model: self.model.clone(), prequential: self.metrics.clone(), drift: self.drift.clone() })
    }
}

/// The online classifier a run starts with: from `init_model` (a classifier file whose
/// features must be this model's), else the group's `restored` checkpoint (its classifier,
/// prequential metrics and drift detector), else new. It checkpoints every `checkpoint_every`
/// epochs (0: never).
pub fn online_head(
    config: &crate::config::Config,
    manifest: &crate::model::Manifest,
    init_model: Option<&std::path::Path>,
    restored: Option<&super::Checkpoint>,
    checkpoint_every: u64,
    counters: LearnerMetrics,
) -> Result<OnlineLrHead, super::PipelineError> {
    if !manifest.has(crate::model::OutputKind::Features) {
        let model = manifest.name.clone();
        return Err(super::PipelineError::Head { head: "online_lr", needs: "features", model });
    }
    let window = config.pipeline.prequential_window;
    let p = &config.pipeline;
    let (model, prequential, drift) = match (init_model, restored) {
        (Some(path), _) => {
            let classifier = crate::transfer::classifier::Classifier::load(path)?;
            classifier.check_featurizer(manifest)?;
            (classifier.model, Prequential::new(window), config.drift.detector())
        }
        (None, Some(restored)) => {
            restored.check(&p.group_id, &p.input_topic, manifest)?;
            (restored.model.clone(), restored.prequential(window), restored.drift(&config.drift))
        }
        (None, None) => {
            let model = SoftmaxRegression::new(manifest.feature_dim, config.learner.clone())?;
            (model, Prequential::new(window), config.drift.detector())
        }
    };
    let mut head = OnlineLrHead::new(model, prequential, checkpoint_every).with_drift(drift, config.drift.action);
    head.counters = Some(counters);
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prequential_window_is_the_configured_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet_lite0.json");
        let manifest = crate::model::Manifest::load(&path).expect("make setup exports the model");
        let learner = crate::metrics::Metrics::new().for_worker(0, "images").learner;
        for window in [50, 1000, 0] {
            let mut config = crate::config::Config::default();
            config.pipeline.prequential_window = window;
            let head = online_head(&config, &manifest, None, None, 0, learner.clone()).unwrap();
            assert_eq!(head.metrics.window_capacity(), window);
        }
    }
}
