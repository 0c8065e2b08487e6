//! Labelled image datasets: a folder with one sub-folder per class, or a CSV or JSONL list of
//! `uri,label`; and the stratified train/test split of one.

use crate::image::list_labelled_images;
pub use crate::learn::SplitMix64;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One labelled image. `uri` is a path or any URI the stream accepts (`file://`, `http(s)://`,
/// `s3://`, `data:`).
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

/// Reads a dataset: a folder of class sub-folders (recursively; sorted by path), or a list
/// ([`read_list`]) in which every line has a label.
pub fn load(path: &Path) -> Result<Vec<Example>, DatasetError> {
    load_checked(path, |_| Ok::<(), std::convert::Infallible>(()))
}

/// Like [`load`], with every URI of a list passed to `check` (e.g. `Fetcher::check`: a scheme
/// dlpipe cannot fetch); a URI it refuses is an error naming its line.
pub fn load_checked<E: std::fmt::Display>(
    path: &Path,
    check: impl Fn(&str) -> Result<(), E>,
) -> Result<Vec<Example>, DatasetError> {
    if path.is_dir() {
        return load_folder(path);
    }
    read_list(path)?
        .into_iter()
        .map(|entry| {
            if is_uri(&entry.uri) {
                check(&entry.uri).map_err(|e| bad_line(path, entry.line, e.to_string()))?;
            }
            match entry.label {
                Some(label) => Ok(Example { uri: entry.uri, label }),
                None => Err(bad_line(path, entry.line, format!("{} has no label (expected uri,label)", entry.uri))),
            }
        })
        .collect()
}

/// One line of a list: its URI (a relative path resolved against the list's folder), its label
/// if the line gives one, and its line number (from 1), for errors that name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub uri: String,
    pub label: Option<String>,
    pub line: usize,
}

/// Reads a list of images: a `.csv` with columns `uri,label` (a header row naming them is
/// optional; the label column may be missing or empty), or a `.jsonl` of `{"uri": ...,
/// "label": ...}` objects (`"path"` is accepted for `"uri"`, so `dlpipe featurize`'s row index
/// is a list too; `"label"` is optional). Relative paths resolve against the list's folder.
/// `train`, `evaluate`, `featurize`, `predict` and `produce` all read lists with this.
pub fn read_list(path: &Path) -> Result<Vec<ListEntry>, DatasetError> {
    if !path.exists() {
        return Err(DatasetError::Missing { path: path.into() });
    }
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io { path: path.into(), source })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let entries = match list_format(path) {
        Some(ListFormat::Csv) => parse_csv(path, &text, base)?,
        Some(ListFormat::Jsonl) => parse_jsonl(path, &text, base)?,
        None => return Err(DatasetError::UnknownFormat { path: path.into() }),
    };
    if entries.is_empty() {
        return Err(DatasetError::Empty { path: path.into() });
    }
    Ok(entries)
}

enum ListFormat {
    Csv,
    Jsonl,
}

/// The list format its extension names (`.csv`, `.jsonl` or `.ndjson`, in any case), if any.
fn list_format(path: &Path) -> Option<ListFormat> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "csv" => Some(ListFormat::Csv),
        "jsonl" | "ndjson" => Some(ListFormat::Jsonl),
        _ => None,
    }
}

/// Whether `path` names a list by its extension (whether or not it exists).
pub fn is_list(path: &Path) -> bool {
    list_format(path).is_some()
}

/// Whether `text` is a URI (`scheme://...` or a `data:` URI) rather than a plain path.
pub fn is_uri(text: &str) -> bool {
    // `data:` URIs carry the image itself and have no `//`.
    text.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:")) || text.contains("://")
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
    if is_uri(uri) || Path::new(uri).is_absolute() {
        uri.to_string()
    } else {
        base.join(uri).to_string_lossy().into_owned()
    }
}

/// The error for line `line` of the list at `path`.
fn bad_line(path: &Path, line: usize, reason: String) -> DatasetError {
    DatasetError::Line { path: path.into(), line, reason }
}

