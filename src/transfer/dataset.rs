//! Labelled image datasets: a folder with one sub-folder per class, or a CSV or JSONL list of
//! `uri,label`; and the stratified train/test split of one.

use crate::image::list_labelled_images;
pub use crate::learn::SplitMix64;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One labelled image. `uri` is a path, a `file://` URI or an `http(s)://` URI, as the stream
/// accepts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub uri: String,
    pub label: String,
}

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: cannot read the dataset: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no such folder or file")]
    Missing { path: PathBuf },
    #[error("{path} holds no labelled images: put each class's images in a sub-folder named after the class")]
    Empty { path: PathBuf },
    #[error(
        "{path}: {count} image(s) lie outside a class sub-folder (the first: {first}); move them into a folder \
         named after their class"
    )]
    Unlabelled { path: PathBuf, count: usize, first: PathBuf },
    #[error("{path}, line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{path}: a dataset list must end in .csv or .jsonl (or be a folder of class sub-folders)")]
    UnknownFormat { path: PathBuf },
    #[error("the test split ratio must be in [0, 1), got {0}")]
    Ratio(f64),
}

/// Reads a dataset: a folder of class sub-folders (recursively; sorted by path), a `.csv` with
/// columns `uri,label` (a header row naming them is optional), or a `.jsonl` of
/// `{"uri": ..., "label": ...}` objects (`"path"` is accepted for `"uri"`, so `dlpipe
/// featurize`'s row index is a dataset too). Relative paths in a list resolve against the
/// list's folder.
pub fn load(path: &Path) -> Result<Vec<Example>, DatasetError> {
    if path.is_dir() {
        return load_folder(path);
    }
    if !path.exists() {
        return Err(DatasetError::Missing { path: path.into() });
    }
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io { path: path.into(), source })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let examples = match extension.as_deref() {
        Some("csv") => parse_csv(path, &text, base)?,
        Some("jsonl") | Some("ndjson") => parse_jsonl(path, &text, base)?,
        _ => return Err(DatasetError::UnknownFormat { path: path.into() }),
    };
    if examples.is_empty() {
        return Err(DatasetError::Empty { path: path.into() });
    }
    Ok(examples)
}

fn load_folder(dir: &Path) -> Result<Vec<Example>, DatasetError> {
    let files =
        list_labelled_images(&[dir.to_path_buf()]).map_err(|source| DatasetError::Io { path: dir.into(), source })?;
    let unlabelled: Vec<&PathBuf> = files.iter().filter(|(_, l)| l.is_none()).map(|(p, _)| p).collect();
    if let Some(first) = unlabelled.first() {
        return Err(DatasetError::Unlabelled { path: dir.into(), count: unlabelled.len(), first: (*first).clone() });
    }
    if files.is_empty() {
        return Err(DatasetError::Empty { path: dir.into() });
    }
    Ok(files
        .into_iter()
        .map(|(path, label)| Example {
            uri: path.to_string_lossy().into_owned(),
            label: label.expect("unlabelled files refused above"),
        })
        .collect())
}

/// A plain relative path resolves against `base`; URIs and absolute paths stay as they are.
fn resolve(uri: &str, base: &Path) -> String {
    // `data:` URIs carry the image itself and have no `//`.
    let is_data = uri.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:"));
    if is_data || uri.contains("://") || Path::new(uri).is_absolute() {
        uri.to_string()
    } else {
        base.join(uri).to_string_lossy().into_owned()
    }
}

/// The error for line `line` of the list at `path`.
fn bad_line(path: &Path, line: usize, reason: String) -> DatasetError {
    DatasetError::Line { path: path.into(), line, reason }
}

/// The example on line `line` of the list at `path`.
fn example(uri: &str, label: &str, base: &Path, path: &Path, line: usize) -> Result<Example, DatasetError> {
    let (uri, label) = (uri.trim(), label.trim());
    if uri.is_empty() {
        return Err(bad_line(path, line, "the uri is empty".into()));
    }
    if label.is_empty() {
        return Err(bad_line(path, line, format!("{uri} has an empty label")));
    }
    Ok(Example { uri: resolve(uri, base), label: label.to_string() })
}

fn parse_csv(path: &Path, text: &str, base: &Path) -> Result<Vec<Example>, DatasetError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
    let mut out = Vec::new();
    let mut columns = (0, 1);
    for (i, record) in reader.records().enumerate() {
        let line = i + 1;
        let record = record.map_err(|e| bad_line(path, line, e.to_string()))?;
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if i == 0 {
            let names: Vec<String> = record.iter().map(|f| f.trim().to_ascii_lowercase()).collect();
            let find = |wanted: &[&str]| names.iter().position(|n| wanted.contains(&n.as_str()));
            if let (Some(u), Some(l)) = (find(&["uri", "path", "url"]), find(&["label", "class"])) {
                columns = (u, l);
                continue;
            }
        }
        let (Some(uri), Some(label)) = (record.get(columns.0), record.get(columns.1)) else {
            return Err(bad_line(path, line, format!("expected uri,label but found {} field(s)", record.len())));
        };
        out.push(example(uri, label, base, path, line)?);
    }
    Ok(out)
}

