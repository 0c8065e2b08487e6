//! `dlpipe run`: the streaming pipeline, built from the operators of `dlpipe-operators` and the
//! library's image, model and learning code.
//!
//! Every timely worker (of every process) reads its share of the input topic's partitions,
//! prepares records on a thread pool, runs the model on its device (devices are given to
//! workers round-robin), predicts with a classifier that every worker holds identically, and
//! publishes predictions and dead letters for the partitions it reads, committing their offsets
//! once published.

mod heads;

pub use heads::{ImagenetHead, OnlineLrHead, Snapshots};

use crate::config::{Config, HeadKind, StartFrom};
use crate::fetch::Fetcher;
use crate::image::{decode, Preprocess};
use crate::kafka::{client_config, ensure_topic};
use crate::learn::SoftmaxRegression;
use crate::model::{parse_device, resolve, Featurizer, OutputKind};
use dlpipe_operators::{
    featurize, fetch_decode, kafka_sink, kafka_source, learn_predict, Backlog, Batching, DeadLetter, Epoch, Fatal,
    Featured, ImageRecord, LabelledExample, ModelRow, Outcome, PartitionRange, PrepareError, SinkContext, SinkSpec,
    SourceSpec,
};
use fast_image_resize::Resizer;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::BaseProducer;
use rdkafka::{Offset, TopicPartitionList};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::vec::{Broadcast, Filter, Map};
use timely::dataflow::operators::{Concat, OkErr, Probe};

/// What one worker did, reported when the pipeline stops.
#[derive(Debug, Clone, Default)]
pub struct WorkerSummary {
    pub worker: usize,
    pub partitions: Vec<i32>,
    /// Labelled examples the worker's classifier learned, its prequential accuracy.
    pub updates: u64,
    pub accuracy: Option<f64>,
}

