//! Concept drift detection on the learner's prequential log-loss: the Page-Hinkley test for an
//! increase in the mean of the losses, and what the learner does when it fires.
//!
//! Each labelled example's log-loss, measured before the example is learned
//! ([`UpdateOutcome::loss`](super::UpdateOutcome)), is one observation. While the stream is
//! stationary the learner's losses fall or stay level; when what the labels mean changes (a
//! new labelling policy, a relabelled class, another population of images) the model's
//! confident predictions turn into confident mistakes and the losses jump. Page-Hinkley
//! accumulates how far each loss lies above the running mean (less a tolerance `delta`) and
//! fires when that sum rises more than `threshold` above its lowest point.
//!
//! Two guards keep a learner's own ways from looking like drift, both found on real features
//! (EfficientNet-Lite0 on Fashion-MNIST): the first `min_examples` losses after a (re)start
//! are a warm-up, not tested (a new classifier's losses rise while it discovers its classes),
//! and each loss counts at most `max_loss` nats (one image early in a stream, while the
//! standardisation statistics were young, had a loss of 274 nats and passed a threshold alone).
//!
//! Pure computation, f64 in a fixed order: the detections depend only on the sequence of
//! losses, and [`PageHinkleyState`] restores a detector bit for bit (checkpoints store it).

use super::LearnError;
use serde::{Deserialize, Serialize};

/// The `[drift]` config section: whether the learner watches its losses for drift, how
/// sensitive the test is, and what it does on a detection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// Run the detector. Default: true.
    pub enabled: bool,
    /// Page-Hinkley's tolerance: the amount (in nats) by which a loss may exceed the running
    /// mean without counting towards a drift. Default: 0.1.
    pub delta: f64,
    /// Page-Hinkley's threshold: how far (in nats, summed over examples) the accumulated excess
    /// must rise above its minimum to fire. Default: 50.
    pub threshold: f64,
    /// Examples after the detector (re)starts that are a warm-up: counted, not tested, so it
    /// cannot fire before. Default: 100.
    pub min_examples: u64,
    /// Each loss counts as at most this many nats, so that one outlier cannot pass the
    /// threshold alone. Default: 10.
    pub max_loss: f64,
    /// What the learner does on a detection. Default: reset.
    pub action: DriftAction,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            delta: 0.1,
            threshold: 50.0,
            min_examples: 100,
            max_loss: 10.0,
            action: DriftAction::Reset,
        }
    }
}

impl DriftConfig {
    /// Checks that the parameters are finite and in range; errors name the key under `drift.`.
    pub fn validate(&self) -> Result<(), LearnError> {
        let invalid = |field, reason: String| Err(LearnError::Config { field, reason });
        if !(self.delta.is_finite() && self.delta >= 0.0) {
            return invalid("drift.delta", format!("must be finite and non-negative, not {}", self.delta));
        }
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return invalid("drift.threshold", format!("must be finite and positive, not {}", self.threshold));
        }
        if !(self.max_loss.is_finite() && self.max_loss > 0.0) {
            return invalid("drift.max_loss", format!("must be finite and positive, not {}", self.max_loss));
        }
        Ok(())
    }

    /// A detector with these parameters, or none when the detector is off.
    pub fn detector(&self) -> Option<PageHinkley> {
        self.enabled.then(|| PageHinkley::new(self))
    }
}

/// What the learner does when the detector fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftAction {
    /// Nothing beyond the log line and the metric.
    None,
    /// Keep the weights, forget the optimizer's accumulated statistics
    /// ([`SoftmaxRegression::restart_step_size`](super::SoftmaxRegression::restart_step_size)):
    /// steps are as large as at the start.
    RestartStepSize,
    /// A fresh classifier with the same classes and standardisation statistics
    /// ([`SoftmaxRegression::reset`](super::SoftmaxRegression::reset)).
    Reset,
}

