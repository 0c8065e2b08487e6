//! `dlpipe produce`: publish image records (`{"id","uri","label"?}`) to a topic, or
//! (`--feedback`) their labels as feedback records (`{"id","label"}`), with the same ids.
//! Inputs are image files, folders, lists of URIs (`.csv` / `.jsonl`, as `train` reads them) and
//! object-store prefixes (`s3://bucket/photos/`, `gs://`, `az://`).
//! `--inline` puts each image's bytes in the record (`{"id","image":"<base64>","label"?}`),
//! `--raw` sends them as the message value with the id and label in headers (for
//! `pipeline.input_format = "raw"`).

use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::fetch::Fetcher;
use dlpipe::image::{list_labelled_images, IMAGE_EXTENSIONS};
use dlpipe::kafka::{client_config, ensure_topic, topic_partitions, wait_for_cluster, Publisher, TopicSpec};
use dlpipe::transfer::dataset;
use dlpipe_operators::records::{ID_HEADER, LABEL_HEADER};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct ProduceArgs {
    /// Topic to publish to [default: pipeline.input_topic; with --feedback,
    /// pipeline.feedback_topic].
    #[arg(long)]
    topic: Option<String>,
    /// Label each record with the name of its class sub-folder (or, under an object-store
    /// prefix, its first sub-prefix). A list's labels are published without it.
    #[arg(long)]
    labels_from_dirs: bool,
    /// Publish each image's label (its class sub-folder, or its label in a list) as a feedback
    /// record `{"id","label"}` rather than an image record: the late labels of images
    /// published without --labels-from-dirs (same inputs, same --shuffle and --limit: same ids).
    #[arg(long, conflicts_with = "labels_from_dirs")]
    feedback: bool,
    /// Carry each image's bytes in its record, base64 in an `image` field, rather than its
    /// URI (URIs are fetched as the pipeline would: fetch.* applies).
    #[arg(long, conflicts_with_all = ["feedback", "raw"])]
    inline: bool,
    /// Send each image's bytes as the message value, the id and label in the `dlpipe-id` and
    /// `dlpipe-label` headers (for pipeline.input_format = "raw").
    #[arg(long, conflicts_with = "feedback")]
    raw: bool,
    /// Records per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Shuffle the records with this seed (class folders otherwise arrive one after another).
    #[arg(long, value_name = "SEED")]
    shuffle: Option<u64>,
    /// Publish at most this many records.
    #[arg(long)]
    limit: Option<usize>,
    /// Partitions of the topic if it has to be created [default: pipeline.topic_partitions].
    #[arg(long)]
    partitions: Option<i32>,
    /// Image files; folders (searched recursively); lists of URIs, `.csv` (uri[,label]) or
    /// `.jsonl` ({"uri","label"?}), each URI checked line by line; object-store prefixes,
    /// `s3://bucket/photos/`, `gs://...` or `az://...` (every image below it, recursively, in key order).
    #[arg(required = true, value_name = "DIR|FILES|LIST|PREFIX")]
    inputs: Vec<String>,
}

/// Where one record's image is.
enum Source {
    /// A local file: published as its canonical file:// URI, read directly for the bytes.
    File(PathBuf),
    /// A URI, published as it is, fetched through the Fetcher for the bytes.
    Uri(String),
}

/// One record to publish.
struct Item {
    /// Its id, also the message key: the path as given, the URI, or for a `data:` URI in a
    /// list `LIST:LINE` (deterministic, so that --feedback gives the same ids).
    id: String,
    source: Source,
    /// The class sub-folder or sub-prefix, or the list's label.
    label: Option<String>,
    /// A list's label goes into image records without --labels-from-dirs.
    listed: bool,
}

/// A small deterministic generator for `--shuffle` (splitmix64), so a seed always gives the same order.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        items.swap(i, (next() % (i as u64 + 1)) as usize);
    }
}