#[derive(serde::Deserialize)]
struct JsonExample {
    #[serde(alias = "path")]
    uri: String,
    label: Option<String>,
}

fn parse_jsonl(path: &Path, text: &str, base: &Path) -> Result<Vec<Example>, DatasetError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: JsonExample = serde_json::from_str(line)
            .map_err(|e| bad_line(path, i + 1, format!("not a {{\"uri\": ..., \"label\": ...}} object: {e}")))?;
        let label = parsed.label.ok_or_else(|| bad_line(path, i + 1, format!("{} has no label", parsed.uri)))?;
        out.push(example(&parsed.uri, &label, base, path, i + 1)?);
    }
    Ok(out)
}

/// Indices of a train/test split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// A stratified split: in every class, `round(ratio × n)` examples (at least one when the
/// class has two or more and `ratio > 0`, never all of them) go to the test side, chosen by a
/// shuffle seeded with `seed`. The same examples, ratio and seed give the same split, on any
/// machine. Both sides are in index order.
pub fn stratified_split(examples: &[Example], ratio: f64, seed: u64) -> Result<Split, DatasetError> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(DatasetError::Ratio(ratio));
    }
    let mut by_class: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_class.entry(&e.label).or_default().push(i);
    }
    let mut rng = SplitMix64(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for indices in by_class.into_values() {
        let mut indices = indices;
        shuffle(&mut indices, &mut rng);
        let n = indices.len();
        let mut take = (ratio * n as f64).round() as usize;
        if ratio > 0.0 && n >= 2 {
            take = take.clamp(1, n - 1);
        }
        let take = take.min(n.saturating_sub(1));
        test.extend_from_slice(&indices[..take]);
        train.extend_from_slice(&indices[take..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok(Split { train, test })
}

/// Fisher-Yates.
pub fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples(counts: &[(&str, usize)]) -> Vec<Example> {
        counts
            .iter()
            .flat_map(|(label, n)| {
                (0..*n).map(move |i| Example { uri: format!("{label}/{i}.png"), label: label.to_string() })
            })
            .collect()
    }

    #[test]
    fn the_split_is_stratified_disjoint_complete_and_reproducible() {
        let data = examples(&[("a", 100), ("b", 30), ("c", 2), ("d", 1)]);
        let split = stratified_split(&data, 0.2, 7).unwrap();
        let test_of = |label: &str| split.test.iter().filter(|&&i| data[i].label == label).count();
        assert_eq!((test_of("a"), test_of("b"), test_of("c"), test_of("d")), (20, 6, 1, 0));
        let mut all: Vec<usize> = split.train.iter().chain(&split.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..data.len()).collect::<Vec<_>>());
        assert_eq!(split, stratified_split(&data, 0.2, 7).unwrap());
        assert_ne!(split.test, stratified_split(&data, 0.2, 8).unwrap().test);
        assert!(stratified_split(&data, 0.0, 7).unwrap().test.is_empty());
        assert!(matches!(stratified_split(&data, 1.0, 7), Err(DatasetError::Ratio(_))));
    }

    #[test]
    fn csv_and_jsonl_lists_resolve_relative_paths_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("list.csv");
        std::fs::write(
            &csv,
            "uri,label\ncats/1.jpg,cat\n\"/abs/dog 2.jpg\",dog\nhttp://h/x.png,cat\n\"data:image/png;base64,iVBO\",cat\n",
        )
        .unwrap();
        let got = load(&csv).unwrap();
        assert_eq!(got[0].uri, dir.path().join("cats/1.jpg").to_string_lossy());
        assert_eq!(got[1], Example { uri: "/abs/dog 2.jpg".into(), label: "dog".into() });
        assert_eq!(got[2].uri, "http://h/x.png");
        assert_eq!(got[3].uri, "data:image/png;base64,iVBO");

        let headerless = dir.path().join("plain.csv");
        std::fs::write(&headerless, "a.png,x\nb.png\n").unwrap();
        let err = load(&headerless).unwrap_err().to_string();
        assert!(err.contains("plain.csv, line 2") && err.contains("expected uri,label"), "{err}");

        let jsonl = dir.path().join("list.jsonl");
        std::fs::write(&jsonl, "{\"uri\":\"a.png\",\"label\":\"x\"}\n{\"path\":\"/b.png\",\"label\":\"y\"}\n{oops\n")
            .unwrap();
        let err = load(&jsonl).unwrap_err().to_string();
        assert!(err.contains("list.jsonl, line 3"), "{err}");
        std::fs::write(&jsonl, "{\"uri\":\"a.png\",\"label\":\"x\"}\n{\"path\":\"/b.png\",\"label\":\"y\"}\n").unwrap();
        assert_eq!(load(&jsonl).unwrap()[1], Example { uri: "/b.png".into(), label: "y".into() });
    }

    #[test]
    fn a_folder_needs_class_sub_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cat")).unwrap();
        std::fs::write(dir.path().join("cat/1.png"), b"x").unwrap();
        assert_eq!(load(dir.path()).unwrap()[0].label, "cat");
        std::fs::write(dir.path().join("loose.png"), b"x").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("outside a class sub-folder") && err.contains("loose.png"), "{err}");
        assert!(matches!(load(&dir.path().join("nope")), Err(DatasetError::Missing { .. })));
    }
}
