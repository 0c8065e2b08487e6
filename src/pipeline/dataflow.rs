//! The dataflow of one worker, read top to bottom in the order records flow:
//!
//! ```text
//! kafka_source ─► labelled / unlabelled lanes: fetch_decode ─► featurize
//!   ─► learn_predict (labelled examples, inline or joined from the feedback topic, broadcast;
//!                     promotions from the model topic, broadcast)
//!   ─► kafka_sink (at least or exactly once) ─► checkpoint (worker 0 writes)
//! ```
//!
//! Dead letters of every stage join the outcomes before the sink. One probe per operator
//! feeds the frontier-lag metric; the last one says when the dataflow is done.

// Dead letters travel through the dataflow as data, in `Result`s; boxing them buys nothing.
#![allow(clippy::result_large_err)]

use super::heads::{ImagenetHead, LearnerState, OnlineLrHead};
use super::kafka::FeedbackReader;
use super::promotions::PromotionReader;
use super::work::Work;
use crate::metrics::kafka::LagContext;
use crate::metrics::WorkerMetrics;
use dlpipe_operators::{
    checkpoint, feedback_join, kafka_feedback_source, kafka_source, AssignedConsumer, Batching, ByteBudget, DeadLetter,
    Delivery, Epoch, Fatal, Featured, Featurize, Feedback, FetchDecode, ImageRecord, KafkaSink, LabelledExample,
    LearnPredict, Outcome, Pixels, Prepare, SharedBacklog, SinkSpec, SourceSpec,
};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::{Broadcast, Filter, Map, ToStream};
use timely::dataflow::operators::{Concat, OkErr, Probe};
use timely::dataflow::StreamVec;

/// The operators' probes by name, in the order records pass them.
pub(super) type Probes = Vec<(&'static str, ProbeHandle<Epoch>)>;

/// What classifies the records.
pub(super) enum Classifier {
    /// The online learner, learning the labelled records (inline, and with a feedback topic
    /// joined late) from `learn_from` on in each partition, and taking the promotions that
    /// worker 0's reader reads.
    Online {
        head: Rc<RefCell<OnlineLrHead>>,
        feedback: Option<Box<FeedbackReader>>,
        learn_from: BTreeMap<i32, i64>,
        promotions: Option<PromotionReader>,
    },
    /// The model's own classes; learns nothing.
    Imagenet { class_names: Vec<String> },
}

/// Everything one worker's dataflow is made of.
pub(super) struct Dataflow {
    pub input: AssignedConsumer<LagContext>,
    pub source: SourceSpec,
    pub backlog: SharedBacklog,
    pub stop: Arc<AtomicBool>,
    pub fatal: Fatal,
    pub work: Work,
    pub fetched_bytes: Arc<ByteBudget>,
    pub max_decoding: usize,
    pub batching: Batching,
    pub classifier: Classifier,
    pub top_k: usize,
    pub sink: SinkSpec,
    pub delivery: Delivery<LagContext>,
    /// With checkpoints: worker 0's writer (`None` on the others, which only pass positions on).
    pub checkpoints: Option<Option<super::model_topic::CheckpointWriter>>,
    pub metrics: WorkerMetrics,
}

impl Dataflow {
    /// Builds the dataflow on `worker`; returns its probes (the last one: done).
    pub(super) fn build(self, worker: &mut timely::worker::Worker) -> Probes {
        let mut probes = Probes::new();
        worker.dataflow::<Epoch, _, _>(|scope| {
            let Dataflow { input, source, backlog, stop, fatal, metrics, .. } = self;
            let (backlog_of_source, stop_source) = (Rc::clone(&backlog), Arc::clone(&stop));
            let raw =
                kafka_source::<ImageRecord, _>(scope, input, source, backlog_of_source, stop_source, metrics.source);
            let (handle, raw) = raw.probe();
            probes.push(("kafka_source", handle));
            let (records, unreadable) = raw.ok_err::<Vec<ImageRecord>, _, Vec<DeadLetter>, _, _>(|r| r);
            // Labelled and unlabelled records are fetched, decoded and featurized in lanes of
            // their own. The learner waits for every labelled record of an epoch
            // (determinism), but not for unlabelled ones: `learn_predict` predicts those that
            // come late with a frozen copy of their epoch's classifier. So an unlabelled
            // record behind a slow server delays its own prediction only.
            let (labelled, unlabelled) = records.ok_err::<Vec<ImageRecord>, _, Vec<ImageRecord>, _, _>(|r| {
                if r.label.is_some() {
                    Ok(r)
                } else {
                    Err(r)
                }
            });
            // One probe per operator for both lanes: the frontier of the two.
            let (fetched, featurized) = (ProbeHandle::new(), ProbeHandle::new());
            probes.push(("fetch_decode", fetched.clone()));
            probes.push(("featurize", featurized.clone()));
            let lanes = Lanes {
                work: &self.work,
                fetched_bytes: &self.fetched_bytes,
                max_decoding: self.max_decoding,
                batching: self.batching,
                fatal: &fatal,
                fetch_metrics: &metrics.fetch_decode,
                featurize_metrics: &metrics.featurize,
                probes: (&fetched, &featurized),
            };
            let lane = |records| lanes.lane(records);
            let (labelled, labelled_dead) = lane(labelled);
            let (unlabelled, unlabelled_dead) = lane(unlabelled);
            let Classified { predictions, states, feedback_dead } =
                classify(labelled, unlabelled, self.classifier, self.top_k, &stop, metrics.learn_predict);
            let (handle, predictions) = predictions.probe();
            probes.push(("learn_predict", handle));
            let dead = unreadable.concat(labelled_dead).concat(unlabelled_dead).map(Outcome::Dead);
            let mut outcomes = predictions.map(Outcome::Predicted).concat(dead);
            if let Some(feedback_dead) = feedback_dead {
                outcomes = outcomes.concat(feedback_dead);
            }
            let positions = outcomes.kafka_sink(self.delivery, self.sink, backlog, Rc::clone(&fatal), metrics.sink);
            let (handle, positions) = positions.probe();
            probes.push(("kafka_sink", handle));
            // Checkpoints are of the online learner only, which gives states.
            if let (Some(writer), Some(states)) = (self.checkpoints, states) {
                let (handle, _checkpointed) = checkpoint(positions, states, writer, fatal).probe();
                probes.push(("checkpoint", handle));
            }
        });
        probes
    }
}

/// What both lanes of a worker share: its work, and one probe per operator.
struct Lanes<'a> {
    work: &'a Work,
    fetched_bytes: &'a Arc<ByteBudget>,
    max_decoding: usize,
    batching: Batching,
    fatal: &'a Fatal,
    fetch_metrics: &'a dlpipe_operators::FetchDecodeMetrics,
    featurize_metrics: &'a dlpipe_operators::FeaturizeMetrics,
    probes: (&'a ProbeHandle<Epoch>, &'a ProbeHandle<Epoch>),
}

