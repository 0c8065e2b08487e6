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

/// A batch of prepared inputs: which inputs made it, and their crops back to back.
struct Prepared<E> {
    /// For each input of the batch, its position among the good ones, or why it failed.
    slots: Vec<Result<usize, E>>,
    crops: Vec<u8>,
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
    let prepare = |i: usize, out: &mut [u8]| -> Result<(), FileError> {
        let path = &paths[i];
        let image = read_file(path, limits)?;
        crop_into(preprocess, &image, out).map_err(|source| FileError::Preprocess { path: path.clone(), source })
    };
    run_inputs(featurizer, paths.len(), batch_size, prepare, |i, outcome| {
        let outcome = match outcome {
            InputOutcome::Done { outputs, row } => FileOutcome::Done { outputs, row },
            InputOutcome::Failed(e) => FileOutcome::Failed(e),
        };
        on_file(i, &paths[i], outcome)
    })
}

/// Resizes and centre-crops `image` into `out` (the model's input bytes; its device normalises
/// them) with this thread's resizer.
pub fn crop_into(preprocess: &Preprocess, image: &RgbImage, out: &mut [u8]) -> Result<(), PreprocessError> {
    RESIZER.with(|r| preprocess.crop(image, &mut r.borrow_mut(), out))
}

/// Runs `featurizer` over inputs `0..count` in batches of `batch_size`, calling
/// `on_input(index, outcome)` once per input, in order. `prepare(index, crop)` fills an
/// input's crop (read, decode, resize, crop) or says why it cannot; it runs on
/// rayon's pool, one batch ahead, while the model runs the previous batch on the calling thread.
pub fn run_inputs<E: Send>(
    featurizer: &Featurizer,
    count: usize,
    batch_size: usize,
    prepare: impl Fn(usize, &mut [u8]) -> Result<(), E> + Sync,
    mut on_input: impl FnMut(usize, InputOutcome<'_, E>),
) -> Result<(), ModelError> {
    let batch_size = batch_size.max(1);
    let len = featurizer.preprocess().crop_len();
    // A channel of one: at most one batch waits, prepared, while the model runs another.
    let (tx, rx) = mpsc::sync_channel::<Prepared<E>>(1);
    let prepare = &prepare;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut start = 0;
            while start < count {
                let end = (start + batch_size).min(count);
                let prepared: Vec<Result<Vec<u8>, E>> = (start..end)
                    .into_par_iter()
                    .map(|i| {
                        let mut out = vec![0u8; len];
                        prepare(i, &mut out).map(|_| out)
                    })
                    .collect();
                let mut crops = Vec::with_capacity((end - start) * len);
                let mut good = 0;
                let slots = prepared
                    .into_iter()
                    .map(|r| {
                        r.map(|p| {
                            crops.extend_from_slice(&p);
                            good += 1;
                            good - 1
                        })
                    })
                    .collect();
                if tx.send(Prepared { slots, crops, good }).is_err() {
                    return; // the consumer stopped on an error
                }
                start = end;
            }
        });
        let mut index = 0;
        for batch in rx {
            let outputs = if batch.good > 0 { Some(featurizer.forward(&batch.crops, batch.good)?) } else { None };
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
