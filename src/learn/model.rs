//! [`SoftmaxRegression`]: the online multinomial logistic regression.

use super::config::LearnerConfig;
use super::kernels::{self, SgdStep, SimdPath};
use super::optimizer::Optimizer;
use super::replay::ReplayBuffer;
use super::standardize::RunningStandardizer;
use super::LearnError;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// What one [`SoftmaxRegression::update`] observed, about the prediction it made *before*
/// learning from the example (test-then-train, "prequential" evaluation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpdateOutcome {
    /// The log-loss `-ln p(label)` of the prediction.
    pub loss: f32,
    /// Whether the most probable class (the first one on ties) was the label.
    pub correct: bool,
}

/// A multinomial logistic regression over `dim` features that learns one example at a time.
///
/// Classes are either fixed by the config or discovered as labels arrive (up to
/// `max_classes`); a new class starts with zero weights. The weights are a row-major
/// `K x D` matrix (one row per class) and a bias per class. With `standardize` on, each
/// feature vector is standardised with the running statistics of the vectors learned before
/// it, for prediction and learning alike.
///
/// The model after a sequence of updates depends only on that sequence: the arithmetic is f32
/// in a fixed order, identical on every CPU (see the `kernels` module), with no
/// randomness and no parallelism. [`updates`](Self::updates) counts the updates, and serves as
/// the model's version.
///
/// With SGD, an update's step on the weights is applied lazily, in the same pass over the
/// weights as the next update's forward pass: the weights (51 KB for 1280 features and 10
/// classes) do not fit in L1, and one pass over them instead of two is most of SGD's speed.
/// Every computation sees the weights as if the step had been applied at once, and gets the
/// same bits.
#[derive(Clone)]
pub struct SoftmaxRegression {
    pub(super) dim: usize,
    pub(super) config: LearnerConfig,
    pub(super) classes: Vec<String>,
    pub(super) class_ids: HashMap<String, usize>,
    /// `K x D`, row-major; `pending` is still to be applied to them.
    pub(super) weights: Vec<f32>,
    pub(super) pending: PendingStep,
    pub(super) bias: Vec<f32>,
    pub(super) optimizer: Optimizer,
    pub(super) standardizer: Option<RunningStandardizer>,
    pub(super) updates: u64,
    /// Examples learned of each class: the running counts behind balanced class weights.
    pub(super) class_counts: Vec<u64>,
    /// The update count at which SGD's learning-rate schedule (re)started: the schedule's `t`
    /// is `updates - schedule_start` (see [`reset`](Self::reset)).
    pub(super) schedule_start: u64,
    pub(super) simd: SimdPath,
    /// The standardised features of the example being learned (`D`), reused so that an update
    /// allocates nothing.
    pub(super) scratch_features: Vec<f32>,
    /// The logits, then probabilities, then gradient coefficients of the example being
    /// learned (`K`).
    pub(super) scratch_classes: Vec<f32>,
    /// The newest examples, replayed at each epoch's end (empty when replay is off).
    pub(super) replay: ReplayBuffer,
}

impl SoftmaxRegression {
    /// A model of `dim` features with the config's classes (or none, to discover them), zero
    /// weights and no standardisation statistics.
    pub fn new(dim: usize, config: LearnerConfig) -> Result<SoftmaxRegression, LearnError> {
        if dim == 0 {
            return Err(LearnError::Config { field: "dim", reason: "the model needs at least one feature".into() });
        }
        config.validate()?;
        let optimizer = Optimizer::new(&config.optimizer, 0, dim);
        let mut model = SoftmaxRegression {
            dim,
            classes: Vec::new(),
            class_ids: HashMap::new(),
            weights: Vec::new(),
            pending: PendingStep::new(dim),
            bias: Vec::new(),
            optimizer,
            standardizer: config.standardize.then(|| RunningStandardizer::new(dim)),
            updates: 0,
            class_counts: Vec::new(),
            schedule_start: 0,
            simd: SimdPath::detect(),
            scratch_features: vec![0.0; if config.standardize { dim } else { 0 }],
            scratch_classes: Vec::new(),
            replay: ReplayBuffer::new(dim, config.replay),
            config,
        };
        for class in model.config.classes.clone() {
            model.add_class(class);
        }
        Ok(model)
    }

    /// The number of features.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The config the model was created with.
    pub fn config(&self) -> &LearnerConfig {
        &self.config
    }

    /// The classes, in index order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// The index of class `label`, if the model has it.
    pub fn find_class(&self, label: &str) -> Option<usize> {
        self.class_ids.get(label).copied()
    }

    /// The index of class `label`, adding it (with zero weights) if the model discovers classes
    /// and has fewer than `max_classes`.
    pub fn class_index(&mut self, label: &str) -> Result<usize, LearnError> {
        if let Some(index) = self.find_class(label) {
            return Ok(index);
        }
        if !self.config.classes.is_empty() {
            return Err(LearnError::UnknownLabel { label: label.to_owned(), classes: self.classes.len() });
        }
        if self.classes.len() >= self.config.max_classes {
            return Err(LearnError::TooManyClasses { label: label.to_owned(), max_classes: self.config.max_classes });
        }
        self.add_class(label.to_owned());
        Ok(self.classes.len() - 1)
    }

    fn add_class(&mut self, label: String) {
        debug_assert!(!self.class_ids.contains_key(&label));
        self.flush();
        self.class_ids.insert(label.clone(), self.classes.len());
        self.classes.push(label);
        self.weights.resize(self.weights.len() + self.dim, 0.0);
        self.bias.push(0.0);
        self.class_counts.push(0);
        self.optimizer.add_class(self.dim);
        self.scratch_classes.push(0.0);
        self.pending.steps.push(0.0);
    }

    /// Applies the pending SGD step to the weights. The next update would fuse it with its
    /// own work, which rounds differently: callers that need a state that a snapshot restores
    /// bit for bit (the stream, at each epoch's end) apply it first.
    pub fn flush(&mut self) {
        if let Some(step) = self.pending.step() {
            self.simd.sgd_apply(&mut self.weights, step.features, step.steps, step.decay);
            self.pending.active = false;
        }
    }

    /// Keeps the weights and biases, and forgets what the optimizer has accumulated, so that
    /// the next steps are as large as the first ones were (after a drift, a model whose
    /// AdaGrad or FTRL rates have shrunk over thousands of examples relearns slowly): AdaGrad's
    /// and FTRL's accumulated squared gradients restart from zero (see `Optimizer::restart`),
    /// and SGD's learning-rate schedule from its first rate (a constant rate has nothing to
    /// restart). The examples kept for replay are forgotten: after a drift they teach what the
    /// labels no longer mean (kept, accuracy after a permutation of every Fashion-MNIST label
    /// fell by another 14-15 points, tests/drift.rs). Classes, standardisation
    /// statistics, class counts and the update count stay.
    pub fn restart_step_size(&mut self) {
        self.flush();
        self.optimizer.restart(&self.weights, &self.bias);
        self.schedule_start = self.updates;
        self.replay.forget();
    }

