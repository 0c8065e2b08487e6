//! How good a classifier is on labelled features: accuracy, per-class precision, recall and F1,
//! macro-F1, log-loss and the confusion matrix; as a table and as JSON.

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
}

/// Evaluates `model` on row-major features `x` with class indices `labels` (of the model's
/// classes).
pub fn evaluate(model: &SoftmaxRegression, x: &[f32], labels: &[usize]) -> Result<Evaluation, LearnError> {
    let k = model.num_classes();
    let dim = model.dim();
    let mut confusion = vec![vec![0u64; k]; k];
    let mut probs = vec![0f32; k];
    let mut loss = 0f64;
    for (row, &label) in x.chunks_exact(dim).zip(labels) {
        model.predict_proba_into(row, &mut probs)?;
        loss -= (probs[label] as f64).clamp(1e-15, 1.0).ln();
        let predicted = argmax(&probs).expect("at least one class");
        confusion[label][predicted] += 1;
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
    })
}

impl Evaluation {
    /// A text report: the summary, the per-class table, the confusion matrix.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "examples {}   accuracy {:.4}   macro-F1 {:.4}   log-loss {:.4}\n",
            self.examples, self.accuracy, self.macro_f1, self.log_loss
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
    }
}
