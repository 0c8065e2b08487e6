//! `dlpipe run`: the streaming pipeline, built from the operators of `dlpipe-operators` and the
//! library's image, model and learning code.
//!
//! Every timely worker (of every process) reads its share of the input topic's partitions,
//! prepares records on a thread pool, runs the model on its device (devices are given to
//! workers round-robin), predicts with a classifier that every worker holds identically, and
//! publishes predictions and dead letters for the partitions it reads. With the online learner,
//! worker 0 checkpoints the classifier with the offsets it has learned and published
//! ([`checkpoint`]) and commits the group's offsets; a restart continues from the newest
//! checkpoint. Otherwise each worker commits its partitions' offsets once published.
//!
//! Each process serves its Prometheus metrics (`crate::metrics`) while it runs: the operators
//! update the handles they are given, and every worker refreshes its gauges (in-flight records,
//! frontier lag, classifier quality) about once a second.

pub mod checkpoint;
mod heads;
mod stall;

pub use checkpoint::{Checkpoint, CheckpointInfo};
pub use heads::{ImagenetHead, LearnerState, OnlineLrHead};

use crate::config::{Config, Delivery, HeadKind, KafkaConfig, StartFrom};
use crate::fetch::Fetcher;
use crate::image::{decode, Preprocess};
use crate::kafka::{client_config, ensure_topics, topic_partitions, with_retry, TopicSpec};
use crate::learn::{Prequential, SoftmaxRegression};
use crate::metrics::kafka::{LagContext, STATISTICS_INTERVAL_MS};
use crate::metrics::{Metrics, Readiness};
use crate::model::{parse_device, resolve, Featurizer, OutputKind};
use crate::transfer::classifier::{featurizer_metadata, Classifier};
use dlpipe_operators::{
    featurize, feedback_join, fetch_decode, kafka_feedback_source, kafka_sink, kafka_source, kafka_txn_sink,
    learn_predict, AssignedConsumer, Backlog, Batching, ByteBudget, CounterByLabel, DeadLetter, Epoch, EpochPolicy,
    Fatal, Featured, FeaturesModel, FeaturesOutput, Feedback, FeedbackJoinMetrics, ImageRecord, LabelledExample,
    ModelRow, Outcome, PartitionRange, Position, Prepare, PrepareError, SharedBacklog, SinkContext, SinkSpec,
    SourceMetrics, SourceSpec, TxnProducer,
};
use fast_image_resize::Resizer;
use prometheus::core::Collector;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::{Broadcast, Filter, Map, ToStream};
use timely::dataflow::operators::{Concat, OkErr, Probe};
use timely::CommunicationConfig;

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
    /// Start the online classifier from this classifier file or snapshot (not from the
    /// group's checkpoint).
    pub init_model: Option<PathBuf>,
    /// Start a new classifier, ignoring the group's checkpoints, at the offsets `start_from`
    /// says.
    pub fresh: bool,
    /// Set to stop gracefully (SIGINT/SIGTERM): read no more, publish what is in flight, commit.
    pub stop: Arc<AtomicBool>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the pipeline until it stops (stop requested, stop-at-end reached, or an error).
pub fn run(options: RunOptions) -> anyhow::Result<Vec<WorkerSummary>> {
    let RunOptions { config, timely_args, init_model, fresh, stop } = options;
    config.validate_run().map_err(anyhow::Error::msg)?;
    if config.model.intra_op_threads > 0 {
        tch::set_num_threads(config.model.intra_op_threads as i32);
    }
    // One clear error, before any worker starts, for a cluster that cannot be reached or
    // refuses dlpipe; a cluster that is still starting is waited for.
    crate::kafka::wait_for_cluster(&config.kafka)?;
    let p = &config.pipeline;
    let checkpoints = p.head == HeadKind::OnlineLr && p.checkpoint_every_epochs > 0;
    let restored = if checkpoints && !fresh && init_model.is_none() {
        let found = checkpoint::read_latest(&config.kafka, &p.model_topic, &p.group_id)?;
        match &found {
            Some(c) => tracing::info!(
                group = p.group_id,
                topic = p.model_topic,
                version = c.model.updates(),
                learned = ?c.info.learned_offsets,
                published = ?c.info.published_offsets,
                "continuing from the newest checkpoint"
            ),
            None => tracing::info!(group = p.group_id, topic = p.model_topic, "no checkpoint: a new classifier"),
        }
        found.map(Arc::new)
    } else {
        None
    };
    let config = Arc::new(config);
    let mut timely_config = timely::Config::from_args(timely_args.into_iter()).map_err(anyhow::Error::msg)?;
    dlpipe_operators::feedback_join::configure(&mut timely_config.worker);
    let (process, local_workers) = match &timely_config.communication {
        CommunicationConfig::Thread => (0, 1),
        CommunicationConfig::Process(n) | CommunicationConfig::ProcessBinary(n) => (0, *n),
        CommunicationConfig::Cluster { threads, process, .. } => (*process, *threads),
    };
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new(local_workers, Arc::clone(&stop)));
    if !config.metrics.listen.trim().is_empty() {
        let address = crate::metrics::server::address_for(config.metrics.listen.trim(), process)?;
        let bound = crate::metrics::serve(address, Arc::clone(&metrics), Arc::clone(&readiness))?;
        tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    }
    crate::metrics::devices::spawn_poller(Arc::clone(&metrics), &config.model.devices, Duration::from_secs(5));
    // Set when any local worker fails: the others stop too, rather than wait for its progress.
    let failed = Arc::new(AtomicBool::new(false));
    let fetched_bytes = Arc::new(ByteBudget::new(config.pipeline.max_fetched_bytes));
    let guards = timely::execute(timely_config, move |worker| {
        let shared = Shared {
            metrics: &metrics,
            readiness: &readiness,
            local_workers,
            failed: &failed,
            fetched_bytes: &fetched_bytes,
        };
        let continues = checkpoints && !fresh && init_model.is_none();
        let start = Start { init_model: init_model.as_deref(), restored: restored.as_deref(), checkpoints, continues };
        let result = run_worker(worker, &config, start, &stop, shared);
        if result.is_err() {
            // Not ready from now on; the other workers see `failed` within one step. Dropping
            // the dataflow lets this worker end (timely would otherwise keep stepping it,
            // waiting for progress that will never come).
            readiness.fail();
            failed.store(true, Ordering::SeqCst);
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
        }
        result.map_err(|e| format!("{e:#}"))
    })
    .map_err(anyhow::Error::msg)?;
    let mut summaries = Vec::new();
    let mut errors = Vec::new();
    for result in guards.join() {
        match result.map_err(anyhow::Error::msg).and_then(|r| r.map_err(anyhow::Error::msg)) {
            Ok(summary) => summaries.push(summary),
            Err(error) => errors.push(error),
        }
    }
    // The error that stopped the run, not the "another worker failed" of the workers it stopped.
    errors.sort_by_key(|e| e.to_string().contains(ANOTHER_WORKER_FAILED));
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(summaries),
    }
}