    /// Starts the classifier afresh: zero weights and biases, a new optimizer, SGD's schedule
    /// from its first rate, nothing kept for replay (see
    /// [`restart_step_size`](Self::restart_step_size)). The classes, the standardisation
    /// statistics and the class counts stay (they describe the features and the stream, not
    /// what the labels mean), and so does the update count, the model's version, which keeps
    /// increasing.
    pub fn reset(&mut self) {
        // The pending SGD step belongs to the weights being discarded.
        self.pending.active = false;
        self.weights.fill(0.0);
        self.bias.fill(0.0);
        self.optimizer = Optimizer::new(&self.config.optimizer, self.classes.len(), self.dim);
        self.schedule_start = self.updates;
        self.replay.forget();
    }

    /// The update count at which SGD's learning-rate schedule last (re)started (0 unless
    /// [`reset`](Self::reset) or [`restart_step_size`](Self::restart_step_size) ran).
    pub fn schedule_start(&self) -> u64 {
        self.schedule_start
    }

    /// Updates applied so far: the model's version.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The examples learned of each class index, whatever their weights.
    pub fn class_counts(&self) -> &[u64] {
        &self.class_counts
    }

    /// A copy that predicts exactly as this model does now, without the optimizer's state (its
    /// accumulators are as large as the weights, or twice, and a copy kept only to predict
    /// never needs them). The copy must not learn: its optimizer knows no class.
    pub(crate) fn predictor(&self) -> SoftmaxRegression {
        SoftmaxRegression {
            dim: self.dim,
            config: self.config.clone(),
            classes: self.classes.clone(),
            class_ids: self.class_ids.clone(),
            weights: self.weights.clone(),
            pending: self.pending.clone(),
            bias: self.bias.clone(),
            optimizer: Optimizer::new(&self.config.optimizer, 0, self.dim),
            standardizer: self.standardizer.clone(),
            updates: self.updates,
            class_counts: self.class_counts.clone(),
            schedule_start: self.schedule_start,
            simd: self.simd,
            scratch_features: Vec::new(),
            scratch_classes: Vec::new(),
            replay: ReplayBuffer::default(),
        }
    }

