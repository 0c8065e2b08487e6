//! Deterministic random data for the learner's tests.

/// The crate's [`SplitMix64`](crate::learn::SplitMix64), with the draws tests want.
pub(crate) struct Rng(crate::learn::SplitMix64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(crate::learn::SplitMix64(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub(crate) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }

    /// Standard normal (Box-Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

/// A linearly separable `classes`-class problem in `dim` features: the label is the argmax of
/// a hidden linear model over latent standard-normal features, with every example at least
/// `margin` away from the decision boundaries. Only the first `informative` latent features
/// enter the hidden model. The observed features are the latent ones shifted and scaled very
/// differently per feature (as CNN features are), which standardisation has to undo.
pub(crate) struct Separable {
    rng: Rng,
    dim: usize,
    hidden: Vec<f32>,
    classes: usize,
    margin: f32,
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Separable {
    pub(crate) fn new(seed: u64, dim: usize, classes: usize, informative: usize) -> Separable {
        let mut rng = Rng::new(seed);
        let hidden = (0..classes * dim).map(|i| if i % dim < informative { rng.normal() } else { 0.0 }).collect();
        let offset = (0..dim).map(|_| 5.0 * rng.normal()).collect();
        let scale = (0..dim).map(|_| (3.0 * rng.normal()).exp().clamp(0.05, 20.0)).collect();
        Separable { rng, dim, hidden, classes, margin: 0.5, offset, scale }
    }

    /// Without the per-feature shift and scale.
    pub(crate) fn unscaled(mut self) -> Separable {
        self.offset.fill(0.0);
        self.scale.fill(1.0);
        self
    }

    /// The next example: observed features and label.
    pub(crate) fn sample(&mut self) -> (Vec<f32>, usize) {
        loop {
            let latent: Vec<f32> = (0..self.dim).map(|_| self.rng.normal()).collect();
            let mut scores: Vec<f32> =
                self.hidden.chunks_exact(self.dim).map(|w| w.iter().zip(&latent).map(|(a, b)| a * b).sum()).collect();
            let label = super::kernels::argmax(&scores).expect("at least one class");
            let best = scores[label];
            scores[label] = f32::NEG_INFINITY;
            let second = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if self.classes > 1 && best - second < self.margin {
                continue;
            }
            let x = latent.iter().zip(&self.offset).zip(&self.scale).map(|((l, o), s)| l * s + o).collect();
            return (x, label);
        }
    }
}
