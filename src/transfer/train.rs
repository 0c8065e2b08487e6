//! Training the stream's learner in batch: several shuffled passes (epochs) over featurized,
//! labelled examples, with class weights, tracking loss and accuracy per epoch.

use super::dataset::{shuffle, SplitMix64};
use super::evaluate::evaluate;
use crate::learn::{LearnError, LearnerConfig, SoftmaxRegression};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// How much each class's examples count.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeights {
    /// Every example counts once.
    #[default]
    None,
    /// `n / (classes × n_c)`, as scikit-learn's `class_weight="balanced"`: rare classes count
    /// as much in total as common ones.
    Balanced,
    /// Given weights; classes not named weigh 1.
    Given(BTreeMap<String, f32>),
}

/// Why class weights cannot be read or used; the message names the class or the text at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClassWeightsError {
    #[error("{pair:?} is not class=weight (or use none, balanced)")]
    NotAPair { pair: String },
    #[error("the weight of {class:?} is not a number: {weight:?}")]
    NotANumber { class: String, weight: String },
    #[error("the weight of {class:?} must be finite and non-negative, got {weight}")]
    OutOfRange { class: String, weight: f32 },
    #[error("class weight for {class:?}, which is not a class of the data ({classes:?})")]
    UnknownClass { class: String, classes: Vec<String> },
}

impl std::str::FromStr for ClassWeights {
    type Err = ClassWeightsError;

    /// `none`, `balanced`, or `class=weight,class=weight`.
    fn from_str(s: &str) -> Result<ClassWeights, ClassWeightsError> {
        match s.trim() {
            "none" | "" => Ok(ClassWeights::None),
            "balanced" => Ok(ClassWeights::Balanced),
            list => list
                .split(',')
                .map(|pair| {
                    let (class, weight) =
                        pair.split_once('=').ok_or_else(|| ClassWeightsError::NotAPair { pair: pair.into() })?;
                    let number: f32 = weight
                        .trim()
                        .parse()
                        .map_err(|_| ClassWeightsError::NotANumber { class: class.into(), weight: weight.into() })?;
                    if !(number.is_finite() && number >= 0.0) {
                        return Err(ClassWeightsError::OutOfRange { class: class.into(), weight: number });
                    }
                    Ok((class.trim().to_string(), number))
                })
                .collect::<Result<_, _>>()
                .map(ClassWeights::Given),
        }
    }
}

impl ClassWeights {
    /// The weight of each class index, for `labels` (class indices) of the training set.
    pub fn resolve(&self, classes: &[String], labels: &[usize]) -> Result<Vec<f32>, ClassWeightsError> {
        match self {
            ClassWeights::None => Ok(vec![1.0; classes.len()]),
            ClassWeights::Balanced => {
                let mut counts = vec![0usize; classes.len()];
                labels.iter().for_each(|&l| counts[l] += 1);
                let present = counts.iter().filter(|&&c| c > 0).count().max(1);
                Ok(counts
                    .iter()
                    .map(|&c| if c == 0 { 1.0 } else { labels.len() as f32 / (present as f32 * c as f32) })
                    .collect())
            }
            ClassWeights::Given(given) => {
                if let Some(unknown) = given.keys().find(|k| !classes.contains(k)) {
                    return Err(ClassWeightsError::UnknownClass { class: unknown.clone(), classes: classes.to_vec() });
                }
                Ok(classes.iter().map(|c| given.get(c).copied().unwrap_or(1.0)).collect())
            }
        }
    }
}

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

    #[test]
    fn class_weights_parse_and_resolve() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let labels = [0, 0, 0, 1, 2, 2];
        assert_eq!("none".parse::<ClassWeights>().unwrap().resolve(&classes, &labels).unwrap(), vec![1.0; 3]);
        let balanced = "balanced".parse::<ClassWeights>().unwrap().resolve(&classes, &labels).unwrap();
        assert_eq!(balanced, vec![6.0 / 9.0, 2.0, 1.0]);
        let given = "b=2.5, c=0".parse::<ClassWeights>().unwrap();
        assert_eq!(given.resolve(&classes, &labels).unwrap(), vec![1.0, 2.5, 0.0]);
        assert!("d=1"
            .parse::<ClassWeights>()
            .unwrap()
            .resolve(&classes, &labels)
            .unwrap_err()
            .to_string()
            .contains("\"d\""));
        assert!("a=x".parse::<ClassWeights>().unwrap_err().to_string().contains("not a number"));
        assert!("a=-1".parse::<ClassWeights>().unwrap_err().to_string().contains("non-negative"));
        assert!("a".parse::<ClassWeights>().unwrap_err().to_string().contains("class=weight"));
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