    /// The weights, a row-major `num_classes x dim` matrix, in standardised feature space when
    /// standardisation is on. Borrowed, except right after an SGD update, whose step on the
    /// weights is still pending: then computed.
    pub fn weights(&self) -> Cow<'_, [f32]> {
        match self.pending.step() {
            None => Cow::Borrowed(&self.weights),
            Some(step) => {
                let mut weights = self.weights.clone();
                self.simd.sgd_apply(&mut weights, step.features, step.steps, step.decay);
                Cow::Owned(weights)
            }
        }
    }

    /// The bias of each class.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// Adds `x` to the standardisation statistics without learning from it (nothing happens
    /// without standardisation). The batch trainer shows it the whole training set first, so
    /// that the first epoch's updates already see settled statistics.
    pub fn observe_features(&mut self, x: &[f32]) -> Result<(), LearnError> {
        self.check_features(x)?;
        match &mut self.standardizer {
            Some(s) => s.observe(x),
            None => Ok(()),
        }
    }

    /// The running feature statistics, when standardisation is on.
    pub fn standardizer(&self) -> Option<&RunningStandardizer> {
        self.standardizer.as_ref()
    }

    /// The instruction set the hot loops run with.
    pub fn simd_path(&self) -> SimdPath {
        self.simd
    }

    /// Runs the hot loops with the target's baseline instructions even where the CPU has
    /// faster ones (`true`), or with the fastest the CPU has (`false`, the default). The
    /// results are the same bits either way; this is for benchmarks and tests.
    pub fn set_portable_kernels(&mut self, portable: bool) {
        self.simd = if portable { SimdPath::Portable } else { SimdPath::detect() };
    }

    /// Checks that `x` is a finite feature vector of the model's dimension.
    fn check_features(&self, x: &[f32]) -> Result<(), LearnError> {
        if x.len() != self.dim {
            return Err(LearnError::Dimension { expected: self.dim, got: x.len() });
        }
        if !self.simd.all_finite(x) {
            return Err(LearnError::non_finite(x));
        }
        Ok(())
    }

    /// Writes the probability of each class for features `x` into `out` (one slot per class).
    /// Allocates a `dim` buffer for the standardised features when standardisation is on.
    pub fn predict_proba_into(&self, x: &[f32], out: &mut [f32]) -> Result<(), LearnError> {
        if out.len() != self.classes.len() {
            return Err(LearnError::OutputLength { expected: self.classes.len(), got: out.len() });
        }
        self.check_features(x)?;
        let standardized;
        let features = match &self.standardizer {
            Some(s) => {
                let mut z = vec![0.0; self.dim];
                s.transform_with(self.simd, x, &mut z);
                standardized = z;
                &standardized[..]
            }
            None => x,
        };
        match self.pending.step() {
            None => self.simd.matvec(&self.weights, features, out),
            Some(step) => self.simd.matvec_after_step(&self.weights, step, features, out),
        }
        add_bias(out, &self.bias);
        let (_, ln_sum) = kernels::softmax_in_place(out);
        if !ln_sum.is_finite() {
            return Err(LearnError::Diverged { updates: self.updates });
        }
        Ok(())
    }

    /// The probability of each class for features `x`; empty while the model has no classes.
    pub fn predict_proba(&self, x: &[f32]) -> Result<Vec<f32>, LearnError> {
        let mut out = vec![0.0; self.classes.len()];
        self.predict_proba_into(x, &mut out)?;
        Ok(out)
    }

    /// The `k` most probable classes for features `x` with their probabilities, most probable
    /// first (lower index first on ties).
    pub fn top_k(&self, x: &[f32], k: usize) -> Result<Vec<(usize, f32)>, LearnError> {
        let probs = self.predict_proba(x)?;
        let mut ranked: Vec<(usize, f32)> = probs.into_iter().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(k);
        Ok(ranked)
    }

    /// Learns one example of class index `label` (see [`class_index`](Self::class_index)),
    /// after predicting it: the outcome describes that prediction. On error the model is
    /// unchanged, except after [`LearnError::Diverged`], when it is beyond use.
    pub fn update(&mut self, x: &[f32], label: usize) -> Result<UpdateOutcome, LearnError> {
        self.update_weighted(x, label, 1.0)
    }

    /// [`update`](Self::update) with the example's gradient scaled by `weight` (class weights,
    /// importance weights): a weight of 2 moves the model as two copies of the example would to
    /// first order. The outcome is unweighted. `weight` must be finite and non-negative.
    ///
    /// `weight` is the whole weight: the config's class weights are not applied on top (that is
    /// [`learn`](Self::learn)'s job), so the batch trainer, which resolves its own, weighs once.
    /// The example is counted in [`class_counts`](Self::class_counts) all the same.
    pub fn update_weighted(&mut self, x: &[f32], label: usize, weight: f32) -> Result<UpdateOutcome, LearnError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(LearnError::Config {
                field: "example weight",
                reason: format!("must be finite and non-negative, got {weight}"),
            });
        }
        if x.len() != self.dim {
            return Err(LearnError::Dimension { expected: self.dim, got: x.len() });
        }
        if label >= self.classes.len() {
            return Err(LearnError::ClassIndex { index: label, classes: self.classes.len() });
        }
        let SoftmaxRegression { standardizer, simd, scratch_features, .. } = self;
        // Checks that x is finite before anything changes: the standardiser in its pass over x,
        // without one a pass of its own.
        let standardized = match standardizer {
            Some(s) => {
                s.transform_and_observe_with(*simd, x, scratch_features)?;
                true
            }
            None if simd.all_finite(x) => false,
            None => return Err(LearnError::non_finite(x)),
        };
        let outcome = self.step(x, standardized, label, weight)?;
        self.updates += 1;
        self.class_counts[label] += 1;
        self.replay.remember(x, label);
        Ok(outcome)
    }

    /// Learns again from examples kept for replay: `learner.replay.ratio` per example learned
    /// since the last call, drawn from the newest `learner.replay.capacity` (see
    /// [`ReplayConfig`](super::ReplayConfig)). The stream calls it at each epoch's end. Returns
    /// the number replayed. Replays are not updates: the version, the class counts and the
    /// standardisation statistics stay those of the examples learned; class weights apply.
    pub fn replay(&mut self) -> Result<usize, LearnError> {
        let rows = self.replay.draw();
        let buffer = std::mem::take(&mut self.replay);
        let mut replayed = Ok(rows.len());
        for &row in &rows {
            let (x, label) = buffer.example(row);
            if let Some(s) = &self.standardizer {
                s.transform_with(self.simd, x, &mut self.scratch_features);
            }
            let weight = self.config.class_weights.counted_weight(&self.classes[label], label, &self.class_counts);
            if let Err(e) = self.step(x, self.standardizer.is_some(), label, weight) {
                replayed = Err(e);
                break;
            }
        }
        self.replay = buffer;
        replayed
    }

    /// One step of learning class `label` from `x`, standardised in `scratch_features` when
    /// `standardized`: predicts, then moves the weights by the gradient scaled by `weight`.
    fn step(&mut self, x: &[f32], standardized: bool, label: usize, weight: f32) -> Result<UpdateOutcome, LearnError> {
        let SoftmaxRegression {
            weights,
            pending,
            bias,
            optimizer,
            updates,
            schedule_start,
            simd,
            scratch_features,
            scratch_classes,
            ..
        } = self;
        let features: &[f32] = if standardized { scratch_features } else { x };
        let probs = scratch_classes;
        match pending.step() {
            None => simd.matvec(weights, features, probs),
            Some(step) => simd.apply_step_matvec(weights, step, features, probs),
        }
        pending.active = false;
        add_bias(probs, bias);
        let logit = probs[label];
        let (max, ln_sum) = kernels::softmax_in_place(probs);
        // A NaN or infinite logit makes the normaliser NaN. Learning from it would spread NaN
        // through every weight; the model is beyond repair, say so.
        if !ln_sum.is_finite() {
            return Err(LearnError::Diverged { updates: *updates });
        }
        // -ln p(label) from the logits rather than from p, which may have underflowed to 0.
        // Mathematically non-negative; rounding may leave a tiny negative.
        let loss = (ln_sum - (logit - max)).max(0.0);
        let correct = kernels::argmax(probs) == Some(label);
        // The gradient of the cross-entropy wrt logit k is p_k - [k == label].
        probs[label] -= 1.0;
        if weight != 1.0 {
            probs.iter_mut().for_each(|g| *g *= weight);
        }
        if let Some(decay) = optimizer.step(*simd, *updates - *schedule_start, weights, bias, features, probs) {
            // SGD: keep the step, to apply with the next forward pass.
            pending.steps.copy_from_slice(probs);
            pending.decay = decay;
            if standardized {
                // The pending features are free again: swap rather than copy.
                std::mem::swap(&mut pending.features, scratch_features);
            } else {
                pending.features.copy_from_slice(x);
            }
            pending.active = true;
        }
        Ok(UpdateOutcome { loss, correct })
    }

    /// [`class_index`](Self::class_index) and [`update_weighted`](Self::update_weighted) in one:
    /// learns one example labelled `label`, weighted by the config's class weights (see
    /// [`ClassWeights::stream_weight`](super::ClassWeights::stream_weight)). An invalid
    /// feature vector adds no class.
    pub fn learn(&mut self, x: &[f32], label: &str) -> Result<UpdateOutcome, LearnError> {
        let index = match self.find_class(label) {
            Some(index) => index,
            None => {
                self.check_features(x)?;
                self.class_index(label)?
            }
        };
        let weight = self.config.class_weights.stream_weight(label, index, &self.class_counts);
        self.update_weighted(x, index, weight)
    }
}

/// `out += bias`.
fn add_bias(out: &mut [f32], bias: &[f32]) {
    for (o, b) in out.iter_mut().zip(bias) {
        *o += b;
    }
}

/// An SGD step computed by the last update and not yet applied to the weights (see
/// [`SoftmaxRegression`]).
#[derive(Clone, Debug)]
pub(super) struct PendingStep {
    /// Whether the fields below hold a step to apply.
    active: bool,
    /// `-lr * (p_k - y_k)` per class.
    steps: Vec<f32>,
    /// `1 - lr * l2`.
    decay: f32,
    /// The (standardised) features of the update.
    features: Vec<f32>,
}

impl PendingStep {
    /// No step pending, with room for the features of a `dim`-feature model (no classes yet).
    pub(super) fn new(dim: usize) -> PendingStep {
        PendingStep { active: false, steps: Vec::new(), decay: 1.0, features: vec![0.0; dim] }
    }

