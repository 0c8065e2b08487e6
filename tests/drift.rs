//! Drift detection on real CNN features: EfficientNet-Lite0 features of 3,000 Fashion-MNIST
//! training images (300 a class; from the feature cache, as `dlpipe featurize` and `train` get
//! them), shuffled with a fixed seed and streamed through the online head's `learn` in epochs,
//! as `dlpipe run` streams them. From record 2,000 on the labels change: in the tests every
//! label becomes the next one in alphabetical order (an ankle boot is now labelled a bag, a bag
//! a coat, and so on).

mod common;

use dlpipe::config::Config;
use dlpipe::learn::{DriftAction, DriftConfig};
use dlpipe::model::Manifest;
use dlpipe::pipeline::model_topic;
use dlpipe::pipeline::{online_lr_head, Checkpoint, CheckpointInfo, OnlineLrHead};
use dlpipe::transfer::classifier::featurizer_metadata;
use dlpipe::transfer::dataset::{shuffle, SplitMix64};
use dlpipe_operators::{Head, LabelledExample, Learner};
use std::collections::BTreeMap;
use std::sync::OnceLock;

const RECORDS: usize = 3000;
const DRIFT_AT: usize = 2000;
/// The tests' shuffle.
const SEED: u64 = 20;
/// Records per epoch: the learner learns an epoch's examples in one `learn` call.
const EPOCH: usize = 25;
/// Shorter epochs, so that a checkpoint can fall between the drift and its detection.
const SHORT_EPOCH: usize = 5;

/// An image's features and class.
type Image = (Vec<f32>, &'static str);

/// The model's manifest, and the features and class of 300 training images of each class.
fn images() -> &'static (Manifest, Vec<Image>) {
    static IMAGES: OnceLock<(Manifest, Vec<Image>)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let images = common::fashion(RECORDS, 0);
        let uris: Vec<String> = images.iter().map(|(path, _)| path.display().to_string()).collect();
        let started = std::time::Instant::now();
        let (manifest, features) = common::cached_features(&uris);
        eprintln!(
            "features of {RECORDS} images in {:.1} s ({} from the cache, {} computed)",
            started.elapsed().as_secs_f64(),
            features.cached,
            features.computed
        );
        let labelled = images
            .iter()
            .enumerate()
            .map(|(i, (_, class))| (features.get(i).expect("every image has features").to_vec(), *class))
            .collect();
        (manifest, labelled)
    })
}

/// How the labels change at record `DRIFT_AT`.
#[derive(Clone, Copy, Debug)]
enum Change {
    Nothing,
    /// Each label becomes the next in alphabetical order: every class is relabelled.
    AllLabels,
    /// Shirts and T-shirts swap labels, and bags and sneakers: 40% of the records.
    TwoPairs,
    /// Bags and sneakers swap labels: 20% of the records.
    OnePair,
}