/// Where the classifier starts.
struct Start<'a> {
    init_model: Option<&'a std::path::Path>,
    /// The group's newest checkpoint, unless `--fresh` or `--init-model`.
    restored: Option<&'a Checkpoint>,
    /// Whether this run checkpoints (online learner, `checkpoint_every_epochs` > 0).
    checkpoints: bool,
    /// Whether the classifier continues from the group's checkpoint (checkpoints on, neither
    /// `--fresh` nor `--init-model`), found or not.
    continues: bool,
}

const ANOTHER_WORKER_FAILED: &str = "stopped because another worker of this process failed";

/// What the workers of one process share.
struct Shared<'a> {
    metrics: &'a Arc<Metrics>,
    readiness: &'a Arc<Readiness>,
    local_workers: usize,
    failed: &'a Arc<AtomicBool>,
    /// The process's bound on bytes between fetching and decoding.
    fetched_bytes: &'a Arc<ByteBudget>,
}

// Dead letters travel through the dataflow as data, in `Result`s; boxing them buys nothing.
#[allow(clippy::result_large_err)]
fn run_worker(
    worker: &mut timely::worker::Worker,
    config: &Config,
    start: Start,
    stop: &Arc<AtomicBool>,
    shared: Shared,
) -> anyhow::Result<WorkerSummary> {
    let (index, peers) = (worker.index(), worker.peers());
    let metrics = shared.metrics;
    let mut handles = metrics.for_worker(index, &config.pipeline.input_topic);
    let worker_label = index.to_string();
    let p = &config.pipeline;
    if index == 0 && p.create_topics {
        let spec =
            TopicSpec { partitions: p.topic_partitions, replication_factor: p.topic_replication_factor, configs: &[] };
        let model_configs = checkpoint::model_topic_configs();
        let model_spec = TopicSpec { partitions: 1, configs: &model_configs, ..spec };
        let mut topics = vec![
            (p.input_topic.as_str(), spec),
            (p.predictions_topic.as_str(), spec),
            (p.dead_letter_topic.as_str(), spec),
            (p.model_topic.as_str(), model_spec),
        ];
        for topic in [&p.features_topic, &p.feedback_topic].into_iter().filter(|t| !t.is_empty()) {
            topics.push((topic.as_str(), spec));
        }
        ensure_topics(&config.kafka, &topics)?;
    }

    // Kafka: this worker's partitions, where to start and (with stop_at_end) where to end.
    let consumer = Arc::new(assigned_consumer(config, &worker_label, &p.input_topic, metrics)?);
    // Topics that worker 0 is creating may take a moment to appear; with create_topics off
    // every topic must already exist (checked here, not at the first send).
    let partitions = topic_partitions(&consumer, &config.kafka, &p.input_topic, p.create_topics)?;
    if index == 0 && !p.create_topics {
        let optional = [&p.features_topic, &p.feedback_topic].into_iter().filter(|t| !t.is_empty());
        for topic in [&p.predictions_topic, &p.dead_letter_topic, &p.model_topic].into_iter().chain(optional) {
            topic_partitions(&consumer, &config.kafka, topic, false)?;
        }
    }
    let mine: Vec<i32> = partitions.into_iter().filter(|p| *p as usize % peers == index).collect();
    // With exactly-once delivery, this worker's transactional producer fences an earlier
    // instance of the worker (aborting its open transaction) before the committed offsets are
    // read, so that no zombie commits behind them.
    let producer: BaseProducer<SinkContext> = match p.delivery {
        Delivery::AtLeastOnce => client_config(&config.kafka)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create_with_context(SinkContext::default())?,
        Delivery::ExactlyOnce => transactional_producer(&config.kafka, &p.group_id, index)?,
    };
    let learned = match start.restored {
        Some(checkpoint) => LearnFrom::Checkpoint(&checkpoint.info.learned_offsets),
        // Continuing, with no checkpoint: offsets the group committed are not in any
        // classifier (an older dlpipe's, or a run that stopped before its first checkpoint),
        // so learning starts at the beginning.
        None if start.continues && p.start_from == StartFrom::Committed => LearnFrom::Earliest,
        None => LearnFrom::Published,
    };
    let (ranges, starts) = partition_ranges(&consumer, config, &mine, learned)?;
    let assigned = AssignedConsumer::assign(Arc::clone(&consumer), &p.input_topic, &ranges)?;
    tracing::info!(worker = index, partitions = ?mine, "assigned partitions");
    for s in starts.iter().filter(|s| s.learned != s.published) {
        let (what, from, to) = if s.learned < s.published {
            ("learned again, not published again", s.learned, s.published)
        } else {
            ("published, not learned again", s.published, s.learned)
        };
        tracing::info!(worker = index, partition = s.partition, from, to, "records before the checkpoint: {what}");
    }
    let learn_from: BTreeMap<i32, i64> = starts.iter().map(|s| (s.partition, s.learned)).collect();
    let feedback = if p.feedback_topic.is_empty() {
        None
    } else {
        Some(feedback_reader(config, index, peers, &worker_label, metrics, start.restored)?)
    };

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
            const WINDOW: usize = 1000;
            let (model, prequential) = match (start.init_model, start.restored) {
                (Some(path), _) => {
                    // A classifier file from `dlpipe train` or a snapshot of an earlier run:
                    // its features must be this model's.
                    let classifier = Classifier::load(path)?;
                    classifier.check_featurizer(&manifest)?;
                    (classifier.model, Prequential::new(WINDOW))
                }
                (None, Some(restored)) => {
                    restored.check(&p.group_id, &p.input_topic, &manifest)?;
                    (restored.model.clone(), restored.prequential(WINDOW))
                }
                (None, None) => {
                    (SoftmaxRegression::new(manifest.feature_dim, config.learner.clone())?, Prequential::new(WINDOW))
                }
            };
            // Worker 0 writes the checkpoints; the others' classifiers are the same.
            let every = if start.checkpoints && index == 0 { p.checkpoint_every_epochs } else { 0 };
            let mut head = OnlineLrHead::new(model, prequential, every);
            head.counters = Some(handles.learner.clone());
            Some(Rc::new(RefCell::new(head)))
        }
        HeadKind::Imagenet => {
            if !manifest.has(OutputKind::Logits) || manifest.class_names.is_empty() {
                anyhow::bail!("head imagenet needs a model with named classes; {} has none", manifest.name);
            }
            None
        }
    };

    // Preparation on the pool: fetch, decode, preprocess.
    let fetcher = Fetcher::new(config.fetch.clone()).map_err(anyhow::Error::msg)?;
    let limits = config.image;
    let preprocess: Preprocess = featurizer.preprocess().clone();
    let fetch_seconds = metrics.fetch_seconds.with_label_values(&[&worker_label]);
    let decode_seconds = metrics.decode_seconds.with_label_values(&[&worker_label]);
    let fetched_bytes = metrics.fetched_bytes.with_label_values(&[&worker_label]);
    let max_encoded_bytes = limits.max_encoded_bytes;
    // Shared by the labelled and unlabelled lanes.
    let fetch = Arc::new(move |record: &ImageRecord| -> Result<Vec<u8>, PrepareError> {
        let started = Instant::now();
        let bytes = fetcher.fetch(&record.uri, max_encoded_bytes);
        fetch_seconds.observe(started.elapsed().as_secs_f64());
        let bytes = bytes.map_err(|e| (e.kind().to_owned(), e.to_string()))?;
        fetched_bytes.inc_by(bytes.len() as u64);
        Ok(bytes)
    });
    let decode_record = Arc::new(move |record: &ImageRecord, bytes: &[u8]| -> Result<Vec<f32>, PrepareError> {
        thread_local! {
            static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
        }
        let started = Instant::now();
        let image = decode(bytes, &limits).map_err(|e| (e.kind().to_owned(), format!("{}: {e}", record.uri)))?;
        let mut pixels = vec![0f32; preprocess.tensor_len()];
        RESIZER
            .with(|r| preprocess.run(&image, &mut r.borrow_mut(), &mut pixels))
            .map_err(|e| (e.kind().to_owned(), format!("{}: {e}", record.uri)))?;
        decode_seconds.observe(started.elapsed().as_secs_f64());
        Ok(pixels)
    });
    let labels = [worker_label.as_str(), device_name.as_str(), manifest.name.as_str()];
    let forward_seconds = metrics.featurize_seconds.with_label_values(&labels);
    let batch_records = metrics.featurize_batch.with_label_values(&labels);
    // One model on this worker's device, run by both lanes (never at once: both run on this thread).
    let model = Rc::new(RefCell::new(move |pixels: &[f32], n: usize| -> Result<Vec<ModelRow>, String> {
        let started = Instant::now();
        let out = featurizer.forward(pixels, n).map_err(|e| e.to_string())?;
        forward_seconds.observe(started.elapsed().as_secs_f64());
        batch_records.observe(n as f64);
        Ok((0..n)
            .map(|i| {
                (out.features_row(i).map(<[f32]>::to_vec).unwrap_or_default(), out.logits_row(i).map(<[f32]>::to_vec))
            })
            .collect())
    }));

    let backlog: SharedBacklog = Rc::new(RefCell::new(Backlog::default()));
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
        features: (!p.features_topic.is_empty()).then(|| FeaturesOutput {
            topic: p.features_topic.clone(),
            model: FeaturesModel { name: manifest.name.clone(), sha256: manifest.sha256.clone().unwrap_or_default() },
        }),
        starts,
        give_up_after: Duration::from_secs(config.kafka.retry_timeout_secs),
        partial_commit_after: (p.delivery == Delivery::ExactlyOnce && p.partial_commit_ms > 0)
            .then(|| Duration::from_millis(p.partial_commit_ms)),
    };
    let writer = match (&online, index) {
        (Some(head), 0) if start.checkpoints => {
            let producer = checkpoint::writer_producer(&config.kafka, &p.group_id)?;
            let files = (!p.snapshot_dir.as_os_str().is_empty())
                .then(|| checkpoint::SnapshotFiles { dir: p.snapshot_dir.clone(), retain: p.snapshot_retain });
            Some(checkpoint::CheckpointWriter::new(
                Rc::clone(head),
                producer,
                config.kafka.clone(),
                Arc::clone(&consumer),
                p.delivery == Delivery::AtLeastOnce,
                p.model_topic.clone(),
                p.group_id.clone(),
                p.input_topic.clone(),
                featurizer_metadata(&manifest),
                files,
                metrics.checkpoints_written.with_label_values::<&str>(&[]),
                metrics.checkpoint_seconds.with_label_values::<&str>(&[]),
            ))
        }
        _ => None,
    };
    // At-least-once: with checkpoints the group's offsets are committed with them (never ahead
    // of one); without, by each worker's sink as its epochs are published. Exactly-once: by
    // each worker's sink, in the transaction of the outputs.
    let committer = (!start.checkpoints).then(|| Arc::clone(&consumer));
    let exactly_once = p.delivery == Delivery::ExactlyOnce;
    let batching =
        Batching { max_batch: config.model.batch_size, max_wait: Duration::from_millis(p.max_batch_wait_ms) };
    let (top_k, max_decoding) = (p.top_k, p.max_decoding);
    let class_names = manifest.class_names.clone();
    let online_head = online.clone();
    // One probe per operator's output, for the frontier lag metric; the last one (the sink's
    // acknowledged frontier) also says when the dataflow is done.
    let probes: Vec<(&str, ProbeHandle<Epoch>)> = Vec::new();
    let probes = RefCell::new(probes);
    let (source_metrics, fetch_metrics, featurize_metrics, learn_metrics, sink_metrics) = (
        handles.source.clone(),
        handles.fetch_decode.clone(),
        handles.featurize.clone(),
        handles.learn_predict.clone(),
        std::mem::take(&mut handles.sink),
    );
    let probe = worker.dataflow::<Epoch, _, _>(|scope| {
        let mut probes = probes.borrow_mut();
        let raw = kafka_source(scope, assigned, source_spec, Rc::clone(&backlog), Arc::clone(stop), source_metrics);
        let (handle, raw) = raw.probe();
        probes.push(("kafka_source", handle));
        let (records, unreadable) = raw.ok_err::<Vec<ImageRecord>, _, Vec<DeadLetter>, _, _>(|r| r);
        // Labelled and unlabelled records are fetched, decoded and featurized in lanes of
        // their own. The learner waits for every labelled record of an epoch (determinism), but
        // not for unlabelled ones: `learn_predict` predicts those that come late with a frozen
        // copy of the classifier of their epoch. So an unlabelled record behind a slow server
        // delays its own prediction, not every later one of every worker.
        let (labelled, unlabelled) = records.ok_err::<Vec<ImageRecord>, _, Vec<ImageRecord>, _, _>(|record| {
            if record.label.is_some() {
                Ok(record)
            } else {
                Err(record)
            }
        });
        // One probe per operator for both lanes: the frontier of the two.
        let (fetched, featurized) = (ProbeHandle::new(), ProbeHandle::new());
        probes.push(("fetch_decode", fetched.clone()));
        probes.push(("featurize", featurized.clone()));
        let lanes = [labelled, unlabelled].map(|records| {
            let (fetch, decode_record, model) = (Arc::clone(&fetch), Arc::clone(&decode_record), Rc::clone(&model));
            let prepare = Prepare {
                fetch: move |r: &ImageRecord| fetch(r),
                decode: move |r: &ImageRecord, bytes: &[u8]| decode_record(r, bytes),
                budget: Arc::clone(shared.fetched_bytes),
            };
            let decoded = fetch_decode(records, max_decoding, prepare, fetch_metrics.clone()).probe_with(&fetched);
            let (decoded, undecodable) = decoded.ok_err::<Vec<_>, _, Vec<DeadLetter>, _, _>(|r| r);
            let model = move |pixels: &[f32], n: usize| model.borrow_mut()(pixels, n);
            let featured = featurize(decoded, batching, model, Rc::clone(&fatal), featurize_metrics.clone())
                .probe_with(&featurized);
            let (featured, unfeaturized) = featured.ok_err::<Vec<Featured>, _, Vec<DeadLetter>, _, _>(|r| r);
            (featured, undecodable.concat(unfeaturized))
        });
        let [(labelled, labelled_dead), (unlabelled, unlabelled_dead)] = lanes;
        let featured = labelled.clone().concat(unlabelled.clone());
        let mut feedback_dead = None;
        let predictions = match online_head {
            Some(head) => {
                let mut labelled = labelled.flat_map(|f| LabelledExample::of(&f));
                if let Some(reader) = feedback {
                    // Records without an inline label wait for theirs from the feedback topic
                    // (and so, here, hold back the learner as labelled ones do).
                    let (received, unreadable) = kafka_feedback_source(
                        scope,
                        reader.consumer,
                        reader.spec,
                        Arc::clone(stop),
                        reader.source_metrics,
                    )
                    .ok_err::<Vec<Feedback>, _, Vec<DeadLetter>, _, _>(|r| r);
                    let joined = feedback_join(unlabelled, received, reader.retention, reader.join_metrics);
                    labelled = labelled.concat(joined.examples);
                    feedback_dead = Some(unreadable.concat(joined.dead_letters).map(Outcome::FeedbackDead));
                }
                // Records before a partition's learned offset are in the restored classifier
                // already: replayed only to publish their outputs.
                let labelled = labelled
                    .filter(move |x| learn_from.get(&x.partition).is_none_or(|from| x.offset >= *from))
                    .broadcast();
                learn_predict(featured, labelled, head, top_k, learn_metrics)
            }
            None => {
                // Nothing to learn, and no epoch to wait for.
                let nothing = Vec::<LabelledExample>::new().to_stream(scope);
                learn_predict(featured, nothing, ImagenetHead { class_names }, top_k, learn_metrics)
            }
        };
        let (handle, predictions) = predictions.probe();
        probes.push(("learn_predict", handle));
        let dead = unreadable.concat(labelled_dead).concat(unlabelled_dead).map(Outcome::Dead);
        let mut outcomes = predictions.map(Outcome::Predicted).concat(dead);
        if let Some(feedback_dead) = feedback_dead {
            outcomes = outcomes.concat(feedback_dead);
        }
        let positions = if exactly_once {
            let consumer = Arc::clone(&consumer);
            let (kafka, group) = (config.kafka.clone(), p.group_id.clone());
            let renew = Box::new(move || transactional_producer(&kafka, &group, index).map_err(|e| format!("{e:#}")));
            kafka_txn_sink(
                outcomes,
                TxnProducer { producer, renew },
                consumer,
                sink_spec,
                Rc::clone(&backlog),
                Rc::clone(&fatal),
                sink_metrics,
            )
        } else {
            kafka_sink(outcomes, producer, committer, sink_spec, Rc::clone(&backlog), Rc::clone(&fatal), sink_metrics)
        };
        let (handle, positions) = positions.probe();
        probes.push(("kafka_sink", handle.clone()));
        if !start.checkpoints {
            return handle;
        }
        let (handle, _checkpointed) = dlpipe_operators::checkpoint(positions, writer, Rc::clone(&fatal)).probe();
        probes.push(("checkpoint", handle.clone()));
        handle
    });
    let probes = probes.into_inner();
    shared.readiness.worker_ready();

    let mut frontier_clock = FrontierClock::new(p.epochs);
    let in_flight = metrics.in_flight.with_label_values(&[&worker_label]);
    let model_version = metrics.model_version.with_label_values(&[&worker_label, &manifest.name]);
    let status_every = Duration::from_secs(config.pipeline.status_interval_secs.max(1));
    let mut last_status = Instant::now();
    let mut last_refresh = Instant::now() - Duration::from_secs(1);
    // The first worker of each process logs the process's status line.
    let logs_status = index % shared.local_workers.max(1) == 0;
    let mut published_at_last_status = 0.0;
    let mut stall_watch = stall::StallWatch::new(p.stall_after_secs, Instant::now());
    let stalled_seconds = metrics.pipeline_stalled.with_label_values(&[&worker_label]);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(20)));
        if let Some(error) = fatal.borrow().clone() {
            anyhow::bail!("worker {index}: {error}");
        }
        if shared.failed.load(Ordering::SeqCst) {
            anyhow::bail!("worker {index}: {ANOTHER_WORKER_FAILED}");
        }
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            in_flight.set(backlog.borrow().len() as i64);
            let frontiers: Vec<(&str, Option<Epoch>)> =
                probes.iter().map(|(name, probe)| (*name, probe.with_frontier(|f| f.first().copied()))).collect();
            for (name, lag) in frontier_clock.lags(&frontiers, dlpipe_operators::records::now_ms()) {
                metrics.frontier_lag.with_label_values(&[&worker_label, name]).set(lag);
            }
            // The published frontier: the sink's.
            let published = frontiers.iter().find(|(name, _)| *name == "kafka_sink").and_then(|(_, f)| *f);
            let stalled = stall_watch.observe(published, backlog.borrow().len(), Instant::now());
            stalled_seconds.set(stalled.map_or(0.0, |d| d.as_secs_f64()));
            let waiting = stalled.zip(published).map(|(_, f)| stall::waiting_for(&backlog.borrow(), f, &frontiers));
            match (&waiting, shared.readiness.stalled(index)) {
                (Some(waiting), None) => tracing::warn!(
                    worker = index,
                    seconds = stalled.map(|d| d.as_secs()),
                    "stalled: the published frontier has not moved with records in flight; waiting for {waiting}"
                ),
                (None, Some(_)) => tracing::info!(worker = index, "no longer stalled: the published frontier moves"),
                _ => {}
            }
            shared.readiness.set_stalled(index, waiting);
            if let Some(head) = &online {
                export_learner(metrics, &worker_label, &head.borrow());
            }
            model_version.set(online.as_ref().map_or(0, |h| h.borrow().model.updates()) as i64);
        }
        if logs_status && last_status.elapsed() >= status_every {
            let seconds = last_status.elapsed().as_secs_f64();
            last_status = Instant::now();
            let acked = probe.with_frontier(|f| f.first().copied());
            let published = sum_of(&metrics.messages_published);
            let throughput = format!("{:.1}/s", (published - published_at_last_status) / seconds);
            published_at_last_status = published;
            let lag = sum_of(&metrics.consumer_lag) as i64;
            let stalled = shared.readiness.first_stalled().unwrap_or_else(|| "no".into());
            match &online {
                Some(head) => {
                    let head = head.borrow();
                    tracing::info!(
                        acked_epoch = ?acked,
                        throughput,
                        lag,
                        in_flight = sum_of(&metrics.in_flight) as i64,
                        updates = head.model.updates(),
                        classes = head.model.num_classes(),
                        accuracy = ?head.metrics.accuracy().map(|a| format!("{a:.3}")),
                        window_accuracy = ?head.metrics.window_accuracy().map(|a| format!("{a:.3}")),
                        stalled,
                        "status"
                    );
                }
                None => tracing::info!(
                    acked_epoch = ?acked,
                    throughput,
                    lag,
                    in_flight = sum_of(&metrics.in_flight) as i64,
                    stalled,
                    "status"
                ),
            }
        }
    }
    for (name, _) in &probes {
        metrics.frontier_lag.with_label_values(&[worker_label.as_str(), name]).set(0.0);
    }
    stalled_seconds.set(0.0);
    shared.readiness.set_stalled(index, None);
    let mut summary = WorkerSummary { worker: index, partitions: mine, ..Default::default() };
    if let Some(head) = &online {
        let head = head.borrow();
        summary.updates = head.model.updates();
        summary.accuracy = head.metrics.accuracy();
    }
    Ok(summary)
}

