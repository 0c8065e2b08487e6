//! [`ReplayBuffer`]: the learner's newest labelled examples, drawn again at each epoch's end
//! (see [`ReplayConfig`]).

use super::config::ReplayConfig;
use super::rng::SplitMix64;

/// The seed of every buffer's generator: draws depend only on the examples and the epochs.
const SEED: u64 = 0x7265_706c_6179; // "replay"

/// A ring of the newest `capacity` examples (raw features and class index), the replays owed
/// for the examples added since the last draw, and the generator that picks them.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ReplayBuffer {
    dim: usize,
    config: ReplayConfig,
    /// `len x dim`, row-major: features as learned, standardised again when replayed.
    features: Vec<f32>,
    labels: Vec<u32>,
    /// The row the next example replaces once the buffer is full: the oldest.
    next: usize,
    /// Replays owed and not yet drawn, fractions included (`ratio` per example added).
    owed: f64,
    rng: SplitMix64,
}

impl ReplayBuffer {
    /// An empty buffer for `dim` features; keeps nothing when `config` is off.
    pub(crate) fn new(dim: usize, config: ReplayConfig) -> ReplayBuffer {
        ReplayBuffer { dim, config, rng: SplitMix64(SEED), ..ReplayBuffer::default() }
    }

    /// Keeps example `x` of class `label`, replacing the oldest when full, and owes `ratio`
    /// replays for it (at most `ratio x capacity` owed in all).
    pub(crate) fn remember(&mut self, x: &[f32], label: usize) {
        if !self.config.is_on() {
            return;
        }
        debug_assert_eq!(x.len(), self.dim);
        if self.labels.len() < self.config.capacity {
            self.features.extend_from_slice(x);
            self.labels.push(label as u32);
        } else {
            self.features[self.next * self.dim..][..self.dim].copy_from_slice(x);
            self.labels[self.next] = label as u32;
            self.next = (self.next + 1) % self.config.capacity;
        }
        // Bounded, so that a model that learned without replaying (say, in a batch) does not
        // owe one epoch of the stream millions of replays.
        let ratio = self.config.ratio as f64;
        self.owed = (self.owed + ratio).min(ratio * self.config.capacity as f64);
    }

    /// The examples to replay now, as rows of the buffer: the whole replays owed, each drawn
    /// uniformly from what the buffer holds. The fraction left is owed to the next draw.
    pub(crate) fn draw(&mut self) -> Vec<usize> {
        let n = self.owed.floor();
        self.owed -= n;
        if self.labels.is_empty() {
            return Vec::new();
        }
        (0..n as u64).map(|_| self.rng.below(self.labels.len() as u64) as usize).collect()
    }

    /// Forgets the examples held and the replays owed (the generator goes on): after a drift
    /// they teach what the labels no longer mean.
    pub(crate) fn forget(&mut self) {
        self.features.clear();
        self.labels.clear();
        self.next = 0;
        self.owed = 0.0;
    }

    /// Row `row`: its features and class index.
    pub(crate) fn example(&self, row: usize) -> (&[f32], usize) {
        (&self.features[row * self.dim..][..self.dim], self.labels[row] as usize)
    }

    /// The examples held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    /// What a snapshot stores: the features (`len x dim`), the labels, and the ring position,
    /// the generator and the replays owed (as `f64` bits).
    pub(crate) fn parts(&self) -> (&[f32], &[u32], [u64; 3]) {
        (&self.features, &self.labels, [self.next as u64, self.rng.0, self.owed.to_bits()])
    }

    /// A buffer from [`parts`](Self::parts); `None` when they do not fit together or the
    /// config (more rows than the capacity, a label or position out of range).
    pub(crate) fn from_parts(
        dim: usize,
        config: ReplayConfig,
        features: Vec<f32>,
        labels: Vec<u32>,
        [next, rng, owed]: [u64; 3],
        classes: usize,
    ) -> Option<ReplayBuffer> {
        let owed = f64::from_bits(owed);
        let fits = features.len() == labels.len() * dim
            && labels.len() <= config.capacity
            && (next as usize) < config.capacity.max(1)
            && labels.iter().all(|&l| (l as usize) < classes)
            && owed.is_finite()
            && owed >= 0.0;
        fits.then_some(ReplayBuffer { dim, config, features, labels, next: next as usize, owed, rng: SplitMix64(rng) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(capacity: usize, ratio: f32) -> ReplayConfig {
        ReplayConfig { capacity, ratio }
    }

    #[test]
    fn keeps_the_newest_examples_and_owes_ratio_replays_each() {
        let mut buffer = ReplayBuffer::new(2, config(3, 1.5));
        for i in 0..5 {
            buffer.remember(&[i as f32, -(i as f32)], i);
        }
        let mut held: Vec<usize> = (0..buffer.len()).map(|row| buffer.example(row).1).collect();
        held.sort();
        assert_eq!(held, [2, 3, 4]);
        for row in 0..3 {
            let (x, label) = buffer.example(row);
            assert_eq!(x, [label as f32, -(label as f32)]);
        }
        // 5 x 1.5 = 7.5, but never more than capacity x ratio = 4.5 owed: four now, the half
        // carried over.
        assert_eq!(buffer.draw().len(), 4);
        buffer.remember(&[9.0, 9.0], 9);
        assert_eq!(buffer.draw().len(), 2);
        assert!(buffer.draw().is_empty());
        (0..100).for_each(|i| buffer.remember(&[0.0, 0.0], i));
        assert_eq!(buffer.draw().len(), 4);
    }

    #[test]
    fn draws_cover_the_buffer_and_depend_only_on_the_examples() {
        let fill = || {
            let mut buffer = ReplayBuffer::new(1, config(10, 20.0));
            (0..10).for_each(|i| buffer.remember(&[i as f32], i));
            buffer
        };
        let (mut a, mut b) = (fill(), fill());
        let rows = a.draw();
        assert_eq!(rows, b.draw());
        let mut seen = rows.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, (0..10).collect::<Vec<_>>(), "200 draws of 10 rows miss none");
    }

    #[test]
    fn off_keeps_nothing_and_owes_nothing() {
        for off in [config(0, 2.0), config(10, 0.0)] {
            let mut buffer = ReplayBuffer::new(1, off);
            buffer.remember(&[1.0], 0);
            assert_eq!(buffer.len(), 0);
            assert!(buffer.draw().is_empty());
        }
    }

    #[test]
    fn parts_round_trip_and_misfits_are_refused() {
        let mut buffer = ReplayBuffer::new(2, config(3, 0.5));
        (0..4).for_each(|i| buffer.remember(&[i as f32, 1.0], i % 2));
        let (features, labels, state) = buffer.parts();
        let restored = ReplayBuffer::from_parts(2, config(3, 0.5), features.to_vec(), labels.to_vec(), state, 2);
        assert_eq!(restored.as_ref(), Some(&buffer));
        let rebuild = |features: &[f32], labels: &[u32], classes| {
            ReplayBuffer::from_parts(2, config(3, 0.5), features.to_vec(), labels.to_vec(), state, classes)
        };
        assert!(rebuild(&features[2..], labels, 2).is_none(), "a row short");
        assert!(rebuild(features, labels, 1).is_none(), "label 1 of one class");
        let four: Vec<f32> = features.iter().chain(&features[..2]).copied().collect();
        assert!(rebuild(&four, &[0, 1, 0, 1], 2).is_none(), "more rows than the capacity");
    }
}
