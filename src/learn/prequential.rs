//! Prequential (test-then-train) evaluation: how well the learner predicted each example
//! before learning it, over the whole stream and over a sliding window of recent examples.

use super::model::UpdateOutcome;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Accuracy and mean log-loss of a learner's predictions, accumulated from the
/// [`UpdateOutcome`]s of its updates: over everything, and over the last `window` outcomes
/// (which follow a drifting stream where the totals cannot).
#[derive(Clone, Debug)]
pub struct Prequential {
    count: u64,
    correct: u64,
    loss_sum: f64,
    window: VecDeque<UpdateOutcome>,
    window_len: usize,
    window_correct: usize,
    window_loss_sum: f64,
    /// Outcomes evicted since the window's loss sum was last recomputed from scratch.
    evicted_since_resum: usize,
}

impl Prequential {
    /// Metrics with a sliding window of the last `window` outcomes; 0 keeps no window.
    pub fn new(window: usize) -> Prequential {
        Prequential {
            count: 0,
            correct: 0,
            loss_sum: 0.0,
            window: VecDeque::with_capacity(window),
            window_len: window,
            window_correct: 0,
            window_loss_sum: 0.0,
            evicted_since_resum: 0,
        }
    }

    /// Adds one outcome.
    pub fn record(&mut self, outcome: UpdateOutcome) {
        self.count += 1;
        self.correct += u64::from(outcome.correct);
        self.loss_sum += f64::from(outcome.loss);
        if self.window_len == 0 {
            return;
        }
        if self.window.len() == self.window_len {
            let old = self.window.pop_front().expect("the window is full");
            self.window_correct -= usize::from(old.correct);
            self.window_loss_sum -= f64::from(old.loss);
            self.evicted_since_resum += 1;
        }
        self.window.push_back(outcome);
        self.window_correct += usize::from(outcome.correct);
        self.window_loss_sum += f64::from(outcome.loss);
        // Adding and subtracting accumulates rounding error (and an infinite loss would leave
        // NaN behind once evicted); summing afresh once per window length bounds both at O(1)
        // amortised cost.
        if self.evicted_since_resum >= self.window_len {
            self.window_loss_sum = self.window.iter().map(|o| f64::from(o.loss)).sum();
            self.evicted_since_resum = 0;
        }
    }

    /// Outcomes recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Correct predictions recorded.
    pub fn correct(&self) -> u64 {
        self.correct
    }

    /// The fraction of correct predictions, if any were recorded.
    pub fn accuracy(&self) -> Option<f64> {
        (self.count > 0).then(|| self.correct as f64 / self.count as f64)
    }

    /// The mean log-loss, if any outcomes were recorded.
    pub fn mean_log_loss(&self) -> Option<f64> {
        (self.count > 0).then(|| self.loss_sum / self.count as f64)
    }

    /// The window's capacity (0: no window).
    pub fn window_capacity(&self) -> usize {
        self.window_len
    }

    /// Outcomes in the window: `min(count, window capacity)`.
    pub fn window_count(&self) -> usize {
        self.window.len()
    }

    /// The fraction of correct predictions in the window, if it holds any.
    pub fn window_accuracy(&self) -> Option<f64> {
        (!self.window.is_empty()).then(|| self.window_correct as f64 / self.window.len() as f64)
    }

    /// The mean log-loss in the window, if it holds any.
    pub fn window_mean_log_loss(&self) -> Option<f64> {
        (!self.window.is_empty()).then(|| self.window_loss_sum / self.window.len() as f64)
    }
}

/// The complete state of [`Prequential`], exact to the bit (floats as their bit patterns), so
/// that a restored learner's metrics continue as if it had never stopped. Checkpoints store it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrequentialState {
    count: u64,
    correct: u64,
    loss_sum_bits: u64,
    window_len: usize,
    /// The window's outcomes, oldest first: the loss's f32 bits, and whether it was correct.
    window: Vec<(u32, bool)>,
    window_loss_sum_bits: u64,
    evicted_since_resum: usize,
}

impl Prequential {
    pub fn state(&self) -> PrequentialState {
        PrequentialState {
            count: self.count,
            correct: self.correct,
            loss_sum_bits: self.loss_sum.to_bits(),
            window_len: self.window_len,
            window: self.window.iter().map(|o| (o.loss.to_bits(), o.correct)).collect(),
            window_loss_sum_bits: self.window_loss_sum.to_bits(),
            evicted_since_resum: self.evicted_since_resum,
        }
    }

