//! `dlpipe predict`: for each image, the top-k classes with names: the pretrained model's own
//! (ImageNet) classes, or with `--classifier` those of a classifier trained on its features.

use super::batch_features::{featurize_uris, load_classifier_featurizers, FeaturizeFlags};
use super::load_featurizer;
use anyhow::Context;
use dlpipe::batch::{run_inputs, InputOutcome, Resizing};
use dlpipe::config::Config;
use dlpipe::fetch::Fetcher;
use dlpipe::image::{decode, list_images, read_file};
use dlpipe::model::ClassProbability;
use dlpipe::model::{top_k, OutputKind, WeightsSource};
use dlpipe::transfer::{dataset, Classifier};
use dlpipe_operators::Pixels;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Model name (models/NAME.json) or manifest path [default: model.name of the config].
    #[arg(long)]
    model: Option<String>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Device: cpu, cuda, cuda:N [default: first of model.devices].
    #[arg(long)]
    device: Option<String>,
    /// Images per forward pass [default: model.batch_size].
    #[arg(long)]
    batch_size: Option<usize>,
    /// A classifier trained by `dlpipe train` (or a stream snapshot): predict its classes
    /// from the model's features instead of the model's own classes.
    #[arg(long, value_name = "FILE")]
    classifier: Option<PathBuf>,
    /// Image files, folders to search for images, URIs (file://, http(s)://, s3://, data:),
    /// or lists of them (.csv / .jsonl, as `train` reads; labels are ignored).
    #[arg(required = true, value_name = "IMAGES|DIR|URI|LIST")]
    inputs: Vec<String>,
}

/// Why an image never reached the model.
struct Failure {
    message: String,
    kind: &'static str,
}

/// The images of the inputs, in order: a local path for each file (read directly), URIs as
/// given (fetched with fetch.*), each list's URIs checked line by line.
fn input_images(inputs: &[String], fetcher: &Fetcher) -> anyhow::Result<Vec<String>> {
    let mut images = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if dataset::is_uri(input) {
            fetcher.check(input)?;
            images.push(input.clone());
        } else if dataset::is_list(path) && path.is_file() {
            for entry in dataset::read_list(path)? {
                if dataset::is_uri(&entry.uri) {
                    fetcher.check(&entry.uri).with_context(|| format!("{}, line {}", path.display(), entry.line))?;
                }
                images.push(entry.uri);
            }
        } else {
            let files = list_images(&[path.to_path_buf()]).with_context(|| input.clone())?;
            images.extend(files.into_iter().map(|p| p.display().to_string()));
        }
    }
    Ok(images)
}

/// The crop (the model's input bytes) of one image (a local path or a URI) into `out`.
fn prepare_image(
    image: &str,
    fetcher: &Fetcher,
    limits: &dlpipe::image::ImageLimits,
    preprocess: &dlpipe::image::Preprocess,
    resizing: Resizing,
) -> Result<Pixels, Failure> {
    let failed = |kind: &'static str, message: String| Failure { message, kind };
    let pixels = if dataset::is_uri(image) {
        let bytes = fetcher.fetch(image, limits.max_encoded_bytes).map_err(|e| failed(e.kind(), e.to_string()))?;
        decode(&bytes, limits).map_err(|e| failed(e.kind(), format!("{}: {e}", shown(image))))?
    } else {
        read_file(Path::new(image), limits).map_err(|e| failed(e.kind(), e.to_string()))?
    };
    resizing.pixels(preprocess, pixels).map_err(|e| failed(e.kind(), format!("{}: {e}", shown(image))))
}

/// How an image is named in the output: as given, but a long `data:` URI cut short.
fn shown(image: &str) -> String {
    match dataset::is_uri(image) && image.len() > 64 && image[..5].eq_ignore_ascii_case("data:") {
        true => format!("{}…", &image[..(0..=48).rev().find(|&i| image.is_char_boundary(i)).unwrap_or(0)]),
        false => image.to_owned(),
    }
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<Vec<dlpipe::model::ClassProbability>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<&'static str>,
}