/// Exports the online classifier's quality and size.
fn export_learner(metrics: &Metrics, worker: &str, head: &OnlineLrHead) {
    let windows = [
        ("prequential", head.metrics.accuracy(), head.metrics.mean_log_loss()),
        ("recent", head.metrics.window_accuracy(), head.metrics.window_mean_log_loss()),
    ];
    for (window, accuracy, loss) in windows {
        if let Some(a) = accuracy {
            metrics.online_accuracy.with_label_values(&[worker, window]).set(a);
        }
        if let Some(l) = loss {
            metrics.online_log_loss.with_label_values(&[worker, window]).set(l);
        }
    }
    metrics.learner_classes.with_label_values(&[worker]).set(head.model.num_classes() as i64);
}

/// The sum of every series of a counter or gauge family (this process's share).
fn sum_of(family: &impl Collector) -> f64 {
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        // Metrics hold a default (zero) value of the types they are not.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// Maps operator frontiers to wall-clock lag. With time epochs an epoch starts at
/// `epoch × millis`; with offset epochs, at the moment the source's frontier first reached it
/// (so on an idle offset-epoch stream the lag grows: such epochs have no wall-clock meaning).
struct FrontierClock {
    policy: EpochPolicy,
    first_seen: BTreeMap<Epoch, i64>,
    /// When the clock was first read: no frontier trails by more than the run has lasted (at
    /// start-up every frontier is still at epoch 0, which time epochs would date to 1970).
    origin_ms: Option<i64>,
}

impl FrontierClock {
    fn new(policy: EpochPolicy) -> FrontierClock {
        FrontierClock { policy, first_seen: BTreeMap::new(), origin_ms: None }
    }

    /// Seconds each operator's frontier trails `now_ms`; the first frontier is the source's.
    fn lags<'a>(&mut self, frontiers: &[(&'a str, Option<Epoch>)], now_ms: i64) -> Vec<(&'a str, f64)> {
        let origin_ms = *self.origin_ms.get_or_insert(now_ms);
        if let Some((_, Some(source))) = frontiers.first() {
            self.first_seen.entry(*source).or_insert(now_ms);
        }
        let lags = frontiers
            .iter()
            .map(|(name, frontier)| {
                let started_ms = match (frontier, self.policy) {
                    (None, _) => now_ms,
                    (Some(e), EpochPolicy::Time { millis }) => ((*e).saturating_mul(millis) as i64).max(origin_ms),
                    (Some(e), EpochPolicy::Offsets { .. }) => {
                        // The newest epoch seen at or before e (e itself unless the source skipped past it).
                        self.first_seen.range(..=*e).next_back().map_or(now_ms, |(_, t)| *t)
                    }
                };
                (*name, (now_ms - started_ms).max(0) as f64 / 1000.0)
            })
            .collect();
        // Epochs below every frontier are of no more use.
        if let Some(least) = frontiers.iter().filter_map(|(_, f)| *f).min() {
            let keep = self.first_seen.range(..=least).next_back().map(|(e, _)| *e);
            self.first_seen.retain(|e, _| Some(*e) >= keep);
        }
        lags
    }
}

