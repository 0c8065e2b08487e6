//! `dlpipe featurize`: pooled CNN features of every image, as a NumPy `.npy` matrix plus a JSONL
//! index of which file (and which class folder) each row came from.

use super::load_featurizer;
use anyhow::Context;
use dlpipe::batch::{run_files, FileOutcome};
use dlpipe::config::Config;
use dlpipe::image::list_labelled_images;
use dlpipe::model::OutputKind;
use dlpipe::npy::NpyWriter;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct FeaturizeArgs {
    /// Model name (models/NAME.json) or manifest path [default: model.name of the config].
    #[arg(long)]
    model: Option<String>,
    /// Device: cpu, cuda, cuda:N [default: first of model.devices].
    #[arg(long)]
    device: Option<String>,
    /// Images per forward pass [default: model.batch_size].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Output .npy file (float32, one row per image); FILE.rows.jsonl gets the index.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
    /// Image files, or folders (one sub-folder per class gives each row its label).
    #[arg(required = true, value_name = "IMAGES|DIR")]
    inputs: Vec<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row<'a> {
    row: usize,
    path: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
}

/// `features.npy` → `features.rows.jsonl`.
pub fn index_path(npy: &Path) -> PathBuf {
    npy.with_extension("rows.jsonl")
}

pub fn run(config: &Config, args: FeaturizeArgs) -> anyhow::Result<()> {
    let files = list_labelled_images(&args.inputs)?;
    if files.is_empty() {
        anyhow::bail!("no images found in {:?}", args.inputs);
    }
    let featurizer = load_featurizer(config, args.model.as_deref(), args.device.as_deref())?;
    let manifest = featurizer.manifest();
    if !manifest.has(OutputKind::Features) {
        anyhow::bail!("model {} outputs no features (its manifest lists {:?})", manifest.name, manifest.outputs);
    }
    let mut npy = NpyWriter::create(&args.out, manifest.feature_dim)?;
    let index = index_path(&args.out);
    let mut rows = std::io::BufWriter::new(
        std::fs::File::create(&index).with_context(|| format!("creating {}", index.display()))?,
    );
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let progress = ProgressBar::new(paths.len() as u64).with_style(
        ProgressStyle::with_template("featurizing {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}] {per_sec}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let mut failed = 0usize;
    let mut write_error: Option<anyhow::Error> = None;
    run_files(
        &featurizer,
        &config.image,
        &paths,
        args.batch_size.unwrap_or(config.model.batch_size),
        |i, path, outcome| {
            progress.inc(1);
            match outcome {
                FileOutcome::Done { outputs, row } => {
                    if write_error.is_some() {
                        return;
                    }
                    let result = npy
                        .push(outputs.features_row(row).expect("features checked above"))
                        .map_err(anyhow::Error::from)
                        .and_then(|_| {
                            let line = Row { row: npy.rows() - 1, path, label: files[i].1.as_deref() };
                            writeln!(rows, "{}", serde_json::to_string(&line).expect("serialisable"))
                                .map_err(Into::into)
                        });
                    if let Err(e) = result {
                        write_error = Some(e);
                    }
                }
                FileOutcome::Failed(error) => {
                    failed += 1;
                    progress.suspend(|| eprintln!("error: {error}"));
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e);
    }
    rows.flush()?;
    let written = npy.finish()?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "featurized {written} image(s) with {} in {seconds:.1} s ({:.1} images/s): {} ({written} x {}) and {}",
        manifest.name,
        written as f64 / seconds,
        args.out.display(),
        manifest.feature_dim,
        index.display()
    );
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} input(s) could not be processed (see the errors above); the others were written",
            paths.len()
        );
    }
    Ok(())
}