    /// Metrics in the given state, with a window of `window` outcomes: the saved window's
    /// newest outcomes when it differs from the saved one.
    pub fn from_state(state: &PrequentialState, window: usize) -> Prequential {
        let mut m = Prequential::new(window);
        m.count = state.count;
        m.correct = state.correct;
        m.loss_sum = f64::from_bits(state.loss_sum_bits);
        let skip = state.window.len().saturating_sub(window);
        for &(loss, correct) in &state.window[skip..] {
            let outcome = UpdateOutcome { loss: f32::from_bits(loss), correct };
            m.window.push_back(outcome);
            m.window_correct += usize::from(correct);
        }
        if window == state.window_len {
            m.window_loss_sum = f64::from_bits(state.window_loss_sum_bits);
            m.evicted_since_resum = state.evicted_since_resum;
        } else {
            m.window_loss_sum = m.window.iter().map(|o| f64::from(o.loss)).sum();
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(loss: f32, correct: bool) -> UpdateOutcome {
        UpdateOutcome { loss, correct }
    }

    #[test]
    fn empty_metrics_have_no_values() {
        let m = Prequential::new(3);
        assert_eq!(m.accuracy(), None);
        assert_eq!(m.mean_log_loss(), None);
        assert_eq!(m.window_accuracy(), None);
        assert_eq!(m.window_mean_log_loss(), None);
    }

    #[test]
    fn totals_and_window_track_their_outcomes() {
        let mut m = Prequential::new(3);
        for (loss, correct) in [(1.0, false), (0.5, true), (0.25, true), (2.0, false), (0.125, true)] {
            m.record(outcome(loss, correct));
        }
        assert_eq!(m.count(), 5);
        assert_eq!(m.correct(), 3);
        assert_eq!(m.accuracy(), Some(0.6));
        assert_eq!(m.mean_log_loss(), Some(3.875 / 5.0));
        // The window holds the last three: 0.25 (correct), 2.0 (wrong), 0.125 (correct).
        assert_eq!(m.window_count(), 3);
        assert_eq!(m.window_accuracy(), Some(2.0 / 3.0));
        assert_eq!(m.window_mean_log_loss(), Some(2.375 / 3.0));
    }

    #[test]
    fn window_recovers_from_an_infinite_loss_once_it_is_evicted() {
        let mut m = Prequential::new(2);
        m.record(outcome(f32::INFINITY, false));
        assert_eq!(m.window_mean_log_loss(), Some(f64::INFINITY));
        for _ in 0..4 {
            m.record(outcome(0.5, true));
        }
        assert_eq!(m.window_mean_log_loss(), Some(0.5));
        assert_eq!(m.window_accuracy(), Some(1.0));
        assert_eq!(m.mean_log_loss(), Some(f64::INFINITY));
    }

    #[test]
    fn a_restored_state_continues_bit_for_bit() {
        let mut m = Prequential::new(4);
        let outcomes: Vec<UpdateOutcome> = (0..11).map(|i| outcome(0.1 * i as f32 + 0.013, i % 3 == 0)).collect();
        for o in &outcomes[..7] {
            m.record(*o);
        }
        let json = serde_json::to_string(&m.state()).unwrap();
        let mut restored = Prequential::from_state(&serde_json::from_str(&json).unwrap(), 4);
        for o in &outcomes[7..] {
            m.record(*o);
            restored.record(*o);
        }
        assert_eq!(restored.state(), m.state());
        assert_eq!(restored.mean_log_loss().unwrap().to_bits(), m.mean_log_loss().unwrap().to_bits());
        // A smaller window keeps the newest outcomes.
        let small = Prequential::from_state(&m.state(), 2);
        assert_eq!(small.window_count(), 2);
        assert_eq!(small.window_accuracy(), Some(0.5));
        assert_eq!(small.count(), 11);
    }

    #[test]
    fn zero_window_keeps_totals_only() {
        let mut m = Prequential::new(0);
        m.record(outcome(1.0, true));
        assert_eq!(m.accuracy(), Some(1.0));
        assert_eq!(m.window_count(), 0);
        assert_eq!(m.window_accuracy(), None);
    }
}
