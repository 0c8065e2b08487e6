//! `dlpipe evaluate`: a classifier (trained by `dlpipe train`, or a snapshot the stream wrote)
//! on labelled images: accuracy, per-class precision/recall/F1, macro-F1, log-loss and the
//! confusion matrix, as a table, as JSON, and as PNG charts.

use super::batch_features::{featurize_uris, load_classifier_featurizers, FeaturizeFlags};
use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::transfer::{dataset, evaluate, plot, Classifier, Evaluation};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Every image of the data.
    All,
    /// The held-out side of the classifier's own train/test split (same data, ratio, seed).
    Test,
    /// The training side of that split.
    Train,
}

#[derive(clap::Args, Debug)]
pub struct EvaluateArgs {
    /// Labelled images: a folder with one sub-folder per class, or a .csv / .jsonl of uri,label.
    #[arg(long, value_name = "DIR|CSV|JSONL")]
    data: PathBuf,
    /// The classifier file (from `dlpipe train`, or a stream snapshot).
    #[arg(long, value_name = "FILE")]
    classifier: PathBuf,
    /// Model to featurize with [default: the one the classifier records].
    #[arg(long)]
    model: Option<String>,
    /// Which images of the data to evaluate on.
    #[arg(long, value_enum, default_value_t = Part::All)]
    split: Part,
    /// Write the evaluation as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write evaluation.json, confusion_matrix.png, reliability.png and (for a trained classifier)
    /// training_curve.png here.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    #[command(flatten)]
    featurize: FeaturizeFlags,
}

/// `evaluation.json`, `confusion_matrix.png` and `reliability.png` in `dir`.
pub fn write_report(evaluation: &Evaluation, title: &str, dir: &Path) -> anyhow::Result<()> {
    write_json(evaluation, &dir.join("evaluation.json"))?;
    plot::confusion_matrix(evaluation, title, &dir.join("confusion_matrix.png"))?;
    plot::reliability_diagram(evaluation, title, &dir.join("reliability.png"))?;
    Ok(())
}

fn write_json(evaluation: &Evaluation, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(evaluation).expect("serialisable");
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

pub fn run(config: &Config, args: EvaluateArgs) -> anyhow::Result<()> {
    let classifier = Classifier::load(&args.classifier)?;
    let mut examples = super::batch_features::load_dataset(config, &args.data)?;
    if args.split != Part::All {
        let Some(record) = &classifier.training else {
            anyhow::bail!(
                "--split {:?} needs the classifier's training record, and {} has none (a stream snapshot?); use \
                 --split all",
                args.split,
                args.classifier.display()
            );
        };
        if record.data != args.data.display().to_string() {
            tracing::warn!(trained_on = record.data, "the split is reproduced on other data than the training run's");
        }
        let split = dataset::stratified_split(&examples, record.test_split, record.seed)?;
        let keep = if args.split == Part::Test { split.test } else { split.train };
        examples = keep.into_iter().map(|i| examples[i].clone()).collect();
        if examples.is_empty() {
            anyhow::bail!("the {:?} side of the split is empty", args.split);
        }
    }
    // Labels the classifier does not know cannot be scored: say which, rather than guess.
    let classes = classifier.model.classes();
    let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &examples {
        if !classes.contains(&e.label) {
            *unknown.entry(&e.label).or_default() += 1;
        }
    }
    if !unknown.is_empty() {
        anyhow::bail!(
            "{} has labels the classifier was not trained on: {:?} (its classes: {:?})",
            args.data.display(),
            unknown,
            classes
        );
    }

    let model_name = classifier.featurizer_model(args.model.as_deref())?.to_string();
    let featurizers = load_classifier_featurizers(config, &model_name, args.model.is_some(), &args.featurize)?;
    classifier.check_featurizer(featurizers[0].manifest())?;
    let uris: Vec<String> = examples.iter().map(|e| e.uri.clone()).collect();
    let features = featurize_uris(config, featurizers, &uris, &args.featurize)?;
    let (x, labels) = features
        .select(0..examples.len(), |i| classifier.model.find_class(&examples[i].label).expect("labels checked above"));
    let evaluation = evaluate::evaluate(&classifier.model, &x, &labels)?;
    println!("{}", evaluation.table());
    if let Some(path) = &args.json {
        write_json(&evaluation, path)?;
    }
    if let Some(dir) = &args.report {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let title = format!("{} on {}", args.classifier.display(), args.data.display());
        write_report(&evaluation, &title, dir)?;
        if let Some(record) = &classifier.training {
            plot::training_curve(
                &record.curve,
                &args.classifier.display().to_string(),
                &dir.join("training_curve.png"),
            )?;
        }
        eprintln!("report written to {}", dir.display());
    }
    Ok(())
}
