//! `dlpipe bench --learning DIR`: how well one streamed pass learns. A labelled data set
//! (`DIR/train/<class>/`, `DIR/test/<class>/`) is streamed once through real Kafka and `dlpipe
//! run`'s online learner, several times with time epochs (whose boundaries, and so the order of
//! learning, depend on timing) and with offset epochs; each run's final classifier is scored
//! on held-out images. Prints one row per run and the spread.

use super::batch_features::{featurize_uris, load_featurizers, FeaturizeFlags};
use super::bench::bench_config;
use anyhow::Context;
use dlpipe::config::{Config, DeliveryGuarantee, HeadKind};
use dlpipe::kafka::{ensure_topic, Publisher, TopicSpec};
use dlpipe::pipeline::{run as run_pipeline, Checkpoint, RunOptions};
use dlpipe::transfer::dataset::{self, shuffle, Example, SplitMix64};
use dlpipe::transfer::{evaluate, Features};
use dlpipe_operators::EpochPolicy;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bounds issue 20 sets for one pass of 3,000 Fashion-MNIST images.
const MIN_ACCURACY: f64 = 0.85;
const MAX_LOG_LOSS: f64 = 0.60;
const MAX_ECE: f64 = 0.05;

/// Flags of the learning benchmark.
#[derive(clap::Args, Debug)]
pub struct LearningArgs {
    /// Also measure learning from one streamed pass over DIR/train (one sub-folder per class),
    /// scored on DIR/test: e.g. data/fashion-mnist, data/cifar10.
    #[arg(long, value_name = "DIR")]
    pub learning: Option<PathBuf>,
    /// Training images per class, streamed in a shuffled order.
    #[arg(long, default_value_t = 300)]
    pub learning_train_per_class: usize,
    /// Held-out images per class.
    #[arg(long, default_value_t = 100)]
    pub learning_test_per_class: usize,
    /// Runs with time epochs (pipeline.epochs' length, or 1 s); offset epochs of 64 records
    /// are run twice (they give the same classifier every time: the second run shows it).
    #[arg(long, default_value_t = 5)]
    pub learning_runs: usize,
    /// Timely workers of each run.
    #[arg(long, default_value_t = 2)]
    pub learning_workers: usize,
}

/// One run's scores.
struct Scores {
    accuracy: f64,
    log_loss: f64,
    ece: f64,
    prequential: f64,
    seconds: f64,
}

impl Scores {
    fn within_bounds(&self) -> bool {
        self.accuracy >= MIN_ACCURACY && self.log_loss <= MAX_LOG_LOSS && self.ece <= MAX_ECE
    }
}

/// The first `per_class` images of each class of `dir`, in path order.
fn take_per_class(dir: &Path, per_class: usize) -> anyhow::Result<Vec<Example>> {
    let mut examples = dataset::load(dir).with_context(|| format!("{} (run make setup)", dir.display()))?;
    examples.sort_by(|a, b| (&a.label, &a.uri).cmp(&(&b.label, &b.uri)));
    let mut taken: BTreeMap<String, usize> = BTreeMap::new();
    examples.retain(|e| {
        let n = taken.entry(e.label.clone()).or_default();
        *n += 1;
        *n <= per_class
    });
    Ok(examples)
}

