//! How good a classifier is on labelled features: accuracy, per-class precision, recall and F1,
//! macro-F1, log-loss, the confusion matrix, and how well its probabilities are calibrated
//! (expected calibration error and the reliability bins); as a table and as JSON.

use crate::learn::{argmax, LearnError, SoftmaxRegression};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

/// One class's scores. A class never predicted has precision 0, one with no examples recall 0
/// (scikit-learn's `zero_division=0`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScores {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Examples of the class.
    pub support: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub examples: u64,
    pub accuracy: f64,
    /// Mean `-ln p(true class)`, with p clipped to `[1e-15, 1]`.
    pub log_loss: f64,
    /// The unweighted mean of the classes' F1 (classes with examples or predictions).
    pub macro_f1: f64,
    pub classes: Vec<ClassScores>,
    /// `confusion[true][predicted]`, in the order of `classes`.
    pub confusion: Vec<Vec<u64>>,
    /// How far the top class's probability is from how often it is right. Absent in
    /// evaluations written before it was measured.
    #[serde(default)]
    pub calibration: Calibration,
}

/// Calibration of the top class's probability (the confidence), over [`CALIBRATION_BINS`]
/// equal-width bins of confidence: a calibrated classifier is right 80% of the times it says
/// 80%.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Expected calibration error: the mean over examples of |accuracy - confidence| of their
    /// bin (Guo et al. 2017), 0 for a calibrated classifier.
    pub ece: f64,
    /// The bins that hold examples, in order of confidence.
    pub bins: Vec<CalibrationBin>,
}

/// Examples whose confidence is in `[lower, upper)` (the last bin includes 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    pub lower: f64,
    pub upper: f64,
    pub examples: u64,
    /// Their mean confidence.
    pub confidence: f64,
    /// The share of them whose top class is right.
    pub accuracy: f64,
}

/// Bins of the reliability diagram and the ECE (the common choice, as in Guo et al.).
pub const CALIBRATION_BINS: usize = 15;

impl Calibration {
    /// From each example's (confidence, whether its top class is right).
    pub fn of(predictions: impl IntoIterator<Item = (f64, bool)>) -> Calibration {
        // Per bin: examples, sum of confidences, right ones.
        let mut sums = [(0u64, 0f64, 0u64); CALIBRATION_BINS];
        for (confidence, right) in predictions {
            let bin = ((confidence * CALIBRATION_BINS as f64) as usize).min(CALIBRATION_BINS - 1);
            let sum = &mut sums[bin];
            *sum = (sum.0 + 1, sum.1 + confidence, sum.2 + right as u64);
        }
        let n: u64 = sums.iter().map(|s| s.0).sum();
        let width = 1.0 / CALIBRATION_BINS as f64;
        let bins: Vec<CalibrationBin> = sums
            .iter()
            .enumerate()
            .filter(|(_, s)| s.0 > 0)
            .map(|(i, &(examples, confidence, right))| CalibrationBin {
                lower: i as f64 * width,
                upper: (i + 1) as f64 * width,
                examples,
                confidence: confidence / examples as f64,
                accuracy: right as f64 / examples as f64,
            })
            .collect();
        let gap = |b: &CalibrationBin| b.examples as f64 * (b.accuracy - b.confidence).abs();
        let ece = if n == 0 { 0.0 } else { bins.iter().map(gap).sum::<f64>() / n as f64 };
        Calibration { ece, bins }
    }
}

/// Evaluates `model` on row-major features `x` with class indices `labels` (of the model's
/// classes).
pub fn evaluate(model: &SoftmaxRegression, x: &[f32], labels: &[usize]) -> Result<Evaluation, LearnError> {
    let k = model.num_classes();
    let dim = model.dim();
    let mut confusion = vec![vec![0u64; k]; k];
    let mut probs = vec![0f32; k];
    let mut loss = 0f64;
    let mut confidences = Vec::with_capacity(labels.len());
    for (row, &label) in x.chunks_exact(dim).zip(labels) {
        model.predict_proba_into(row, &mut probs)?;
        loss -= (probs[label] as f64).clamp(1e-15, 1.0).ln();
        let predicted = argmax(&probs).expect("at least one class");
        confusion[label][predicted] += 1;
        confidences.push((probs[predicted] as f64, predicted == label));
    }
    let n = labels.len() as u64;
    let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let mut f1_sum = 0.0;
    let mut f1_count = 0;
    let classes = model
        .classes()
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let support: u64 = confusion[c].iter().sum();
            let predicted: u64 = (0..k).map(|t| confusion[t][c]).sum();
            let (precision, recall) = (ratio(confusion[c][c], predicted), ratio(confusion[c][c], support));
            let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
            if support > 0 || predicted > 0 {
                f1_sum += f1;
                f1_count += 1;
            }
            ClassScores { class: name.clone(), precision, recall, f1, support }
        })
        .collect();
    Ok(Evaluation {
        examples: n,
        accuracy: ratio(correct, n),
        log_loss: if n == 0 { 0.0 } else { loss / n as f64 },
        macro_f1: if f1_count == 0 { 0.0 } else { f1_sum / f1_count as f64 },
        classes,
        confusion,
        calibration: Calibration::of(confidences),
    })
}

