//! A feature cache: the CNN features of images already featurized, so that training a second
//! time (other hyperparameters, more epochs) featurizes nothing.
//!
//! One file per featurizer, `DIR/<featurizer key>.features`, where the key hashes the model
//! file's sha256 and its input spec (size, resize, crop, normalisation): another model or other
//! preprocessing is another file. Each record is an image's content hash (sha256 of its bytes,
//! so a renamed or copied file is still a hit, and an edited one is not) followed by its
//! features:
//!
//! ```text
//! header  b"DLPFEAT1", dim: u32 LE, 4 zero bytes
//! record  sha256 [32 bytes], dim × f32 LE      (repeated)
//! ```
//!
//! Records are only ever appended, each batch under an exclusive lock, so several processes
//! may share a cache. A partial record at the end (a crash mid-write) is ignored on reading and
//! cut off before the next append.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"DLPFEAT1";
const HEADER_LEN: u64 = 16;
/// Bumped when dlpipe's preprocessing changes in a way that changes features.
const PREPROCESSING_VERSION: &str = "1";

/// The sha256 of some bytes: an image's cache key.
pub type ContentHash = [u8; 32];

/// The content hash of an image's bytes.
pub fn content_hash(bytes: &[u8]) -> ContentHash {
    Sha256::digest(bytes).into()
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("feature cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("feature cache {path} is not a dlpipe feature cache (bad header); delete it to start afresh")]
    NotACache { path: PathBuf },
    #[error("feature cache {path} holds {found}-dimensional features, the model gives {expected}; delete it")]
    Dimension { path: PathBuf, found: usize, expected: usize },
    #[error("feature row has {got} values, the cache holds {expected}")]
    RowLength { expected: usize, got: usize },
}

/// The features cached for one featurizer, loaded in memory, and the records to append.
pub struct FeatureCache {
    path: PathBuf,
    dim: usize,
    index: HashMap<ContentHash, usize>,
    rows: Vec<f32>,
    unwritten: Vec<u8>,
}

impl FeatureCache {
    /// The cache file name for a model: its sha256 and input spec (as JSON), hashed.
    pub fn key(model_sha256: &str, input_spec_json: &str) -> String {
        let mut h = Sha256::new();
        h.update(model_sha256.as_bytes());
        h.update([0]);
        h.update(input_spec_json.as_bytes());
        h.update([0]);
        h.update(PREPROCESSING_VERSION.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Opens (or creates) the cache `dir/<key>.features` for `dim`-dimensional features.
    pub fn open(dir: &Path, key: &str, dim: usize) -> Result<FeatureCache, CacheError> {
        let path = dir.join(format!("{key}.features"));
        let io = |source| CacheError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io)?;
        file.lock_shared().map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        file.unlock().map_err(io)?;
        if !bytes.is_empty() {
            if bytes.len() < HEADER_LEN as usize || &bytes[..8] != MAGIC {
                return Err(CacheError::NotACache { path });
            }
            let found = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
            if found != dim {
                return Err(CacheError::Dimension { path, found, expected: dim });
            }
        }
        let mut cache = FeatureCache { path, dim, index: HashMap::new(), rows: Vec::new(), unwritten: Vec::new() };
        if bytes.is_empty() {
            return Ok(cache);
        }
        // Two processes may have featurized the same image: the first record wins.
        cache.reindex(&bytes[HEADER_LEN as usize..]);
        Ok(cache)
    }

    /// Indexes whole records; a torn last record is left out.
    fn reindex(&mut self, records: &[u8]) {
        let record = self.record_len();
        self.index.clear();
        self.rows.clear();
        for chunk in records.chunks_exact(record) {
            let key: ContentHash = chunk[..32].try_into().expect("32 bytes");
            if self.index.contains_key(&key) {
                continue;
            }
            self.index.insert(key, self.index.len());
            self.rows.extend(chunk[32..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))));
        }
    }

    fn record_len(&self) -> usize {
        32 + 4 * self.dim
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Images cached (including those not yet flushed).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The cached features of the image with this content hash.
    pub fn get(&self, key: &ContentHash) -> Option<&[f32]> {
        self.index.get(key).map(|&row| &self.rows[row * self.dim..(row + 1) * self.dim])
    }

    /// Adds an image's features; they reach the file on [`flush`](Self::flush).
    pub fn insert(&mut self, key: ContentHash, features: &[f32]) -> Result<(), CacheError> {
        if features.len() != self.dim {
            return Err(CacheError::RowLength { expected: self.dim, got: features.len() });
        }
        if self.index.contains_key(&key) {
            return Ok(());
        }
        self.index.insert(key, self.index.len());
        self.rows.extend_from_slice(features);
        self.unwritten.extend_from_slice(&key);
        for v in features {
            self.unwritten.extend_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Appends the records added since the last flush to the file, under an exclusive lock:
    /// writes the header if the file is empty and cuts off a partial record left by a crash.
    pub fn flush(&mut self) -> Result<(), CacheError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let io = |source| CacheError::Io { path: self.path.clone(), source };
        let mut file = OpenOptions::new().read(true).write(true).open(&self.path).map_err(io)?;
        file.lock().map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < HEADER_LEN {
            let mut header = [0u8; HEADER_LEN as usize];
            header[..8].copy_from_slice(MAGIC);
            header[8..12].copy_from_slice(&(self.dim as u32).to_le_bytes());
            file.set_len(0).map_err(io)?;
            file.write_all(&header).map_err(io)?;
        } else {
            let whole = HEADER_LEN + (len - HEADER_LEN) / self.record_len() as u64 * self.record_len() as u64;
            if whole != len {
                file.set_len(whole).map_err(io)?;
            }
            file.seek(SeekFrom::Start(whole)).map_err(io)?;
        }
        file.write_all(&self.unwritten).map_err(io)?;
        file.sync_data().map_err(io)?;
        file.unlock().map_err(io)?;
        self.unwritten.clear();
        Ok(())
    }
}

impl Drop for FeatureCache {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_survive_reopening_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (content_hash(b"image a"), content_hash(b"image b"));
        {
            let mut cache = FeatureCache::open(dir.path(), "k", 3).unwrap();
            assert!(cache.is_empty());
            cache.insert(a, &[1.0, 2.0, 3.0]).unwrap();
            assert!(matches!(cache.insert(b, &[1.0]), Err(CacheError::RowLength { .. })));
            cache.flush().unwrap();
        }
        let path = dir.path().join("k.features");
        // A crash in the middle of the next record.
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(&b[..20]);
        std::fs::write(&path, &torn).unwrap();
        let mut cache = FeatureCache::open(dir.path(), "k", 3).unwrap();
        assert_eq!(cache.get(&a), Some(&[1.0, 2.0, 3.0][..]));
        assert_eq!(cache.get(&b), None);
        cache.insert(b, &[4.0, 5.0, 6.0]).unwrap();
        drop(cache); // flushes
        let cache = FeatureCache::open(dir.path(), "k", 3).unwrap();
        assert_eq!((cache.len(), cache.get(&b)), (2, Some(&[4.0, 5.0, 6.0][..])));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_LEN + 2 * (32 + 12));
        assert!(matches!(FeatureCache::open(dir.path(), "k", 4), Err(CacheError::Dimension { found: 3, .. })));
        std::fs::write(dir.path().join("junk.features"), b"not a cache at all").unwrap();
        assert!(matches!(FeatureCache::open(dir.path(), "junk", 3), Err(CacheError::NotACache { .. })));
    }

    #[test]
    fn the_key_changes_with_the_model_and_the_preprocessing() {
        let base = FeatureCache::key("abc", "{\"height\":224}");
        assert_ne!(base, FeatureCache::key("abd", "{\"height\":224}"));
        assert_ne!(base, FeatureCache::key("abc", "{\"height\":256}"));
        assert_eq!(base, FeatureCache::key("abc", "{\"height\":224}"));
    }
}
