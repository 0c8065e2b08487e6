//! Image bytes in, model-ready pixels out: decoding with limits, EXIF orientation, colour
//! conversion, resize and centre crop, normalisation. Pure functions, no timely, no torch, so the
//! batch path, the stream and the tests share exactly the same preprocessing.

mod decode;
mod preprocess;

pub use decode::{decode, DecodeError, ImageLimits};
pub use preprocess::{Preprocess, PreprocessError, ResizePlan};

use image::RgbImage;
use std::path::{Path, PathBuf};

/// An image file that could not be turned into pixels, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
    #[error("{path}: {source}")]
    Preprocess {
        path: PathBuf,
        #[source]
        source: PreprocessError,
    },
}

impl FileError {
    /// A short machine-readable cause: `not_found`, `unreadable`, `empty`, `too_large`,
    /// `unsupported_format`, `undecodable`. Dead letters and metrics use these.
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "not_found",
            FileError::Read { .. } => "unreadable",
            FileError::Decode { source, .. } => source.kind(),
            FileError::Preprocess { source, .. } => source.kind(),
        }
    }
}

impl PreprocessError {
    /// See [`FileError::kind`]: `too_large` or `unprocessable`.
    pub fn kind(&self) -> &'static str {
        match self {
            PreprocessError::TooLarge { .. } => "too_large",
            PreprocessError::Invalid(_) | PreprocessError::Resize(_) => "unprocessable",
        }
    }
}

impl DecodeError {
    /// See [`FileError::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooManyBytes { .. } | DecodeError::TooLarge { .. } | DecodeError::AspectRatio { .. } => {
                "too_large"
            }
            DecodeError::UnknownFormat { .. } => "unsupported_format",
            DecodeError::Corrupt { .. } | DecodeError::Truncated { .. } => "undecodable",
        }
    }
}

/// Reads and decodes an image file. The file's size is checked against the limit before it is
/// read, so a huge file is refused without reading it.
pub fn read_file(path: &Path, limits: &ImageLimits) -> Result<RgbImage, FileError> {
    let read_err = |source| FileError::Read { path: path.into(), source };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > limits.max_encoded_bytes {
        return Err(FileError::Decode {
            path: path.into(),
            source: DecodeError::TooManyBytes { bytes: len, limit: limits.max_encoded_bytes },
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    decode(&bytes, limits).map_err(|source| FileError::Decode { path: path.into(), source })
}

/// File name extensions treated as images when a folder is listed.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"];

/// Expands folders into the image files under them (recursively, sorted by path); files given
/// explicitly are kept whatever their extension, since decoding sniffs the format.
pub fn list_images(inputs: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    Ok(list_labelled_images(inputs)?.into_iter().map(|(path, _)| path).collect())
}

/// Like [`list_images`], with each file's label: the name of the sub-folder of the given folder
/// that holds it (the one-folder-per-class layout), or None for files given directly or lying
/// at a folder's top level.
pub fn list_labelled_images(inputs: &[PathBuf]) -> std::io::Result<Vec<(PathBuf, Option<String>)>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            found.sort();
            out.extend(found.into_iter().map(|path| {
                let label = path.strip_prefix(input).ok().and_then(|rel| {
                    let mut parts = rel.components();
                    let first = parts.next()?;
                    parts.next().map(|_| first.as_os_str().to_string_lossy().into_owned())
                });
                (path, label)
            }));
        } else {
            out.push((input.clone(), None));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}
