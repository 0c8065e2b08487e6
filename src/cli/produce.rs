//! `dlpipe produce`: publish image records (`{"id","uri","label"?}`) for files to a topic, or
//! (`--feedback`) their labels as feedback records (`{"id","label"}`), with the same ids.
//! `--inline` puts each file's bytes in the record (`{"id","image":"<base64>","label"?}`),
//! `--raw` sends them as the message value with the id and label in headers (for
//! `pipeline.input_format = "raw"`).

use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::image::list_labelled_images;
use dlpipe::kafka::{client_config, ensure_topic, topic_partitions, wait_for_cluster, Publisher, TopicSpec};
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
    /// Label each record with the name of its class sub-folder.
    #[arg(long)]
    labels_from_dirs: bool,
    /// Publish each file's label (its class sub-folder) as a feedback record
    /// `{"id","label"}` rather than an image record: the late labels of images published
    /// without --labels-from-dirs (same files, same --shuffle and --limit: same ids).
    #[arg(long, conflicts_with = "labels_from_dirs")]
    feedback: bool,
    /// Carry each file's bytes in its record, base64 in an `image` field, rather than its
    /// file:// URI.
    #[arg(long, conflicts_with_all = ["feedback", "raw"])]
    inline: bool,
    /// Send each file's bytes as the message value, the id and label in the `dlpipe-id` and
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
    /// Image files, or folders (searched recursively).
    #[arg(required = true, value_name = "DIR|FILES")]
    inputs: Vec<PathBuf>,
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
    let mut files = list_labelled_images(&args.inputs)?;
    if let Some(seed) = args.shuffle {
        shuffle(&mut files, seed);
    }
    if let Some(limit) = args.limit {
        files.truncate(limit);
    }
    if files.is_empty() {
        anyhow::bail!("no images found in {:?}", args.inputs);
    }
    wait_for_cluster(&config.kafka)?;
    let p = &config.pipeline;
    if p.create_topics {
        let partitions = args.partitions.unwrap_or(p.topic_partitions);
        ensure_topic(
            &config.kafka,
            &topic,
            TopicSpec { partitions, replication_factor: p.topic_replication_factor, configs: &[] },
        )?;
    } else {
        let consumer: rdkafka::consumer::BaseConsumer = client_config(&config.kafka).create()?;
        topic_partitions(&consumer, &config.kafka, &topic, false)?;
    }
    let publisher = Publisher::new(&config.kafka)?;
    let progress = ProgressBar::new(files.len() as u64).with_style(
        ProgressStyle::with_template("producing {bar:40} {pos}/{len} [{elapsed_precise}] {per_sec}").expect("valid"),
    );
    let started = Instant::now();
    for (i, (path, label)) in files.iter().enumerate() {
        let id = path.display().to_string();
        if args.labels_from_dirs && label.is_none() {
            anyhow::bail!("{} is not inside a class sub-folder (--labels-from-dirs)", path.display())
        }
        if args.raw {
            let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
            let mut headers = vec![(ID_HEADER, id.as_str())];
            if let (true, Some(label)) = (args.labels_from_dirs, label) {
                headers.push((LABEL_HEADER, label.as_str()));
            }
            publisher.send_with_headers(&topic, &id, &bytes, &headers)?;
        } else {
            publisher.send(&topic, &id, &record_of(&args, path, &id, label.as_deref())?.to_string())?;
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

/// The JSON record of one file: its feedback label, its image's base64 bytes (`--inline`) or
/// its file:// URI.
fn record_of(args: &ProduceArgs, path: &Path, id: &str, label: Option<&str>) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let mut record = if args.feedback {
        let Some(label) = label else {
            anyhow::bail!("{} is not inside a class sub-folder: --feedback has no label for it", path.display())
        };
        serde_json::json!({ "id": id, "label": label, "ts": dlpipe_operators::records::now_ms() })
    } else if args.inline {
        let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        serde_json::json!({ "id": id, "image": base64::engine::general_purpose::STANDARD.encode(bytes) })
    } else {
        let absolute = std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?;
        serde_json::json!({ "id": id, "uri": format!("file://{}", absolute.display()) })
    };
    if let (true, Some(label)) = (args.labels_from_dirs, label) {
        record["label"] = label.into();
    }
    Ok(record)
}
