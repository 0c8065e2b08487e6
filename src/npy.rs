//! NumPy `.npy` files of f32 matrices: the feature files `dlpipe featurize` writes, loadable with
//! a bare `numpy.load` (and memory-mappable with `mmap_mode="r"`).
//!
//! [`NpyWriter`] streams rows to disk without knowing their number in advance: it reserves a
//! fixed-size header and rewrites it with the final shape on [`NpyWriter::finish`].

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"\x93NUMPY\x01\x00";
/// Bytes of magic + length + header dict + padding; a multiple of 64 as the format asks, and
/// room for any shape of two u64s.
const HEADER_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a 2-d little-endian f32 .npy file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: row has {got} values, the file's rows have {want}")]
    RowWidth { path: PathBuf, got: usize, want: usize },
}

fn header(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    let mut out = MAGIC.to_vec();
    let dict_len = HEADER_LEN - MAGIC.len() - 2;
    out.extend_from_slice(&(dict_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(HEADER_LEN - 1, b' ');
    out.push(b'\n');
    out
}

/// Writes a `rows x cols` f32 matrix row by row.
pub struct NpyWriter {
    file: BufWriter<File>,
    path: PathBuf,
    cols: usize,
    rows: usize,
}

impl NpyWriter {
    pub fn create(path: &Path, cols: usize) -> Result<NpyWriter, NpyError> {
        let io = |source| NpyError::Io { path: path.into(), source };
        let mut file = BufWriter::new(File::create(path).map_err(io)?);
        file.write_all(&header(0, cols)).map_err(io)?;
        Ok(NpyWriter { file, path: path.into(), cols, rows: 0 })
    }

    pub fn push(&mut self, row: &[f32]) -> Result<(), NpyError> {
        if row.len() != self.cols {
            return Err(NpyError::RowWidth { path: self.path.clone(), got: row.len(), want: self.cols });
        }
        let mut bytes = Vec::with_capacity(row.len() * 4);
        for v in row {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.file.write_all(&bytes).map_err(|source| NpyError::Io { path: self.path.clone(), source })?;
        self.rows += 1;
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Writes the final shape into the header and flushes.
    pub fn finish(mut self) -> Result<usize, NpyError> {
        let io = |source| NpyError::Io { path: self.path.clone(), source };
        self.file.flush().map_err(io)?;
        let file = self.file.get_mut();
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&header(self.rows, self.cols)).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(self.rows)
    }
}

/// Reads a 2-d little-endian f32 `.npy` file: (rows, cols, values row-major).
pub fn read_f32(path: &Path) -> Result<(usize, usize, Vec<f32>), NpyError> {
    let io = |source| NpyError::Io { path: path.into(), source };
    let bad = |reason: String| NpyError::Format { path: path.into(), reason };
    let mut file = BufReader::new(File::open(path).map_err(io)?);
    let mut prefix = [0u8; 10];
    file.read_exact(&mut prefix).map_err(io)?;
    if &prefix[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic".into()));
    }
    let dict_len = match prefix[6] {
        1 => usize::from(u16::from_le_bytes([prefix[8], prefix[9]])),
        2 | 3 => {
            let mut more = [0u8; 2];
            file.read_exact(&mut more).map_err(io)?;
            u32::from_le_bytes([prefix[8], prefix[9], more[0], more[1]]) as usize
        }
        v => return Err(bad(format!("format version {v}"))),
    };
    let mut dict = vec![0u8; dict_len];
    file.read_exact(&mut dict).map_err(io)?;
    let dict = String::from_utf8_lossy(&dict);
    if !dict.contains("'descr': '<f4'") || !dict.contains("'fortran_order': False") {
        return Err(bad(format!("header {}", dict.trim())));
    }
    let shape =
        dict.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).ok_or_else(|| bad("no shape".into()))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad(format!("shape ({shape})"))))
        .collect::<Result<_, _>>()?;
    let [rows, cols] = dims[..] else { return Err(bad(format!("shape ({shape}) is not 2-d"))) };
    let mut bytes = Vec::with_capacity(rows * cols * 4);
    file.read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() != rows * cols * 4 {
        return Err(bad(format!("{} data bytes for shape ({rows}, {cols})", bytes.len())));
    }
    let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Ok((rows, cols, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_the_header_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let mut w = NpyWriter::create(&path, 3).unwrap();
        w.push(&[1.0, 2.0, 3.0]).unwrap();
        w.push(&[-0.5, f32::MAX, 0.0]).unwrap();
        assert!(matches!(w.push(&[1.0]), Err(NpyError::RowWidth { got: 1, want: 3, .. })));
        assert_eq!(w.finish().unwrap(), 2);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN + 2 * 3 * 4);
        assert!(String::from_utf8_lossy(&bytes[..HEADER_LEN]).contains("'shape': (2, 3)"));
        let (rows, cols, values) = read_f32(&path).unwrap();
        assert_eq!((rows, cols), (2, 3));
        assert_eq!(values, vec![1.0, 2.0, 3.0, -0.5, f32::MAX, 0.0]);
    }
}
