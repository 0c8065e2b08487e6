//! `dlpipe featurize`: pooled CNN features of every image, as a NumPy `.npy` matrix plus a JSONL
//! index of which image (and which class) each row came from. Features come from the feature
//! cache where it has them, so exporting after `dlpipe train` (or before it) costs one pass.

use super::batch_features::{featurize_uris, load_featurizers, FeaturizeFlags};
use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::image::list_labelled_images;
use dlpipe::npy::NpyWriter;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct FeaturizeArgs {
    /// Model name (models/NAME.json) or manifest path [default: model.name of the config].
    #[arg(long)]
    model: Option<String>,
    /// Output .npy file (float32, one row per image); FILE.rows.jsonl gets the index.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
    /// A labelled dataset instead of (or besides) INPUTS: class folders, or a .csv / .jsonl of
    /// uri,label.
    #[arg(long, value_name = "DIR|CSV|JSONL")]
    data: Option<PathBuf>,
    #[command(flatten)]
    featurize: FeaturizeFlags,
    /// Image files, or folders (one sub-folder per class gives each row its label).
    #[arg(value_name = "IMAGES|DIR", required_unless_present = "data")]
    inputs: Vec<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row<'a> {
    row: usize,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
}

/// `features.npy` → `features.rows.jsonl`.
pub fn index_path(npy: &Path) -> PathBuf {
    npy.with_extension("rows.jsonl")
}

pub fn run(config: &Config, args: FeaturizeArgs) -> anyhow::Result<()> {
    let mut images: Vec<(String, Option<String>)> = Vec::new();
    if let Some(data) = &args.data {
        images.extend(super::batch_features::load_dataset(config, data)?.into_iter().map(|e| (e.uri, Some(e.label))));
    }
    images.extend(
        list_labelled_images(&args.inputs)?.into_iter().map(|(p, label)| (p.to_string_lossy().into_owned(), label)),
    );
    if images.is_empty() {
        anyhow::bail!("no images found in {:?}", args.inputs);
    }
    let model_name = args.model.as_deref().unwrap_or(&config.model.name);
    let featurizers = load_featurizers(config, model_name, &args.featurize)?;
    let manifest = featurizers[0].manifest().clone();
    let uris: Vec<String> = images.iter().map(|(u, _)| u.clone()).collect();
    let features = featurize_uris(config, featurizers, &uris, &args.featurize)?;

    let mut npy = NpyWriter::create(&args.out, features.dim)?;
    let index = index_path(&args.out);
    let mut rows = std::io::BufWriter::new(
        std::fs::File::create(&index).with_context(|| format!("creating {}", index.display()))?,
    );
    for (i, (uri, label)) in images.iter().enumerate() {
        if let Some(row) = features.get(i) {
            npy.push(row)?;
            let line = Row { row: npy.rows() - 1, path: uri, label: label.as_deref() };
            writeln!(rows, "{}", serde_json::to_string(&line).expect("serialisable"))?;
        }
    }
    rows.flush()?;
    let written = npy.finish()?;
    eprintln!(
        "wrote {} ({written} x {} features of {}) and {}",
        args.out.display(),
        manifest.feature_dim,
        manifest.name,
        index.display()
    );
    let failed = features.failures().count();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} input(s) could not be processed (see the errors above); the others were written",
            uris.len()
        );
    }
    Ok(())
}
