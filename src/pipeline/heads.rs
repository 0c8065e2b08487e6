//! The classifiers behind the `learn_predict` operator.

use crate::learn::{DriftAction, LearnError, PageHinkley, Prequential, SoftmaxRegression};
use crate::metrics::LearnerMetrics;
use crate::model::top_k;
use dlpipe_operators::{
    ClassScore, ClassifierId, Epoch, Featured, Head, LabelledExample, Learner, Predict, Promotion, PromotionRole,
};

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

    fn classifier(&self) -> ClassifierId {
        ClassifierId("imagenet".into())
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
    classifier: ClassifierId,
}

impl Predict for FrozenClassifier {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        classify(&self.model, record, k)
    }

    fn version(&self) -> u64 {
        self.model.updates()
    }

    fn classifier(&self) -> ClassifierId {
        self.classifier.clone()
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
    pub classifier: ClassifierId,
    pub prequential: Prequential,
    /// The drift detector, when it is on.
    pub drift: Option<PageHinkley>,
    /// The model-topic offset of the last promotion taken.
    pub promoted_through: Option<i64>,
    pub shadow: Option<Shadow>,
}

/// A challenger (`dlpipe promote --shadow`): learns the same labelled records as the champion,
/// scored prequentially beside it; never predicts for the output.
#[derive(Clone)]
pub struct Shadow {
    pub classifier: ClassifierId,
    pub model: SoftmaxRegression,
    pub metrics: Prequential,
}

/// Online softmax regression on the CNN features, test-then-train.
pub struct OnlineLrHead {
    pub model: SoftmaxRegression,
    /// Where `model` started: predictions name it.
    pub classifier: ClassifierId,
    pub metrics: Prequential,
    /// The model-topic offset of the last promotion taken (a restart reads those after it).
    pub promoted_through: Option<i64>,
    pub shadow: Option<Shadow>,
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
            classifier: ClassifierId::new_learner(),
            metrics,
            promoted_through: None,
            shadow: None,
            drift: None,
            drift_action: DriftAction::None,
            checkpoint_every_epochs,
            last_state: None,
            refused: 0,
            counters: None,
        }
    }

    /// The head with a drift detector (None: none).
    pub fn with_drift(mut self, detector: Option<PageHinkley>) -> OnlineLrHead {
        self.drift = detector;
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

    /// Learns one example (the shadow too), scoring it prequentially first.
    fn learn_one(&mut self, example: &LabelledExample) {
        if let Some(shadow) = &mut self.shadow {
            // Its refusals (another class list, max_classes) lose nothing: the champion's count.
            if let Ok(outcome) = shadow.model.learn(&example.features, &example.label) {
                shadow.metrics.record(outcome);
            }
        }
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
}

impl Predict for OnlineLrHead {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        classify(&self.model, record, k)
    }

    fn version(&self) -> u64 {
        self.model.updates()
    }

    fn classifier(&self) -> ClassifierId {
        self.classifier.clone()
    }
}

impl Head for OnlineLrHead {
    type Frozen = FrozenClassifier;

    fn freeze(&self) -> FrozenClassifier {
        FrozenClassifier { model: self.model.predictor(), classifier: self.classifier.clone() }
    }

    fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
        for example in examples {
            self.learn_one(example);
        }
        if let Some(shadow) = &mut self.shadow {
            if let Err(error) = shadow.model.replay() {
                tracing::error!(%error, "replaying recent examples (shadow)");
            }
            shadow.model.flush();
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

    /// The promoted classifier replaces the champion (which keeps its prequential metrics: they
    /// score what predicts) or the shadow. One that is not a classifier of these features is
    /// refused, at every worker alike.
    fn promote(&mut self, epoch: Epoch, promotion: &Promotion) {
        self.promoted_through = Some(promotion.offset);
        let (id, role) = (&promotion.id, promotion.role);
        let model = match SoftmaxRegression::from_bytes(&promotion.classifier) {
            Ok((model, _)) if model.dim() == self.model.dim() => model,
            Ok((model, _)) => {
                let (dim, features) = (model.dim(), self.model.dim());
                tracing::error!(%id, ?role, dim, features, "promotion refused: the classifier is of other features");
                return;
            }
            Err(error) => {
                tracing::error!(%id, ?role, %error, "promotion refused: not a classifier");
                return;
            }
        };
        tracing::info!(%id, ?role, epoch, updates = model.updates(), "promoted: learns from epoch {epoch} on");
        let classifier = id.clone();
        match role {
            PromotionRole::Champion => {
                self.model = model;
                self.classifier = classifier;
                if let Some(detector) = &mut self.drift {
                    detector.restart();
                }
            }
            PromotionRole::Shadow => {
                let metrics = Prequential::new(self.metrics.window_capacity());
                self.shadow = Some(Shadow { classifier, model, metrics });
            }
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
        Some(LearnerState {
            model: self.model.clone(),
            classifier: self.classifier.clone(),
            prequential: self.metrics.clone(),
            drift: self.drift.clone(),
            promoted_through: self.promoted_through,
            shadow: self.shadow.clone(),
        })
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
    let new = |model| OnlineLrHead::new(model, Prequential::new(window), checkpoint_every);
    let mut head = match (init_model, restored) {
        (Some(path), _) => {
            let classifier = crate::transfer::classifier::Classifier::load(path)?;
            classifier.check_featurizer(manifest)?;
            OnlineLrHead { classifier: classifier.id, ..new(classifier.model) }.with_drift(config.drift.detector())
        }
        (None, Some(restored)) => {
            restored.check(&p.group_id, &p.input_topic, manifest)?;
            let info = &restored.info;
            let metrics = restored.prequential(window);
            let shadow = restored.shadow(window);
            let (classifier, promoted_through) = (info.classifier.clone(), info.promoted_through);
            let head = OnlineLrHead { classifier, metrics, promoted_through, shadow, ..new(restored.model.clone()) };
            head.with_drift(restored.drift(&config.drift))
        }
        (None, None) => {
            let model = SoftmaxRegression::new(manifest.feature_dim, config.learner.clone())?;
            new(model).with_drift(config.drift.detector())
        }
    };
    head.drift_action = config.drift.action;
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
