//! Running feature standardisation: `(x - mean) / std` per feature, with the mean and variance
//! of the features seen so far (Welford's algorithm).

use super::kernels::SimdPath;
use super::LearnError;

/// Per-feature running mean and variance of the feature vectors observed, and the
/// standardisation they define.
///
/// A learner standardises each example with the statistics of the examples *before* it and then
/// observes it ([`RunningStandardizer::transform_and_observe`]), so the features it predicts on
/// and the features it learns from are the same, and the result depends only on the sequence.
#[derive(Clone, Debug)]
pub struct RunningStandardizer {
    count: u64,
    /// The mean of each feature, then Welford's sum of squared deviations from the mean (`m2`).
    stats: Vec<f32>,
    /// Where an observation writes the next `stats`. They replace `stats` only once the whole
    /// feature vector has proven finite, so the check costs no pass of its own and a rejected
    /// vector leaves the statistics untouched.
    next: Vec<f32>,
}

impl PartialEq for RunningStandardizer {
    fn eq(&self, other: &Self) -> bool {
        self.count == other.count && self.stats == other.stats
    }
}

impl RunningStandardizer {
    /// No observations yet: every feature is passed through unchanged until the first one.
    pub fn new(dim: usize) -> RunningStandardizer {
        RunningStandardizer { count: 0, stats: vec![0.0; 2 * dim], next: vec![0.0; 2 * dim] }
    }

    /// Restores a standardiser from its state, as returned by the getters.
    ///
    /// # Panics
    /// If `mean` and `m2` differ in length.
    pub fn from_parts(count: u64, mean: Vec<f32>, m2: Vec<f32>) -> RunningStandardizer {
        assert_eq!(mean.len(), m2.len(), "mean and m2 must have one value per feature");
        let mut stats = mean;
        stats.extend_from_slice(&m2);
        RunningStandardizer { count, next: vec![0.0; stats.len()], stats }
    }

    /// The number of features.
    pub fn dim(&self) -> usize {
        self.stats.len() / 2
    }

    /// The number of feature vectors observed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The running mean of each feature.
    pub fn mean(&self) -> &[f32] {
        &self.stats[..self.dim()]
    }

    /// The running sum of squared deviations of each feature (variance times count).
    pub fn m2(&self) -> &[f32] {
        &self.stats[self.dim()..]
    }

    /// The population variance of each feature (zero before two observations).
    pub fn variance(&self) -> Vec<f32> {
        let inv_n = inv_count(self.count);
        self.m2().iter().map(|m2| m2 * inv_n).collect()
    }

    /// Writes the standardised `x` into `out` without observing it. Features whose variance
    /// is at most [`VARIANCE_EPSILON`](super::VARIANCE_EPSILON) are only centred.
    pub fn transform(&self, x: &[f32], out: &mut [f32]) -> Result<(), LearnError> {
        self.check(x, Some(out))?;
        self.transform_with(SimdPath::detect(), x, out);
        Ok(())
    }

    /// [`transform`](Self::transform) on a given path; the lengths must be right.
    pub(crate) fn transform_with(&self, simd: SimdPath, x: &[f32], out: &mut [f32]) {
        simd.standardize(x, &self.stats, out, inv_count(self.count));
    }

    /// Updates the statistics with `x`. A non-finite feature is an error, and leaves the
    /// statistics as they were.
    pub fn observe(&mut self, x: &[f32]) -> Result<(), LearnError> {
        self.check(x, None)?;
        let finite = SimdPath::detect().observe(x, &self.stats, &mut self.next, inv_count(self.count + 1));
        self.commit(x, finite)
    }

    /// [`transform`](Self::transform) then [`observe`](Self::observe), in one pass over the
    /// features: the learner's hot path. `out` receives exactly what `transform` would write.
    /// A non-finite feature is an error, and leaves the statistics as they were.
    pub fn transform_and_observe(&mut self, x: &[f32], out: &mut [f32]) -> Result<(), LearnError> {
        self.check(x, Some(out))?;
        self.transform_and_observe_with(SimdPath::detect(), x, out)
    }

