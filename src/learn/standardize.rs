//! Running feature standardisation: `(x - mean) / std` per feature, with the mean and variance
//! of the features seen so far (Welford's algorithm).

use super::kernels::SimdPath;

/// Per-feature running mean and variance of the feature vectors observed, and the
/// standardisation they define.
///
/// A learner standardises each example with the statistics of the examples *before* it and then
/// observes it ([`RunningStandardizer::transform_and_observe`]), so the features it predicts on
/// and the features it learns from are the same, and the result depends only on the sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStandardizer {
    count: u64,
    mean: Vec<f32>,
    /// Welford's sum of squared deviations from the mean.
    m2: Vec<f32>,
}

impl RunningStandardizer {
    /// No observations yet: every feature is passed through unchanged until the first one.
    pub fn new(dim: usize) -> RunningStandardizer {
        RunningStandardizer { count: 0, mean: vec![0.0; dim], m2: vec![0.0; dim] }
    }

    /// Restores a standardiser from its state, as returned by the getters.
    ///
    /// # Panics
    /// If `mean` and `m2` differ in length.
    pub fn from_parts(count: u64, mean: Vec<f32>, m2: Vec<f32>) -> RunningStandardizer {
        assert_eq!(mean.len(), m2.len(), "mean and m2 must have one value per feature");
        RunningStandardizer { count, mean, m2 }
    }

    /// The number of features.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// The number of feature vectors observed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The running mean of each feature.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    /// The running sum of squared deviations of each feature (variance times count).
    pub fn m2(&self) -> &[f32] {
        &self.m2
    }

    /// The population variance of each feature (zero before two observations).
    pub fn variance(&self) -> Vec<f32> {
        let inv_n = self.inv_count();
        self.m2.iter().map(|m2| m2 * inv_n).collect()
    }

    /// `1 / count`, or 0 before the first observation (which makes every variance 0).
    fn inv_count(&self) -> f32 {
        if self.count == 0 {
            0.0
        } else {
            (1.0 / self.count as f64) as f32
        }
    }

    /// Writes the standardised `x` into `out` without observing it. Features whose variance
    /// is at most [`VARIANCE_EPSILON`](super::VARIANCE_EPSILON) are only centred.
    ///
    /// # Panics
    /// If `x` or `out` is not [`dim`](Self::dim) long.
    pub fn transform(&self, x: &[f32], out: &mut [f32]) {
        self.transform_with(SimdPath::detect(), x, out);
    }

    pub(crate) fn transform_with(&self, simd: SimdPath, x: &[f32], out: &mut [f32]) {
        assert!(x.len() == self.dim() && out.len() == self.dim(), "feature vector length differs from dim");
        simd.standardize(x, &self.mean, &self.m2, self.inv_count(), out);
    }

    /// Updates the statistics with `x`.
    ///
    /// # Panics
    /// If `x` is not [`dim`](Self::dim) long.
    pub fn observe(&mut self, x: &[f32]) {
        assert_eq!(x.len(), self.dim(), "feature vector length differs from dim");
        SimdPath::detect().observe(x, &mut self.mean, &mut self.m2, self.inv_next_count());
        self.count += 1;
    }

    /// [`transform`](Self::transform) then [`observe`](Self::observe), in one pass over the
    /// features: the learner's hot path. `out` receives exactly what `transform` would write.
    ///
    /// # Panics
    /// If `x` or `out` is not [`dim`](Self::dim) long.
    pub fn transform_and_observe(&mut self, x: &[f32], out: &mut [f32]) {
        self.transform_and_observe_with(SimdPath::detect(), x, out);
    }

    pub(crate) fn transform_and_observe_with(&mut self, simd: SimdPath, x: &[f32], out: &mut [f32]) {
        assert!(x.len() == self.dim() && out.len() == self.dim(), "feature vector length differs from dim");
        let (inv_n, inv_n1) = (self.inv_count(), self.inv_next_count());
        simd.standardize_observe(x, &mut self.mean, &mut self.m2, inv_n, inv_n1, out);
        self.count += 1;
    }

    /// `1 / (count + 1)`, the weight of the next observation in the mean.
    fn inv_next_count(&self) -> f32 {
        (1.0 / (self.count as f64 + 1.0)) as f32
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
            s.observe(x);
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
            fused.transform_and_observe(&x, &mut z_fused);
            separate.transform(&x, &mut z_separate);
            separate.observe(&x);
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
        s.transform_and_observe(&[3.0, 7.0], &mut z);
        assert_eq!(z, [3.0, 7.0]);
        // One observation: zero variance, so only centred.
        s.transform_and_observe(&[5.0, 7.0], &mut z);
        assert_eq!(z, [2.0, 0.0]);
        for _ in 0..10 {
            s.transform_and_observe(&[4.0, 7.0], &mut z);
            assert!(z.iter().all(|v| v.is_finite()));
        }
        // Feature 1 has been exactly constant: its deviation is passed through unscaled.
        s.transform(&[4.0, 7.5], &mut z);
        assert_eq!(z[1], 0.5);
        assert_eq!(s.m2()[1], 0.0);
    }
}
