//! The inputs `dlpipe produce` publishes besides folders (lists of URIs as `train` reads them,
//! object-store prefixes), and the same URIs read by `featurize` and `predict`: against the real
//! broker and the real S3-compatible server (moto, started by `scripts/s3 start`).

mod common;

use base64::Engine;
use common::fashion;
use common::run::read_topic;
use common::s3::{bucket_with, signed, unsigned, Server};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A config for the CLI: the test broker, the models, the S3 server (on loopback, allowed), and
/// a feature cache of its own.
struct Cli {
    dir: tempfile::TempDir,
}

impl Cli {
    fn new(s: &Server) -> Cli {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "[model]\ndir = \"{models}\"\nbatch_size = 16\n\n[kafka]\nbrokers = \"{brokers}\"\n\n\
             [train]\nfeature_cache = \"{cache}\"\n\n[fetch]\nallowed_networks = [\"127.0.0.0/8\"]\n\n\
             [fetch.stores.s3]\nendpoint = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            s.endpoint,
            s.key_id,
            s.secret,
            models = common::root().join("models").display(),
            brokers = common::kafka_brokers(),
            cache = dir.path().join("features").display(),
        );
        std::fs::write(dir.path().join("config.toml"), toml).unwrap();
        Cli { dir }
    }

    /// `dlpipe -c CONFIG ARGS`, in the repository root.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dlpipe"))
            .arg("-c")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .current_dir(common::root())
            .output()
            .unwrap()
    }

    /// Like [`run`](Self::run), failing the test unless it succeeds; its stdout and stderr.
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "dlpipe {args:?} failed:\n{stderr}");
        (String::from_utf8(out.stdout).unwrap(), stderr)
    }

    /// Like [`run`](Self::run), failing the test unless it fails; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "dlpipe {args:?} succeeded:\n{stderr}");
        stderr
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `dlpipe produce ARGS` to a new topic of one partition (so its order is the produce order);
    /// the records published.
    fn produce(&self, name: &str, args: &[&str], want: usize) -> Vec<Value> {
        let topic = common::unique(name);
        self.ok(&[&["produce", "--partitions", "1", "--topic", &topic], args].concat());
        let records = read_topic(&topic, want + 1, Duration::from_secs(3));
        assert_eq!(records.len(), want, "{records:?}");
        records
    }
}

fn path_text(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn file_uri(path: &Path) -> String {
    format!("file://{}", std::fs::canonicalize(path).unwrap().display())
}

/// Records without their `ts` (feedback records carry the time they were made).
fn without_ts(records: Vec<Value>) -> Vec<Value> {
    records
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("ts");
            r
        })
        .collect()
}

/// A prefix is listed recursively in key order, only images, only below the prefix (not a
/// sibling that shares its first letters), labelled by the first sub-prefix; keys that need
/// percent-encoding round-trip through the published URIs (checked by --inline, which fetches
/// them back).
#[test]
fn produce_publishes_an_object_store_prefix() {
    let images = fashion(4, 0);
    let mut objects: Vec<(String, PathBuf)> =
        images.iter().enumerate().map(|(i, (p, c))| (format!("photos/{c}/{i}.png"), p.clone())).collect();
    objects.push(("photos/trouser/deep/x y%é.PNG".into(), images[1].0.clone()));
    objects.push(("photos/notes.txt".into(), common::root().join("Cargo.toml")));
    objects.push(("photos2/tshirt_top/9.png".into(), images[0].0.clone()));
    let bucket = bucket_with(unsigned(), "lists-prefix", &objects);
    let cli = Cli::new(unsigned());
    let prefix = format!("s3://{bucket}/photos/");
    let got = cli.produce("lists-prefix", &["--labels-from-dirs", &prefix], 5);
    let uri = |key: &str| format!("s3://{bucket}/photos/{key}");
    let record = |key: &str, label: &str| json!({"id": uri(key), "uri": uri(key), "label": label});
    let want = [
        record("dress/3.png", "dress"),
        record("pullover/2.png", "pullover"),
        record("trouser/1.png", "trouser"),
        record("trouser/deep/x%20y%25%C3%A9.PNG", "trouser"),
        record("tshirt_top/0.png", "tshirt_top"),
    ];
    assert_eq!(got, want);

    let inline = cli.produce("lists-inline", &["--inline", &format!("s3://{bucket}/photos")], 5);
    let bytes = |r: &Value| base64::engine::general_purpose::STANDARD.decode(r["image"].as_str().unwrap()).unwrap();
    let files = [&images[3].0, &images[2].0, &images[1].0, &images[1].0, &images[0].0];
    for ((record, want), file) in inline.iter().zip(&want).zip(files) {
        assert_eq!(record["id"], want["id"]);
        assert_eq!(record.get("label"), None, "no labels without --labels-from-dirs");
        assert_eq!(bytes(record), std::fs::read(file).unwrap(), "{}", record["id"]);
    }
}