/// The entry on line `line` of the list at `path`; an empty label is no label.
fn entry(uri: &str, label: Option<&str>, base: &Path, path: &Path, line: usize) -> Result<ListEntry, DatasetError> {
    let uri = uri.trim();
    if uri.is_empty() {
        return Err(bad_line(path, line, "the uri is empty".into()));
    }
    let label = label.map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned);
    Ok(ListEntry { uri: resolve(uri, base), label, line })
}

fn parse_csv(path: &Path, text: &str, base: &Path) -> Result<Vec<ListEntry>, DatasetError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
    let mut out = Vec::new();
    let mut columns = (0, Some(1));
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(i + 1, |p| line_at(text, p.byte()));
            bad_line(path, line, e.to_string())
        })?;
        let line = record.position().map_or(i + 1, |p| line_at(text, p.byte()));
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        if i == 0 {
            let names: Vec<String> = record.iter().map(|f| f.trim().to_ascii_lowercase()).collect();
            let find = |wanted: &[&str]| names.iter().position(|n| wanted.contains(&n.as_str()));
            if let Some(u) = find(&["uri", "path", "url"]) {
                columns = (u, find(&["label", "class"]));
                continue;
            }
        }
        let Some(uri) = record.get(columns.0) else {
            return Err(bad_line(path, line, format!("expected uri,label but found {} field(s)", record.len())));
        };
        out.push(entry(uri, columns.1.and_then(|l| record.get(l)), base, path, line)?);
    }
    Ok(out)
}

/// The line (from 1) of the record that starts at `byte`. The reader skips blank lines and
/// puts a record's start before those it skipped, so they are stepped over here.
fn line_at(text: &str, byte: u64) -> usize {
    let bytes = text.as_bytes();
    let mut at = (byte as usize).min(bytes.len());
    while at < bytes.len() && matches!(bytes[at], b'\n' | b'\r') {
        at += 1;
    }
    bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1
}

#[derive(serde::Deserialize)]
struct JsonExample {
    #[serde(alias = "path")]
    uri: String,
    label: Option<String>,
}

fn parse_jsonl(path: &Path, text: &str, base: &Path) -> Result<Vec<ListEntry>, DatasetError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: JsonExample = serde_json::from_str(line)
            .map_err(|e| bad_line(path, i + 1, format!("not a {{\"uri\": ..., \"label\": ...}} object: {e}")))?;
        out.push(entry(&parsed.uri, parsed.label.as_deref(), base, path, i + 1)?);
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
    fn lists_may_leave_labels_out_but_datasets_may_not() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("uris.CSV");
        std::fs::write(&csv, "uri\ns3://b/cat/1.png\n\r\n\n a.png \n").unwrap();
        let got = read_list(&csv).unwrap();
        let want = [("s3://b/cat/1.png".to_owned(), 2), (dir.path().join("a.png").to_string_lossy().into_owned(), 5)];
        assert_eq!(got.iter().map(|e| (e.uri.clone(), e.line)).collect::<Vec<_>>(), want);
        assert!(got.iter().all(|e| e.label.is_none()));
        let err = load(&csv).unwrap_err().to_string();
        assert!(err.contains("uris.CSV, line 2") && err.contains("s3://b/cat/1.png has no label"), "{err}");
        let mixed = dir.path().join("mixed.csv");
        std::fs::write(&mixed, "a.png,cat\nb.png,\nc.png\n").unwrap();
        let labels: Vec<Option<String>> = read_list(&mixed).unwrap().into_iter().map(|e| e.label).collect();
        assert_eq!(labels, [Some("cat".to_owned()), None, None]);
        let jsonl = dir.path().join("l.jsonl");
        std::fs::write(&jsonl, "{\"uri\":\"data:image/png;base64,AA\"}\n").unwrap();
        assert_eq!(
            read_list(&jsonl).unwrap(),
            [ListEntry { uri: "data:image/png;base64,AA".into(), label: None, line: 1 }]
        );
        assert!(is_list(Path::new("x.JSONL")) && !is_list(Path::new("x.png")));
        assert!(is_uri("S3://b/k") && is_uri("DATA:image/png,x") && !is_uri("/a/b.png"));
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