    /// No step pending, for `classes` classes of `dim` features.
    pub(super) fn with_classes(dim: usize, classes: usize) -> PendingStep {
        PendingStep { steps: vec![0.0; classes], ..PendingStep::new(dim) }
    }

    fn step(&self) -> Option<SgdStep<'_>> {
        self.active.then_some(SgdStep { steps: &self.steps, decay: self.decay, features: &self.features })
    }
}

impl fmt::Debug for SoftmaxRegression {
    /// The shape and state, without the weights.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftmaxRegression")
            .field("dim", &self.dim)
            .field("classes", &self.classes)
            .field("updates", &self.updates)
            .field("class_counts", &self.class_counts)
            .field("config", &self.config)
            .field("simd", &self.simd)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::config::{AdagradConfig, FtrlConfig, OptimizerConfig, ReplayConfig, SgdConfig};
    use crate::learn::testutil::{Rng, Separable};
    use crate::learn::{LearningRateSchedule, Prequential};

    fn config(optimizer: OptimizerConfig, standardize: bool) -> LearnerConfig {
        LearnerConfig { optimizer, standardize, ..LearnerConfig::default() }
    }

    fn sgd() -> OptimizerConfig {
        OptimizerConfig::Sgd(SgdConfig::default())
    }

    fn all_optimizers() -> Vec<OptimizerConfig> {
        vec![
            sgd(),
            OptimizerConfig::Sgd(SgdConfig {
                learning_rate: 0.5,
                schedule: LearningRateSchedule::InverseScaling { power_t: 0.25 },
                l2: 1e-4,
            }),
            // A separable toy problem learns to be sure fast at 0.1 (the default, 0.01, is chosen
            // for noisy image features, where 0.1 is overconfident).
            OptimizerConfig::Adagrad(AdagradConfig { learning_rate: 0.1, ..AdagradConfig::default() }),
            OptimizerConfig::Ftrl(FtrlConfig::default()),
        ]
    }

