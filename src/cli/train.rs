//! `dlpipe train`: transfer learning over a labelled dataset. Featurize (cached), split by
//! class, train the stream's learner for several shuffled epochs, evaluate on the held-out
//! split, save a classifier file the stream can start from.

use super::batch_features::{featurize_uris, load_featurizers, FeaturizeFlags};
use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::learn::{ClassWeights, LearnerConfig, OptimizerConfig, ReplayConfig};
use dlpipe::transfer::train::{train, EpochStats, Examples, Schedule};
use dlpipe::transfer::{classes_of, dataset, evaluate, plot, Classifier, TrainingRecord};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Labelled images: a folder with one sub-folder per class, or a .csv / .jsonl of uri,label.
    #[arg(long, value_name = "DIR|CSV|JSONL")]
    data: PathBuf,
    /// Where to write the classifier (safetensors).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
    /// Model to featurize with (models/NAME.json or a manifest path) [default: model.name].
    #[arg(long)]
    model: Option<String>,
    /// Share of each class held out for testing [default: train.test_split].
    #[arg(long)]
    test_split: Option<f64>,
    /// Seed of the split and the shuffles [default: train.seed].
    #[arg(long)]
    seed: Option<u64>,
    /// Passes over the training set [default: train.epochs].
    #[arg(long)]
    epochs: Option<usize>,
    /// Optimizer: sgd, adagrad or ftrl, with its defaults [default: train.optimizer].
    #[arg(long)]
    optimizer: Option<String>,
    /// The optimizer's learning rate (FTRL's alpha).
    #[arg(long)]
    learning_rate: Option<f32>,
    /// L2 regularisation strength.
    #[arg(long)]
    l2: Option<f32>,
    /// none, balanced, or class=weight,class=weight [default: train.class_weights].
    #[arg(long)]
    class_weights: Option<String>,
    /// Write the training curve, and the held-out evaluation (JSON, confusion matrix), here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    #[command(flatten)]
    featurize: FeaturizeFlags,
}

/// The learner config with `[train]`'s optimizer and class weights, and the command line's
/// settings, applied.
fn learner_config(config: &Config, args: &TrainArgs) -> anyhow::Result<LearnerConfig> {
    let mut learner = config.learner.clone();
    learner.optimizer = config.train.optimizer.clone();
    // Epochs over the whole set do what replay does for a stream.
    learner.replay = ReplayConfig::OFF;
    // The classifier's config says how it learned, and a stream that starts from it (`run
    // --init-model`) goes on with these weights. Training passes its weights, resolved from
    // them, with every update, which applies no config weights on top.
    learner.class_weights = match &args.class_weights {
        Some(text) => text.parse::<ClassWeights>().context("--class-weights")?,
        None => config.train.class_weights.clone(),
    };
    if let Some(kind) = &args.optimizer {
        if kind != learner.optimizer.name() {
            learner.optimizer = serde_json::from_value(serde_json::json!({ "kind": kind }))
                .map_err(|_| anyhow::anyhow!("--optimizer {kind:?}: expected sgd, adagrad or ftrl"))?;
        }
    }
    match &mut learner.optimizer {
        OptimizerConfig::Sgd(c) => {
            c.learning_rate = args.learning_rate.unwrap_or(c.learning_rate);
            c.l2 = args.l2.unwrap_or(c.l2);
        }
        OptimizerConfig::Adagrad(c) => {
            c.learning_rate = args.learning_rate.unwrap_or(c.learning_rate);
            c.l2 = args.l2.unwrap_or(c.l2);
        }
        OptimizerConfig::Ftrl(c) => {
            c.alpha = args.learning_rate.unwrap_or(c.alpha);
            c.l2 = args.l2.unwrap_or(c.l2);
        }
    }
    learner.validate()?;
    Ok(learner)
}

/// The classes: the config's fixed list (which must cover the data), else the data's, sorted.
fn classes_to_learn(learner: &LearnerConfig, examples: &[dataset::Example]) -> anyhow::Result<Vec<String>> {
    if learner.classes.is_empty() {
        return Ok(classes_of(examples));
    }
    if let Some(e) = examples.iter().find(|e| !learner.classes.contains(&e.label)) {
        anyhow::bail!("{} is labelled {:?}, which learner.classes does not list", e.uri, e.label);
    }
    Ok(learner.classes.clone())
}

/// One epoch's line of the progress log.
fn epoch_line(s: &EpochStats) -> String {
    match (s.test_log_loss, s.test_accuracy) {
        (Some(l), Some(a)) => format!(
            "epoch {:>3}  train loss {:.4} acc {:.4}   held-out loss {l:.4} acc {a:.4}   ({:.2} s)",
            s.epoch, s.train_log_loss, s.train_accuracy, s.seconds
        ),
        _ => format!(
            "epoch {:>3}  train loss {:.4} acc {:.4}   ({:.2} s)",
            s.epoch, s.train_log_loss, s.train_accuracy, s.seconds
        ),
    }
}