impl Evaluation {
    /// A text report: the summary, the per-class table, the confusion matrix.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "examples {}   accuracy {:.4}   macro-F1 {:.4}   log-loss {:.4}   ECE {:.4}\n",
            self.examples, self.accuracy, self.macro_f1, self.log_loss, self.calibration.ece
        );
        let width = self.classes.iter().map(|c| c.class.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(out, "{:<width$}  precision  recall      f1  support", "class");
        for c in &self.classes {
            let _ = writeln!(
                out,
                "{:<width$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}",
                c.class, c.precision, c.recall, c.f1, c.support
            );
        }
        let _ = writeln!(out, "\nconfusion matrix (rows: true class, columns: predicted, in the order above)");
        let cell = self.confusion.iter().flatten().max().map_or(1, |m| m.to_string().len()).max(3);
        for (c, row) in self.classes.iter().zip(&self.confusion) {
            let _ = write!(out, "{:<width$} ", c.class);
            for v in row {
                let _ = write!(out, " {v:>cell$}");
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::LearnerConfig;

    #[test]
    fn scores_match_a_hand_computed_confusion_matrix() {
        // One feature; class a is learned for x = -1 and class b for x = +1.
        let config = LearnerConfig { classes: vec!["a".into(), "b".into()], standardize: false, ..Default::default() };
        let mut model = SoftmaxRegression::new(1, config).unwrap();
        for _ in 0..200 {
            model.update(&[-1.0], 0).unwrap();
            model.update(&[1.0], 1).unwrap();
        }
        // True a: predicted a, a, b. True b: predicted b.
        let e = evaluate(&model, &[-1.0, -1.0, 1.0, 1.0], &[0, 0, 0, 1]).unwrap();
        assert_eq!(e.confusion, vec![vec![2, 1], vec![0, 1]]);
        assert_eq!(e.accuracy, 0.75);
        let (a, b) = (&e.classes[0], &e.classes[1]);
        assert_eq!((a.precision, a.recall, a.support), (1.0, 2.0 / 3.0, 3));
        assert_eq!((b.precision, b.recall, b.support), (0.5, 1.0, 1));
        assert!((a.f1 - 0.8).abs() < 1e-12 && (b.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        let p_b_at_plus_one = model.predict_proba(&[1.0]).unwrap()[1] as f64;
        assert!(e.log_loss > -p_b_at_plus_one.ln());
        let table = e.table();
        assert!(table.contains("accuracy 0.7500") && table.contains("confusion matrix"), "{table}");
        assert!(table.contains(&format!("ECE {:.4}", e.calibration.ece)), "{table}");
    }

    #[test]
    fn calibration_bins_and_ece_match_a_hand_computation() {
        // Four examples at 0.95 confidence, three right; two at 0.55, both right; one at 1.0, right.
        let predictions =
            [(0.95, true), (0.95, true), (0.95, false), (0.95, true), (0.55, true), (0.55, true), (1.0, true)];
        let c = Calibration::of(predictions);
        let bins: Vec<(u64, f64)> = c.bins.iter().map(|b| (b.examples, b.accuracy)).collect();
        // 0.55 is in bin 8 of 15 ([0.533, 0.6)); 0.95 and 1.0 share the last ([0.933, 1]).
        assert_eq!(bins, vec![(2, 1.0), (5, 0.8)]);
        assert!((c.bins[0].lower - 8.0 / 15.0).abs() < 1e-12 && c.bins[1].upper == 1.0);
        assert!((c.bins[1].confidence - 0.96).abs() < 1e-12);
        // |1.0 - 0.55| * 2 + |0.8 - 0.96| * 5, over 7 examples.
        let expected = (0.45 * 2.0 + 0.16 * 5.0) / 7.0;
        assert!((c.ece - expected).abs() < 1e-12, "{} vs {expected}", c.ece);
        assert!((Calibration::of([(0.7, true), (0.7, false)]).ece - 0.2).abs() < 1e-12);
        assert_eq!(Calibration::of(std::iter::empty()), Calibration::default());
    }
}