pub fn run(config: &Config, args: PredictArgs) -> anyhow::Result<()> {
    let fetcher = Fetcher::new(config.fetch.clone())?;
    let images = input_images(&args.inputs, &fetcher)?;
    if images.is_empty() {
        anyhow::bail!(
            "no images found in {:?} (looked for {})",
            args.inputs,
            dlpipe::image::IMAGE_EXTENSIONS.join(", ")
        );
    }
    if let Some(classifier) = &args.classifier {
        return with_classifier(config, &args, classifier, &images);
    }
    let featurizer = load_featurizer(config, args.model.as_deref(), args.device.as_deref())?;
    let manifest = featurizer.manifest().clone();
    if !manifest.has(OutputKind::Logits) {
        anyhow::bail!(
            "model {} outputs only features, no class logits; predict with a trained classifier instead",
            manifest.name
        );
    }
    if manifest.weights.source == WeightsSource::Untrained {
        eprintln!("WARNING: model {} has UNTRAINED weights; these predictions are meaningless", manifest.name);
    }
    let progress = ProgressBar::new(images.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} images [{elapsed_precise}] {per_sec}")
            .expect("valid template"),
    );
    if images.len() < 64 {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failed = 0usize;
    let mut write_result: std::io::Result<()> = Ok(());
    let preprocess = featurizer.preprocess();
    let resizing = Resizing::of(&config.model, featurizer.device().is_cuda());
    let prepare = |i: usize| prepare_image(&images[i], &fetcher, &config.image, preprocess, resizing);
    let batch_size = args.batch_size.unwrap_or(config.model.batch_size);
    run_inputs(&featurizer, images.len(), batch_size, prepare, |i, outcome| {
        progress.inc(1);
        let shown = shown(&images[i]);
        let line = match outcome {
            InputOutcome::Done { outputs, row } => {
                let logits = outputs.logits_row(row).expect("logits checked above");
                predicted_line(&shown, top_k(logits, args.top_k, &manifest.class_names), args.json)
            }
            InputOutcome::Failed(error) => {
                failed += 1;
                if !args.json {
                    progress.suspend(|| eprintln!("error: {}", error.message));
                    return;
                }
                let line =
                    JsonLine { path: &shown, top_k: None, error: Some(error.message), error_kind: Some(error.kind) };
                serde_json::to_string(&line).expect("serialisable")
            }
        };
        if write_result.is_ok() {
            write_result = progress.suspend(|| writeln!(out, "{line}"));
        }
    })?;
    out.flush()?;
    write_result?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let done = images.len() - failed;
    tracing::info!(
        "predicted {done} image(s) in {seconds:.2} s ({:.1} images/s) with {}{}",
        done as f64 / seconds,
        manifest.name,
        if failed > 0 { format!("; {failed} failed") } else { String::new() }
    );
    if failed > 0 {
        anyhow::bail!("{failed} of {} input(s) could not be processed (see the errors above)", images.len());
    }
    Ok(())
}

/// The output line of an image's classes: JSON, or its path and one indented line per class.
fn predicted_line(path: &str, classes: Vec<ClassProbability>, json: bool) -> String {
    if json {
        let line = JsonLine { path, top_k: Some(classes), error: None, error_kind: None };
        return serde_json::to_string(&line).expect("serialisable");
    }
    let mut text = path.to_owned();
    for c in classes {
        let name = c.name.as_deref().unwrap_or("");
        text.push_str(&format!("\n  {:>6.2}%  {name} [{}]", c.probability * 100.0, c.class));
    }
    text
}

/// Predicts with a trained classifier on the features of the model it records.
fn with_classifier(config: &Config, args: &PredictArgs, path: &std::path::Path, uris: &[String]) -> anyhow::Result<()> {
    let classifier = Classifier::load(path)?;
    let flags = FeaturizeFlags {
        devices: args.device.iter().cloned().collect(),
        batch_size: args.batch_size,
        feature_cache: None,
        // New images: nothing to gain from hashing them against the cache.
        no_cache: true,
    };
    let model_name = classifier.featurizer_model(args.model.as_deref())?.to_string();
    let featurizers = load_classifier_featurizers(config, &model_name, args.model.is_some(), &flags)?;
    classifier.check_featurizer(featurizers[0].manifest())?;
    let features = featurize_uris(config, featurizers, uris, &flags)?;
    let classes = classifier.model.classes();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, uri) in uris.iter().enumerate() {
        let uri = &shown(uri);
        let line = match (&features.rows[i], features.get(i)) {
            (_, Some(x)) => {
                let top: Vec<ClassProbability> = classifier
                    .model
                    .top_k(x, args.top_k)?
                    .into_iter()
                    .map(|(c, probability)| ClassProbability { class: c, name: Some(classes[c].clone()), probability })
                    .collect();
                if args.json {
                    serde_json::to_string(&JsonLine { path: uri, top_k: Some(top), error: None, error_kind: None })
                        .expect("serialisable")
                } else {
                    let mut text = uri.clone();
                    for c in top {
                        text.push_str(&format!("\n  {:>6.2}%  {}", c.probability * 100.0, classes[c.class]));
                    }
                    text
                }
            }
            (Err(error), None) if args.json => serde_json::to_string(&JsonLine {
                path: uri,
                top_k: None,
                error: Some(error.to_string()),
                error_kind: Some(error.kind()),
            })
            .expect("serialisable"),
            _ => continue, // reported by featurize_uris
        };
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    let failed = features.failures().count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} input(s) could not be processed (see the errors above)", uris.len());
    }
    Ok(())
}
