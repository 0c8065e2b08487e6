//! `dlpipe run`: the streaming pipeline, built from the operators of `dlpipe-operators` and the
//! library's image, model and learning code.
//!
//! Every timely worker (of every process) reads its share of the input topic's partitions,
//! prepares records on a thread pool, runs the model on its device (devices are given to
//! workers round-robin), predicts with a classifier that every worker holds identically, and
//! publishes predictions and dead letters for the partitions it reads. With the online learner,
//! worker 0 checkpoints the classifier with the offsets it has learned and published
//! ([`model_topic`]) and commits the group's offsets; a restart continues from the newest
//! checkpoint. Otherwise each worker commits its partitions' offsets once published.
//!
//! Each process serves its Prometheus metrics (`crate::metrics`) while it runs: the operators
//! update the handles they are given, and every worker refreshes its gauges (in-flight records,
//! frontier lag, stalls, classifier quality) about once a second.
//!
//! | file | what it owns |
//! |---|---|
//! | `mod.rs` | `run`: the timely workers of a process; `run_worker`: one worker, step by step |
//! | `cluster.rs` | a cluster's connections (timely's, with keepalive), and noticing a lost peer |
//! | `kafka.rs` | topics, the worker's consumers and producer, where each partition starts |
//! | `work.rs` | fetch, decode and preprocess, and the forward pass: what the lanes run |
//! | `heads.rs` | the classifiers behind `learn_predict` (online learner, ImageNet classes) |
//! | `dataflow.rs` | the dataflow, source to sink, in the order records flow |
//! | `run_loop.rs` | stepping the worker, its telemetry and the status line |
//! | `stall.rs` | noticing a worker whose published frontier stands still |
//! | `model_topic.rs` | the learner's checkpoints in the model topic: written (the `checkpoint` operator's store), read back at start-up |
//! | `promotions.rs` | classifiers `dlpipe promote` announces on the model topic: read by worker 0, into `learn_predict` |
//! | `worker_ids.rs` | exactly-once transactional ids: worker indexes registered in the model topic, removed ones fenced at start |
//! | `error.rs` | [`PipelineError`]: why a run could not start or had to stop |

pub mod cluster;
mod dataflow;
mod error;
mod heads;
mod kafka;
pub mod model_topic;
pub mod promotions;
mod run_loop;
mod stall;
mod work;
pub mod worker_ids;

pub use error::PipelineError;
pub use heads::{online_head as online_lr_head, ImagenetHead, LearnerState, OnlineLrHead};
pub use model_topic::{Checkpoint, CheckpointError, CheckpointInfo};

use crate::batch::Resizing;
use crate::config::{Config, DeliveryGuarantee, HeadKind};
use crate::metrics::kafka::LagContext;
use crate::metrics::{Metrics, Readiness, WorkerMetrics};
use crate::model::{parse_device, resolve_precision, Featurizer, Manifest, OutputKind};
use crate::transfer::classifier::featurizer_metadata;
use dataflow::{Classifier, Dataflow};
use dlpipe_operators::{
    Batching, ByteBudget, Delivery, Fatal, ModelId, Position, SharedBacklog, SinkContext, SinkSpec, TxnProducer,
};
use kafka::LearnFrom;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::BaseProducer;
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use timely::communication::allocator::zero_copy::initialize::CommsGuard;
use timely::communication::AllocatorBuilder;
use timely::CommunicationConfig;
use work::Work;

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
    /// Timely's workers and processes ([`one_process`], or a cluster).
    pub timely: timely::Config,
    /// Added to `metrics.listen`'s port: the process index where processes share a host, 0
    /// where each has its own (a Kubernetes pod).
    pub metrics_port_offset: usize,
    /// Start the online classifier from this classifier file or snapshot (not from the
    /// group's checkpoint).
    pub init_model: Option<PathBuf>,
    /// Start a new classifier, ignoring the group's checkpoints, at the offsets `start_from`
    /// says.
    pub fresh: bool,
    /// Set to stop gracefully (SIGINT/SIGTERM): read no more, publish what is in flight, commit.
    pub stop: Arc<AtomicBool>,
}

