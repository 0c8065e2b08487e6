//! Throughput of the online softmax regression: updates per second on one thread for each
//! optimizer, with and without feature standardisation, at the size of a typical CNN's pooled
//! features (1280, EfficientNet-Lite0 / MobileNetV2) and 10 classes.
//!
//! Run with `cargo bench --bench learner`; prints a markdown table. `cargo bench --bench learner
//! -- NAME` measures only the optimizers whose name contains NAME.

use dlpipe::learn::{
    AdagradConfig, FtrlConfig, LearnerConfig, OptimizerConfig, SgdConfig, SimdPath, SoftmaxRegression,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const DIM: usize = 1280;
const CLASSES: usize = 10;
/// Distinct examples, cycled: 20 MiB of features, more than the caches hold, as a stream is.
const EXAMPLES: usize = 4096;
const _: () = assert!(EXAMPLES % 512 == 0, "batches of 512 cycle through the examples");
const WARM_UP: Duration = Duration::from_millis(300);
const MEASURE: Duration = Duration::from_secs(2);
/// The measurement is split into this many slices.
const SLICES: usize = 20;

/// SplitMix64, so that every run learns the same examples.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Non-negative features of varied scale with a class-dependent shift, roughly like pooled
/// ReLU activations, so the model's probabilities stay away from saturation as on real data.
fn examples() -> (Vec<f32>, Vec<usize>) {
    let mut rng = Rng(42);
    let scales: Vec<f32> = (0..DIM).map(|_| 0.1 + 3.0 * rng.uniform()).collect();
    let labels: Vec<usize> = (0..EXAMPLES).map(|_| (rng.next_u64() % CLASSES as u64) as usize).collect();
    let mut features = Vec::with_capacity(EXAMPLES * DIM);
    for &label in &labels {
        for (i, scale) in scales.iter().enumerate() {
            let shift = if i % CLASSES == label { 0.5 } else { 0.0 };
            features.push(scale * (rng.uniform() + shift));
        }
    }
    (features, labels)
}

/// Updates per second of `model` learning the examples in a loop: the median and the best of
/// the [`SLICES`] slices of [`MEASURE`]. On a quiet machine they agree; on a shared one the best
/// slice is the code's speed and the median what the machine gave it.
fn updates_per_second(model: &mut SoftmaxRegression, features: &[f32], labels: &[usize]) -> (f64, f64) {
    const BATCH: usize = 512;
    let mut next = 0;
    let mut run = |duration: Duration| {
        let start = Instant::now();
        let mut updates = 0u64;
        loop {
            // Check the clock once per batch, so its cost does not count.
            let batch = &features[next * DIM..(next + BATCH) * DIM];
            for (x, &label) in batch.chunks_exact(DIM).zip(&labels[next..next + BATCH]) {
                black_box(model.update(black_box(x), label).expect("valid example"));
            }
            next = (next + BATCH) % EXAMPLES;
            updates += BATCH as u64;
            let elapsed = start.elapsed();
            if elapsed >= duration {
                return updates as f64 / elapsed.as_secs_f64();
            }
        }
    };
    run(WARM_UP);
    let mut rates: Vec<f64> = (0..SLICES).map(|_| run(MEASURE / SLICES as u32)).collect();
    rates.sort_by(f64::total_cmp);
    (rates[SLICES / 2], rates[SLICES - 1])
}

fn main() {
    // cargo passes `--bench`; any other argument filters the optimizers by name.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_default();
    let (features, labels) = examples();
    let optimizers = [
        OptimizerConfig::Sgd(SgdConfig::default()),
        OptimizerConfig::Adagrad(AdagradConfig::default()),
        OptimizerConfig::Ftrl(FtrlConfig { l1: 0.1, ..FtrlConfig::default() }),
    ];
    let detected = SimdPath::detect();
    println!("SIMD path: {detected} (detected); D = {DIM} features, K = {CLASSES} classes, one thread\n");
    println!("| optimizer | standardize | kernels | updates/s (median) | ns/update (median) | updates/s (best) |");
    println!("|---|---|---|---:|---:|---:|");
    for optimizer in optimizers.into_iter().filter(|o| o.name().contains(&filter)) {
        for standardize in [true, false] {
            // SGD also with the baseline kernels, to show what the vector path buys.
            let portable_too = matches!(optimizer, OptimizerConfig::Sgd(_)) && detected != SimdPath::Portable;
            for portable in [false, true].into_iter().filter(|&p| !p || portable_too) {
                let config = LearnerConfig { optimizer: optimizer.clone(), standardize, ..LearnerConfig::default() };
                let mut model = SoftmaxRegression::new(DIM, config).expect("valid config");
                for class in 0..CLASSES {
                    model.class_index(&format!("class {class}")).expect("within max_classes");
                }
                model.set_portable_kernels(portable);
                let (median, best) = updates_per_second(&mut model, &features, &labels);
                println!(
                    "| {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                    optimizer.name(),
                    if standardize { "on" } else { "off" },
                    model.simd_path(),
                    median,
                    1e9 / median,
                    best
                );
            }
        }
    }
}