/// A whole bucket (no prefix) is listed with signed requests; its top-level folders are the
/// classes, and an image outside any folder has no label to give.
#[test]
fn produce_publishes_a_whole_bucket_from_a_signed_store() {
    let images = fashion(2, 20);
    let objects: Vec<(String, PathBuf)> = images.iter().map(|(p, c)| (format!("{c}/a b.png"), p.clone())).collect();
    let bucket = bucket_with(signed(), "lists-bucket", &objects);
    let cli = Cli::new(signed());
    let got = cli.produce("lists-bucket", &["--labels-from-dirs", &format!("s3://{bucket}")], 2);
    let record = |class: &str| {
        let uri = format!("s3://{bucket}/{class}/a%20b.png");
        json!({"id": uri, "uri": uri, "label": class})
    };
    assert_eq!(got, [record("trouser"), record("tshirt_top")]);
    let bucket = bucket_with(signed(), "lists-loose", &[("top.png".into(), images[0].0.clone())]);
    let error = cli.fails(&["produce", "--labels-from-dirs", "--topic", "unused", &format!("s3://{bucket}/")]);
    let want = format!("s3://{bucket}/top.png is not inside a class sub-folder (--labels-from-dirs)");
    assert!(error.contains(&want), "{error}");
}

/// A list is published line by line: URIs as they are, relative paths as file:// URIs of the
/// files beside the list, labels where the list has them, `data:` URIs by list and line; its
/// --feedback records carry the same ids.
#[test]
fn produce_publishes_a_list_and_its_feedback_with_the_same_ids() {
    let images = fashion(3, 10);
    let bucket = bucket_with(signed(), "lists-csv", &[("a/0.png".into(), images[0].0.clone())]);
    let cli = Cli::new(signed());
    std::fs::copy(&images[1].0, cli.dir.path().join("local.png")).unwrap();
    let data = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"x"));
    let csv = cli.file(
        "list.csv",
        &format!("uri,label\ns3://{bucket}/a/0.png,tshirt_top\nlocal.png,trouser\n\n\"{data}\",pullover\n"),
    );
    let s3 = format!("s3://{bucket}/a/0.png");
    let local = path_text(&cli.dir.path().join("local.png")).to_owned();
    let data_id = format!("{}:5", csv.display());
    let want = [
        json!({"id": s3, "uri": s3, "label": "tshirt_top"}),
        json!({"id": local, "uri": file_uri(Path::new(&local)), "label": "trouser"}),
        json!({"id": data_id, "uri": data, "label": "pullover"}),
    ];
    assert_eq!(cli.produce("lists-csv", &[path_text(&csv)], 3), want);
    let feedback = without_ts(cli.produce("lists-feedback", &["--feedback", path_text(&csv)], 3));
    let labels = ["tshirt_top", "trouser", "pullover"];
    let want_feedback: Vec<Value> =
        want.iter().zip(labels).map(|(r, label)| json!({"id": r["id"], "label": label})).collect();
    assert_eq!(feedback, want_feedback);

    // A JSONL list without labels publishes none; --feedback then has nothing to send.
    let jsonl = cli.file("unlabelled.jsonl", &format!("{{\"uri\":\"{s3}\"}}\n"));
    assert_eq!(cli.produce("lists-jsonl", &[path_text(&jsonl)], 1), [json!({"id": s3, "uri": s3})]);
    let error = cli.fails(&["produce", "--feedback", "--topic", "unused", path_text(&jsonl)]);
    assert!(error.contains(&format!("{s3} has no label in its list")), "{error}");
}

