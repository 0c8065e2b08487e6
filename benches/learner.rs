//! Throughput of the online softmax regression: examples learned per second on one thread for
//! each optimizer, with and without feature standardisation, at the size of a typical CNN's
//! pooled features (1280, EfficientNet-Lite0 / MobileNetV2) and 10 classes. Without replay an
//! example is one update; with the stream's default replay (3 per example, drawn at each batch's
//! end as the stream does at each epoch's end) it is one update and three replays.
//!
//! Run with `cargo bench --bench learner`; prints a markdown table. `cargo bench --bench learner
//! -- NAME` measures only the optimizers whose name contains NAME.

use dlpipe::learn::{
    AdagradConfig, FtrlConfig, LearnerConfig, OptimizerConfig, ReplayConfig, SgdConfig, SimdPath, SoftmaxRegression,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const DIM: usize = 1280;
const CLASSES: usize = 10;
/// Distinct examples, cycled: 20 MiB of features, more than the caches hold, so every example
/// comes from memory as a stream's would.
const EXAMPLES: usize = 4096;
/// For SGD also a set that stays in cache (320 KiB), as a batch fresh from the CNN would: the
/// difference is the cost of fetching features from memory.
const EXAMPLES_IN_CACHE: usize = 64;
/// Examples between two looks at the clock.
const BATCH: usize = 64;
const _: () = assert!(
    EXAMPLES.is_multiple_of(BATCH) && EXAMPLES_IN_CACHE.is_multiple_of(BATCH),
    "batches cycle through the examples"
);
const WARM_UP: Duration = Duration::from_millis(300);
const MEASURE: Duration = Duration::from_secs(2);
/// The wall-clock measurement is split into this many slices, and reports their median.
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

/// Nanoseconds this thread has spent on a CPU (Linux's `/proc/thread-self/schedstat`), to
/// measure throughput undisturbed by other processes taking turns on the core.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// Throughput of a model learning examples in a loop for [`MEASURE`].
struct Throughput {
    /// Updates per wall-clock second, the median of [`SLICES`] slices.
    wall: f64,
    /// Updates per second on the CPU, where the OS reports it.
    cpu: Option<f64>,
}

/// Runs `model` over the first `examples` of `features` and `labels`, cycling.
fn measure(model: &mut SoftmaxRegression, features: &[f32], labels: &[usize], examples: usize) -> Throughput {
    let mut next = 0;
    let mut run = |duration: Duration| {
        let start = Instant::now();
        let mut learned = 0u64;
        loop {
            // Check the clock once per batch, so its cost does not count.
            let batch = &features[next * DIM..(next + BATCH) * DIM];
            for (x, &label) in batch.chunks_exact(DIM).zip(&labels[next..next + BATCH]) {
                black_box(model.update(black_box(x), label).expect("valid example"));
            }
            black_box(model.replay().expect("replays of valid examples"));
            next = (next + BATCH) % examples;
            learned += BATCH as u64;
            let elapsed = start.elapsed();
            if elapsed >= duration {
                return (learned, elapsed);
            }
        }
    };
    run(WARM_UP);
    let cpu_start = thread_cpu_ns();
    let slices: Vec<(u64, Duration)> = (0..SLICES).map(|_| run(MEASURE / SLICES as u32)).collect();
    let cpu_ns = thread_cpu_ns().zip(cpu_start).map(|(end, start)| end - start);
    let mut rates: Vec<f64> = slices.iter().map(|(n, t)| *n as f64 / t.as_secs_f64()).collect();
    rates.sort_by(f64::total_cmp);
    let learned: u64 = slices.iter().map(|(n, _)| n).sum();
    Throughput { wall: rates[SLICES / 2], cpu: cpu_ns.map(|ns| learned as f64 / (ns as f64 * 1e-9)) }
}

/// One row of the table.
struct Case {
    optimizer: OptimizerConfig,
    standardize: bool,
    portable: bool,
    examples: usize,
    replay: bool,
}

fn main() {
    // cargo passes `--bench`; any other argument filters the optimizers by name.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_default();
    let (features, labels) = examples();
    let detected = SimdPath::detect();
    let optimizers = [
        OptimizerConfig::Sgd(SgdConfig::default()),
        OptimizerConfig::Adagrad(AdagradConfig::default()),
        OptimizerConfig::Ftrl(FtrlConfig { l1: 0.1, ..FtrlConfig::default() }),
    ];
    let mut cases = Vec::new();
    for optimizer in optimizers.into_iter().filter(|o| o.name().contains(&filter)) {
        let sgd = matches!(optimizer, OptimizerConfig::Sgd(_));
        for standardize in [true, false] {
            let case = |portable, examples| Case {
                optimizer: optimizer.clone(),
                standardize,
                portable,
                examples,
                replay: false,
            };
            cases.push(case(false, EXAMPLES));
            if standardize {
                cases.push(Case { replay: true, ..case(false, EXAMPLES) });
            }
            if sgd {
                cases.push(case(false, EXAMPLES_IN_CACHE));
                // The baseline kernels too, to show what the vector path buys.
                if detected != SimdPath::Portable {
                    cases.push(case(true, EXAMPLES));
                }
            }
        }
    }

    println!("SIMD path: {detected} (detected); D = {DIM} features, K = {CLASSES} classes, one thread");
    println!(
        "examples/s (wall): median of {SLICES} slices of {:?}; (on CPU): over the time the thread ran\n",
        MEASURE / SLICES as u32
    );
    println!(
        "| optimizer | standardize | replay | kernels | examples | examples/s (wall) | examples/s (on CPU) | ns/example \
         (on CPU) |"
    );
    println!("|---|---|---|---|---|---:|---:|---:|");
    for case in cases {
        let config = LearnerConfig {
            optimizer: case.optimizer.clone(),
            standardize: case.standardize,
            replay: if case.replay { ReplayConfig::default() } else { ReplayConfig::OFF },
            ..LearnerConfig::default()
        };
        let mut model = SoftmaxRegression::new(DIM, config).expect("valid config");
        for class in 0..CLASSES {
            model.class_index(&format!("class {class}")).expect("within max_classes");
        }
        model.set_portable_kernels(case.portable);
        let t = measure(&mut model, &features, &labels, case.examples);
        let cpu = |f: fn(f64) -> f64| t.cpu.map_or("n/a".to_string(), |r| format!("{:.0}", f(r)));
        let examples = if case.examples == EXAMPLES { "4096, from memory" } else { "64, in cache" };
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} |",
            case.optimizer.name(),
            if case.standardize { "on" } else { "off" },
            if case.replay { "3 per example" } else { "off" },
            model.simd_path(),
            examples,
            t.wall,
            cpu(|r| r),
            cpu(|r| 1e9 / r),
        );
    }
}