    #[test]
    fn a_weight_of_two_is_a_doubled_sgd_step_and_zero_is_no_step() {
        let mut data = Separable::new(7, 16, 3, 8).unscaled();
        let examples: Vec<(Vec<f32>, usize)> = (0..50).map(|_| data.sample()).collect();
        let lr = |learning_rate| {
            OptimizerConfig::Sgd(SgdConfig { learning_rate, schedule: LearningRateSchedule::Constant, l2: 0.0 })
        };
        let classes: Vec<String> = (0..3).map(|c| c.to_string()).collect();
        let fixed = |opt| LearnerConfig { classes: classes.clone(), ..config(opt, false) };
        let mut weighted = SoftmaxRegression::new(16, fixed(lr(0.05))).unwrap();
        let mut doubled = SoftmaxRegression::new(16, fixed(lr(0.1))).unwrap();
        let mut unweighted =
            SoftmaxRegression::new(16, fixed(OptimizerConfig::Adagrad(AdagradConfig::default()))).unwrap();
        for (x, label) in &examples {
            weighted.update_weighted(x, *label, 2.0).unwrap();
            doubled.update(x, *label).unwrap();
            unweighted.update_weighted(x, *label, 0.0).unwrap();
        }
        assert_eq!(weighted.weights(), doubled.weights());
        assert_eq!(weighted.bias(), doubled.bias());
        assert!(unweighted.weights().iter().chain(unweighted.bias()).all(|w| *w == 0.0));
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(weighted.update_weighted(&examples[0].0, 0, bad), Err(LearnError::Config { .. })));
        }
    }

    #[test]
    fn a_replay_learns_the_drawn_examples_again_without_counting_or_observing_them() {
        let mut data = Separable::new(3, 12, 3, 6);
        let examples: Vec<(Vec<f32>, usize)> = (0..40).map(|_| data.sample()).collect();
        let classes: Vec<String> = (0..3).map(|c| c.to_string()).collect();
        let replay = ReplayConfig { capacity: 25, ratio: 1.5 };
        for optimizer in all_optimizers() {
            let fixed = |standardize| LearnerConfig {
                classes: classes.clone(),
                replay,
                ..config(optimizer.clone(), standardize)
            };
            let mut replaying = SoftmaxRegression::new(12, fixed(true)).unwrap();
            // The same draws, by a buffer of its own, learned as plain updates.
            let mut buffer = ReplayBuffer::new(12, replay);
            let mut by_hand =
                SoftmaxRegression::new(12, LearnerConfig { replay: ReplayConfig::OFF, ..fixed(false) }).unwrap();
            for (x, label) in &examples {
                replaying.update(x, *label).unwrap();
                buffer.remember(x, *label);
            }
            // 40 x 1.5 = 60 owed, capped at capacity x ratio = 37.5.
            assert_eq!(replaying.replay().unwrap(), 37);
            assert_eq!(replaying.updates(), 40, "replays are not updates");
            assert_eq!(replaying.standardizer().unwrap().count(), 40, "nor observed twice");
            let rows = buffer.draw();
            assert_eq!(rows.len(), 37);
            // The newest 25: rows 0..15 were overwritten by examples 25..40.
            for row in 0..25 {
                assert_eq!(buffer.example(row).0, examples[if row < 15 { 25 + row } else { row }].0);
            }

            // Without standardisation the replays are exactly updates of the drawn examples.
            let mut plain = SoftmaxRegression::new(12, fixed(false)).unwrap();
            for (x, label) in &examples {
                plain.update(x, *label).unwrap();
                by_hand.update(x, *label).unwrap();
            }
            plain.replay().unwrap();
            for &row in &rows {
                let (x, label) = buffer.example(row);
                by_hand.update(x, label).unwrap();
            }
            if !matches!(
                optimizer,
                OptimizerConfig::Sgd(SgdConfig { schedule: LearningRateSchedule::InverseScaling { .. }, .. })
            ) {
                assert_eq!(plain.weights(), by_hand.weights(), "{optimizer:?}");
                assert_eq!(plain.bias(), by_hand.bias(), "{optimizer:?}");
            }
            assert_ne!(plain.weights(), SoftmaxRegression::new(12, fixed(false)).unwrap().weights());
        }
    }

    /// Learns `n` examples prequentially; returns the metrics over the last `tail` of them.
    fn run(model: &mut SoftmaxRegression, data: &mut Separable, n: usize, tail: usize) -> Prequential {
        let mut metrics = Prequential::new(tail);
        for _ in 0..n {
            let (x, y) = data.sample();
            let index = model.class_index(&format!("class{y}")).unwrap();
            metrics.record(model.update(&x, index).unwrap());
        }
        metrics
    }

    #[test]
    fn every_optimizer_learns_a_separable_problem() {
        for optimizer in all_optimizers() {
            let mut model = SoftmaxRegression::new(20, config(optimizer.clone(), true)).unwrap();
            let mut data = Separable::new(11, 20, 3, 20);
            let metrics = run(&mut model, &mut data, 6000, 2000);
            let accuracy = metrics.window_accuracy().unwrap();
            assert!(accuracy > 0.95, "{optimizer:?}: accuracy {accuracy} on the last 2000");
            // Learning shows in the loss too: far below chance's ln 3 = 1.1.
            let loss = metrics.window_mean_log_loss().unwrap();
            assert!(loss < 0.2, "{optimizer:?}: mean log-loss {loss} on the last 2000");
            assert_eq!(model.updates(), 6000);
            assert_eq!(model.num_classes(), 3);
        }
    }

    #[test]
    fn learns_without_standardisation_on_unscaled_features() {
        for optimizer in all_optimizers() {
            let mut model = SoftmaxRegression::new(20, config(optimizer.clone(), false)).unwrap();
            let mut data = Separable::new(12, 20, 3, 20).unscaled();
            let accuracy = run(&mut model, &mut data, 6000, 2000).window_accuracy().unwrap();
            assert!(accuracy > 0.95, "{optimizer:?}: accuracy {accuracy} on the last 2000");
        }
    }

    #[test]
    fn standardisation_is_what_copes_with_badly_scaled_features() {
        // The same stream, features scaled by up to 20x and shifted: plain SGD at the default
        // learning rate diverges or crawls without standardisation.
        let accuracy = |standardize| {
            let mut model = SoftmaxRegression::new(20, config(sgd(), standardize)).unwrap();
            run(&mut model, &mut Separable::new(13, 20, 3, 20), 3000, 1000).window_accuracy().unwrap()
        };
        let (with, without) = (accuracy(true), accuracy(false));
        assert!(with > 0.9 && with > without + 0.05, "with {with}, without {without}");
    }

    /// -ln softmax(W x + b)[y] in f64.
    fn reference_loss(w: &[f64], b: &[f64], x: &[f64], y: usize) -> f64 {
        let logits: Vec<f64> = b
            .iter()
            .enumerate()
            .map(|(k, bk)| bk + w[k * x.len()..][..x.len()].iter().zip(x).map(|(a, c)| a * c).sum::<f64>())
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        lse - logits[y]
    }

    #[test]
    fn sgd_step_follows_the_numerical_gradient_of_the_log_loss() {
        let (k, d) = (4, 7);
        // lr = 1: the step is minus the gradient.
        let optimizer = OptimizerConfig::Sgd(SgdConfig { learning_rate: 1.0, ..SgdConfig::default() });
        let mut model = SoftmaxRegression::new(d, config(optimizer, false)).unwrap();
        for c in 0..k {
            model.class_index(&c.to_string()).unwrap();
        }
        let mut rng = Rng::new(3);
        model.weights.iter_mut().for_each(|w| *w = rng.normal());
        model.bias.iter_mut().for_each(|b| *b = rng.normal());
        let x: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let y = 2;

        let w0: Vec<f64> = model.weights.iter().map(|&v| v as f64).collect();
        let b0: Vec<f64> = model.bias.iter().map(|&v| v as f64).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let outcome = model.update(&x, y).unwrap();
        let loss = reference_loss(&w0, &b0, &x64, y);
        assert!((outcome.loss as f64 - loss).abs() < 1e-5 * (1.0 + loss), "{} vs {loss}", outcome.loss);

        let h = 1e-5;
        for i in 0..k * d {
            let (mut plus, mut minus) = (w0.clone(), w0.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (reference_loss(&plus, &b0, &x64, y) - reference_loss(&minus, &b0, &x64, y)) / (2.0 * h);
            let analytic = w0[i] - model.weights()[i] as f64;
            assert!((numeric - analytic).abs() < 1e-5, "weight {i}: numeric {numeric}, step {analytic}");
        }
        for c in 0..k {
            let (mut plus, mut minus) = (b0.clone(), b0.clone());
            plus[c] += h;
            minus[c] -= h;
            let numeric = (reference_loss(&w0, &plus, &x64, y) - reference_loss(&w0, &minus, &x64, y)) / (2.0 * h);
            let analytic = b0[c] - model.bias[c] as f64;
            assert!((numeric - analytic).abs() < 1e-5, "bias {c}: numeric {numeric}, step {analytic}");
        }
    }

    /// `learn` weighs each example by the config's class weights (balanced: from the running
    /// counts, this example included), exactly as `update_weighted` with the weight worked out
    /// here from the formula; and it counts every example, whatever its weight.
    #[test]
    fn learn_weighs_examples_by_the_configs_class_weights() {
        let mut rng = Rng::new(5);
        // 8:2:1, with class "c" first seen after 30 examples.
        let stream: Vec<(Vec<f32>, usize)> = (0..120)
            .map(|i| {
                let class = match i % 11 {
                    _ if i < 30 => i % 2 * (i % 5 / 4),
                    0 => 2,
                    1 | 2 => 1,
                    _ => 0,
                };
                let x: Vec<f32> = (0..9).map(|d| rng.normal() + if d % 3 == class { 1.5 } else { 0.0 }).collect();
                (x, class)
            })
            .collect();
        let names = ["a", "b", "c"];
        for (weights, optimizer) in [("balanced", sgd()), ("balanced", all_optimizers()[2].clone()), ("c=3,z=7", sgd())]
        {
            let with = |class_weights: &str| LearnerConfig {
                class_weights: class_weights.parse().unwrap(),
                ..config(optimizer.clone(), true)
            };
            let mut learned = SoftmaxRegression::new(9, with(weights)).unwrap();
            let mut by_hand = SoftmaxRegression::new(9, with("none")).unwrap();
            let mut unweighted = SoftmaxRegression::new(9, with("none")).unwrap();
            let mut counts = [0u64; 3];
            for (x, class) in &stream {
                counts[*class] += 1;
                let weight = match weights {
                    "balanced" => {
                        let (n, seen) = (counts.iter().sum::<u64>(), counts.iter().filter(|&&c| c > 0).count());
                        (n as f64 / (seen as f64 * counts[*class] as f64)) as f32
                    }
                    _ => [1.0, 1.0, 3.0][*class],
                };
                learned.learn(x, names[*class]).unwrap();
                let index = by_hand.class_index(names[*class]).unwrap();
                by_hand.update_weighted(x, index, weight).unwrap();
                unweighted.learn(x, names[*class]).unwrap();
            }
            assert_eq!(state_bits(&learned), state_bits(&by_hand), "{weights} {optimizer:?}");
            assert_ne!(state_bits(&learned), state_bits(&unweighted), "{weights}: the weights change nothing");
            assert_eq!(learned.classes(), names, "discovered in the order of the stream");
            assert_eq!(learned.class_counts(), counts);
            assert_eq!(unweighted.class_counts(), counts);
        }
    }

    #[test]
    fn update_reports_the_prediction_made_before_learning() {
        let mut model = SoftmaxRegression::new(20, LearnerConfig::default()).unwrap();
        let mut data = Separable::new(4, 20, 3, 20);
        for _ in 0..3 {
            model.class_index(&data.sample().1.to_string()).unwrap();
        }
        for step in 0..500 {
            let (x, _) = data.sample();
            let y = step % model.num_classes();
            let p = model.predict_proba(&x).unwrap();
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let outcome = model.update(&x, y).unwrap();
            assert_eq!(outcome.correct, argmax_is(&p, y), "step {step}");
            assert!((outcome.loss - -p[y].ln()).abs() < 1e-4 * (1.0 + outcome.loss), "step {step}");
        }
    }

    fn argmax_is(p: &[f32], y: usize) -> bool {
        crate::learn::argmax(p) == Some(y)
    }

    #[test]
    fn classes_are_discovered_up_to_max_classes() {
        let cfg = LearnerConfig {
            optimizer: OptimizerConfig::Adagrad(AdagradConfig::default()),
            max_classes: 3,
            ..LearnerConfig::default()
        };
        let mut model = SoftmaxRegression::new(4, cfg).unwrap();
        assert!(model.predict_proba(&[1.0, 2.0, 3.0, 4.0]).unwrap().is_empty());
        assert_eq!(model.class_index("cat").unwrap(), 0);
        assert_eq!(model.class_index("dog").unwrap(), 1);
        assert_eq!(model.class_index("cat").unwrap(), 0);
        model.update(&[1.0, 2.0, 3.0, 4.0], 1).unwrap();
        assert_eq!(model.class_index("eel").unwrap(), 2);
        // The new class starts from zero weights and fresh optimizer state.
        assert_eq!(model.weights().len(), 3 * 4);
        assert!(model.weights()[8..].iter().all(|&w| w == 0.0));
        assert_eq!(model.bias()[2], 0.0);
        let Optimizer::Adagrad { sum_sq_weight, sum_sq_bias, .. } = &model.optimizer else { panic!("not adagrad") };
        assert_eq!((sum_sq_weight.len(), sum_sq_bias.len()), (12, 3));
        assert!(sum_sq_weight[8..].iter().all(|&g| g == 0.0));
        assert_eq!(model.predict_proba(&[0.0; 4]).unwrap().len(), 3);

        let err = model.class_index("fox").unwrap_err();
        assert!(matches!(&err, LearnError::TooManyClasses { label, max_classes: 3 } if label == "fox"), "{err:?}");
        assert!(err.to_string().contains("\"fox\""), "{err}");
        assert_eq!(model.classes(), ["cat", "dog", "eel"]);
        // `learn` discovers too, and fails the same way.
        assert!(model.learn(&[0.0; 4], "fox").is_err());
        assert_eq!(model.learn(&[0.0; 4], "eel").map(|_| model.updates()).unwrap(), 2);
    }

    #[test]
    fn fixed_classes_reject_other_labels() {
        let cfg = LearnerConfig { classes: vec!["no".into(), "yes".into()], ..LearnerConfig::default() };
        let mut model = SoftmaxRegression::new(2, cfg).unwrap();
        assert_eq!(model.num_classes(), 2);
        assert_eq!(model.predict_proba(&[0.5, 0.5]).unwrap(), [0.5, 0.5]);
        assert_eq!(model.class_index("yes").unwrap(), 1);
        let err = model.class_index("maybe").unwrap_err();
        assert!(matches!(&err, LearnError::UnknownLabel { label, classes: 2 } if label == "maybe"), "{err:?}");
    }

    #[test]
    fn invalid_inputs_are_errors_that_leave_the_model_unchanged() {
        let mut model = SoftmaxRegression::new(3, LearnerConfig::default()).unwrap();
        model.learn(&[1.0, 2.0, 3.0], "a").unwrap();
        let before = model.clone();
        let err = model.update(&[1.0, 2.0], 0).unwrap_err();
        assert!(matches!(err, LearnError::Dimension { expected: 3, got: 2 }), "{err:?}");
        assert!(matches!(model.predict_proba(&[1.0; 4]), Err(LearnError::Dimension { expected: 3, got: 4 })));
        let err = model.update(&[1.0, f32::NAN, 3.0], 0).unwrap_err();
        assert!(matches!(err, LearnError::NonFinite { index: 1, .. }), "{err:?}");
        let err = model.learn(&[f32::INFINITY, 0.0, 0.0], "b").unwrap_err();
        assert!(matches!(err, LearnError::NonFinite { index: 0, .. }), "{err:?}");
        let err = model.update(&[1.0, 2.0, 3.0], 1).unwrap_err();
        assert!(matches!(err, LearnError::ClassIndex { index: 1, classes: 1 }), "{err:?}");
        let err = model.predict_proba_into(&[1.0, 2.0, 3.0], &mut [0.0; 2]).unwrap_err();
        assert!(matches!(err, LearnError::OutputLength { expected: 1, got: 2 }), "{err:?}");
        assert_eq!(model.classes(), ["a"]);
        assert_eq!(model.updates(), 1);
        assert_eq!(model.weights(), before.weights());
        assert_eq!(model.standardizer, before.standardizer);
        assert!(SoftmaxRegression::new(0, LearnerConfig::default()).is_err());
    }

    #[test]
    fn divergence_is_reported_rather_than_spread() {
        let optimizer = OptimizerConfig::Sgd(SgdConfig { learning_rate: 1e30, ..SgdConfig::default() });
        let mut model = SoftmaxRegression::new(3, config(optimizer, false)).unwrap();
        let x = [1e10, -1e10, 1e10];
        let mut result = Ok(());
        for step in 0..10 {
            if let Err(e) = model.learn(&x, if step % 2 == 0 { "a" } else { "b" }) {
                result = Err(e);
                break;
            }
        }
        let err = result.unwrap_err();
        assert!(matches!(err, LearnError::Diverged { .. }), "{err:?}");
        assert!(matches!(model.predict_proba(&x), Err(LearnError::Diverged { .. })));
    }

    /// A model's complete state, as bits.
    fn state_bits(model: &SoftmaxRegression) -> Vec<u32> {
        let mut bits: Vec<u32> = model.weights().iter().chain(&model.bias).map(|v| v.to_bits()).collect();
        for (_, data, _) in model.optimizer.tensors() {
            bits.extend(data.iter().map(|v| v.to_bits()));
        }
        if let Some(s) = &model.standardizer {
            bits.extend(s.mean().iter().chain(s.m2()).map(|v| v.to_bits()));
        }
        bits
    }

    /// Feeds the same random stream (odd dimension, for the kernels' tails) to `model`.
    fn feed(model: &mut SoftmaxRegression, n: usize) -> Vec<(u32, bool)> {
        let mut rng = Rng::new(99);
        (0..n)
            .map(|_| {
                let x: Vec<f32> = (0..model.dim()).map(|i| rng.normal() * (1 + i % 7) as f32 + i as f32).collect();
                let label = format!("c{}", rng.below(6));
                let outcome = model.learn(&x, &label).unwrap();
                (outcome.loss.to_bits(), outcome.correct)
            })
            .collect()
    }

    #[test]
    fn the_same_sequence_gives_bit_identical_models() {
        for optimizer in all_optimizers() {
            for standardize in [true, false] {
                let cfg = config(optimizer.clone(), standardize);
                let mut a = SoftmaxRegression::new(101, cfg.clone()).unwrap();
                let mut b = SoftmaxRegression::new(101, cfg).unwrap();
                assert_eq!(feed(&mut a, 300), feed(&mut b, 300));
                assert_eq!(state_bits(&a), state_bits(&b), "{optimizer:?}");
            }
        }
    }

    #[test]
    fn lazy_sgd_steps_give_the_bits_of_eager_ones() {
        for standardize in [true, false] {
            for l2 in [0.0, 1e-3] {
                let optimizer = OptimizerConfig::Sgd(SgdConfig { l2, ..SgdConfig::default() });
                let cfg = config(optimizer, standardize);
                let mut lazy = SoftmaxRegression::new(101, cfg.clone()).unwrap();
                let mut eager = SoftmaxRegression::new(101, cfg).unwrap();
                let mut rng = Rng::new(17);
                for step in 0..300 {
                    let x: Vec<f32> = (0..101).map(|i| rng.normal() + (i % 5) as f32).collect();
                    let label = format!("c{}", rng.below(5));
                    // Predictions see the pending step, as they would the applied one.
                    if lazy.num_classes() > 0 {
                        let (p, q) = (lazy.predict_proba(&x).unwrap(), eager.predict_proba(&x).unwrap());
                        assert_eq!(
                            p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            q.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        );
                    }
                    let (a, b) = (lazy.learn(&x, &label).unwrap(), eager.learn(&x, &label).unwrap());
                    assert_eq!((a.loss.to_bits(), a.correct), (b.loss.to_bits(), b.correct), "step {step}");
                    eager.flush();
                    assert!(!eager.pending.active);
                    assert!(lazy.pending.active, "the lazy model keeps its step pending");
                    assert!(matches!(lazy.weights(), Cow::Owned(_)));
                    assert_eq!(state_bits(&lazy), state_bits(&eager), "step {step}");
                }
            }
        }
    }

    #[test]
    fn portable_and_vector_kernels_give_bit_identical_models() {
        if SimdPath::detect() == SimdPath::Portable {
            eprintln!("this CPU has no vector path beyond the baseline; comparing the baseline with itself");
        }
        for optimizer in all_optimizers() {
            for standardize in [true, false] {
                let cfg = config(optimizer.clone(), standardize);
                let mut fast = SoftmaxRegression::new(101, cfg.clone()).unwrap();
                let mut portable = SoftmaxRegression::new(101, cfg).unwrap();
                portable.set_portable_kernels(true);
                assert_eq!(portable.simd_path(), SimdPath::Portable);
                assert_eq!(feed(&mut fast, 300), feed(&mut portable, 300), "{optimizer:?}");
                assert_eq!(state_bits(&fast), state_bits(&portable), "{optimizer:?} standardize={standardize}");
                let x: Vec<f32> = (0..101).map(|i| i as f32 * 0.1).collect();
                let (p, q) = (fast.predict_proba(&x).unwrap(), portable.predict_proba(&x).unwrap());
                assert_eq!(
                    p.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    q.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn ftrl_l1_sets_uninformative_weights_exactly_to_zero() {
        let ftrl = |l1| OptimizerConfig::Ftrl(FtrlConfig { l1, ..FtrlConfig::default() });
        let informative = 5;
        let train = |l1| {
            let mut model = SoftmaxRegression::new(20, config(ftrl(l1), true)).unwrap();
            let metrics = run(&mut model, &mut Separable::new(21, 20, 3, informative), 4000, 1000);
            let zeros = |keep: fn(usize) -> bool| {
                model.weights().iter().enumerate().filter(|&(i, &w)| keep(i % 20) && w == 0.0).count()
            };
            (zeros(|i| i < 5), zeros(|i| i >= 5), metrics.window_accuracy().unwrap())
        };
        let (zero_informative, zero_noise, accuracy) = train(0.0);
        assert_eq!((zero_informative, zero_noise), (0, 0), "without L1 no weight is exactly zero");
        assert!(accuracy > 0.95, "accuracy {accuracy} without L1");
        let (zero_informative, zero_noise, accuracy) = train(20.0);
        // 3 classes x 15 noise features.
        assert!(zero_noise >= 36, "{zero_noise} of 45 noise weights are zero");
        assert!(zero_informative <= 3, "{zero_informative} of 15 informative weights are zero");
        assert!(accuracy > 0.9, "accuracy {accuracy} with L1");
        // An L1 beyond any accumulated gradient zeroes every weight; the bias still learns.
        let mut model = SoftmaxRegression::new(20, config(ftrl(1e9), true)).unwrap();
        run(&mut model, &mut Separable::new(22, 20, 3, 20), 500, 1);
        assert!(model.weights().iter().all(|&w| w == 0.0));
        assert!(model.bias().iter().any(|&b| b != 0.0));
    }

    #[test]
    fn sgd_l2_shrinks_the_weights() {
        let norm = |l2| {
            let optimizer = OptimizerConfig::Sgd(SgdConfig { l2, ..SgdConfig::default() });
            let mut model = SoftmaxRegression::new(20, config(optimizer, true)).unwrap();
            run(&mut model, &mut Separable::new(5, 20, 3, 20), 2000, 1);
            model.weights().iter().map(|w| w * w).sum::<f32>().sqrt()
        };
        let (plain, decayed) = (norm(0.0), norm(0.1));
        assert!(decayed < 0.7 * plain, "l2: {decayed}, none: {plain}");
    }

    #[test]
    fn top_k_ranks_classes_by_probability() {
        let mut model = SoftmaxRegression::new(20, config(sgd(), true)).unwrap();
        let mut data = Separable::new(6, 20, 3, 20);
        run(&mut model, &mut data, 2000, 1);
        let (x, y) = data.sample();
        let top = model.top_k(&x, 2).unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(model.classes()[top[0].0], format!("class{y}"));
        assert!(top[0].1 >= top[1].1);
        assert_eq!(model.top_k(&x, 10).unwrap().len(), 3);
    }

    /// `model` after learning 300 examples of a 3-class problem, with the examples that follow.
    fn trained(optimizer: OptimizerConfig) -> (SoftmaxRegression, Vec<(Vec<f32>, usize)>) {
        let mut model = SoftmaxRegression::new(20, config(optimizer, true)).unwrap();
        let mut data = Separable::new(31, 20, 3, 20);
        run(&mut model, &mut data, 300, 1);
        (model, (0..100).map(|_| data.sample()).collect())
    }

    #[test]
    fn restarting_the_step_size_keeps_the_predictions_and_makes_steps_large_again() {
        let inverse_scaling = OptimizerConfig::Sgd(SgdConfig {
            learning_rate: 0.5,
            schedule: LearningRateSchedule::InverseScaling { power_t: 0.5 },
            l2: 0.0,
        });
        let ftrl_l1 = OptimizerConfig::Ftrl(FtrlConfig { l1: 0.5, l2: 0.1, ..FtrlConfig::default() });
        for optimizer in [all_optimizers(), vec![inverse_scaling, ftrl_l1]].concat() {
            let (mut model, next) = trained(optimizer.clone());
            let before = model.clone();
            model.restart_step_size();
            assert_eq!((model.updates(), model.schedule_start()), (300, 300), "{optimizer:?}");
            assert!(before.replay.len() > 0 && model.replay.len() == 0, "the replay buffer is forgotten");
            assert_eq!(model.replay().unwrap(), 0, "and owes no replays");
            assert_eq!(model.weights(), before.weights(), "{optimizer:?}: the weights stay");
            assert_eq!(model.bias(), before.bias());
            assert_eq!(model.classes(), before.classes());
            match &model.optimizer {
                Optimizer::Sgd(_) => {}
                Optimizer::Adagrad { sum_sq_weight, sum_sq_bias, .. } => {
                    assert!(sum_sq_weight.iter().chain(sum_sq_bias).all(|&g| g == 0.0))
                }
                Optimizer::Ftrl { config: c, z_weight, n_weight, .. } => {
                    assert!(n_weight.iter().all(|&n| n == 0.0));
                    // z gives back the weights FTRL keeps materialised (to rounding: z holds
                    // l1 besides the weight's share).
                    let p = kernels::FtrlParams { inv_alpha: 1.0 / c.alpha, beta: c.beta, l1: c.l1, l2: c.l2 };
                    for (&z, &w) in z_weight.iter().zip(model.weights().iter()) {
                        let again = kernels::ftrl_weight(z, 0.0, p);
                        let tolerance = 1e-6 * (w.abs() + c.l1);
                        assert!((again - w).abs() <= tolerance, "{optimizer:?}: z {z} gives {again}, not {w}");
                    }
                }
            }
            // The next step is as large as the first steps were: well above the settled one,
            // except for a constant SGD rate, which has nothing to restart.
            let (x, y) = &next[0];
            let step = |mut m: SoftmaxRegression| {
                let start = m.bias().to_vec();
                m.update(x, *y).unwrap();
                m.bias().iter().zip(&start).map(|(a, b)| (a - b).abs()).sum::<f32>()
            };
            let (restarted, settled) = (step(model), step(before));
            let constant_sgd =
                matches!(&optimizer, OptimizerConfig::Sgd(c) if c.schedule == LearningRateSchedule::Constant);
            if constant_sgd {
                assert_eq!(restarted, settled);
            } else {
                assert!(
                    restarted > 3.0 * settled,
                    "{optimizer:?}: step {restarted} after a restart, {settled} without"
                );
            }
        }
    }

    #[test]
    fn a_reset_model_learns_as_a_new_one_with_its_classes_and_standardisation() {
        let inverse_time = OptimizerConfig::Sgd(SgdConfig {
            schedule: LearningRateSchedule::InverseTime { decay: 0.1 },
            ..SgdConfig::default()
        });
        for optimizer in [all_optimizers(), vec![inverse_time]].concat() {
            let (mut model, next) = trained(optimizer.clone());
            // A pending SGD step belongs to the old weights and must not reach the new ones.
            assert!(model.replay.len() > 0);
            model.reset();
            assert_eq!((model.updates(), model.schedule_start()), (300, 300));
            assert_eq!(model.replay.len(), 0, "the replay buffer is forgotten");
            assert!(model.weights().iter().chain(model.bias()).all(|&w| w == 0.0), "{optimizer:?}");
            let uniform = model.predict_proba(&next[0].0).unwrap();
            assert!(uniform.iter().all(|&p| p == 1.0 / 3.0), "{uniform:?}");
            let mut fresh = SoftmaxRegression::new(20, config(optimizer.clone(), true)).unwrap();
            for class in model.classes() {
                fresh.class_index(class).unwrap();
            }
            fresh.standardizer = model.standardizer.clone();
            for (x, y) in &next {
                let (a, b) = (model.update(x, *y).unwrap(), fresh.update(x, *y).unwrap());
                assert_eq!((a.loss.to_bits(), a.correct), (b.loss.to_bits(), b.correct), "{optimizer:?}");
            }
            assert_eq!(state_bits(&model), state_bits(&fresh), "{optimizer:?}");
            assert_eq!(model.updates(), 400);
        }
    }

    #[test]
    fn a_predictor_copy_predicts_bit_for_bit_as_the_model() {
        let mut rng = crate::transfer::dataset::SplitMix64(7);
        let mut model = SoftmaxRegression::new(16, LearnerConfig::default()).unwrap();
        let point = |rng: &mut crate::transfer::dataset::SplitMix64| -> Vec<f32> {
            (0..16).map(|_| (rng.next_u64() % 1000) as f32 / 100.0 - 5.0).collect()
        };
        for i in 0..200 {
            let x = point(&mut rng);
            model.learn(&x, ["a", "b", "c"][i % 3]).unwrap();
        }
        let copy = model.predictor();
        assert_eq!(copy.updates(), model.updates());
        for _ in 0..20 {
            let x = point(&mut rng);
            let (want, got) = (model.predict_proba(&x).unwrap(), copy.predict_proba(&x).unwrap());
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{want:?} {got:?}");
        }
    }
}