/// `featurize` over a list of `s3://` URIs gives the features of the same images by file://,
/// bit for bit, computed from the fetched bytes (no cache) and from the cache, which is keyed by
/// the bytes' sha256 whatever the URI.
#[test]
fn featurize_reads_s3_uris_bit_for_bit_as_files() {
    let images = fashion(24, 40);
    let objects: Vec<(String, PathBuf)> =
        images.iter().enumerate().map(|(i, (p, c))| (format!("{c}/{i}.png"), p.clone())).collect();
    let bucket = bucket_with(signed(), "lists-featurize", &objects);
    let cli = Cli::new(signed());
    let files: String = images.iter().map(|(p, c)| format!("{},{c}\n", p.display())).collect();
    let uris: String = objects.iter().zip(&images).map(|((k, _), (_, c))| format!("s3://{bucket}/{k},{c}\n")).collect();
    let (files, uris) = (cli.file("files.csv", &files), cli.file("uris.csv", &uris));
    let featurize = |list: &Path, out: &str, extra: &[&str]| {
        let out = cli.dir.path().join(out);
        let (_, stderr) = cli.ok(&[&["featurize", "--data", path_text(list), "-o", path_text(&out)], extra].concat());
        (std::fs::read(&out).unwrap(), stderr)
    };
    let (by_file, stderr) = featurize(&files, "files.npy", &[]);
    assert!(stderr.contains("0 from the cache, 24 computed"), "{stderr}");
    let (by_s3, stderr) = featurize(&uris, "s3.npy", &["--no-cache"]);
    assert!(stderr.contains("features of 24 image(s)"), "{stderr}");
    assert_eq!(by_s3, by_file, "features of s3:// objects computed from their bytes");
    let (cached, stderr) = featurize(&uris, "cached.npy", &[]);
    assert!(stderr.contains("24 from the cache, 0 computed"), "{stderr}");
    assert_eq!(cached, by_file);
    let rows = std::fs::read_to_string(cli.dir.path().join("s3.rows.jsonl")).unwrap();
    assert!(rows.lines().next().unwrap().contains(&format!("s3://{bucket}/")), "{rows}");
}

/// `predict` takes `s3://` and `data:` URIs, and lists of them, and names what it sees exactly
/// as for the same files.
#[test]
fn predict_reads_s3_and_data_uris_as_files() {
    let images = fashion(3, 70);
    let objects: Vec<(String, PathBuf)> =
        images.iter().enumerate().map(|(i, (p, _))| (format!("p/{i}.png"), p.clone())).collect();
    let bucket = bucket_with(signed(), "lists-predict", &objects);
    let cli = Cli::new(signed());
    let data = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&images[2].0).unwrap())
    );
    let list = cli.file("uris.csv", &format!("s3://{bucket}/p/1.png\n"));
    let top = |args: &[&str]| -> Vec<(String, Value)> {
        let (stdout, _) = cli.ok(&[&["predict", "--json", "--top-k", "3"], args].concat());
        let lines = stdout.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
        lines.map(|l| (l["path"].as_str().unwrap().to_owned(), l["top_k"].clone())).collect()
    };
    let by_file = top(&images.iter().map(|(p, _)| path_text(p)).collect::<Vec<_>>());
    let by_uri = top(&[&format!("s3://{bucket}/p/0.png"), path_text(&list), &data]);
    assert_eq!(by_uri.len(), 3, "{by_uri:?}");
    assert_eq!(by_uri[0].0, format!("s3://{bucket}/p/0.png"));
    assert_eq!(by_uri[1].0, format!("s3://{bucket}/p/1.png"));
    assert!(by_uri[2].0.starts_with("data:image/png;base64,") && by_uri[2].0.ends_with('…'), "{}", by_uri[2].0);
    for (file, uri) in by_file.iter().zip(&by_uri) {
        assert!(file.1.as_array().is_some_and(|t| t.len() == 3), "{file:?}");
        assert_eq!(file.1, uri.1, "{} and {}", file.0, uri.0);
    }
}

/// A prefix with no images and a list line with a scheme dlpipe cannot fetch are errors that
/// name the prefix and the line, before anything is published, predicted or featurized.
#[test]
fn an_empty_prefix_and_an_unknown_scheme_are_named() {
    let bucket = bucket_with(unsigned(), "lists-bad", &[("docs/readme.txt".into(), common::root().join("Cargo.toml"))]);
    let cli = Cli::new(unsigned());
    for prefix in [format!("s3://{bucket}/docs/"), format!("s3://{bucket}/nothing/")] {
        let error = cli.fails(&["produce", "--topic", "unused", &prefix]);
        assert!(error.contains(&prefix) && error.contains("no images under this prefix"), "{error}");
    }
    let error = cli.fails(&["produce", "--topic", "unused", "s3://no-such-bucket-dlpipe-lists/x/"]);
    assert!(
        error.contains("s3://no-such-bucket-dlpipe-lists/x/") && error.contains("no such object (HTTP 404)"),
        "{error}"
    );
    let list = cli.file("bad.csv", &format!("uri,label\ns3://{bucket}/a.png,x\nftp://host/b.png,y\n"));
    let named = format!("{}, line 3", list.display());
    let error = cli.fails(&["produce", "--topic", "unused", path_text(&list)]);
    assert!(error.contains(&named) && error.contains("unsupported URI scheme `ftp:`"), "{error}");
    for args in [vec!["predict", path_text(&list)], vec!["featurize", "--data", path_text(&list), "-o", "unused.npy"]] {
        let error = cli.fails(&args);
        assert!(error.contains(&named) && error.contains("unsupported URI scheme `ftp:`"), "{args:?}: {error}");
    }
}