pub fn run(config: &Config, args: ProduceArgs) -> anyhow::Result<()> {
    let topic = match (args.topic.clone(), args.feedback) {
        (Some(topic), _) => topic,
        (None, false) => config.pipeline.input_topic.clone(),
        (None, true) if config.pipeline.feedback_topic.is_empty() => {
            anyhow::bail!("--feedback: pipeline.feedback_topic is not set; set it in the config, or give --topic")
        }
        (None, true) => config.pipeline.feedback_topic.clone(),
    };
    // Only lists and URIs need one; folders of files are read directly, as before.
    let needs_fetcher = args.inputs.iter().any(|i| dataset::is_uri(i) || dataset::is_list(Path::new(i)));
    let fetcher = needs_fetcher.then(|| Fetcher::new(config.fetch.clone())).transpose()?;
    let mut items = collect_items(&args.inputs, fetcher.as_ref())?;
    if let Some(seed) = args.shuffle {
        shuffle(&mut items, seed);
    }
    if let Some(limit) = args.limit {
        items.truncate(limit);
    }
    if items.is_empty() {
        anyhow::bail!("no images found in {:?}", args.inputs);
    }
    check_labels(&args, &items)?;
    prepare_topic(config, &args, &topic)?;
    let publisher = Publisher::new(&config.kafka)?;
    let progress = ProgressBar::new(items.len() as u64).with_style(
        ProgressStyle::with_template("producing {bar:40} {pos}/{len} [{elapsed_precise}] {per_sec}").expect("valid"),
    );
    let started = Instant::now();
    let max_bytes = config.image.max_encoded_bytes;
    for (i, item) in items.iter().enumerate() {
        let label = item.label.as_deref().filter(|_| args.labels_from_dirs || item.listed);
        if args.raw {
            let bytes = bytes_of(item, fetcher.as_ref(), max_bytes)?;
            let mut headers = vec![(ID_HEADER, item.id.as_str())];
            if let Some(label) = label {
                headers.push((LABEL_HEADER, label));
            }
            publisher.send_with_headers(&topic, &item.id, &bytes, &headers)?;
        } else {
            let record = record_of(&args, item, label, fetcher.as_ref(), max_bytes)?;
            publisher.send(&topic, &item.id, &record.to_string())?;
        }
        progress.inc(1);
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64((i + 1) as f64 / args.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let acked = publisher.finish(Duration::from_secs(60))?;
    progress.finish_and_clear();
    eprintln!("published {acked} record(s) to {topic} in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Refuses, before anything is published, an image without the label that --labels-from-dirs
/// or --feedback needs.
fn check_labels(args: &ProduceArgs, items: &[Item]) -> anyhow::Result<()> {
    let Some(item) = items.iter().find(|i| i.label.is_none()) else { return Ok(()) };
    let place = if item.listed { "has no label in its list" } else { "is not inside a class sub-folder" };
    match (args.labels_from_dirs, args.feedback) {
        (true, _) => anyhow::bail!("{} {place} (--labels-from-dirs)", item.id),
        (_, true) => anyhow::bail!("{} {place}: --feedback has no label for it", item.id),
        _ => Ok(()),
    }
}

/// Creates the topic if the config lets dlpipe create topics, else checks that it exists.
fn prepare_topic(config: &Config, args: &ProduceArgs, topic: &str) -> anyhow::Result<()> {
    wait_for_cluster(&config.kafka)?;
    let p = &config.pipeline;
    if p.create_topics {
        let partitions = args.partitions.unwrap_or(p.topic_partitions);
        let properties = p.topic_properties();
        let shared: Vec<(&str, &str)> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let spec = TopicSpec { partitions, replication_factor: p.topic_replication_factor, configs: &shared };
        ensure_topic(&config.kafka, topic, spec)?;
    } else {
        let consumer: rdkafka::consumer::BaseConsumer = client_config(&config.kafka).create()?;
        topic_partitions(&consumer, &config.kafka, topic, false)?;
    }
    Ok(())
}

/// The records of every input, in the order given: files and folders as listed on disk, lists
/// line by line, prefixes in key order.
fn collect_items(inputs: &[String], fetcher: Option<&Fetcher>) -> anyhow::Result<Vec<Item>> {
    let mut items = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if dataset::is_uri(input) {
            items.extend(prefix_items(fetcher.expect("made for URIs"), input)?);
        } else if dataset::is_list(path) && path.is_file() {
            items.extend(list_items(fetcher.expect("made for lists"), path)?);
        } else {
            let files = list_labelled_images(&[path.to_path_buf()]).with_context(|| input.clone())?;
            items.extend(files.into_iter().map(|(path, label)| Item {
                id: path.display().to_string(),
                source: Source::File(path),
                label,
                listed: false,
            }));
        }
    }
    Ok(items)
}

/// The entries of a list, each URI checked (scheme, local files allowed) before anything is
/// published, so that a typo fails here naming its line rather than as dead letters.
fn list_items(fetcher: &Fetcher, list: &Path) -> anyhow::Result<Vec<Item>> {
    dataset::read_list(list)?
        .into_iter()
        .map(|entry| {
            let source = if dataset::is_uri(&entry.uri) {
                fetcher.check(&entry.uri).with_context(|| format!("{}, line {}", list.display(), entry.line))?;
                Source::Uri(entry.uri.clone())
            } else {
                Source::File(PathBuf::from(&entry.uri))
            };
            let is_data = entry.uri.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:"));
            let id = if is_data { format!("{}:{}", list.display(), entry.line) } else { entry.uri };
            Ok(Item { id, source, label: entry.label, listed: true })
        })
        .collect()
}

/// The images under an object-store prefix, labelled with their first sub-prefix below it.
fn prefix_items(fetcher: &Fetcher, prefix: &str) -> anyhow::Result<Vec<Item>> {
    let uris = fetcher.list(prefix)?;
    let base = format!("{}/", prefix.trim_end_matches('/'));
    let images: Vec<Item> = uris
        .into_iter()
        .filter(|uri| {
            let extension = uri.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
            extension.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
        })
        .map(|uri| {
            let below = uri.strip_prefix(&base).unwrap_or_default();
            // A label is a folder below the prefix, not the object's own name.
            let label = below.split_once('/').map(|(first, _)| decoded(first));
            Item { id: uri.clone(), source: Source::Uri(uri), label, listed: false }
        })
        .collect();
    if images.is_empty() {
        anyhow::bail!("{prefix}: no images under this prefix (looked for {})", IMAGE_EXTENSIONS.join(", "));
    }
    Ok(images)
}

/// A percent-encoded URI segment as text (listed keys are encoded; labels are not).
fn decoded(segment: &str) -> String {
    let bytes = dlpipe::fetch::percent_decode(segment).unwrap_or_else(|| segment.as_bytes().to_vec());
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An image's bytes: read from its file, or fetched.
fn bytes_of(item: &Item, fetcher: Option<&Fetcher>, max_bytes: u64) -> anyhow::Result<Vec<u8>> {
    match &item.source {
        Source::File(path) => std::fs::read(path).with_context(|| format!("{}", path.display())),
        Source::Uri(uri) => Ok(fetcher.expect("made for URIs").fetch(uri, max_bytes)?),
    }
}

/// The JSON record of one image: its feedback label, its base64 bytes (`--inline`) or its URI
/// (a file's canonical file:// URI).
fn record_of(
    args: &ProduceArgs,
    item: &Item,
    label: Option<&str>,
    fetcher: Option<&Fetcher>,
    max_bytes: u64,
) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let id = item.id.as_str();
    let mut record = if args.feedback {
        let label = item.label.as_deref().expect("checked by check_labels");
        serde_json::json!({ "id": id, "label": label, "ts": dlpipe_operators::records::now_ms() })
    } else if args.inline {
        let bytes = bytes_of(item, fetcher, max_bytes)?;
        serde_json::json!({ "id": id, "image": base64::engine::general_purpose::STANDARD.encode(bytes) })
    } else {
        let uri = match &item.source {
            Source::File(path) => {
                let absolute = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
                format!("file://{}", absolute.display())
            }
            Source::Uri(uri) => uri.clone(),
        };
        serde_json::json!({ "id": id, "uri": uri })
    };
    if let (false, Some(label)) = (args.feedback, label) {
        record["label"] = label.into();
    }
    Ok(record)
}
