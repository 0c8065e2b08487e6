//! Training the stream's learner in batch: several shuffled passes (epochs) over featurized,
//! labelled examples, with class weights, tracking loss and accuracy per epoch.

use super::dataset::{shuffle, SplitMix64};
use super::evaluate::evaluate;
use crate::learn::{LearnError, LearnerConfig, SoftmaxRegression};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Loss and accuracy after one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    /// Mean log-loss and accuracy of the predictions made during the epoch, each before its
    /// example was learned (progressive validation on the training set).
    pub train_log_loss: f64,
    pub train_accuracy: f64,
    /// On the held-out examples, after the epoch.
    pub test_log_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub seconds: f64,
}

/// Labelled features: row-major `x` (`labels.len() × dim`) and a class index per row.
pub struct Examples<'a> {
    pub x: &'a [f32],
    pub labels: &'a [usize],
}

impl Examples<'_> {
    fn row(&self, i: usize, dim: usize) -> &[f32] {
        &self.x[i * dim..(i + 1) * dim]
    }
}

/// How many passes, in which orders, with which class weights.
pub struct Schedule<'a> {
    pub epochs: usize,
    /// Seeds the shuffles.
    pub seed: u64,
    /// The weight of each class index.
    pub class_weights: &'a [f32],
}

/// Trains a model with `config`'s classes (which must be fixed: the data's classes) on
/// `train` for `schedule.epochs` shuffled passes, calling `on_epoch` after each. With
/// standardisation on, the model first observes every training example, so that the first
/// epoch already learns with settled statistics.
pub fn train(
    dim: usize,
    config: LearnerConfig,
    train: &Examples<'_>,
    test: Option<&Examples<'_>>,
    schedule: &Schedule<'_>,
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<(SoftmaxRegression, Vec<EpochStats>), LearnError> {
    let Schedule { epochs, seed, class_weights } = *schedule;
    let mut model = SoftmaxRegression::new(dim, config)?;
    for i in 0..train.labels.len() {
        model.observe_features(train.row(i, dim))?;
    }
    let mut rng = SplitMix64(seed);
    let mut order: Vec<usize> = (0..train.labels.len()).collect();
    let mut curve = Vec::with_capacity(epochs);
    for epoch in 1..=epochs {
        let started = Instant::now();
        shuffle(&mut order, &mut rng);
        let (mut loss, mut correct) = (0f64, 0usize);
        for &i in &order {
            let label = train.labels[i];
            let outcome = model.update_weighted(train.row(i, dim), label, class_weights[label])?;
            loss += outcome.loss as f64;
            correct += outcome.correct as usize;
        }
        let n = order.len().max(1) as f64;
        let (test_log_loss, test_accuracy) = match test {
            Some(test) if !test.labels.is_empty() => {
                let scores = evaluate(&model, test.x, test.labels)?;
                (Some(scores.log_loss), Some(scores.accuracy))
            }
            _ => (None, None),
        };
        let stats = EpochStats {
            epoch,
            train_log_loss: loss / n,
            train_accuracy: correct as f64 / n,
            test_log_loss,
            test_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_epoch(&stats);
        curve.push(stats);
    }
    Ok((model, curve))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch trainer weighs each example once, by the schedule's resolved weights: a
    /// config with class weights (which `dlpipe train` sets, to record them) adds nothing on
    /// top. And the model counts every pass's examples.
    #[test]
    fn the_schedules_weights_are_applied_once() {
        let mut rng = SplitMix64(11);
        let dim = 6;
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        for i in 0..300 {
            // 6:3:1.
            let label = [0, 0, 0, 0, 0, 0, 1, 1, 1, 2][i % 10];
            x.extend((0..dim).map(|d| (rng.next_u64() % 1000) as f32 / 500.0 + if d == label { 1.0 } else { 0.0 }));
            labels.push(label);
        }
        let examples = Examples { x: &x, labels: &labels };
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let balanced = crate::learn::ClassWeights::Balanced;
        let weights = balanced.resolve(&classes, &labels).unwrap();
        assert_eq!(weights, [300.0 / (3.0 * 180.0), 300.0 / (3.0 * 90.0), 300.0 / (3.0 * 30.0)]);
        let config = |class_weights| LearnerConfig { classes: classes.clone(), class_weights, ..Default::default() };
        let run = |class_weights, schedule_weights: &[f32]| {
            let schedule = Schedule { epochs: 3, seed: 5, class_weights: schedule_weights };
            train(dim, config(class_weights), &examples, None, &schedule, |_| {}).unwrap().0
        };
        let recorded = run(balanced.clone(), &weights);
        let plain = run(crate::learn::ClassWeights::None, &weights);
        assert_eq!(recorded.weights(), plain.weights());
        assert_eq!(recorded.bias(), plain.bias());
        assert_ne!(run(balanced, &[1.0; 3]).weights(), plain.weights(), "the schedule's weights count");
        assert_eq!(recorded.class_counts(), [3 * 180, 3 * 90, 3 * 30]);
    }

    /// Two Gaussian blobs per class in 8 dimensions: more epochs fit better, and the same seed
    /// trains the same bits.
    #[test]
    fn epochs_reduce_the_loss_and_the_seed_fixes_the_result() {
        let mut rng = SplitMix64(3);
        let mut uniform = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let dim = 8;
        let (mut x, mut labels) = (Vec::new(), Vec::new());
        for i in 0..600 {
            let label = i % 3;
            for d in 0..dim {
                x.push(uniform() * 2.0 + if d == label { 1.0 } else { 0.0 } + 10.0 * d as f32);
            }
            labels.push(label);
        }
        let examples = Examples { x: &x, labels: &labels };
        let config = LearnerConfig { classes: vec!["a".into(), "b".into(), "c".into()], ..LearnerConfig::default() };
        let mut seen = 0;
        let schedule = |seed| Schedule { epochs: 5, seed, class_weights: &[1.0; 3] };
        let (model, curve) = train(dim, config.clone(), &examples, Some(&examples), &schedule(1), |s| {
            seen += 1;
            assert_eq!(s.epoch, seen);
        })
        .unwrap();
        assert_eq!(curve.len(), 5);
        assert!(curve[4].test_log_loss.unwrap() < curve[0].test_log_loss.unwrap(), "{curve:?}");
        assert!(curve[4].test_accuracy.unwrap() > 0.8, "{curve:?}");
        let (again, _) = train(dim, config.clone(), &examples, None, &schedule(1), |_| {}).unwrap();
        assert_eq!(model.weights(), again.weights());
        let (other, _) = train(dim, config, &examples, None, &schedule(2), |_| {}).unwrap();
        assert_ne!(model.weights(), other.weights());
    }
}