/// Options of one run beyond the config file.
pub struct RunOptions {
    pub config: Config,
    /// Timely's own arguments: -w, -n, -p, -h.
    pub timely_args: Vec<String>,
    /// Start the online classifier from this classifier file or snapshot.
    pub init_model: Option<PathBuf>,
    /// Set to stop gracefully (SIGINT/SIGTERM): read no more, publish what is in flight, commit.
    pub stop: Arc<AtomicBool>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the pipeline until it stops (stop requested, stop-at-end reached, or an error).
pub fn run(options: RunOptions) -> anyhow::Result<Vec<WorkerSummary>> {
    let RunOptions { config, timely_args, init_model, stop } = options;
    config.validate().map_err(anyhow::Error::msg)?;
    if config.model.intra_op_threads > 0 {
        tch::set_num_threads(config.model.intra_op_threads as i32);
    }
    let config = Arc::new(config);
    let timely_config = timely::Config::from_args(timely_args.into_iter()).map_err(anyhow::Error::msg)?;
    let guards = timely::execute(timely_config, move |worker| {
        run_worker(worker, &config, init_model.as_deref(), &stop).map_err(|e| format!("{e:#}"))
    })
    .map_err(anyhow::Error::msg)?;
    let mut summaries = Vec::new();
    for result in guards.join() {
        summaries.push(result.map_err(anyhow::Error::msg)?.map_err(anyhow::Error::msg)?);
    }
    Ok(summaries)
}

// Dead letters travel through the dataflow as data, in `Result`s; boxing them buys nothing.
#[allow(clippy::result_large_err)]
fn run_worker(
    worker: &mut timely::worker::Worker,
    config: &Config,
    init_model: Option<&std::path::Path>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<WorkerSummary> {
    let (index, peers) = (worker.index(), worker.peers());
    let p = &config.pipeline;
    if index == 0 && p.create_topics_partitions > 0 {
        for topic in [&p.input_topic, &p.predictions_topic, &p.dead_letter_topic] {
            ensure_topic(&config.kafka, topic, p.create_topics_partitions, 1, &[])?;
        }
        ensure_topic(&config.kafka, &p.model_topic, 1, 1, &[("cleanup.policy", "compact")])?;
    }

    // Kafka: this worker's partitions, where to start and (with stop_at_end) where to end.
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set("group.id", &p.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let consumer = Rc::new(consumer);
    let partitions = wait_for_partitions(&consumer, &p.input_topic)?;
    let mine: Vec<i32> = partitions.into_iter().filter(|p| *p as usize % peers == index).collect();
    let ranges = partition_ranges(&consumer, &p.input_topic, &mine, p.start_from, p.stop_at_end)?;
    let mut assignment = TopicPartitionList::new();
    for r in &ranges {
        assignment.add_partition_offset(&p.input_topic, r.partition, Offset::Offset(r.start))?;
    }
    consumer.assign(&assignment)?;
    tracing::info!(worker = index, partitions = ?mine, "assigned partitions");

    let producer: BaseProducer<SinkContext> = client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(SinkContext::default())?;

    // The model, on this worker's device.
    let device_name = &config.model.devices[index % config.model.devices.len()];
    let manifest_path = resolve(&config.model.name, &config.model.dir)?;
    let featurizer = Featurizer::load(&manifest_path, parse_device(device_name)?)?;
    let manifest = featurizer.manifest().clone();
    tracing::info!(worker = index, model = manifest.name, device = device_name, "model loaded");

    // The classifier.
    let online = match p.head {
        HeadKind::OnlineLr => {
            if !manifest.has(OutputKind::Features) {
                anyhow::bail!("head online_lr needs features, and model {} outputs none", manifest.name);
            }
            let model = match init_model {
                Some(path) => {
                    let (model, _) = SoftmaxRegression::load(path)?;
                    if model.dim() != manifest.feature_dim {
                        anyhow::bail!(
                            "classifier {} has {} features, model {} gives {}",
                            path.display(),
                            model.dim(),
                            manifest.name,
                            manifest.feature_dim
                        );
                    }
                    model
                }
                None => SoftmaxRegression::new(manifest.feature_dim, config.learner.clone())?,
            };
            let snapshots = (index == 0 && p.snapshot_every_epochs > 0)
                .then(|| -> anyhow::Result<Snapshots> {
                    let mut metadata = std::collections::BTreeMap::new();
                    metadata.insert("featurizer.name".into(), manifest.name.clone());
                    metadata.insert("featurizer.sha256".into(), manifest.sha256.clone().unwrap_or_default());
                    Ok(Snapshots {
                        every_epochs: p.snapshot_every_epochs,
                        dir: p.snapshot_dir.clone(),
                        topic: p.model_topic.clone(),
                        producer: client_config(&config.kafka).create()?,
                        metadata,
                    })
                })
                .transpose()?;
            Some(Rc::new(RefCell::new(OnlineLrHead::new(model, 1000, snapshots))))
        }
        HeadKind::Imagenet => {
            if !manifest.has(OutputKind::Logits) || manifest.class_names.is_empty() {
                anyhow::bail!("head imagenet needs a model with named classes; {} has none", manifest.name);
            }
            None
        }
    };

    // Preparation on the pool: fetch, decode, preprocess.
    let fetcher = Fetcher::new(config.fetch.clone());
    let limits = config.image;
    let preprocess: Preprocess = featurizer.preprocess().clone();
    let prepare = Arc::new(move |record: &ImageRecord| -> Result<Vec<f32>, PrepareError> {
        thread_local! {
            static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
        }
        let bytes =
            fetcher.fetch(&record.uri, limits.max_encoded_bytes).map_err(|e| (e.kind().to_owned(), e.to_string()))?;
        let image = decode(&bytes, &limits).map_err(|e| (e.kind().to_owned(), format!("{}: {e}", record.uri)))?;
        let mut pixels = vec![0f32; preprocess.tensor_len()];
        RESIZER
            .with(|r| preprocess.run(&image, &mut r.borrow_mut(), &mut pixels))
            .map_err(|e| ("unprocessable".to_owned(), format!("{}: {e}", record.uri)))?;
        Ok(pixels)
    });
    let model = move |pixels: &[f32], n: usize| -> Result<Vec<ModelRow>, String> {
        let out = featurizer.forward(pixels, n).map_err(|e| e.to_string())?;
        Ok((0..n)
            .map(|i| {
                (out.features_row(i).map(<[f32]>::to_vec).unwrap_or_default(), out.logits_row(i).map(<[f32]>::to_vec))
            })
            .collect())
    };

    let backlog: Backlog = Rc::new(std::cell::Cell::new(0));
    let fatal: Fatal = Rc::new(RefCell::new(None));
    let source_spec = SourceSpec {
        topic: p.input_topic.clone(),
        partitions: ranges,
        epochs: p.epochs,
        max_backlog: p.max_backlog,
        max_poll: 256,
    };
    let sink_spec = SinkSpec {
        input_topic: p.input_topic.clone(),
        predictions_topic: p.predictions_topic.clone(),
        dead_letter_topic: p.dead_letter_topic.clone(),
    };
    let batching =
        Batching { max_batch: config.model.batch_size, max_wait: Duration::from_millis(p.max_batch_wait_ms) };
    let (top_k, max_decoding) = (p.top_k, p.max_decoding);
    let class_names = manifest.class_names.clone();
    let online_head = online.clone();
    let probe = worker.dataflow::<Epoch, _, _>(|scope| {
        let raw = kafka_source(scope, Rc::clone(&consumer), source_spec, Rc::clone(&backlog), Arc::clone(stop));
        let (records, unreadable) = raw.ok_err::<Vec<ImageRecord>, _, Vec<DeadLetter>, _, _>(|r| r);
        let decoded = fetch_decode(records, max_decoding, prepare);
        let (decoded, undecodable) = decoded.ok_err::<Vec<_>, _, Vec<DeadLetter>, _, _>(|r| r);
        let featured = featurize(decoded, batching, model);
        let (featured, unfeaturized) = featured.ok_err::<Vec<Featured>, _, Vec<DeadLetter>, _, _>(|r| r);
        let predictions = match online_head {
            Some(head) => {
                let labelled = featured.clone().flat_map(|f| LabelledExample::of(&f)).broadcast();
                learn_predict(featured, labelled, head, top_k)
            }
            None => {
                let nothing =
                    featured.clone().filter(|_| false).map(|f| LabelledExample::of(&f).expect("filtered out"));
                learn_predict(featured, nothing, ImagenetHead { class_names }, top_k)
            }
        };
        let dead = unreadable.concat(undecodable).concat(unfeaturized).map(Outcome::Dead);
        let outcomes = predictions.map(Outcome::Predicted).concat(dead);
        let acked = kafka_sink(
            outcomes,
            producer,
            Some(Rc::clone(&consumer)),
            sink_spec,
            Rc::clone(&backlog),
            Rc::clone(&fatal),
        );
        acked.probe().0
    });

    let status_every = Duration::from_secs(config.pipeline.status_interval_secs.max(1));
    let mut last_status = Instant::now();
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(20)));
        if let Some(error) = fatal.borrow().clone() {
            anyhow::bail!("worker {index}: {error}");
        }
        if index == 0 && last_status.elapsed() >= status_every {
            last_status = Instant::now();
            let acked = probe.with_frontier(|f| f.first().copied());
            match &online {
                Some(head) => {
                    let head = head.borrow();
                    tracing::info!(
                        acked_epoch = ?acked,
                        backlog = backlog.get(),
                        updates = head.model.updates(),
                        classes = head.model.num_classes(),
                        accuracy = ?head.metrics.accuracy().map(|a| format!("{a:.3}")),
                        window_accuracy = ?head.metrics.window_accuracy().map(|a| format!("{a:.3}")),
                        "status"
                    );
                }
                None => tracing::info!(acked_epoch = ?acked, backlog = backlog.get(), "status"),
            }
        }
    }
    let mut summary = WorkerSummary { worker: index, partitions: mine, ..Default::default() };
    if let Some(head) = &online {
        let mut head = head.borrow_mut();
        head.flush();
        summary.updates = head.model.updates();
        summary.accuracy = head.metrics.accuracy();
    }
    Ok(summary)
}

/// The input topic's partitions; waits a little for a topic that is being created.
fn wait_for_partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
        if let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) {
            if t.error().is_none() && !t.partitions().is_empty() {
                return Ok(t.partitions().iter().map(|p| p.id()).collect());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "input topic {topic:?} does not exist (or has no partitions) on the cluster; create it, \
                 or set pipeline.create_topics_partitions"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Start offsets (the group's commits, else the chosen end) and, with stop-at-end, the high
/// watermarks as end offsets.
fn partition_ranges(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    start: StartFrom,
    stop_at_end: bool,
) -> anyhow::Result<Vec<PartitionRange>> {
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(list, TIMEOUT)?;
    partitions
        .iter()
        .map(|&partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
            let committed = committed.find_partition(topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let start = match (start, committed) {
                (StartFrom::Committed, Some(o)) => o.clamp(low, high),
                (StartFrom::Committed | StartFrom::Earliest, _) => low,
                (StartFrom::Latest, _) => high,
            };
            Ok(PartitionRange { partition, start, end: stop_at_end.then_some(high) })
        })
        .collect()
}
