//! dlpipe: deep learning on streams of images.
//!
//! Image records flow from Kafka through a timely dataflow that fetches and decodes them,
//! featurizes them with a TorchScript CNN on each worker's device, classifies them with an online
//! logistic regression that keeps learning from labelled records, and publishes predictions back
//! to Kafka. The same featurizer and learner serve the batch commands (train, evaluate,
//! predict over folders of images).
//!
//! The library is layered so that each part is testable on its own:
//! - [`image`]: bytes → pixels (decode with limits, EXIF, resize, crop, normalise); pure, the
//!   `dlpipe-image` crate, re-exported.
//! - [`model`]: TorchScript models and their manifests, on CPU or CUDA devices.
//! - [`batch`]: a model over many files, decoding overlapped with inference.
//! - [`kafka`]: client configuration and topic administration.
//! - [`config`]: the TOML configuration.
//! - [`metrics`]: Prometheus metrics of the streaming pipeline and their HTTP endpoint.
//! - [`transfer`]: batch transfer learning: featurize (cached), train, evaluate, plot.
//! - [`Error`]: every module's error enum in one type, for callers that use several modules.
//!
//! The timely operators live in the `dlpipe-operators` crate, image decoding in `dlpipe-image`.

pub mod batch;
pub mod config;
mod error;
pub mod fetch;
pub mod kafka;
pub mod learn;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod pipeline;
pub mod transfer;

pub use dlpipe_image as image;
pub use error::{Error, Result};