/// Where the classifier's learning starts in each partition.
#[derive(Clone, Copy)]
enum LearnFrom<'a> {
    /// A checkpoint's learned offsets (a partition it does not know, added since, from its
    /// earliest offset).
    Checkpoint(&'a BTreeMap<i32, i64>),
    /// Each partition's earliest offset.
    Earliest,
    /// Where publishing starts.
    Published,
}

/// A consumer of the group for partitions the caller assigns (no subscription, no automatic
/// commits), reporting `topic`'s lag for `worker`.
fn assigned_consumer(
    config: &Config,
    worker: &str,
    topic: &str,
    metrics: &Metrics,
) -> anyhow::Result<BaseConsumer<LagContext>> {
    let lag = LagContext { lag: metrics.consumer_lag.clone(), worker: worker.to_owned(), topic: topic.to_owned() };
    Ok(client_config(&config.kafka)
        .set("group.id", &config.pipeline.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        .create_with_context(lag)?)
}

/// What the feedback source and join of one worker need.
struct FeedbackReader {
    consumer: AssignedConsumer<LagContext>,
    spec: SourceSpec,
    retention: Epoch,
    source_metrics: SourceMetrics,
    join_metrics: FeedbackJoinMetrics,
}

/// Worker `index`'s share of the feedback topic (partition p to worker p mod `peers`, as the
/// input's). Continuing from a checkpoint with time epochs, it starts at the feedback that
/// came within the retention before the checkpoint's cut (found by Kafka timestamp): what the
/// join still held then, so that labels waiting for images read again after the restart are
/// not lost, and older feedback is not processed again. Otherwise from where `start_from`
/// says: the group's committed offset of the feedback topic (the earliest where it has none),
/// the earliest, or the end.
fn feedback_reader(
    config: &Config,
    index: usize,
    peers: usize,
    worker_label: &str,
    metrics: &Metrics,
    restored: Option<&Checkpoint>,
) -> anyhow::Result<FeedbackReader> {
    let (kafka, p) = (&config.kafka, &config.pipeline);
    let topic = p.feedback_topic.as_str();
    let consumer = assigned_consumer(config, worker_label, topic, metrics)?;
    let partitions: Vec<i32> = topic_partitions(&consumer, kafka, topic, p.create_topics)?
        .into_iter()
        .filter(|partition| *partition as usize % peers == index)
        .collect();
    let mut list = TopicPartitionList::new();
    for partition in &partitions {
        list.add_partition(topic, *partition);
    }
    let retention = p.feedback_retention.epochs(p.epochs).map_err(anyhow::Error::msg)?;
    let awaiting = format!("the committed offsets of group {:?} on {topic} (its group coordinator)", p.group_id);
    let committed = with_retry(kafka, &awaiting, || consumer.committed_offsets(list.clone(), TIMEOUT))?;
    let retained_from = match (restored, p.epochs) {
        (Some(checkpoint), EpochPolicy::Time { millis }) if !partitions.is_empty() => {
            // The cut's time: its frontier's epoch start (`Epoch::MAX` for the final checkpoint
            // of a run that ended: then when it was written).
            let cut_ms =
                checkpoint.info.frontier.saturating_mul(millis).min(checkpoint.info.written_at_ms.max(0) as u64);
            let from_ms = cut_ms.saturating_sub(retention.saturating_mul(millis));
            let mut times = TopicPartitionList::new();
            for partition in &partitions {
                times.add_partition_offset(topic, *partition, Offset::Offset(from_ms.min(i64::MAX as u64) as i64))?;
            }
            let awaiting = format!("the offsets of {topic} by time (its leaders)");
            Some(with_retry(kafka, &awaiting, || consumer.offsets_for_times(times.clone(), TIMEOUT))?)
        }
        _ => None,
    };
    let mut ranges = Vec::new();
    for &partition in &partitions {
        let awaiting = format!("the offsets of partition {partition} of topic {topic} (its leader)");
        let (low, high) = with_retry(kafka, &awaiting, || consumer.fetch_watermarks(topic, partition, TIMEOUT))?;
        let committed = committed.find_partition(topic, partition).and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o.clamp(low, high)),
            _ => None,
        });
        let by_time =
            retained_from.as_ref().and_then(|l| l.find_partition(topic, partition)).map(|e| match e.offset() {
                Offset::Offset(o) => o.clamp(low, high),
                // No message at or after that time.
                _ => high,
            });
        let start = match (by_time, p.start_from) {
            (Some(start), _) => start,
            (None, StartFrom::Committed) => committed.unwrap_or(low),
            (None, StartFrom::Earliest) => low,
            (None, StartFrom::Latest) => high,
        };
        ranges.push(PartitionRange { partition, start, end: p.stop_at_end.then_some(high) });
    }
    let consumer = AssignedConsumer::assign(Arc::new(consumer), topic, &ranges)?;
    tracing::info!(worker = index, partitions = ?partitions, topic, "assigned feedback partitions");
    let consumed = CounterByLabel::new(metrics.records_consumed.clone(), vec![worker_label.to_owned(), topic.into()]);
    Ok(FeedbackReader {
        consumer,
        spec: SourceSpec { topic: topic.into(), partitions: ranges, epochs: p.epochs, max_backlog: 1, max_poll: 256 },
        retention,
        source_metrics: SourceMetrics { consumed },
        join_metrics: metrics.feedback_join(index),
    })
}