/// The Page-Hinkley test for an increase in the mean of a sequence (Page 1954; in the form of
/// Gama et al., "A survey on concept drift adaptation", 2014) on losses `x_i` capped at
/// `max_loss`: with `mean_t` the mean of the losses after the warm-up (the first
/// `min_examples` since the (re)start),
///
/// ```text
/// m_t = Σ_{i ≤ t} (x_i - mean_i - delta)      M_t = min(0, min_{i ≤ t} m_i)
/// ```
///
/// and a drift is detected when `m_t - M_t > threshold`. The detector then restarts its
/// statistics, warm-up included, so that it measures the new concept from scratch.
#[derive(Clone, Debug, PartialEq)]
pub struct PageHinkley {
    delta: f64,
    threshold: f64,
    min_examples: u64,
    max_loss: f64,
    /// Observations since the last (re)start, warm-up included.
    count: u64,
    /// The mean, `m_t` and `M_t` of the losses tested since the last (re)start.
    mean: f64,
    cumulative: f64,
    minimum: f64,
    /// Observations and detections since the detector was created (restarts included).
    observations: u64,
    detections: u64,
    /// The observation (counted from 1) that completed the last detection.
    last_detection: Option<u64>,
}

impl PageHinkley {
    /// A detector with `config`'s parameters and no observations.
    pub fn new(config: &DriftConfig) -> PageHinkley {
        PageHinkley {
            delta: config.delta,
            threshold: config.threshold,
            min_examples: config.min_examples,
            max_loss: config.max_loss,
            count: 0,
            mean: 0.0,
            cumulative: 0.0,
            minimum: 0.0,
            observations: 0,
            detections: 0,
            last_detection: None,
        }
    }

    /// Adds one loss; true when it completes a detection (the statistics have then restarted).
    /// A non-finite loss (which a learner that has not diverged never reports) is ignored, so
    /// that it cannot poison the statistics.
    pub fn observe(&mut self, loss: f32) -> bool {
        if !loss.is_finite() {
            return false;
        }
        let x = f64::from(loss).min(self.max_loss);
        self.observations += 1;
        self.count += 1;
        // The warm-up's losses are counted, not tested.
        let Some(n) = self.count.checked_sub(self.min_examples).filter(|&n| n > 0) else { return false };
        self.mean += (x - self.mean) / n as f64;
        self.cumulative += x - self.mean - self.delta;
        self.minimum = self.minimum.min(self.cumulative);
        if self.statistic() > self.threshold {
            self.detections += 1;
            self.last_detection = Some(self.observations);
            self.restart();
            return true;
        }
        false
    }

    /// Forgets the observations (the detection count stays).
    pub fn restart(&mut self) {
        self.count = 0;
        self.mean = 0.0;
        self.cumulative = 0.0;
        self.minimum = 0.0;
    }

    /// The test statistic `m_t - M_t`: how far the accumulated excess loss has risen above
    /// its minimum. A drift is detected when it passes the threshold.
    pub fn statistic(&self) -> f64 {
        self.cumulative - self.minimum
    }

    /// The statistic as a fraction of the threshold: a detection comes at 1.
    pub fn statistic_ratio(&self) -> f64 {
        self.statistic() / self.threshold
    }

    /// Observations since the last (re)start, warm-up included.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The mean (capped) loss since the warm-up, if it is over.
    pub fn mean(&self) -> Option<f64> {
        (self.count > self.min_examples).then_some(self.mean)
    }

    /// Observations since the detector was created.
    pub fn observations(&self) -> u64 {
        self.observations
    }

    /// Detections since the detector was created.
    pub fn detections(&self) -> u64 {
        self.detections
    }

    /// The observation (counted from 1, since the detector was created) that completed the
    /// last detection, if there was one.
    pub fn last_detection(&self) -> Option<u64> {
        self.last_detection
    }

    /// The detector's complete state, exact to the bit.
    pub fn state(&self) -> PageHinkleyState {
        PageHinkleyState {
            count: self.count,
            mean_bits: self.mean.to_bits(),
            cumulative_bits: self.cumulative.to_bits(),
            minimum_bits: self.minimum.to_bits(),
            observations: self.observations,
            detections: self.detections,
            last_detection: self.last_detection,
        }
    }

