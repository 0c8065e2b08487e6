//! The library's one top-level error.

use crate::config::ConfigError;
use crate::fetch::FetchError;
use crate::image::{DecodeError, FileError, PreprocessError};
use crate::kafka::KafkaError;
use crate::learn::{ClassWeightsError, LearnError};
use crate::metrics::ServeError;
use crate::model::ModelError;
use crate::npy::NpyError;
use crate::transfer::cache::CacheError;
use crate::transfer::dataset::DatasetError;
use crate::transfer::features::{FeaturizeError, ImageError};
use crate::transfer::plot::PlotError;
use crate::transfer::ClassifierError;

/// Any error of the dlpipe library: one variant per module error, each shown as it is.
///
/// Why one type: like rdkafka's single `KafkaError`, it lets a caller that drives several
/// layers (a command, an application embedding dlpipe) use `?` across them and match on one
/// type, while each module keeps returning its own enum, which says the detail (the file, the
/// key, the URI, and what to do).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    ImageFile(#[from] FileError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// Snapshot errors come as [`LearnError::Snapshot`], which names the file.
    #[error(transparent)]
    Learn(#[from] LearnError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Featurize(#[from] FeaturizeError),
    /// One image of a dataset that has no features.
    #[error(transparent)]
    DatasetImage(#[from] ImageError),
    #[error(transparent)]
    ClassWeights(#[from] ClassWeightsError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error(transparent)]
    Classifier(#[from] ClassifierError),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
}

/// A result whose error is, unless said otherwise, the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_error_converts_and_reads_the_same() {
        // anyhow (in the command line) takes only errors that threads may share.
        fn shareable<E: std::error::Error + Send + Sync + 'static>() {}
        shareable::<Error>();
        let config = ConfigError::Value("pipeline.top_k must be at least 1".into());
        let message = config.to_string();
        let error: Error = config.into();
        assert_eq!(error.to_string(), message);
        assert!(matches!(error, Error::Config(ConfigError::Value(_))));
    }
}
