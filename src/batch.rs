//! Running a model over many image files: decode and preprocess batch i+1 on a pool of threads
//! while the model runs batch i, and hand every file's outcome, in input order, to the caller.
//! Shared by `dlpipe predict`, `dlpipe featurize` and the batch trainer.

use crate::image::{read_file, FileError, ImageLimits, Preprocess, PreprocessError};
use crate::model::{Featurizer, ModelError, Outputs};
use ::image::RgbImage;
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

/// What happened to one input of [`run_inputs`].
pub enum InputOutcome<'a, E> {
    /// The model ran on it: its row `row` of `outputs`.
    Done { outputs: &'a Outputs, row: usize },
    /// It never reached the model: the error of `prepare`.
    Failed(E),
}

/// A batch of prepared inputs: which inputs made it, and their pixels back to back.
struct Prepared<E> {
    /// For each input of the batch, its position among the good ones, or why it failed.
    slots: Vec<Result<usize, E>>,
    pixels: Vec<f32>,
    good: usize,
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Runs `featurizer` over `paths` in batches of `batch_size`, calling `on_file(index, path,
/// outcome)` once per path, in order. See [`run_inputs`].
pub fn run_files(
    featurizer: &Featurizer,
    limits: &ImageLimits,
    paths: &[PathBuf],
    batch_size: usize,
    mut on_file: impl FnMut(usize, &PathBuf, FileOutcome<'_>),
) -> Result<(), ModelError> {
    let preprocess = featurizer.preprocess();
    let prepare = |i: usize, out: &mut [f32]| -> Result<(), FileError> {
        let path = &paths[i];
        let image = read_file(path, limits)?;
        preprocess_into(preprocess, &image, out).map_err(|source| FileError::Preprocess { path: path.clone(), source })
    };
    run_inputs(featurizer, paths.len(), batch_size, prepare, |i, outcome| {
        let outcome = match outcome {
            InputOutcome::Done { outputs, row } => FileOutcome::Done { outputs, row },
            InputOutcome::Failed(e) => FileOutcome::Failed(e),
        };
        on_file(i, &paths[i], outcome)
    })
}

/// Resizes, crops and normalises `image` into `out` with this thread's resizer.
pub fn preprocess_into(preprocess: &Preprocess, image: &RgbImage, out: &mut [f32]) -> Result<(), PreprocessError> {
    RESIZER.with(|r| preprocess.run(image, &mut r.borrow_mut(), out))
}

/// Runs `featurizer` over inputs `0..count` in batches of `batch_size`, calling
/// `on_input(index, outcome)` once per input, in order. `prepare(index, pixels)` fills an
/// input's model-ready pixels (read, decode, preprocess) or says why it cannot; it runs on
/// rayon's pool, one batch ahead, while the model runs the previous batch on the calling thread.
pub fn run_inputs<E: Send>(
    featurizer: &Featurizer,
    count: usize,
    batch_size: usize,
    prepare: impl Fn(usize, &mut [f32]) -> Result<(), E> + Sync,
    mut on_input: impl FnMut(usize, InputOutcome<'_, E>),
) -> Result<(), ModelError> {
    let batch_size = batch_size.max(1);
    let len = featurizer.preprocess().tensor_len();
    // A channel of one: at most one batch waits, prepared, while the model runs another.
    let (tx, rx) = mpsc::sync_channel::<Prepared<E>>(1);
    let prepare = &prepare;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut start = 0;
            while start < count {
                let end = (start + batch_size).min(count);
                let prepared: Vec<Result<Vec<f32>, E>> = (start..end)
                    .into_par_iter()
                    .map(|i| {
                        let mut out = vec![0f32; len];
                        prepare(i, &mut out).map(|_| out)
                    })
                    .collect();
                let mut pixels = Vec::with_capacity((end - start) * len);
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
                start = end;
            }
        });
        let mut index = 0;
        for batch in rx {
            let outputs = if batch.good > 0 { Some(featurizer.forward(&batch.pixels, batch.good)?) } else { None };
            for slot in batch.slots {
                let outcome = match slot {
                    Ok(row) => {
                        InputOutcome::Done { outputs: outputs.as_ref().expect("a good row implies outputs"), row }
                    }
                    Err(e) => InputOutcome::Failed(e),
                };
                on_input(index, outcome);
                index += 1;
            }
        }
        Ok(())
    })
}