pub fn learning_table(config: &Config, args: &LearningArgs, dir: &Path) -> anyhow::Result<()> {
    let mut train = take_per_class(&dir.join("train"), args.learning_train_per_class)?;
    shuffle(&mut train, &mut SplitMix64(7));
    let test = take_per_class(&dir.join("test"), args.learning_test_per_class)?;
    let flags = FeaturizeFlags { devices: Vec::new(), batch_size: None, feature_cache: None, no_cache: false };
    let featurizers = load_featurizers(config, &config.model.name, &flags)?;
    let test_uris: Vec<String> = test.iter().map(|e| e.uri.clone()).collect();
    let test_features = featurize_uris(config, featurizers, &test_uris, &flags)?;

    let time = match config.pipeline.epochs {
        EpochPolicy::Time { millis } => millis,
        EpochPolicy::Offsets { .. } => 1000,
    };
    let policies = [EpochPolicy::Time { millis: time }, EpochPolicy::Offsets { records: 64 }];
    let classes = train.iter().map(|e| &e.label).collect::<std::collections::BTreeSet<_>>().len();
    println!(
        "\n## learning from one streamed pass ({}: {} images of {classes} classes through Kafka, {} workers; scored \
         on {} held-out)\n",
        dir.display(),
        train.len(),
        args.learning_workers,
        test.len()
    );
    println!("| epochs | run | held-out accuracy | log-loss | ECE | prequential accuracy | seconds |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for policy in policies {
        let name = match policy {
            EpochPolicy::Time { millis } => format!("time, {millis} ms"),
            EpochPolicy::Offsets { records } => format!("offsets, {records}"),
        };
        let mut runs = Vec::new();
        let times = match policy {
            EpochPolicy::Time { .. } => args.learning_runs,
            EpochPolicy::Offsets { .. } => args.learning_runs.min(2),
        };
        for run in 1..=times {
            let s = learning_run(config, args, policy, &train, &test, &test_features)?;
            println!(
                "| {name} | {run} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} |",
                s.accuracy, s.log_loss, s.ece, s.prequential, s.seconds
            );
            runs.push(s);
        }
        let range = |f: fn(&Scores) -> f64| {
            let (lo, hi) = runs.iter().map(f).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
            format!("{lo:.3}-{hi:.3}")
        };
        println!(
            "| **{name}** | **min-max** | **{}** | **{}** | **{}** | **{}** | |",
            range(|s| s.accuracy),
            range(|s| s.log_loss),
            range(|s| s.ece),
            range(|s| s.prequential)
        );
        all.extend(runs);
    }
    let within = all.iter().filter(|s| s.within_bounds()).count();
    println!(
        "\n{within} of {} runs within accuracy >= {MIN_ACCURACY}, log-loss <= {MAX_LOG_LOSS}, ECE <= {MAX_ECE} \
         (the bounds set for 3,000 Fashion-MNIST images).",
        all.len()
    );
    Ok(())
}

/// Streams `train` once through a pipeline of its own topics with `epochs`, and scores the
/// final classifier on `test`.
fn learning_run(
    config: &Config,
    args: &LearningArgs,
    epochs: EpochPolicy,
    train: &[Example],
    test: &[Example],
    test_features: &Features,
) -> anyhow::Result<Scores> {
    let mut config = bench_config(config, DeliveryGuarantee::AtLeastOnce, "learning")?;
    let p = &mut config.pipeline;
    let snapshots = std::env::temp_dir().join(&p.group_id);
    p.head = HeadKind::OnlineLr;
    p.stop_at_end = true;
    p.epochs = epochs;
    p.feedback_topic = String::new();
    p.features_topic = String::new();
    p.model_topic = format!("{}-models", p.group_id);
    p.snapshot_dir = snapshots.clone();
    let properties = p.topic_properties();
    let shared: Vec<(&str, &str)> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spec =
        TopicSpec { partitions: p.topic_partitions, replication_factor: p.topic_replication_factor, configs: &shared };
    ensure_topic(&config.kafka, &p.input_topic, spec)?;
    let publisher = Publisher::new(&config.kafka)?;
    for (i, e) in train.iter().enumerate() {
        let id = format!("l{i}");
        let record = serde_json::json!({"id": id, "uri": e.uri, "label": e.label});
        publisher.send(&p.input_topic, &id, &record.to_string())?;
    }
    publisher.finish(Duration::from_secs(60))?;

    let started = Instant::now();
    let timely = dlpipe::pipeline::one_process(args.learning_workers);
    let stop = Arc::new(AtomicBool::new(false));
    run_pipeline(RunOptions { config, timely, metrics_port_offset: 0, init_model: None, fresh: true, stop })?;
    let seconds = started.elapsed().as_secs_f64();

    let latest = snapshots.join("latest.safetensors");
    let bytes = std::fs::read(&latest).with_context(|| format!("the run's final checkpoint {}", latest.display()))?;
    std::fs::remove_dir_all(&snapshots).with_context(|| format!("removing {}", snapshots.display()))?;
    let checkpoint = Checkpoint::decode(&bytes)?;
    let model = &checkpoint.model;
    if let Some(e) = test.iter().find(|e| model.find_class(&e.label).is_none()) {
        anyhow::bail!("held-out class {:?} never came in the stream (its classes: {:?})", e.label, model.classes());
    }
    let (x, labels) =
        test_features.select(0..test.len(), |i| model.find_class(&test[i].label).expect("every class checked above"));
    let evaluation = evaluate::evaluate(model, &x, &labels)?;
    Ok(Scores {
        accuracy: evaluation.accuracy,
        log_loss: evaluation.log_loss,
        ece: evaluation.calibration.ece,
        prequential: checkpoint.prequential(0).accuracy().unwrap_or(0.0),
        seconds,
    })
}