impl Change {
    fn relabel(self, label: &'static str) -> &'static str {
        let swap = |pairs: &[(&'static str, &'static str)]| {
            pairs.iter().find_map(|&(a, b)| (label == a).then_some(b).or((label == b).then_some(a))).unwrap_or(label)
        };
        match self {
            Change::Nothing => label,
            Change::AllLabels => {
                let mut classes = common::FASHION_CLASSES;
                classes.sort();
                classes[(classes.iter().position(|c| *c == label).unwrap() + 1) % classes.len()]
            }
            Change::TwoPairs => swap(&[("shirt", "tshirt_top"), ("bag", "sneaker")]),
            Change::OnePair => swap(&[("bag", "sneaker")]),
        }
    }
}

/// The 3,000 images shuffled with `seed`, labelled as `change` says from record `DRIFT_AT` on.
fn stream(seed: u64, change: Change) -> Vec<LabelledExample> {
    let mut order: Vec<&Image> = images().1.iter().collect();
    shuffle(&mut order, &mut SplitMix64(seed));
    let label = |i: usize, class: &'static str| if i < DRIFT_AT { class } else { change.relabel(class) };
    let example = |(i, (features, class)): (usize, &&Image)| LabelledExample {
        partition: 0,
        offset: i as i64,
        label: label(i, class).to_owned(),
        features: features.clone(),
    };
    order.iter().enumerate().map(example).collect()
}

/// A new online head as `dlpipe run` makes it, with the drift section `drift`.
fn head(drift: &DriftConfig, checkpoint_every: u64) -> OnlineLrHead {
    let config = Config { drift: drift.clone(), ..Config::default() };
    let counters = dlpipe::metrics::Metrics::new().for_worker(0, "images").learner;
    online_lr_head(&config, &images().0, None, None, checkpoint_every, counters).unwrap()
}

/// What a head did over part of the stream.
#[derive(Debug, PartialEq)]
struct Learned {
    /// The records (0-based stream positions) at which drift was detected: the last one of
    /// each epoch with any.
    detections: Vec<usize>,
    /// Detections in all, and before record `DRIFT_AT`.
    total: u64,
    before_change: u64,
    /// Prequential accuracy over the records from `DRIFT_AT` on that it learned.
    accuracy_after_drift: f64,
}

/// Learns `examples` (records `first..`) in epochs of `epoch` records, noting the detections.
fn learn_in(head: &mut OnlineLrHead, examples: &[LabelledExample], first: usize, epoch: usize) -> Learned {
    // The detector counts every loss it has seen, before a checkpoint too, from 1; every
    // record here is learned, so observation n is record `origin + n - 1`.
    let origin = first - head.drift.as_ref().map_or(0, |d| d.observations() as usize);
    let detections_so_far = |head: &OnlineLrHead| head.drift.as_ref().map_or(0, |d| d.detections());
    let at_start = detections_so_far(head);
    let (mut detections, mut before_change) = (Vec::new(), 0);
    let (mut correct_after, mut seen_after) = (0, 0);
    for (e, records) in examples.chunks(epoch).enumerate() {
        let start = first + e * epoch;
        if start == DRIFT_AT {
            before_change = detections_so_far(head) - at_start;
        }
        let (before, correct) = (detections_so_far(head), head.metrics.correct());
        head.learn(e as u64, records);
        if detections_so_far(head) > before {
            let observation = head.drift.as_ref().unwrap().last_detection().unwrap() as usize;
            detections.push(origin + observation - 1);
        }
        if start >= DRIFT_AT {
            correct_after += head.metrics.correct() - correct;
            seen_after += records.len();
        }
    }
    let total = detections_so_far(head) - at_start;
    let accuracy_after_drift = correct_after as f64 / seen_after.max(1) as f64;
    Learned { detections, total, before_change, accuracy_after_drift }
}

/// Learns `examples` (records `first..`) in epochs of `EPOCH` records.
fn learn(head: &mut OnlineLrHead, examples: &[LabelledExample], first: usize) -> Learned {
    learn_in(head, examples, first, EPOCH)
}

#[test]
fn a_label_permutation_is_detected_and_the_default_action_learns_the_new_labels() {
    let started = std::time::Instant::now();
    let examples = stream(SEED, Change::AllLabels);
    let default = DriftConfig::default();
    let mut drifting = head(&default, 0);
    let with_default = learn(&mut drifting, &examples, 0);
    let off = DriftConfig { enabled: false, ..DriftConfig::default() };
    let fresh = learn(&mut head(&off, 0), &examples[DRIFT_AT..], DRIFT_AT);
    let none = learn(&mut head(&DriftConfig { action: DriftAction::None, ..default.clone() }, 0), &examples, 0);
    eprintln!(
        "default action {:?}: drift detected at records {:?}; prequential accuracy over records {DRIFT_AT}..{RECORDS} \
         {:.3}, a fresh model's trained on them only {:.3}, with action none {:.3} (in {:.1} s)",
        default.action,
        with_default.detections,
        with_default.accuracy_after_drift,
        fresh.accuracy_after_drift,
        none.accuracy_after_drift,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(with_default.total, with_default.detections.len() as u64, "no epoch with two detections");
    let first = *with_default.detections.first().expect("the drift is detected");
    assert!((DRIFT_AT..DRIFT_AT + 300).contains(&first), "detected at record {first}, not within 300 of {DRIFT_AT}");
    assert_eq!(none.detections.first(), Some(&first), "the action does not change when the drift is found");
    let gap = with_default.accuracy_after_drift - fresh.accuracy_after_drift;
    assert!(gap.abs() <= 0.05, "accuracy after the drift {gap:+.3} from a fresh model's");
    // Without an action the old weights hold the learner back (which is why there is one).
    assert!(none.accuracy_after_drift < fresh.accuracy_after_drift - 0.1, "{none:?} vs {fresh:?}");
    // The metrics count it; the statistic restarted there and is back below the threshold.
    let counters = drifting.counters.as_ref().unwrap();
    assert_eq!(counters.drifts.get(), with_default.detections.len() as u64);
    let statistic = counters.drift_statistic.get();
    assert!((0.0..1.0).contains(&statistic) && statistic == drifting.drift.as_ref().unwrap().statistic_ratio());
    // The same images without the change: no alarm.
    let stationary = learn(&mut head(&default, 0), &stream(SEED, Change::Nothing), 0);
    assert_eq!(stationary.detections, Vec::<usize>::new());
}

/// A checkpoint of the head (model, prequential metrics, detector), as the model topic
/// carries it, restored as `dlpipe run` restores it.
fn checkpoint_and_restore(head: &mut OnlineLrHead, frontier: u64, drift: &DriftConfig) -> OnlineLrHead {
    let state = head.learned_through(frontier).expect("a state every epoch");
    let config = Config { drift: drift.clone(), ..Config::default() };
    let (group, input) = (&config.pipeline.group_id, &config.pipeline.input_topic);
    let info = CheckpointInfo::new(&state, group, input, frontier, BTreeMap::new(), BTreeMap::new());
    let manifest = &images().0;
    let bytes = model_topic::encode(&state, &info, &featurizer_metadata(manifest)).unwrap();
    let restored = Checkpoint::decode(&bytes).unwrap();
    let counters = dlpipe::metrics::Metrics::new().for_worker(0, "images").learner;
    online_lr_head(&config, manifest, None, Some(&restored), 1, counters).unwrap()
}

#[test]
fn the_drift_detector_continues_from_a_checkpoint_as_if_never_stopped() {
    let examples = stream(SEED, Change::AllLabels);
    for action in [DriftAction::Reset, DriftAction::RestartStepSize, DriftAction::None] {
        let drift = DriftConfig { action, ..DriftConfig::default() };
        let mut uninterrupted = head(&drift, 1);
        let whole = learn_in(&mut uninterrupted, &examples, 0, SHORT_EPOCH);
        let detected = whole.detections[0];
        // Cut before the drift; after it began but before it was detected (the excess the
        // detector has accumulated must survive the restart for the same detection); and after.
        let cut_in_drift = (detected - 1) / SHORT_EPOCH * SHORT_EPOCH;
        assert!(cut_in_drift > DRIFT_AT, "detected at {detected}: no epoch boundary between the drift and it");
        for cut in [1500, cut_in_drift, 2500] {
            let mut first = head(&drift, 1);
            let mut detections = learn_in(&mut first, &examples[..cut], 0, SHORT_EPOCH).detections;
            let mut restored = checkpoint_and_restore(&mut first, (cut / SHORT_EPOCH) as u64, &drift);
            assert_eq!(restored.drift, first.drift, "the detector is restored exactly");
            detections.extend(learn_in(&mut restored, &examples[cut..], cut, SHORT_EPOCH).detections);
            assert_eq!(whole.total, whole.detections.len() as u64, "no epoch with two detections");
            assert_eq!(detections, whole.detections, "{action:?}, cut at record {cut}");
            assert_eq!(restored.drift, uninterrupted.drift, "{action:?}, cut at {cut}");
            assert_eq!(restored.model.weights(), uninterrupted.model.weights(), "{action:?}, cut at {cut}");
            assert_eq!(restored.model.bias(), uninterrupted.model.bias());
            assert_eq!(restored.model.schedule_start(), uninterrupted.model.schedule_start());
        }
        eprintln!("{action:?}: detections at records {:?} with and without a checkpoint", whole.detections);
    }
}

/// Values of the environment variable `name` (comma-separated), else `default`.
fn values<T>(name: &str, default: &[T]) -> Vec<T>
where
    T: Clone + std::str::FromStr,
    T::Err: std::fmt::Debug,
{
    match std::env::var(name) {
        Ok(list) => list.split(',').map(|v| v.trim().parse().unwrap()).collect(),
        Err(_) => default.to_vec(),
    }
}

/// The measurement behind `[drift]`'s defaults (configs/local.toml, README "Drift"): for each
/// change of labels, parameter setting and action, over 20 shuffles (`SEEDS`), the false alarms
/// (before the change, and in the same streams without it), how many records after the change
/// it was found, and the prequential accuracy over records 2,000..3,000 against a fresh
/// model's trained on them alone. `DELTAS`, `THRESHOLDS`, `MIN_EXAMPLES` and `MAX_LOSSES`
/// (comma-separated) choose the settings:
///
/// ```text
/// cargo test --release --test drift -- --ignored --nocapture
/// ```
#[test]
#[ignore = "a measurement (a minute or two), not a check: prints the table the defaults were chosen from"]
fn measure_drift_settings() {
    let seeds = 1..=values("SEEDS", &[20u64])[0];
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let off = DriftConfig { enabled: false, ..DriftConfig::default() };
    let stationary: Vec<Vec<LabelledExample>> = seeds.clone().map(|s| stream(s, Change::Nothing)).collect();
    for change in [Change::AllLabels, Change::TwoPairs, Change::OnePair] {
        let streams: Vec<Vec<LabelledExample>> = seeds.clone().map(|s| stream(s, change)).collect();
        let fresh: Vec<f64> =
            streams.iter().map(|s| learn(&mut head(&off, 0), &s[DRIFT_AT..], DRIFT_AT).accuracy_after_drift).collect();
        eprintln!("{change:?}: a fresh model's accuracy over records {DRIFT_AT}.. {fresh:.3?}");
        for delta in values("DELTAS", &[0.05, 0.1, 0.5]) {
            for threshold in values("THRESHOLDS", &[25.0, 50.0, 100.0]) {
                for min_examples in values("MIN_EXAMPLES", &[100]) {
                    for max_loss in values("MAX_LOSSES", &[10.0]) {
                        for action in [DriftAction::None, DriftAction::RestartStepSize, DriftAction::Reset] {
                            let drift = DriftConfig { delta, threshold, min_examples, max_loss, action, enabled: true };
                            let run = |s: &[LabelledExample]| learn(&mut head(&drift, 0), s, 0);
                            let runs: Vec<Learned> = streams.iter().map(|s| run(s)).collect();
                            let early: u64 = runs.iter().map(|r| r.before_change).sum();
                            let delays: Vec<Option<usize>> = runs
                                .iter()
                                .map(|r| r.detections.iter().find(|&&r| r >= DRIFT_AT).map(|r| r - DRIFT_AT))
                                .collect();
                            let alarms: u64 = stationary.iter().map(|s| run(s).total).sum();
                            let gaps: Vec<f64> =
                                runs.iter().zip(&fresh).map(|(r, f)| r.accuracy_after_drift - f).collect();
                            eprintln!(
                                "  delta {delta:<5} threshold {threshold:<5} min_examples {min_examples:<4} max_loss \
                                 {max_loss:<5} {action:<15?}: false alarms {early} before the change, {alarms} in the \
                                 stationary streams; found {delays:?} records after; accuracy after vs fresh {:+.3} \
                                 (worst {:+.3})",
                                mean(&gaps),
                                gaps.iter().copied().fold(f64::INFINITY, f64::min)
                            );
                        }
                    }
                }
            }
        }
    }
}