    /// [`transform_and_observe`](Self::transform_and_observe) on a given path; the lengths must
    /// be right.
    pub(crate) fn transform_and_observe_with(
        &mut self,
        simd: SimdPath,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<(), LearnError> {
        let (inv_n, inv_n1) = (inv_count(self.count), inv_count(self.count + 1));
        let finite = simd.standardize_observe(x, &self.stats, &mut self.next, out, inv_n, inv_n1);
        self.commit(x, finite)
    }

    /// Makes the statistics computed into `next` current if `x` was finite.
    fn commit(&mut self, x: &[f32], finite: bool) -> Result<(), LearnError> {
        if !finite {
            return Err(LearnError::non_finite(x));
        }
        std::mem::swap(&mut self.stats, &mut self.next);
        self.count += 1;
        Ok(())
    }

    fn check(&self, x: &[f32], out: Option<&mut [f32]>) -> Result<(), LearnError> {
        if x.len() != self.dim() {
            return Err(LearnError::Dimension { expected: self.dim(), got: x.len() });
        }
        match out {
            Some(out) if out.len() != self.dim() => {
                Err(LearnError::OutputLength { expected: self.dim(), got: out.len() })
            }
            _ => Ok(()),
        }
    }
}

/// `1 / n`, or 0 for no observations (which makes every variance 0).
fn inv_count(n: u64) -> f32 {
    if n == 0 {
        0.0
    } else {
        (1.0 / n as f64) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::testutil::Rng;

    /// Features with very different offsets and scales, as CNN features have.
    fn sample(rng: &mut Rng, dim: usize) -> Vec<f32> {
        (0..dim).map(|i| 100.0 * i as f32 - 50.0 + (0.01 + i as f32) * rng.normal()).collect()
    }

    #[test]
    fn running_statistics_match_two_pass_mean_and_variance() {
        let mut rng = Rng::new(7);
        let dim = 6;
        let data: Vec<Vec<f32>> = (0..5000).map(|_| sample(&mut rng, dim)).collect();
        let mut s = RunningStandardizer::new(dim);
        for x in &data {
            s.observe(x).unwrap();
        }
        assert_eq!(s.count(), 5000);
        let var = s.variance();
        for i in 0..dim {
            let n = data.len() as f64;
            let mean: f64 = data.iter().map(|x| x[i] as f64).sum::<f64>() / n;
            let var_exact: f64 = data.iter().map(|x| (x[i] as f64 - mean).powi(2)).sum::<f64>() / n;
            assert!((s.mean()[i] as f64 - mean).abs() <= 1e-4 * (mean.abs() + var_exact.sqrt()), "mean {i}");
            assert!((var[i] as f64 - var_exact).abs() <= 1e-3 * var_exact, "variance {i}: {} vs {var_exact}", var[i]);
        }
    }

    #[test]
    fn transform_uses_the_statistics_before_the_example() {
        let mut rng = Rng::new(8);
        let dim = 5;
        let mut fused = RunningStandardizer::new(dim);
        let mut separate = RunningStandardizer::new(dim);
        let mut seen: Vec<Vec<f32>> = Vec::new();
        for step in 0..300 {
            let x = sample(&mut rng, dim);
            let mut z_fused = vec![0.0; dim];
            let mut z_separate = vec![0.0; dim];
            fused.transform_and_observe(&x, &mut z_fused).unwrap();
            separate.transform(&x, &mut z_separate).unwrap();
            separate.observe(&x).unwrap();
            for i in 0..dim {
                assert_eq!(z_fused[i].to_bits(), z_separate[i].to_bits(), "step {step} feature {i}");
            }
            if step >= 2 {
                // Against the two-pass statistics of the examples before this one.
                let n = seen.len() as f64;
                let mean: f64 = seen.iter().map(|v| v[0] as f64).sum::<f64>() / n;
                let var: f64 = seen.iter().map(|v| (v[0] as f64 - mean).powi(2)).sum::<f64>() / n;
                let want = (x[0] as f64 - mean) / var.sqrt();
                assert!((z_fused[0] as f64 - want).abs() < 1e-2 * (1.0 + want.abs()), "step {step}");
            }
            seen.push(x);
        }
        assert_eq!(fused, separate);
    }

    #[test]
    fn constant_and_unseen_features_are_centred_but_not_scaled() {
        let mut s = RunningStandardizer::new(2);
        let mut z = vec![0.0; 2];
        // Nothing observed: passed through.
        s.transform_and_observe(&[3.0, 7.0], &mut z).unwrap();
        assert_eq!(z, [3.0, 7.0]);
        // One observation: zero variance, so only centred.
        s.transform_and_observe(&[5.0, 7.0], &mut z).unwrap();
        assert_eq!(z, [2.0, 0.0]);
        for _ in 0..10 {
            s.transform_and_observe(&[4.0, 7.0], &mut z).unwrap();
            assert!(z.iter().all(|v| v.is_finite()));
        }
        // Feature 1 has been exactly constant: its deviation is passed through unscaled.
        s.transform(&[4.0, 7.5], &mut z).unwrap();
        assert_eq!(z[1], 0.5);
        assert_eq!(s.m2()[1], 0.0);
    }

    #[test]
    fn rejected_vectors_leave_the_statistics_unchanged() {
        let mut s = RunningStandardizer::new(3);
        s.observe(&[1.0, 2.0, 3.0]).unwrap();
        s.observe(&[2.0, 4.0, 8.0]).unwrap();
        let before = s.clone();
        let mut z = [0.0; 3];
        let err = s.transform_and_observe(&[1.0, f32::NAN, 0.0], &mut z).unwrap_err();
        assert!(matches!(err, LearnError::NonFinite { index: 1, .. }), "{err:?}");
        let err = s.observe(&[1.0, 0.0, f32::NEG_INFINITY]).unwrap_err();
        assert!(matches!(err, LearnError::NonFinite { index: 2, .. }), "{err:?}");
        assert!(matches!(s.observe(&[1.0]), Err(LearnError::Dimension { expected: 3, got: 1 })));
        assert!(matches!(s.transform(&[1.0; 3], &mut [0.0; 2]), Err(LearnError::OutputLength { expected: 3, got: 2 })));
        assert_eq!(s, before);
        assert_eq!((s.count(), s.mean()), (2, &[1.5, 3.0, 5.5][..]));
    }
}