/// The training curve and, with a held-out set, its evaluation's plots, into `dir`.
fn write_report(
    dir: &std::path::Path,
    out: &std::path::Path,
    model: &str,
    record: &TrainingRecord,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let title = format!("{} on {model} features", out.display());
    plot::training_curve(&record.curve, &title, &dir.join("training_curve.png"))?;
    if let Some(evaluation) = &record.held_out {
        super::evaluate::write_report(evaluation, &format!("held-out: {title}"), dir)?;
    }
    eprintln!("report written to {}", dir.display());
    Ok(())
}

pub fn run(config: &Config, args: TrainArgs) -> anyhow::Result<()> {
    let test_split = args.test_split.unwrap_or(config.train.test_split);
    let seed = args.seed.unwrap_or(config.train.seed);
    let epochs = args.epochs.unwrap_or(config.train.epochs);
    if epochs == 0 {
        anyhow::bail!("--epochs must be at least 1");
    }
    let mut learner = learner_config(config, &args)?;

    let examples = super::batch_features::load_dataset(config, &args.data)?;
    let split = dataset::stratified_split(&examples, test_split, seed)?;
    let classes = classes_to_learn(&learner, &examples)?;
    learner.classes = classes.clone();
    eprintln!(
        "{}: {} images of {} classes; {} for training, {} held out (test_split {test_split}, seed {seed})",
        args.data.display(),
        examples.len(),
        classes.len(),
        split.train.len(),
        split.test.len()
    );

    let model_name = args.model.as_deref().unwrap_or(&config.model.name);
    let featurizers = load_featurizers(config, model_name, &args.featurize)?;
    let manifest = featurizers[0].manifest().clone();
    let uris: Vec<String> = examples.iter().map(|e| e.uri.clone()).collect();
    let features = featurize_uris(config, featurizers, &uris, &args.featurize)?;

    let class_ids: std::collections::HashMap<&str, usize> =
        classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let label = |i: usize| class_ids[examples[i].label.as_str()];
    let (train_x, train_labels) = features.select(split.train.iter().copied(), label);
    let (test_x, test_labels) = features.select(split.test.iter().copied(), label);
    if train_labels.is_empty() {
        anyhow::bail!("no training example has features");
    }
    let weights = learner.class_weights.resolve(&classes, &train_labels)?;

    let started = Instant::now();
    let progress = ProgressBar::new(epochs as u64).with_style(
        ProgressStyle::with_template("   training {bar:40} epoch {pos}/{len} [{elapsed_precise}] {msg}")
            .expect("valid template"),
    );
    let train_set = Examples { x: &train_x, labels: &train_labels };
    let test_set = Examples { x: &test_x, labels: &test_labels };
    let held_out = (!test_labels.is_empty()).then_some(&test_set);
    let schedule = Schedule { epochs, seed, class_weights: &weights };
    let (model, curve) = train(manifest.feature_dim, learner, &train_set, held_out, &schedule, |s| {
        progress.suspend(|| eprintln!("{}", epoch_line(s)));
        progress.inc(1);
    })?;
    progress.finish_and_clear();
    let train_seconds = started.elapsed().as_secs_f64();

    let evaluation = match held_out {
        Some(test) => Some(evaluate::evaluate(&model, test.x, test.labels)?),
        None => None,
    };
    let record = TrainingRecord {
        dlpipe_version: env!("CARGO_PKG_VERSION").into(),
        data: args.data.display().to_string(),
        examples: examples.len(),
        train_examples: train_labels.len(),
        test_examples: test_labels.len(),
        failed_examples: features.failures().count(),
        test_split,
        seed,
        epochs,
        class_weights: weights.clone(),
        curve,
        held_out: evaluation.clone(),
        featurize_seconds: features.seconds,
        train_seconds,
    };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Classifier::save(&args.out, &model, &manifest, Some(&record))?;
    if let Some(evaluation) = &evaluation {
        println!("held-out evaluation ({} examples):\n{}", evaluation.examples, evaluation.table());
    }
    if let Some(dir) = &args.report {
        write_report(dir, &args.out, &manifest.name, &record)?;
    }
    eprintln!(
        "classifier written to {} ({} classes, {} features of {}; {} epochs in {train_seconds:.1} s)",
        args.out.display(),
        model.num_classes(),
        model.dim(),
        manifest.name,
        epochs
    );
    Ok(())
}