/// Runs the pipeline until it stops (stop requested, stop-at-end reached, or an error).
pub fn run(options: RunOptions) -> Result<Vec<WorkerSummary>, PipelineError> {
    let RunOptions { config, timely: mut timely_config, metrics_port_offset, init_model, fresh, stop } = options;
    config.validate_run()?;
    work::start_decoding_pool(config.pipeline.decode_nice);
    // One clear error, before any worker starts, for a cluster that cannot be reached or
    // refuses dlpipe; a cluster that is still starting is waited for.
    crate::kafka::wait_for_cluster(&config.kafka)?;
    let p = &config.pipeline;
    let checkpoints = p.head == HeadKind::OnlineLr && p.checkpoint_every_epochs > 0;
    let restored = if checkpoints && !fresh && init_model.is_none() {
        let found = model_topic::read_latest(&config.kafka, &p.model_topic, &p.group_id)?;
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
    dlpipe_operators::feedback_join::configure(&mut timely_config.worker);
    let local_workers = match &timely_config.communication {
        CommunicationConfig::Thread => 1,
        CommunicationConfig::Process(n) | CommunicationConfig::ProcessBinary(n) => *n,
        CommunicationConfig::Cluster { threads, .. } => *threads,
    };
    crate::model::set_intra_op_threads(config.model.intra_op_threads, local_workers);
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::new(local_workers, Arc::clone(&stop)));
    if !config.metrics.listen.trim().is_empty() {
        let address = crate::metrics::server::address_for(config.metrics.listen.trim(), metrics_port_offset)?;
        let bound = crate::metrics::serve(address, Arc::clone(&metrics), Arc::clone(&readiness))?;
        tracing::info!(address = %bound, "serving /metrics, /healthz and /readyz");
    }
    crate::metrics::devices::spawn_poller(Arc::clone(&metrics), &config.model.devices, Duration::from_secs(5));
    // Set when any local worker fails: the others stop too, rather than wait for its progress.
    let failed = Arc::new(AtomicBool::new(false));
    let fetched_bytes = Arc::new(ByteBudget::new(config.pipeline.max_fetched_bytes));
    let peer_timeout = Duration::from_millis(config.cluster.peer_timeout_ms);
    let (builders, network) = communication(timely_config.communication, peer_timeout, &readiness)?;
    let peers = network.as_ref().map(|n| Arc::clone(&n.1));
    let guards = timely::execute::execute_from(builders, Box::new(()), timely_config.worker, move |worker| {
        // Every log line of this worker's thread names it (an error span: on whatever the
        // filter lets through, warnings included, not only at info).
        let _span = tracing::error_span!("worker", worker = worker.index()).entered();
        let shared = Shared {
            metrics: &metrics,
            readiness: &readiness,
            local_workers,
            failed: &failed,
            fetched_bytes: &fetched_bytes,
            peers: peers.as_deref().map(|p| (p, peer_timeout)),
        };
        let continues = checkpoints && !fresh && init_model.is_none();
        let start = Start { init_model: init_model.as_deref(), restored: restored.as_deref(), checkpoints, continues };
        // A panic (a lost peer poisons timely's queues) fails the process as an error does.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_worker(worker, &config, start, &stop, shared)
        }))
        .unwrap_or_else(|panic| Err(PipelineError::Panicked(panic_message(&*panic))));
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
        result
    })
    .map_err(PipelineError::Timely)?;
    outcome(guards.join(), network)
}

/// What the workers' results say: their summaries, or the error that stopped the run.
fn outcome(
    results: Vec<Result<Result<WorkerSummary, PipelineError>, String>>,
    network: Option<(CommsGuard, Arc<cluster::PeerWatch>)>,
) -> Result<Vec<WorkerSummary>, PipelineError> {
    let mut summaries = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        // Timely's own panics, after the worker's function (stepping what is left of a dataflow
        // on poisoned queues), come as the payload's debug text: "Any { .. }".
        match result.map_err(|panic| PipelineError::Panicked(format!("timely: {panic}"))).and_then(|r| r) {
            Ok(summary) => summaries.push(summary),
            Err(error) => errors.push(error),
        }
    }
    if let Some((threads, watch)) = network {
        if errors.is_empty() {
            drop(threads); // joins timely's communication threads: the peers said goodbye
        } else {
            // Joining would wait on live peers' sockets, and panic on the failed ones' threads.
            std::mem::forget(threads);
            if let Some(loss) = watch.first() {
                // The panics of poisoned queues say nothing; the lost peer does.
                errors.retain(
                    |e| !matches!(e, PipelineError::Panicked(m) if m.starts_with("timely: ") || cluster::is_poisoned(m)),
                );
                errors.push(PipelineError::lost(loss));
            }
        }
    }
    // The error that stopped the run: this process's own first, then a lost peer, then the
    // "another worker failed" of the workers it stopped.
    errors.sort_by_key(|e| match e {
        PipelineError::AnotherWorkerFailed { .. } => 2,
        PipelineError::PeerLost { .. } => 1,
        _ => 0,
    });
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(summaries),
    }
}

