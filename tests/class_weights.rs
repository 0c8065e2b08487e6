//! Class weights on an imbalanced stream of real CNN features: Fashion-MNIST images featurized
//! by the exported EfficientNet-Lite0 (from the feature cache in .cache/features, which the
//! first run fills), learned in stream epochs through the online head the pipeline runs,
//! evaluated on a balanced held-out set.

mod common;

use dlpipe::learn::{ClassWeights, LearnerConfig, Prequential, SoftmaxRegression};
use dlpipe::pipeline::{Checkpoint, CheckpointInfo, OnlineLrHead};
use dlpipe::transfer::dataset::{shuffle, SplitMix64};
use dlpipe::transfer::evaluate::{evaluate, Evaluation};
use dlpipe_operators::{Head, LabelledExample, Learner};
use std::path::PathBuf;
use std::time::Instant;

/// Ten times as many images of these classes in the stream as of the others. Each minority
/// class has a look-alike among them (coat/pullover, shirt/tshirt_top, sneaker and
/// ankle_boot/sandal), which an unweighted learner favours.
const MAJORITY: [&str; 5] = ["dress", "pullover", "sandal", "trouser", "tshirt_top"];
const MINORITY: [&str; 5] = ["ankle_boot", "bag", "coat", "shirt", "sneaker"];
const PER_MAJORITY_CLASS: usize = 300;
const PER_MINORITY_CLASS: usize = 30;
const TEST_PER_CLASS: usize = 100;
/// Records per stream epoch.
const EPOCH_RECORDS: usize = 50;

/// The first `n` images of `class` in `data/fashion-mnist/<side>`, as (path, class).
fn images(side: &str, class: &str, n: usize) -> Vec<(String, String)> {
    let dir = common::root().join("data/fashion-mnist").join(side).join(class);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().take(n).map(|f| (f.display().to_string(), class.to_string())).collect()
}

/// The features of `images`, in order, from the cache (or the model, for images it lacks).
fn features(images: &[(String, String)]) -> Vec<Vec<f32>> {
    let uris: Vec<String> = images.iter().map(|(uri, _)| uri.clone()).collect();
    let (_, features) = common::cached_features(&uris);
    println!("{} images: {} from the cache, {} computed", uris.len(), features.cached, features.computed);
    (0..uris.len()).map(|i| features.get(i).expect("every Fashion-MNIST image featurizes").to_vec()).collect()
}

/// The stream learner with `class_weights` after one pass over `stream` in epochs of
/// `EPOCH_RECORDS` records, evaluated on `test`.
fn learn_and_evaluate(
    class_weights: ClassWeights,
    stream: &[LabelledExample],
    test: &[(Vec<f32>, String)],
) -> (Evaluation, SoftmaxRegression) {
    let config = LearnerConfig { class_weights, ..LearnerConfig::default() };
    let model = SoftmaxRegression::new(stream[0].features.len(), config).unwrap();
    let mut head = OnlineLrHead::new(model, Prequential::new(0), 0);
    for (epoch, examples) in stream.chunks(EPOCH_RECORDS).enumerate() {
        head.learn(epoch as u64, examples);
    }
    assert_eq!(head.refused, 0);
    let model = head.model;
    let x: Vec<f32> = test.iter().flat_map(|(x, _)| x.iter().copied()).collect();
    let labels: Vec<usize> = test.iter().map(|(_, class)| model.find_class(class).expect("a learned class")).collect();
    (evaluate(&model, &x, &labels).unwrap(), model)
}

fn recall(evaluation: &Evaluation, class: &str) -> f64 {
    evaluation.classes.iter().find(|c| c.class == class).expect("a class of the evaluation").recall
}

/// The imbalanced stream, shuffled with a fixed seed, its offsets in stream order; and the
/// balanced held-out set as (features, class).
fn stream_and_test() -> (Vec<LabelledExample>, Vec<(Vec<f32>, String)>) {
    let mut train = Vec::new();
    for class in MAJORITY {
        train.extend(images("train", class, PER_MAJORITY_CLASS));
    }
    for class in MINORITY {
        train.extend(images("train", class, PER_MINORITY_CLASS));
    }
    let test: Vec<(String, String)> =
        MAJORITY.iter().chain(&MINORITY).flat_map(|class| images("test", class, TEST_PER_CLASS)).collect();
    let mut all = train.clone();
    all.extend(test.iter().cloned());
    let mut features = features(&all);
    let test_features = features.split_off(train.len());

    let mut stream: Vec<LabelledExample> = train
        .into_iter()
        .zip(features)
        .map(|((_, label), features)| LabelledExample { partition: 0, offset: 0, label, features })
        .collect();
    shuffle(&mut stream, &mut SplitMix64(20));
    for (offset, example) in stream.iter_mut().enumerate() {
        example.offset = offset as i64;
    }
    let test = test_features.into_iter().zip(test.into_iter().map(|(_, c)| c)).collect();
    (stream, test)
}