impl Lanes<'_> {
    /// One lane: `records` fetched, decoded and featurized; the featured records, and the
    /// dead letters of those that could not be.
    fn lane<'scope>(
        &self,
        records: StreamVec<'scope, Epoch, ImageRecord>,
    ) -> (StreamVec<'scope, Epoch, Featured>, StreamVec<'scope, Epoch, DeadLetter>) {
        let (fetch, decode) = (Arc::clone(&self.work.fetch), Arc::clone(&self.work.decode));
        let prepare = Prepare {
            fetch: move |r: &ImageRecord| fetch(r),
            decode: move |r: &ImageRecord, bytes: &[u8]| decode(r, bytes),
            budget: Arc::clone(self.fetched_bytes),
        };
        let decoded =
            records.fetch_decode(self.max_decoding, prepare, self.fetch_metrics.clone()).probe_with(self.probes.0);
        let (decoded, undecodable) = decoded.ok_err::<Vec<_>, _, Vec<DeadLetter>, _, _>(|r| r);
        let model = Rc::clone(&self.work.model);
        let model = move |images: &[&Pixels]| model.borrow_mut()(images);
        let featured = decoded
            .featurize(self.batching, model, Rc::clone(self.fatal), self.featurize_metrics.clone())
            .probe_with(self.probes.1);
        let (featured, unfeaturized) = featured.ok_err::<Vec<Featured>, _, Vec<DeadLetter>, _, _>(|r| r);
        (featured, undecodable.concat(unfeaturized))
    }
}

/// What `learn_predict` with the classifier gives.
struct Classified<'scope> {
    predictions: StreamVec<'scope, Epoch, dlpipe_operators::Prediction>,
    /// The online learner's states, for checkpoints.
    states: Option<StreamVec<'scope, Epoch, LearnerState>>,
    /// With a feedback topic, the dead letters of the feedback source and join.
    feedback_dead: Option<StreamVec<'scope, Epoch, Outcome>>,
}

/// `learn_predict` with the classifier.
fn classify<'scope>(
    labelled: StreamVec<'scope, Epoch, Featured>,
    unlabelled: StreamVec<'scope, Epoch, Featured>,
    classifier: Classifier,
    top_k: usize,
    stop: &Arc<AtomicBool>,
    metrics: dlpipe_operators::LearnPredictMetrics,
) -> Classified<'scope> {
    let scope = labelled.scope();
    let featured = labelled.clone().concat(unlabelled.clone());
    match classifier {
        Classifier::Online { head, feedback, learn_from, promotions } => {
            let mut examples = labelled.flat_map(|f| LabelledExample::of(&f));
            let mut feedback_dead = None;
            if let Some(reader) = feedback {
                // Records without an inline label wait for theirs from the feedback topic (and
                // so, here, hold back the learner as labelled ones do).
                let (received, unreadable) =
                    kafka_feedback_source(scope, reader.consumer, reader.spec, Arc::clone(stop), reader.source_metrics)
                        .ok_err::<Vec<Feedback>, _, Vec<DeadLetter>, _, _>(|r| r);
                let joined = feedback_join(unlabelled, received, reader.retention, reader.join_metrics);
                examples = examples.concat(joined.examples);
                feedback_dead = Some(unreadable.concat(joined.dead_letters).map(Outcome::FeedbackDead));
            }
            // Records before a partition's learned offset are in the restored classifier
            // already: replayed only to publish their outputs.
            let examples =
                examples.filter(move |x| learn_from.get(&x.partition).is_none_or(|from| x.offset >= *from)).broadcast();
            let promotions = super::promotions::promotions(&examples, promotions).broadcast();
            let learned = featured.learn_predict_states(examples, promotions, head, top_k, metrics);
            Classified { predictions: learned.predictions, states: Some(learned.states), feedback_dead }
        }
        Classifier::Imagenet { class_names } => {
            // Nothing to learn, and no epoch to wait for.
            let nothing = Vec::<LabelledExample>::new().to_stream(scope);
            let predictions = featured.learn_predict(nothing, ImagenetHead { class_names }, top_k, metrics);
            Classified { predictions, states: None, feedback_dead: None }
        }
    }
}