/// What a panic said, where it said it in words.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".into(),
    }
}

/// Timely's allocators: its own for one process; for a cluster, dlpipe's connections
/// ([`cluster`]), with timely's communication threads and what watches the peers.
#[allow(clippy::type_complexity)]
fn communication(
    config: CommunicationConfig,
    peer_timeout: Duration,
    readiness: &Arc<Readiness>,
) -> Result<(Vec<AllocatorBuilder>, Option<(CommsGuard, Arc<cluster::PeerWatch>)>), PipelineError> {
    match config {
        CommunicationConfig::Cluster { threads, process, addresses, .. } => {
            let connected = cluster::connect(addresses, process, threads, peer_timeout, Arc::clone(readiness))?;
            Ok((connected.builders, Some((connected.threads, connected.watch))))
        }
        other => Ok((other.try_build().map_err(PipelineError::Timely)?.0, None)),
    }
}

/// Timely's configuration for `workers` threads in one process, as timely's `-w workers`.
pub fn one_process(workers: usize) -> timely::Config {
    if workers > 1 {
        timely::Config::process(workers)
    } else {
        timely::Config::thread()
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

/// What the workers of one process share.
struct Shared<'a> {
    metrics: &'a Arc<Metrics>,
    readiness: &'a Arc<Readiness>,
    local_workers: usize,
    failed: &'a Arc<AtomicBool>,
    /// The process's bound on bytes between fetching and decoding.
    fetched_bytes: &'a Arc<ByteBudget>,
    /// A cluster's peers, and how long one may be gone before this process stops.
    peers: Option<(&'a cluster::PeerWatch, Duration)>,
}

/// One worker: its Kafka clients and partitions, its model and classifier, its dataflow, and
/// the loop that steps it.
fn run_worker(
    worker: &mut timely::worker::Worker,
    config: &Config,
    start: Start,
    stop: &Arc<AtomicBool>,
    shared: Shared,
) -> Result<WorkerSummary, PipelineError> {
    let (index, peers) = (worker.index(), worker.peers());
    let p = &config.pipeline;
    if index == 0 && p.create_topics {
        kafka::create_topics(config)?;
    }
    let (consumer, partitions) = kafka::input_consumer(config, index, peers, shared.metrics)?;
    let producer = kafka::output_producer(config, index, peers)?;
    let learned = LearnFrom::of(start.restored, start.continues, p.start_from);
    let input = kafka::assign_input(&consumer, config, index, &partitions, learned)?;
    let feedback = (!p.feedback_topic.is_empty())
        .then(|| kafka::feedback_reader(config, index, peers, &index.to_string(), shared.metrics, start.restored))
        .transpose()?;

    let device = &config.model.devices[index % config.model.devices.len()];
    let devices: Vec<_> = config.model.devices.iter().map(|d| parse_device(d)).collect::<Result<_, _>>()?;
    let manifest = resolve_precision(&config.model.name, &config.model.dir, config.model.precision, &devices)?;
    let featurizer = Featurizer::load(&manifest, parse_device(device)?)?;
    let manifest = featurizer.manifest().clone();
    let resizing = Resizing::of(&config.model, devices.iter().all(|d| d.is_cuda()));
    tracing::info!(worker = index, model = manifest.name, device, resize_on = %resizing.describe(), "model loaded");
    let metrics = shared.metrics.for_worker(index, &p.input_topic);
    let online = online_head(config, &manifest, &start, index, &metrics)?;
    let promotions = promotion_reader(config, &start, &online, index)?;
    let classifier = classifier(&online, feedback, promotions, &input.starts, &manifest);
    let mut checkpoints = checkpoints(config, &start, &online, &consumer, &manifest, index, shared.metrics)?;
    if let (Some(Some(writer)), DeliveryGuarantee::ExactlyOnce) = (&mut checkpoints, p.delivery) {
        writer.registered_workers = Some(peers);
    }

    let (backlog, fatal): (SharedBacklog, Fatal) = Default::default();
    let dataflow = Dataflow {
        source: input.source,
        input: input.assigned,
        sink: sink_spec(config, &manifest, input.starts),
        delivery: delivery(config, producer, &consumer, start.checkpoints, index),
        backlog: Rc::clone(&backlog),
        stop: Arc::clone(stop),
        fatal: Rc::clone(&fatal),
        work: Work::new(config, featurizer, device, resizing, shared.metrics, &index.to_string())?,
        fetched_bytes: Arc::clone(shared.fetched_bytes),
        max_decoding: p.max_decoding,
        batching: Batching { max_batch: config.model.batch_size, max_wait: Duration::from_millis(p.max_batch_wait_ms) },
        classifier,
        top_k: p.top_k,
        checkpoints,
        metrics,
    };
    let probes = dataflow.build(worker);
    shared.readiness.worker_ready();
    let watched = run_loop::Watched { backlog, fatal, online: online.clone(), model_name: &manifest.name };
    run_loop::run(worker, config, &probes, watched, &shared)?;
    let learned = online.map(|head| (head.borrow().model.updates(), head.borrow().metrics.accuracy()));
    let (updates, accuracy) = learned.unwrap_or_default();
    Ok(WorkerSummary { worker: index, partitions, updates, accuracy })
}

/// The online classifier (with `head = "online_lr"`), which worker 0 checkpoints; the others'
/// classifiers are the same.
fn online_head(
    config: &Config,
    manifest: &Manifest,
    start: &Start,
    index: usize,
    metrics: &WorkerMetrics,
) -> Result<Option<Rc<RefCell<OnlineLrHead>>>, PipelineError> {
    match config.pipeline.head {
        HeadKind::OnlineLr => {
            let every = if start.checkpoints && index == 0 { config.pipeline.checkpoint_every_epochs } else { 0 };
            let counters = metrics.learner.clone();
            let head = heads::online_head(config, manifest, start.init_model, start.restored, every, counters)?;
            if index == 0 {
                log_class_weights(config, head.model.config(), start);
            }
            Ok(Some(Rc::new(RefCell::new(head))))
        }
        HeadKind::Imagenet if !manifest.has(OutputKind::Logits) || manifest.class_names.is_empty() => {
            Err(PipelineError::Head { head: "imagenet", needs: "named classes", model: manifest.name.clone() })
        }
        HeadKind::Imagenet => Ok(None),
    }
}

/// Says which class weights the stream learner applies. They are the model's: a checkpoint's
/// or an init model's config rules over `[learner]`, class weights included, so a different
/// configured value is a warning.
fn log_class_weights(config: &Config, model: &crate::learn::LearnerConfig, start: &Start) {
    let applied = &model.class_weights;
    let from = match (start.init_model, start.restored) {
        (Some(_), _) => "the init model",
        (None, Some(_)) => "the checkpoint",
        (None, None) => "learner.class_weights",
    };
    tracing::info!(class_weights = %applied, from, "stream learner class weights");
    if *applied != config.learner.class_weights {
        tracing::warn!(
            configured = %config.learner.class_weights,
            applied = %applied,
            "learner.class_weights differs from the class weights {from} learns with; those apply, as the rest of \
             its learner config does"
        );
    }
}

/// What classifies the records: the online classifier, learning from where `starts` says,
/// or the model's own classes.
fn classifier(
    online: &Option<Rc<RefCell<OnlineLrHead>>>,
    feedback: Option<kafka::FeedbackReader>,
    promotions: Option<promotions::PromotionReader>,
    starts: &[Position],
    manifest: &Manifest,
) -> Classifier {
    match online {
        Some(head) => Classifier::Online {
            head: Rc::clone(head),
            feedback: feedback.map(Box::new),
            learn_from: starts.iter().map(|s| (s.partition, s.learned)).collect(),
            promotions,
        },
        None => Classifier::Imagenet { class_names: manifest.class_names.clone() },
    }
}

/// Worker 0's reader of the group's promotions, for the online learner. A run that continues
/// the group reads those its checkpoint has not taken (all of them without one); `--fresh` and
/// `--init-model` choose the classifier, so only promotions announced from now on apply.
fn promotion_reader(
    config: &Config,
    start: &Start,
    online: &Option<Rc<RefCell<OnlineLrHead>>>,
    index: usize,
) -> Result<Option<promotions::PromotionReader>, PipelineError> {
    if index != 0 || online.is_none() {
        return Ok(None);
    }
    let from = match (start.continues, start.restored.and_then(|c| c.info.promoted_through)) {
        (true, Some(taken)) => rdkafka::Offset::Offset(taken + 1),
        (true, None) => rdkafka::Offset::Beginning,
        (false, _) => rdkafka::Offset::End,
    };
    let p = &config.pipeline;
    Ok(Some(promotions::PromotionReader::new(&config.kafka, &p.model_topic, &p.group_id, from)?))
}

/// The topics the sink writes, where each partition starts, and its retry and commit bounds.
fn sink_spec(config: &Config, manifest: &Manifest, starts: Vec<Position>) -> SinkSpec {
    let p = &config.pipeline;
    SinkSpec {
        input_topic: p.input_topic.clone(),
        predictions_topic: p.predictions_topic.clone(),
        dead_letter_topic: p.dead_letter_topic.clone(),
        model: ModelId { name: manifest.name.clone(), sha256: manifest.sha256.clone().unwrap_or_default() },
        features_topic: (!p.features_topic.is_empty()).then(|| p.features_topic.clone()),
        starts,
        give_up_after: Duration::from_secs(config.kafka.retry_timeout_secs),
        transaction_timeout: crate::kafka::transaction_timeout(&config.kafka),
        partial_commit_after: (p.delivery == DeliveryGuarantee::ExactlyOnce && p.partial_commit_ms > 0)
            .then(|| Duration::from_millis(p.partial_commit_ms)),
    }
}

/// How the sink publishes. At-least-once: with checkpoints the group's offsets are committed
/// with them (never ahead of one); without, by each worker's sink as its epochs are
/// published. Exactly-once: by each worker's sink, in the transaction of the outputs.
fn delivery(
    config: &Config,
    producer: BaseProducer<SinkContext>,
    consumer: &Arc<BaseConsumer<LagContext>>,
    checkpoints: bool,
    index: usize,
) -> Delivery<LagContext> {
    match config.pipeline.delivery {
        DeliveryGuarantee::AtLeastOnce => {
            Delivery::AtLeastOnce { producer, committer: (!checkpoints).then(|| Arc::clone(consumer)) }
        }
        DeliveryGuarantee::ExactlyOnce => {
            let (kafka, group) = (config.kafka.clone(), config.pipeline.group_id.clone());
            let renew = Box::new(move || kafka::transactional_producer(&kafka, &group, index).map_err(Into::into));
            Delivery::ExactlyOnce { producer: TxnProducer { producer, renew }, consumer: Arc::clone(consumer) }
        }
    }
}

/// With checkpoints: worker 0's writer (the others pass their positions on to it).
fn checkpoints(
    config: &Config,
    start: &Start,
    online: &Option<Rc<RefCell<OnlineLrHead>>>,
    consumer: &Arc<BaseConsumer<LagContext>>,
    manifest: &Manifest,
    index: usize,
    metrics: &Metrics,
) -> Result<Option<Option<model_topic::CheckpointWriter>>, PipelineError> {
    if online.is_none() || !start.checkpoints {
        return Ok(None);
    }
    if index != 0 {
        return Ok(Some(None));
    }
    let (kafka, p) = (&config.kafka, &config.pipeline);
    let files = (!p.snapshot_dir.as_os_str().is_empty())
        .then(|| model_topic::SnapshotFiles { dir: p.snapshot_dir.clone(), retain: p.snapshot_retain });
    Ok(Some(Some(model_topic::CheckpointWriter::new(
        model_topic::writer_producer(kafka, &p.group_id)?,
        kafka.clone(),
        Arc::clone(consumer),
        p.delivery == DeliveryGuarantee::AtLeastOnce,
        p.model_topic.clone(),
        p.group_id.clone(),
        p.input_topic.clone(),
        featurizer_metadata(manifest),
        files,
        metrics.checkpoints_written.with_label_values::<&str>(&[]),
        metrics.checkpoint_seconds.with_label_values::<&str>(&[]),
    ))))
}