#[test]
fn balanced_class_weights_raise_macro_f1_on_an_imbalanced_fashion_mnist_stream() {
    let started = Instant::now();
    let (stream, test) = stream_and_test();
    let (none, unweighted) = learn_and_evaluate(ClassWeights::None, &stream, &test);
    let (balanced, weighted) = learn_and_evaluate(ClassWeights::Balanced, &stream, &test);
    println!(
        "stream of {} records ({PER_MAJORITY_CLASS} per majority class, {PER_MINORITY_CLASS} per minority class), \
         one pass in epochs of {EPOCH_RECORDS}; held out: {TEST_PER_CLASS} per class",
        stream.len()
    );
    println!("class weights  macro-F1  accuracy  minority recall ({})", MINORITY.join(", "));
    for (name, e) in [("none", &none), ("balanced", &balanced)] {
        let recalls: Vec<String> = MINORITY.iter().map(|c| format!("{:.2}", recall(e, c))).collect();
        println!("{name:<13}  {:.4}    {:.4}    {}", e.macro_f1, e.accuracy, recalls.join(" "));
    }
    println!("{:.1} s", started.elapsed().as_secs_f64());

    // Both learned every example, counted alike; only the weights differ.
    let total = stream.len() as u64;
    assert_eq!(unweighted.class_counts().iter().sum::<u64>(), total);
    assert_eq!(weighted.class_counts(), unweighted.class_counts());
    let shirt = weighted.find_class("shirt").unwrap();
    assert_eq!(weighted.class_counts()[shirt], PER_MINORITY_CLASS as u64);

    assert!(
        balanced.macro_f1 > none.macro_f1,
        "balanced macro-F1 {:.4} is not above none's {:.4}",
        balanced.macro_f1,
        none.macro_f1
    );
    let mean_minority_recall = |e: &Evaluation| MINORITY.iter().map(|c| recall(e, c)).sum::<f64>() / 5.0;
    assert!(mean_minority_recall(&balanced) > mean_minority_recall(&none));
}

/// The running class counts travel in the stream's checkpoint: a learner restarted from a
/// checkpoint taken halfway (encoded and decoded as the model topic does) ends with the
/// uninterrupted learner's bits.
#[test]
fn a_restart_from_a_checkpoint_continues_balanced_learning_bit_for_bit() {
    let (stream, test) = stream_and_test();
    let epochs: Vec<&[LabelledExample]> = stream.chunks(EPOCH_RECORDS).collect();
    let halfway = epochs.len() / 2;
    let new_head = |model| OnlineLrHead::new(model, Prequential::new(0), 1);
    let config = LearnerConfig { class_weights: ClassWeights::Balanced, ..LearnerConfig::default() };
    let mut uninterrupted = new_head(SoftmaxRegression::new(1280, config).unwrap());
    let mut checkpoint = None;
    for (epoch, examples) in epochs.iter().enumerate() {
        uninterrupted.learn(epoch as u64, examples);
        if epoch + 1 == halfway {
            checkpoint = uninterrupted.learned_through(halfway as u64);
        }
    }
    let state = checkpoint.expect("a checkpoint every epoch");
    let info = CheckpointInfo::new(&state, "g", "images", halfway as u64, Default::default(), Default::default());
    let bytes = dlpipe::pipeline::model_topic::encode(&state, &info, &Default::default()).unwrap();
    let restored = Checkpoint::decode(&bytes).unwrap();
    assert_eq!(restored.model.class_counts(), state.model.class_counts());
    assert!(restored.model.class_counts().iter().all(|&c| c > 0), "every class seen by the halfway point");
    let mut restarted = new_head(restored.model);
    for (epoch, examples) in epochs.iter().enumerate().skip(halfway) {
        restarted.learn(epoch as u64, examples);
    }
    let (a, b) = (&uninterrupted.model, &restarted.model);
    assert_eq!(a.class_counts(), b.class_counts());
    assert_eq!(a.updates(), b.updates());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&a.weights()) == bits(&b.weights()) && bits(a.bias()) == bits(b.bias()), "the weights differ");
    for (x, _) in test.iter().take(50) {
        assert_eq!(bits(&a.predict_proba(x).unwrap()), bits(&b.predict_proba(x).unwrap()));
    }
}