    /// A detector with `config`'s parameters in a saved state: it continues as the saved one
    /// would have (with other parameters, from the same statistics).
    pub fn from_state(state: &PageHinkleyState, config: &DriftConfig) -> PageHinkley {
        PageHinkley {
            count: state.count,
            mean: f64::from_bits(state.mean_bits),
            cumulative: f64::from_bits(state.cumulative_bits),
            minimum: f64::from_bits(state.minimum_bits),
            observations: state.observations,
            detections: state.detections,
            last_detection: state.last_detection,
            ..PageHinkley::new(config)
        }
    }
}

/// The complete state of a [`PageHinkley`] detector (floats as their bit patterns), without
/// its parameters, which come from the config. Checkpoints store it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageHinkleyState {
    pub count: u64,
    pub mean_bits: u64,
    pub cumulative_bits: u64,
    pub minimum_bits: u64,
    pub observations: u64,
    pub detections: u64,
    pub last_detection: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::testutil::Rng;

    /// Losses like a settled classifier's: mostly small, now and then a confident mistake (an
    /// exponential with mean `mean`: heavier-tailed than a Gaussian, as log-losses are).
    fn losses(rng: &mut Rng, mean: f32, n: usize) -> Vec<f32> {
        (0..n).map(|_| (-f64::from(mean) * (1.0 - rng.uniform()).ln()) as f32).collect()
    }

    /// The positions (0-based) at which `detector` fires on `xs`.
    fn detections(detector: &mut PageHinkley, xs: &[f32]) -> Vec<usize> {
        xs.iter().enumerate().filter(|(_, &x)| detector.observe(x)).map(|(i, _)| i).collect()
    }

    #[test]
    fn a_stationary_stream_raises_no_alarm() {
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let mut detector = DriftConfig::default().detector().unwrap();
            let xs = losses(&mut rng, 0.5, 5000);
            assert_eq!(detections(&mut detector, &xs), Vec::<usize>::new(), "seed {seed}");
            assert!(detector.statistic_ratio() < 1.0);
        }
    }

    #[test]
    fn a_falling_loss_raises_no_alarm() {
        // A learner's loss curve: high at first, settling.
        let mut rng = Rng::new(3);
        let xs: Vec<f32> =
            (0..3000).map(|t| (2.3 * (-(t as f32) / 300.0).exp() + 0.4) * 2.0 * rng.uniform() as f32).collect();
        let mut detector = DriftConfig::default().detector().unwrap();
        assert_eq!(detections(&mut detector, &xs), Vec::<usize>::new());
    }

    #[test]
    fn a_mean_shift_is_detected_soon_after_it_happens() {
        for seed in 0..20 {
            let mut rng = Rng::new(100 + seed);
            let mut xs = losses(&mut rng, 0.5, 2000);
            xs.extend(losses(&mut rng, 2.0, 1000));
            let mut detector = DriftConfig::default().detector().unwrap();
            let found = detections(&mut detector, &xs);
            // An excess of about 1.5 nats an example passes a threshold of 50 in about 35.
            assert!(!found.is_empty() && (2000..2100).contains(&found[0]), "seed {seed}: {found:?}");
            assert_eq!(detector.detections(), found.len() as u64);
        }
    }

    #[test]
    fn a_detection_restarts_the_statistics() {
        let mut detector = PageHinkley::new(&DriftConfig { min_examples: 0, ..DriftConfig::default() });
        for _ in 0..10 {
            assert!(!detector.observe(0.1));
        }
        let mut fired_after = None;
        for i in 1..100 {
            if detector.observe(10.0) {
                fired_after = Some(i);
                break;
            }
        }
        // m rises by 10 - mean - delta per loss: 4.5, 3.3, ... until it passes 50.
        assert!(fired_after.is_some_and(|i| i < 20), "{fired_after:?}");
        assert_eq!((detector.count(), detector.statistic(), detector.mean()), (0, 0.0, None));
        assert_eq!((detector.detections(), detector.last_detection()), (1, Some(10 + fired_after.unwrap())));
        // The new level is the new normal: the restarted detector does not fire on it.
        for _ in 0..1000 {
            assert!(!detector.observe(10.0));
        }
    }

    #[test]
    fn the_warm_up_is_not_tested() {
        // A new classifier's losses rise while it discovers its classes: within the warm-up
        // that is no drift, and the level it reaches is the baseline.
        let xs: Vec<f32> = (0..800)
            .map(|i| {
                if i < 50 {
                    0.1
                } else if i < 600 {
                    3.0
                } else {
                    9.0
                }
            })
            .collect();
        let mut warm = PageHinkley::new(&DriftConfig { min_examples: 100, ..DriftConfig::default() });
        assert_eq!(detections(&mut warm, &xs[..600]), Vec::<usize>::new());
        assert_eq!(warm.mean(), Some(3.0));
        // A rise after the warm-up is tested: (9 - mean - 0.1) a loss passes 50 in 9 losses.
        assert_eq!(detections(&mut warm, &xs[600..]), vec![8]);
        // Without a warm-up the rise from 0.1 to 3.0 is a drift: the j-th loss of 3.0 adds
        // 145 / (50 + j) - 0.1, which sums past 50 at j = 22.
        let mut cold = PageHinkley::new(&DriftConfig { min_examples: 0, ..DriftConfig::default() });
        assert_eq!(detections(&mut cold, &xs)[0], 49 + 22);
    }

    #[test]
    fn one_outlier_counts_as_at_most_max_loss() {
        let mut xs = vec![0.3f32; 1000];
        xs[500] = 274.0;
        let capped = DriftConfig::default();
        assert_eq!(detections(&mut PageHinkley::new(&capped), &xs), Vec::<usize>::new());
        let uncapped = DriftConfig { max_loss: 1e9, ..capped };
        assert_eq!(detections(&mut PageHinkley::new(&uncapped), &xs), vec![500]);
    }

    #[test]
    fn a_restored_state_continues_bit_for_bit() {
        let mut rng = Rng::new(7);
        let mut xs = losses(&mut rng, 0.4, 1500);
        xs.extend(losses(&mut rng, 3.0, 300));
        xs.extend(losses(&mut rng, 0.4, 500));
        xs.extend(losses(&mut rng, 3.0, 300));
        let config = DriftConfig::default();
        let mut whole = PageHinkley::new(&config);
        let all = detections(&mut whole, &xs);
        assert!(all.len() >= 2 && (1500..1600).contains(&all[0]), "{all:?}");
        for cut in [1, 700, 1510, 1700, 2400] {
            let mut first = PageHinkley::new(&config);
            let mut found = detections(&mut first, &xs[..cut]);
            let json = serde_json::to_string(&first.state()).unwrap();
            let mut restored = PageHinkley::from_state(&serde_json::from_str(&json).unwrap(), &config);
            found.extend(detections(&mut restored, &xs[cut..]).into_iter().map(|i| i + cut));
            assert_eq!(found, all, "cut at {cut}");
            assert_eq!(restored, whole, "cut at {cut}");
        }
    }

    #[test]
    fn non_finite_losses_are_ignored() {
        let mut detector = DriftConfig::default().detector().unwrap();
        detector.observe(0.5);
        let before = detector.clone();
        assert!(!detector.observe(f32::NAN) && !detector.observe(f32::INFINITY));
        assert_eq!(detector, before);
    }

    #[test]
    fn config_defaults_parse_and_bad_values_name_their_key() {
        let c: DriftConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, DriftConfig::default());
        let c: DriftConfig = serde_json::from_str(r#"{"action": "restart_step_size"}"#).unwrap();
        assert_eq!(c.action, DriftAction::RestartStepSize);
        assert!(serde_json::from_str::<DriftConfig>(r#"{"action": "refit"}"#).is_err());
        assert!(serde_json::from_str::<DriftConfig>(r#"{"treshold": 3}"#).is_err());
        let e = DriftConfig { threshold: 0.0, ..DriftConfig::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("drift.threshold"), "{e}");
        let e = DriftConfig { delta: f64::NAN, ..DriftConfig::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("drift.delta"), "{e}");
        let e = DriftConfig { max_loss: f64::INFINITY, ..DriftConfig::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("drift.max_loss"), "{e}");
        assert!(DriftConfig { enabled: false, ..DriftConfig::default() }.detector().is_none());
    }
}