/// Worker `index`'s transactional producer for exactly-once delivery, initialised: that fences
/// an earlier instance of the worker (aborting its open transaction).
fn transactional_producer(
    kafka: &KafkaConfig,
    group_id: &str,
    index: usize,
) -> anyhow::Result<BaseProducer<SinkContext>> {
    let id = format!("dlpipe-{group_id}-worker-{index}");
    let producer: BaseProducer<SinkContext> = client_config(kafka)
        .set("transactional.id", &id)
        .set("linger.ms", "5")
        .create_with_context(SinkContext::default())?;
    let awaiting = format!("the transaction coordinator of {id}");
    with_retry(kafka, &awaiting, || producer.init_transactions(TIMEOUT))?;
    Ok(producer)
}

/// Where each partition starts and (with stop-at-end: the high watermark) ends.
///
/// Publishing starts at the group's committed offset (else the end `start_from` chooses),
/// learning where `learned` says; reading starts at the lower of the two. Both calls wait out
/// a cluster that is still loading the group coordinator or electing leaders.
fn partition_ranges<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &Config,
    partitions: &[i32],
    learned: LearnFrom,
) -> anyhow::Result<(Vec<PartitionRange>, Vec<Position>)> {
    let (kafka, p) = (&config.kafka, &config.pipeline);
    let topic = p.input_topic.as_str();
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        list.add_partition(topic, *partition);
    }
    let awaiting = format!("the committed offsets of group {:?} (its group coordinator)", p.group_id);
    let committed = with_retry(kafka, &awaiting, || consumer.committed_offsets(list.clone(), TIMEOUT))?;
    partitions
        .iter()
        .map(|&partition| {
            let awaiting = format!("the offsets of partition {partition} of topic {topic} (its leader)");
            let (low, high) = with_retry(kafka, &awaiting, || consumer.fetch_watermarks(topic, partition, TIMEOUT))?;
            let committed = committed.find_partition(topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let published = match (p.start_from, committed) {
                (StartFrom::Committed, Some(o)) => o.clamp(low, high),
                (StartFrom::Committed | StartFrom::Earliest, _) => low,
                (StartFrom::Latest, _) => high,
            };
            let learned = match learned {
                LearnFrom::Checkpoint(offsets) => offsets.get(&partition).map_or(low, |o| (*o).clamp(low, high)),
                LearnFrom::Earliest => low,
                LearnFrom::Published => published,
            };
            let range = PartitionRange { partition, start: learned.min(published), end: p.stop_at_end.then_some(high) };
            Ok((range, Position { partition, learned, published }))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(|v| v.into_iter().unzip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_lag_counts_from_the_epochs_start_or_from_when_the_source_reached_it() {
        // Time epochs of 1 s: epoch 100 starts at 100 000 ms; a done operator trails by nothing.
        let mut clock = FrontierClock::new(EpochPolicy::Time { millis: 1000 });
        // At start-up every frontier is at epoch 0: the lag counts from the start, not 1970.
        let lags = clock.lags(&[("kafka_source", Some(0)), ("featurize", Some(0))], 98_000);
        assert_eq!(lags, vec![("kafka_source", 0.0), ("featurize", 0.0)]);
        let lags = clock.lags(&[("kafka_source", Some(0)), ("featurize", Some(0))], 99_000);
        assert_eq!(lags, vec![("kafka_source", 1.0), ("featurize", 1.0)]);
        let lags = clock.lags(&[("kafka_source", Some(102)), ("featurize", Some(100)), ("kafka_sink", None)], 102_500);
        assert_eq!(lags, vec![("kafka_source", 0.5), ("featurize", 2.5), ("kafka_sink", 0.0)]);

        // Offset epochs: from when the source's frontier first reached the epoch.
        let mut clock = FrontierClock::new(EpochPolicy::Offsets { records: 10 });
        clock.lags(&[("kafka_source", Some(3)), ("featurize", Some(3))], 1_000);
        clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(3))], 4_000);
        let lags = clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(4))], 6_000);
        // featurize at 4: the source never stood at 4; epoch 3, reached at 1 s, is the newest before it.
        assert_eq!(lags, vec![("kafka_source", 2.0), ("featurize", 5.0)]);
        // Once every frontier passed epoch 3, only what is still needed is kept.
        clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(5))], 7_000);
        assert_eq!(clock.first_seen.keys().copied().collect::<Vec<_>>(), vec![5]);
    }
}
