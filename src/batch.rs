//! Running a model over many image files: decode and preprocess batch i+1 on a pool of threads
//! while the model runs batch i, and hand every file's outcome, in input order, to the caller.
//! Shared by `dlpipe predict`, `dlpipe featurize` and the batch trainer.

use crate::image::{read_file, FileError, ImageLimits};
use crate::model::{Featurizer, ModelError, Outputs};
use fast_image_resize::Resizer;
use rayon::prelude::*;
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::mpsc;

/// What happened to one input file.
pub enum FileOutcome<'a> {
    /// The model ran on it: its row `row` of `outputs`.
    Done { outputs: &'a Outputs, row: usize },
    /// It never reached the model.
    Failed(FileError),
}

/// A batch of prepared inputs: which files made it, and their pixels back to back.
struct Prepared {
    /// For each file of the batch, its position among the good ones, or why it failed.
    slots: Vec<Result<usize, FileError>>,
    pixels: Vec<f32>,
    good: usize,
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Runs `featurizer` over `paths` in batches of `batch_size`, calling `on_file(index, path,
/// outcome)` once per path, in order. Decoding overlaps the forward pass: one batch is prepared
/// ahead on rayon's pool while the model runs on the calling thread.
pub fn run_files(
    featurizer: &Featurizer,
    limits: &ImageLimits,
    paths: &[PathBuf],
    batch_size: usize,
    mut on_file: impl FnMut(usize, &PathBuf, FileOutcome<'_>),
) -> Result<(), ModelError> {
    let batch_size = batch_size.max(1);
    let preprocess = featurizer.preprocess();
    let len = preprocess.tensor_len();
    // A channel of one: at most one batch waits, prepared, while the model runs another.
    let (tx, rx) = mpsc::sync_channel::<Prepared>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for chunk in paths.chunks(batch_size) {
                let prepared: Vec<Result<Vec<f32>, FileError>> = chunk
                    .par_iter()
                    .map(|path| {
                        let image = read_file(path, limits)?;
                        let mut out = vec![0f32; len];
                        RESIZER
                            .with(|r| preprocess.run(&image, &mut r.borrow_mut(), &mut out))
                            .map_err(|source| FileError::Preprocess { path: path.clone(), source })?;
                        Ok(out)
                    })
                    .collect();
                let mut pixels = Vec::with_capacity(chunk.len() * len);
                let mut good = 0;
                let slots = prepared
                    .into_iter()
                    .map(|r| {
                        r.map(|p| {
                            pixels.extend_from_slice(&p);
                            good += 1;
                            good - 1
                        })
                    })
                    .collect();
                if tx.send(Prepared { slots, pixels, good }).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        let mut index = 0;
        for batch in rx {
            let outputs = if batch.good > 0 { Some(featurizer.forward(&batch.pixels, batch.good)?) } else { None };
            for slot in batch.slots {
                let outcome = match slot {
                    Ok(row) => {
                        FileOutcome::Done { outputs: outputs.as_ref().expect("a good row implies outputs"), row }
                    }
                    Err(e) => FileOutcome::Failed(e),
                };
                on_file(index, &paths[index], outcome);
                index += 1;
            }
        }
        Ok(())
    })
}
