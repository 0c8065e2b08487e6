//! Running a model over many image files: decode and preprocess batch i+1 on a pool of threads
//! while the model runs batch i, and hand every file's outcome, in input order, to the caller.
//! Shared by `dlpipe predict`, `dlpipe featurize` and the batch trainer.

use crate::config::{ModelConfig, ResizeOn};
use crate::image::{read_file, FileError, ImageLimits, Preprocess, PreprocessError};
use crate::model::{Featurizer, ModelError, Outputs};
use ::image::RgbImage;
use dlpipe_operators::Pixels;
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

/// A batch of prepared inputs: which inputs made it, and their pixels.
struct Prepared<E> {
    /// For each input of the batch, its position among the good ones, or why it failed.
    slots: Vec<Result<usize, E>>,
    pixels: Vec<Pixels>,
}

/// Where a decoded image becomes the model's input (`model.resize_on`): cropped on the host, or,
/// up to `model.device_resize_max_pixels`, sent as decoded for the model's device to resize
/// ([`Featurizer::forward_pixels`]). The stream and the batch commands decide alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resizing {
    /// The largest image (pixels) the device resizes; None: the host crops every image.
    device_max_pixels: Option<u64>,
}

impl Resizing {
    /// Every image cropped on the host.
    pub const ON_HOST: Resizing = Resizing { device_max_pixels: None };

    /// What `model.resize_on` means where the model's devices are all CUDA (`all_cuda`) or not.
    pub fn of(model: &ModelConfig, all_cuda: bool) -> Resizing {
        let on_device = model.resize_on.resolve(all_cuda) == ResizeOn::Device;
        Resizing { device_max_pixels: on_device.then_some(model.device_resize_max_pixels) }
    }

    /// Where images go, for the logs: "host", or "device" with its limit.
    pub fn describe(&self) -> String {
        match self.device_max_pixels {
            None => "host".into(),
            Some(max) => format!("device (images up to {max} pixels)"),
        }
    }

    /// `image` as the model's input: its crop, or the image itself for the device to resize
    /// (checked here, so that an image the device cannot crop fails with its name, not the batch).
    pub fn pixels(&self, preprocess: &Preprocess, image: RgbImage) -> Result<Pixels, PreprocessError> {
        let (width, height) = image.dimensions();
        match self.device_max_pixels {
            Some(max) if u64::from(width) * u64::from(height) <= max => {
                preprocess.plan(width, height)?;
                Ok(Pixels::Image { width, height, rgb: image.into_raw() })
            }
            _ => {
                let mut crop = vec![0u8; preprocess.crop_len()];
                crop_into(preprocess, &image, &mut crop)?;
                Ok(Pixels::Crop(crop))
            }
        }
    }
}

thread_local! {
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Runs `featurizer` over `paths` in batches of `batch_size`, calling `on_file(index, path,
/// outcome)` once per path, in order. See [`run_inputs`].
pub fn run_files(
    featurizer: &Featurizer,
    limits: &ImageLimits,
    resizing: Resizing,
    paths: &[PathBuf],
    batch_size: usize,
    mut on_file: impl FnMut(usize, &PathBuf, FileOutcome<'_>),
) -> Result<(), ModelError> {
    let preprocess = featurizer.preprocess();
    let prepare = |i: usize| -> Result<Pixels, FileError> {
        let path = &paths[i];
        let image = read_file(path, limits)?;
        resizing.pixels(preprocess, image).map_err(|source| FileError::Preprocess { path: path.clone(), source })
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
fn crop_into(preprocess: &Preprocess, image: &RgbImage, out: &mut [u8]) -> Result<(), PreprocessError> {
    RESIZER.with(|r| preprocess.crop(image, &mut r.borrow_mut(), out))
}

/// Runs `featurizer` over inputs `0..count` in batches of `batch_size`, calling
/// `on_input(index, outcome)` once per input, in order. `prepare(index)` makes an input's
/// pixels (read, decode, and a [`Resizing`]'s crop) or says why it cannot; it runs on
/// rayon's pool, one batch ahead, while the model runs the previous batch on the calling thread.
pub fn run_inputs<E: Send>(
    featurizer: &Featurizer,
    count: usize,
    batch_size: usize,
    prepare: impl Fn(usize) -> Result<Pixels, E> + Sync,
    mut on_input: impl FnMut(usize, InputOutcome<'_, E>),
) -> Result<(), ModelError> {
    let batch_size = batch_size.max(1);
    // A channel of one: at most one batch waits, prepared, while the model runs another.
    let (tx, rx) = mpsc::sync_channel::<Prepared<E>>(1);
    let prepare = &prepare;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut start = 0;
            while start < count {
                let end = (start + batch_size).min(count);
                let prepared: Vec<Result<Pixels, E>> = (start..end).into_par_iter().map(prepare).collect();
                let mut pixels = Vec::with_capacity(end - start);
                let slots = prepared
                    .into_iter()
                    .map(|r| {
                        r.map(|p| {
                            pixels.push(p);
                            pixels.len() - 1
                        })
                    })
                    .collect();
                if tx.send(Prepared { slots, pixels }).is_err() {
                    return; // the consumer stopped on an error
                }
                start = end;
            }
        });
        let mut index = 0;
        for batch in rx {
            let images: Vec<&Pixels> = batch.pixels.iter().collect();
            let outputs = if images.is_empty() { None } else { Some(featurizer.forward_pixels(&images)?) };
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
