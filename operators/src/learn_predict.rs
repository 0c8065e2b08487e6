//! `learn_predict`: featured records in, predictions out, while a classifier learns from the
//! labelled ones (test-then-train).
//!
//! **In:** this worker's `Featured` records (first input), and every worker's labelled
//! examples, broadcast, so each worker holds the same classifier (second input).
//! **Out:** one `Prediction` per featured record, at the record's epoch.
//! **Progress and determinism:** a record of epoch e is predicted with the classifier that has
//! learned every labelled example of the epochs before e and nothing of e or later. Epoch e's
//! examples are applied once the labelled input's frontier has passed e, sorted by
//! (partition, offset), after every record of epochs <= e that is here has been predicted. The
//! classifier after epoch e therefore depends only on the input records and the epoch
//! boundaries, not on the number of workers, on which worker read which partition, or on
//! timing. Records of epoch e are held (with a capability) only until the frontier of the
//! labelled input reaches e.
//!
//! **Late records:** learning does not wait for the records input. A record that is slow to
//! arrive (an unlabelled image behind a slow server: labelled ones hold back the labelled
//! input, and so the learner, by construction) must not hold back every later prediction of
//! every worker. So when epoch l is learned while records of epoch l or earlier may still come
//! (the records frontier is at most l), the classifier is first frozen as it is, a copy
//! ([`Head::freeze`]) kept under l; a record of epoch e that comes after the head has learned
//! past e is predicted by the earliest copy kept under an epoch >= e, which is the classifier
//! of the epochs before e, as it would have been had the record come in time. Copies are
//! dropped once the records frontier has passed them. At most [`MAX_FROZEN`] are kept: past
//! that, learning waits for the late records as it did before (memory stays bounded, and
//! nothing changes but when).
//!
//! **Promotions** ([`learn_predict_states`]): a third input of classifiers announced to take
//! over (or shadow) the head at an epoch ([`Promotion`], broadcast). One takes effect at
//! epoch E = the greatest of its announced epoch, its timestamp (a promotion read after the
//! stream passed its epoch applies as soon as it can) and the previous promotion's E (they
//! apply in the order announced): after the records of epoch E are predicted and before E's
//! examples are learned, once the promotions' frontier has passed E. So, like learning, where
//! the switch falls depends only on the inputs and the epoch boundaries.
//!
//! **States** ([`learn_predict_states`], for a [`Learner`]): a second output carries the
//! head's states. The operator holds a capability there at the learned frontier (every
//! labelled example of the epochs before it learned, none of later ones), downgraded as that
//! frontier advances; each time it does, the head may give its state
//! ([`Learner::learned_through`]), sent at that frontier. Once the labelled input is done and
//! learned the frontier is `Epoch::MAX`: the final state is sent there and the capability
//! dropped. So the states' frontier is the learned frontier, which is what checkpoints are cut
//! at. A state at frontier F has also taken every promotion of the epochs before F.

use crate::metrics::LearnPredictMetrics;
use crate::records::{ClassScore, ClassifierId, Epoch, Featured, LabelledExample, Prediction, Promotion};
use std::collections::BTreeMap;
use std::time::Instant;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{OutputBuilder, OutputBuilderSession};
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;
use timely::progress::Antichain;

/// Frozen copies of the classifier kept at most (one per epoch learned while a record may still
/// come late): 32 s of learning ahead of a late record with 1 s epochs, more than the 15 s a
/// fetch may take; a copy of a 1000-class, 1280-feature classifier is about 5 MB.
pub const MAX_FROZEN: usize = 32;

/// What predicts: a classifier, or a frozen copy of one.
pub trait Predict: 'static {
    /// The `k` most probable classes of one record.
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore>;
    /// The model version predictions report: updates applied so far.
    fn version(&self) -> u64;
    /// Where the classifier started (a new learner, or the file it was loaded or promoted from).
    fn classifier(&self) -> ClassifierId;
}

/// The classifier behind `learn_predict`: the online logistic regression, or a pretrained
/// model's own classes.
pub trait Head: Predict {
    /// A copy of the head that predicts as the head does now.
    type Frozen: Predict;
    /// Freezes the head's predictions as they are now, for records that come late (see the
    /// module's doc). Called only while such records may still come.
    fn freeze(&self) -> Self::Frozen;
    /// Learns one epoch's labelled examples, given in (partition, offset) order.
    fn learn(&mut self, epoch: Epoch, examples: &[LabelledExample]);
    /// Takes a promotion at `epoch` (see the module's doc): before learning that epoch. A head
    /// that cannot take another classifier keeps its own, and says so.
    fn promote(&mut self, epoch: Epoch, promotion: &Promotion) {
        tracing::warn!(epoch, id = %promotion.id, "this classifier takes no promotion: it is ignored");
    }
}

/// A head whose states are checkpointed: [`learn_predict_states`] sends them on.
pub trait Learner: Head {
    /// What a checkpoint at a learned frontier holds.
    type State: Clone + 'static;
    /// Says that the head has now learned every example of the epochs before `frontier` and
    /// none of later epochs, and returns its state then if one is due for a checkpoint (the
    /// head decides how often; at `Epoch::MAX`, the end, one should always be). Called each
    /// time the learned frontier advances.
    fn learned_through(&mut self, frontier: Epoch) -> Option<Self::State>;
}

/// What [`learn_predict_states`] gives.
pub struct Learned<'scope, S> {
    /// One per featured record, at its epoch.
    pub predictions: StreamVec<'scope, Epoch, Prediction>,
    /// The head's states, each at its learned frontier; the stream's frontier is the learned
    /// frontier.
    pub states: StreamVec<'scope, Epoch, S>,
}

/// `metrics` counts predictions, times each epoch's predictions and learning, and gauges the
/// records held for their epoch's labels.
pub fn learn_predict<'scope, H: Head>(
    featured: StreamVec<'scope, Epoch, Featured>,
    labelled: StreamVec<'scope, Epoch, LabelledExample>,
    head: H,
    top_k: usize,
    metrics: LearnPredictMetrics,
) -> StreamVec<'scope, Epoch, Prediction> {
    use timely::dataflow::operators::vec::ToStream;
    let none = Vec::<Promotion>::new().to_stream(featured.scope());
    build(featured, labelled, none, head, |_: &mut H, _| None::<()>, top_k, metrics).predictions
}

/// [`learn_predict()`] taking `promotions` too, and the head's states as it learns (see the
/// module's doc).
pub fn learn_predict_states<'scope, H: Learner>(
    featured: StreamVec<'scope, Epoch, Featured>,
    labelled: StreamVec<'scope, Epoch, LabelledExample>,
    promotions: StreamVec<'scope, Epoch, Promotion>,
    head: H,
    top_k: usize,
    metrics: LearnPredictMetrics,
) -> Learned<'scope, H::State> {
    build(featured, labelled, promotions, head, H::learned_through, top_k, metrics)
}

/// The operator, with `state_at` for the head's state at a learned frontier.
fn build<'scope, H: Head, S: Clone + 'static>(
    featured: StreamVec<'scope, Epoch, Featured>,
    labelled: StreamVec<'scope, Epoch, LabelledExample>,
    promotions: StreamVec<'scope, Epoch, Promotion>,
    head: H,
    mut state_at: impl FnMut(&mut H, Epoch) -> Option<S> + 'static,
    top_k: usize,
    metrics: LearnPredictMetrics,
) -> Learned<'scope, S> {
    let mut builder = OperatorBuilder::new("LearnPredict".to_owned(), featured.scope());
    let mut input1 = builder.new_input(featured, Pipeline);
    let mut input2 = builder.new_input(labelled, Pipeline);
    let mut input3 = builder.new_input(promotions, Pipeline);
    let (predicted, predictions) = builder.new_output();
    // The states are of the labels and promotions only: a record that may still come holds
    // back no state.
    let (stated, states) = builder.new_output_connection([(1, Antichain::from_elem(0)), (2, Antichain::from_elem(0))]);
    let mut predicted = OutputBuilder::<_, CapacityContainerBuilder<Vec<Prediction>>>::from(predicted);
    let mut stated = OutputBuilder::<_, CapacityContainerBuilder<Vec<S>>>::from(stated);
    builder.build(move |mut capabilities| {
        // The states' capability, at the learned frontier. The predictions' is not needed:
        // each epoch's records keep a capability of their own.
        let mut at_learned = capabilities.pop();
        let mut learning = Learning {
            head,
            top_k,
            metrics,
            records: BTreeMap::new(),
            examples: BTreeMap::new(),
            promotions: BTreeMap::new(),
            last_promotion: 0,
            frozen: BTreeMap::new(),
        };
        move |frontiers| {
            input1.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let entry = learning.records.entry(*cap.time()).or_insert_with(|| (cap, Vec::new()));
                for batch in data {
                    entry.1.append(batch);
                }
            });
            input2.for_each_stamp(|cap, data| {
                let Some(&epoch) = cap.least() else { return };
                let entry = learning.examples.entry(epoch).or_default();
                for batch in data {
                    entry.append(batch);
                }
            });
            input3.for_each_stamp(|cap, data| {
                let Some(&at) = cap.least() else { return };
                for batch in data {
                    learning.announce(at, batch);
                }
            });
            // Epochs below `labels_done` have all their labelled examples here, below
            // `promotions_done` all their promotions; records of epochs at or after
            // `records_done` may still come.
            let done = |i: usize| frontiers[i].frontier().first().copied().unwrap_or(Epoch::MAX);
            let inputs = Done { records: done(0), labels: done(1), promotions: done(2) };
            let learned = learning.run(inputs, &mut predicted.activate());
            if let Some(cap) = at_learned.as_mut().filter(|cap| *cap.time() < learned) {
                cap.downgrade(&learned);
                if let Some(state) = state_at(&mut learning.head, learned) {
                    stated.activate().session(cap).give(state);
                }
                if learned == Epoch::MAX {
                    at_learned = None;
                }
            }
        }
    });
    Learned { predictions, states }
}

/// What the operator holds between activations.
struct Learning<H: Head> {
    head: H,
    top_k: usize,
    metrics: LearnPredictMetrics,
    /// Records by epoch, with a capability to predict them at it.
    records: BTreeMap<Epoch, (Capability<Epoch>, Vec<Featured>)>,
    /// Labelled examples by epoch, not yet learned.
    examples: BTreeMap<Epoch, Vec<LabelledExample>>,
    /// Promotions by the epoch they take effect at, in the order announced.
    promotions: BTreeMap<Epoch, Vec<Promotion>>,
    /// The epoch the last promotion announced takes effect at: none takes effect earlier.
    last_promotion: Epoch,
    /// The head as it was before learning epoch l, under l, while records of epoch l or
    /// earlier may still come.
    frozen: BTreeMap<Epoch, H::Frozen>,
}

/// The inputs' frontiers: the least epoch of records, labelled examples and promotions that
/// may still come.
#[derive(Clone, Copy)]
struct Done {
    records: Epoch,
    labels: Epoch,
    promotions: Epoch,
}

/// Where predictions go.
type Predictions<'a> = OutputBuilderSession<'a, Epoch, CapacityContainerBuilder<Vec<Prediction>>>;

impl<H: Head> Learning<H> {
    /// Takes promotions stamped `at` (see the module's doc for the epoch each takes effect at).
    fn announce(&mut self, at: Epoch, batch: &mut Vec<Promotion>) {
        batch.sort_by_key(|p| p.offset);
        for promotion in batch.drain(..) {
            let epoch = promotion.at_epoch.unwrap_or(at).max(at).max(self.last_promotion);
            self.last_promotion = epoch;
            self.promotions.entry(epoch).or_default().push(promotion);
        }
    }

    /// Predicts, promotes and learns what can be, in order: for each epoch, its records, then
    /// its promotions, then its examples. Returns the learned frontier.
    fn run(&mut self, done: Done, output: &mut Predictions) -> Epoch {
        loop {
            let next_records = self.records.keys().next().copied();
            let next_examples = self.examples.keys().next().copied();
            let next_promotion = self.promotions.keys().next().copied();
            // Records of epoch e: once every earlier epoch's examples and promotions are in
            // and applied.
            if let Some(e) = next_records {
                let applied = next_examples.is_none_or(|l| l >= e) && next_promotion.is_none_or(|p| p >= e);
                if e <= done.labels && e <= done.promotions && applied {
                    self.predict(e, output);
                    continue;
                }
            }
            // Promotions of epoch p: once every earlier epoch's examples are in and learned,
            // every promotion of p is here, and the records of epochs <= p that are here are
            // predicted.
            if let Some(p) = next_promotion {
                let ready = p <= done.labels && p < done.promotions && next_examples.is_none_or(|l| l >= p);
                if ready && next_records.is_none_or(|e| e > p) && self.may_get_ahead(p, done.records) {
                    self.promote(p, done.records);
                    continue;
                }
            }
            // Examples of epoch l: once complete, once the records of epochs <= l that are
            // here are predicted and the promotions of epochs <= l taken.
            if let Some(l) = next_examples {
                let ready = l < done.labels && l < done.promotions && next_promotion.is_none_or(|p| p > l);
                if ready && next_records.is_none_or(|e| e > l) && self.may_get_ahead(l, done.records) {
                    self.learn(l, done.records);
                    continue;
                }
            }
            break;
        }
        // A record still to come has an epoch of at least `records_done`: it needs no copy
        // kept under an earlier epoch.
        self.frozen = self.frozen.split_off(&done.records);
        self.metrics.waiting.set(self.records.values().map(|(_, r)| r.len() as i64).sum());
        self.metrics.frozen.set(self.frozen.len() as i64);
        let pending = self.examples.keys().chain(self.promotions.keys()).min().copied().unwrap_or(Epoch::MAX);
        done.labels.min(done.promotions).min(pending)
    }

    /// Whether the head may change at epoch `l` now: no record of epoch `l` or earlier may
    /// still come, or a copy of the head before `l` is (or may still be) kept for them.
    fn may_get_ahead(&self, l: Epoch, records_done: Epoch) -> bool {
        records_done > l || self.frozen.len() < MAX_FROZEN || self.frozen.contains_key(&l)
    }

    /// Keeps a copy of the head as it is, before it changes at epoch `l`, if records of epoch
    /// `l` or earlier may still come (the first copy under `l` stays: the head before `l`).
    fn freeze_before(&mut self, l: Epoch, records_done: Epoch) {
        if records_done <= l && !self.frozen.contains_key(&l) {
            self.frozen.insert(l, self.head.freeze());
        }
    }

    /// Takes the promotions of epoch `p`, in the order announced.
    fn promote(&mut self, p: Epoch, records_done: Epoch) {
        self.freeze_before(p, records_done);
        for promotion in self.promotions.remove(&p).expect("key exists") {
            self.head.promote(p, &promotion);
        }
    }

    /// Predicts the records of epoch `e`.
    fn predict(&mut self, e: Epoch, output: &mut Predictions) {
        let (cap, batch) = self.records.remove(&e).expect("key exists");
        let started = Instant::now();
        self.metrics.predicted.inc_by(batch.len() as u64);
        // Learned past e already (the records came late): the copy of the head of the epochs
        // before e.
        let predictor: &mut dyn Predict = match self.frozen.range_mut(e..).next() {
            Some((_, copy)) => copy,
            None => &mut self.head,
        };
        let (version, classifier) = (predictor.version(), predictor.classifier());
        let now = crate::records::now_ms();
        let mut session = output.session(&cap);
        for record in batch {
            let top_k = predictor.predict(&record, self.top_k);
            session.give(Prediction {
                record: record.record,
                top_k,
                classifier: classifier.clone(),
                model_version: version,
                predicted_at_ms: now,
                features: record.features,
            });
        }
        self.metrics.predict_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Learns the examples of epoch `l`, first freezing the head if records of epoch `l` or
    /// earlier may still come.
    fn learn(&mut self, l: Epoch, records_done: Epoch) {
        self.freeze_before(l, records_done);
        let mut batch = self.examples.remove(&l).expect("key exists");
        batch.sort_by_key(|x| (x.partition, x.offset));
        let started = Instant::now();
        self.head.learn(l, &batch);
        self.metrics.learn_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// A head shared with the code that built the dataflow (to read its metrics, snapshot it at
/// shutdown); the worker thread owns both, so a `RefCell` suffices.
impl<H: Head> Predict for std::rc::Rc<std::cell::RefCell<H>> {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        self.borrow_mut().predict(record, k)
    }

    fn version(&self) -> u64 {
        self.borrow().version()
    }

    fn classifier(&self) -> ClassifierId {
        self.borrow().classifier()
    }
}

impl<H: Head> Head for std::rc::Rc<std::cell::RefCell<H>> {
    type Frozen = H::Frozen;

    fn freeze(&self) -> H::Frozen {
        self.borrow().freeze()
    }

    fn learn(&mut self, epoch: Epoch, examples: &[LabelledExample]) {
        self.borrow_mut().learn(epoch, examples)
    }

    fn promote(&mut self, epoch: Epoch, promotion: &Promotion) {
        self.borrow_mut().promote(epoch, promotion)
    }
}

impl<H: Learner> Learner for std::rc::Rc<std::cell::RefCell<H>> {
    type State = H::State;

    fn learned_through(&mut self, frontier: Epoch) -> Option<H::State> {
        self.borrow_mut().learned_through(frontier)
    }
}

/// [`learn_predict()`] as a method of a stream of featured records.
pub trait LearnPredict<'scope> {
    /// Predicts each record with `head` as it was after learning every labelled example of
    /// the epochs before the record's, then learns the examples of each epoch once it is
    /// complete.
    ///
    /// ```
    /// use dlpipe_operators::{
    ///     ClassScore, ClassifierId, Epoch, Featured, Head, ImageRecord, LabelledExample, LearnPredict, Predict, Promotion,
    /// };
    /// use timely::dataflow::operators::vec::ToStream;
    /// use timely::dataflow::operators::Inspect;
    ///
    /// /// Predicts the label it saw most recently; its version is how many it has seen.
    /// #[derive(Clone)]
    /// struct Latest(Vec<String>);
    /// impl Predict for Latest {
    ///     fn predict(&mut self, _record: &Featured, _k: usize) -> Vec<ClassScore> {
    ///         self.0.last().map(|l| ClassScore { class: l.clone(), probability: 1.0 }).into_iter().collect()
    ///     }
    ///     fn version(&self) -> u64 {
    ///         self.0.len() as u64
    ///     }
    ///     fn classifier(&self) -> ClassifierId {
    ///         ClassifierId::new_learner()
    ///     }
    /// }
    /// impl Head for Latest {
    ///     type Frozen = Latest;
    ///     fn freeze(&self) -> Latest {
    ///         self.clone()
    ///     }
    ///     fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
    ///         self.0.extend(examples.iter().map(|x| x.label.clone()));
    ///     }
    ///     /// Takes a promoted list of labels, one per line.
    ///     fn promote(&mut self, _epoch: Epoch, promotion: &Promotion) {
    ///         self.0 = String::from_utf8_lossy(&promotion.classifier).lines().map(String::from).collect();
    ///     }
    /// }
    ///
    /// timely::example(|scope| {
    ///     let featured = |offset: i64| Featured {
    ///         record: ImageRecord {
    ///             id: offset.to_string(), uri: "mem://x".into(), label: None, partition: 0, offset, kafka_ts_ms: None, image: None,
    ///         },
    ///         features: vec![0.0],
    ///         logits: None,
    ///     };
    ///     // A labelled example and a record, both of epoch 0.
    ///     let example = LabelledExample { partition: 0, offset: 0, label: "cat".into(), features: vec![0.0] };
    ///     let labels = vec![example].to_stream(scope);
    ///     vec![featured(0)]
    ///         .to_stream(scope)
    ///         .learn_predict(labels, Latest(Vec::new()), 1, Default::default())
    ///         .inspect(|p| assert_eq!(p.model_version, 0, "epoch 0 is predicted before it is learned"));
    /// });
    /// ```
    fn learn_predict<H: Head>(
        self,
        labelled: StreamVec<'scope, Epoch, LabelledExample>,
        head: H,
        top_k: usize,
        metrics: LearnPredictMetrics,
    ) -> StreamVec<'scope, Epoch, Prediction>;

    /// As [`learn_predict`](LearnPredict::learn_predict), taking `promotions` too, and gives
    /// the head's states, each at its learned frontier (see the module's doc).
    fn learn_predict_states<H: Learner>(
        self,
        labelled: StreamVec<'scope, Epoch, LabelledExample>,
        promotions: StreamVec<'scope, Epoch, Promotion>,
        head: H,
        top_k: usize,
        metrics: LearnPredictMetrics,
    ) -> Learned<'scope, H::State>;
}

impl<'scope> LearnPredict<'scope> for StreamVec<'scope, Epoch, Featured> {
    fn learn_predict<H: Head>(
        self,
        labelled: StreamVec<'scope, Epoch, LabelledExample>,
        head: H,
        top_k: usize,
        metrics: LearnPredictMetrics,
    ) -> StreamVec<'scope, Epoch, Prediction> {
        learn_predict(self, labelled, head, top_k, metrics)
    }

    fn learn_predict_states<H: Learner>(
        self,
        labelled: StreamVec<'scope, Epoch, LabelledExample>,
        promotions: StreamVec<'scope, Epoch, Promotion>,
        head: H,
        top_k: usize,
        metrics: LearnPredictMetrics,
    ) -> Learned<'scope, H::State> {
        learn_predict_states(self, labelled, promotions, head, top_k, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LearnPredictMetrics;
    use crate::records::ImageRecord;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::probe::Handle as ProbeHandle;
    use timely::dataflow::operators::{Concat, Inspect, Probe};
    use timely::dataflow::{InputHandle, InputHandleVec};

    /// A head whose predictions name its version: the labels it has learned, in order (after
    /// those of a promotion, its classifier's bytes, one label per line; it names the promotion).
    #[derive(Clone, Default)]
    struct Labels(Vec<String>, ClassifierId);

    impl Predict for Labels {
        fn predict(&mut self, _record: &Featured, _k: usize) -> Vec<ClassScore> {
            vec![ClassScore { class: self.0.join(","), probability: 1.0 }]
        }

        fn version(&self) -> u64 {
            self.0.len() as u64
        }

        fn classifier(&self) -> ClassifierId {
            self.1.clone()
        }
    }

    impl Head for Labels {
        type Frozen = Labels;

        fn freeze(&self) -> Labels {
            self.clone()
        }

        fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
            self.0.extend(examples.iter().map(|x| x.label.clone()));
        }

        fn promote(&mut self, _epoch: Epoch, promotion: &Promotion) {
            self.0 = String::from_utf8_lossy(&promotion.classifier).lines().map(String::from).collect();
            self.1 = promotion.id.clone();
        }
    }

    /// Its state is its labels, given at every learned frontier.
    impl Learner for Labels {
        type State = String;

        fn learned_through(&mut self, _frontier: Epoch) -> Option<String> {
            Some(self.0.join(","))
        }
    }

    fn record(id: &str, offset: i64) -> Featured {
        let record = ImageRecord {
            id: id.into(),
            uri: format!("u/{id}"),
            label: None,
            partition: 0,
            offset,
            kafka_ts_ms: None,
            image: None,
        };
        Featured { record, features: vec![0.0], logits: None }
    }

    /// A prediction as (epoch, id, model version, the classifier's labels).
    type Seen = (Epoch, String, u64, String);

    fn example(label: &str, offset: i64) -> LabelledExample {
        LabelledExample { partition: 1, offset, label: label.into(), features: vec![0.0] }
    }

    /// `learn_predict_states` with a `Labels` head, fed by four inputs: records on time,
    /// records that come late, labelled examples and promotions; what it predicts, its gauge
    /// of frozen copies, the states it gives (with their times) and their frontier.
    struct Harness {
        on_time: InputHandleVec<Epoch, Featured>,
        late: InputHandleVec<Epoch, Featured>,
        labels: InputHandleVec<Epoch, LabelledExample>,
        /// `None` once closed (tests without promotions close it at once).
        promotions: Option<InputHandleVec<Epoch, Promotion>>,
        predicted: Rc<RefCell<Vec<Seen>>>,
        /// Which classifier made each prediction, in the order of `predicted`.
        classifiers: Rc<RefCell<Vec<ClassifierId>>>,
        frozen: prometheus::IntGauge,
        states: Rc<RefCell<Vec<(Epoch, String)>>>,
        learned: ProbeHandle<Epoch>,
    }

    impl Harness {
        /// The states' frontier (`None` once empty).
        fn learned(&self) -> Option<Epoch> {
            self.learned.with_frontier(|f| f.first().copied())
        }

        fn last_state(&self) -> Option<(Epoch, String)> {
            self.states.borrow().last().cloned()
        }
    }

    /// The harness, with its promotions input closed unless `promoting`.
    fn harness(worker: &mut timely::worker::Worker, promoting: bool) -> Harness {
        let (mut on_time, mut late, mut labels) = (InputHandle::new(), InputHandle::new(), InputHandle::new());
        let mut promotions = InputHandle::new();
        let predicted: Rc<RefCell<Vec<Seen>>> = Rc::default();
        let classifiers: Rc<RefCell<Vec<ClassifierId>>> = Rc::default();
        let named = Rc::clone(&classifiers);
        let metrics = LearnPredictMetrics::default();
        let frozen = metrics.frozen.clone();
        let seen = Rc::clone(&predicted);
        let states: Rc<RefCell<Vec<(Epoch, String)>>> = Rc::default();
        let given = Rc::clone(&states);
        let learned = worker.dataflow::<Epoch, _, _>(|scope| {
            let records = on_time.to_stream(scope).concat(late.to_stream(scope));
            let (labelled, promoted) = (labels.to_stream(scope), promotions.to_stream(scope));
            let out = learn_predict_states(records, labelled, promoted, Labels::default(), 1, metrics);
            out.predictions.inspect_core(move |event| {
                let Ok((stamp, batch)) = event else { return };
                let epoch = *stamp.least().expect("a stamped batch");
                for p in batch {
                    let class = p.top_k.first().map(|c| c.class.clone()).unwrap_or_default();
                    seen.borrow_mut().push((epoch, p.record.id.clone(), p.model_version, class));
                    named.borrow_mut().push(p.classifier.clone());
                }
            });
            let states = out.states.inspect_core(move |event| {
                let Ok((stamp, batch)) = event else { return };
                let at = *stamp.least().expect("a stamped batch");
                given.borrow_mut().extend(batch.iter().map(|s| (at, s.clone())));
            });
            states.probe().0
        });
        let promotions = promoting.then_some(promotions);
        Harness { on_time, late, labels, promotions, predicted, classifiers, frozen, states, learned }
    }

    #[test]
    fn the_states_frontier_is_the_learned_frontier_and_a_state_comes_at_each_step_of_it() {
        timely::execute_directly(|worker| {
            let mut harness = harness(worker, false);
            for _ in 0..5 {
                worker.step();
            }
            assert_eq!(harness.learned(), Some(0));
            assert_eq!(harness.last_state(), None, "nothing learned, no state");
            // Epochs 0 and 1 labelled and complete, no records: learned through both.
            harness.labels.send(example("l0", 0));
            harness.labels.advance_to(1);
            harness.labels.send(example("l1", 1));
            harness.on_time.advance_to(2);
            harness.late.advance_to(2);
            harness.labels.advance_to(2);
            for _ in 0..10 {
                worker.step();
            }
            assert_eq!(harness.learned(), Some(2));
            assert_eq!(harness.last_state(), Some((2, "l0,l1".to_owned())));
            // Epoch 2's example is here, its labels not complete: the frontier stays.
            harness.labels.send(example("l2", 2));
            for _ in 0..10 {
                worker.step();
            }
            assert_eq!(harness.learned(), Some(2));
            harness.labels.advance_to(3);
            for _ in 0..10 {
                worker.step();
            }
            assert_eq!(harness.learned(), Some(3));
            assert_eq!(harness.last_state(), Some((3, "l0,l1,l2".to_owned())));
            // The end: the final state at Epoch::MAX, then the states' frontier is empty.
            let Harness { on_time, late, labels, states, learned, .. } = harness;
            on_time.close();
            late.close();
            labels.close();
            while worker.step() {}
            assert_eq!(states.borrow().last().cloned(), Some((Epoch::MAX, "l0,l1,l2".to_owned())));
            assert_eq!(states.borrow().len(), 3);
            assert!(learned.done());
        });
    }

    fn promotion(offset: i64, at_epoch: Option<Epoch>, labels: &str) -> Promotion {
        let id = ClassifierId(labels.to_uppercase());
        let classifier = labels.as_bytes().to_vec();
        Promotion { role: crate::records::PromotionRole::Champion, id, at_epoch, offset, classifier }
    }

    #[test]
    fn a_promotion_takes_effect_at_its_epoch_once_known_and_promotions_apply_in_the_order_announced() {
        timely::execute_directly(|worker| {
            let mut harness = harness(worker, true);
            let mut promotions = harness.promotions.take().expect("promoting");
            // Epochs 0 to 7, a record and a label each, all here; a record of epoch 2 is late.
            harness.late.advance_to(2);
            for epoch in 0..8u64 {
                harness.on_time.advance_to(epoch);
                harness.labels.advance_to(epoch);
                harness.on_time.send(record(&format!("r{epoch}"), epoch as i64));
                harness.labels.send(example(&format!("l{epoch}"), epoch as i64));
            }
            let Harness { on_time, late, labels, predicted, classifiers, states, learned, .. } = harness;
            on_time.close();
            labels.close();
            let step = |worker: &mut timely::worker::Worker| (0..20).for_each(|_| _ = worker.step());
            // Until the promotions' frontier passes epoch 0, epoch 0 is not learned.
            step(worker);
            assert_eq!(predicted.borrow().len(), 1);
            assert_eq!(learned.with_frontier(|f| f.first().copied()), Some(0));
            // A announced for epoch 2: records of epoch 2 predicted before it, epoch 2 learned after.
            promotions.send(promotion(10, Some(2), "a"));
            promotions.advance_to(3);
            step(worker);
            assert_eq!(learned.with_frontier(|f| f.first().copied()), Some(3));
            // B read at epoch 3, announced for epoch 1 (late): at epoch 3.
            promotions.send(promotion(11, Some(1), "b"));
            promotions.advance_to(4);
            step(worker);
            // C for epoch 6, then D for epoch 5: D is announced after C, so it applies after it.
            promotions.send(promotion(12, Some(6), "c"));
            promotions.send(promotion(13, Some(5), "d"));
            promotions.close();
            let mut late = late;
            late.send(record("late", 99));
            late.close();
            while worker.step() {}
            let seen: BTreeMap<String, (Epoch, u64, String, String)> = predicted
                .borrow()
                .iter()
                .zip(classifiers.borrow().iter())
                .map(|((e, id, version, class), by)| (id.clone(), (*e, *version, class.clone(), by.0.clone())))
                .collect();
            let want = |e, v, class: &str, by: &str| (e, v, class.to_owned(), by.to_owned());
            let expected = BTreeMap::from([
                ("r0".to_owned(), want(0, 0, "", "")),
                ("r1".to_owned(), want(1, 1, "l0", "")),
                ("r2".to_owned(), want(2, 2, "l0,l1", "")),
                ("late".to_owned(), want(2, 2, "l0,l1", "")),
                ("r3".to_owned(), want(3, 2, "a,l2", "A")),
                ("r4".to_owned(), want(4, 2, "b,l3", "B")),
                ("r5".to_owned(), want(5, 3, "b,l3,l4", "B")),
                ("r6".to_owned(), want(6, 4, "b,l3,l4,l5", "B")),
                ("r7".to_owned(), want(7, 2, "d,l6", "D")),
            ]);
            assert_eq!(seen, expected);
            assert_eq!(states.borrow().last().cloned(), Some((Epoch::MAX, "d,l6,l7".to_owned())));
        });
    }

    #[test]
    fn a_late_record_holds_back_no_other_prediction_and_is_predicted_by_the_classifier_of_its_epoch() {
        timely::execute_directly(|worker| {
            let Harness { mut on_time, mut late, mut labels, predicted, frozen, .. } = harness(worker, false);
            // Epochs 0 to 3 on time, each with a record and a label; the record `late` of
            // epoch 1 has not come yet: its input stays at epoch 1.
            late.advance_to(1);
            for epoch in 0..4u64 {
                on_time.advance_to(epoch);
                labels.advance_to(epoch);
                on_time.send(record(&format!("r{epoch}"), epoch as i64));
                labels.send(example(&format!("l{epoch}"), epoch as i64));
            }
            on_time.advance_to(4);
            labels.advance_to(4);
            for _ in 0..20 {
                worker.step();
            }
            // Every on-time record is predicted by the classifier of the epochs before its own,
            // though a record of epoch 1 may still come.
            let want: Vec<Seen> = (0..4u64)
                .map(|e| {
                    let learned: Vec<String> = (0..e).map(|l| format!("l{l}")).collect();
                    (e, format!("r{e}"), e, learned.join(","))
                })
                .collect();
            assert_eq!(*predicted.borrow(), want);
            // Learned through epoch 3, with copies of the classifier before epochs 1, 2 and 3.
            assert_eq!(frozen.get(), 3);

            // The late record: predicted as if it had come in time, by the classifier that had
            // learned epoch 0 only, as r1 was.
            late.send(record("late", 9));
            late.close();
            on_time.close();
            labels.close();
            while worker.step() {}
            let last = predicted.borrow().last().cloned().unwrap();
            assert_eq!(last, (1, "late".to_owned(), 1, "l0".to_owned()));
            assert_eq!(predicted.borrow().len(), 5);
            assert_eq!(frozen.get(), 0, "no copy is kept once no record can come late");
        });
    }

    #[test]
    fn past_max_frozen_copies_learning_waits_for_the_late_record() {
        timely::execute_directly(|worker| {
            let Harness { mut on_time, mut late, mut labels, predicted, frozen, states, learned, .. } =
                harness(worker, false);
            let epochs = MAX_FROZEN as u64 + 10;
            late.advance_to(1);
            for epoch in 0..epochs {
                on_time.advance_to(epoch);
                labels.advance_to(epoch);
                on_time.send(record(&format!("r{epoch}"), epoch as i64));
                labels.send(example(&format!("l{epoch}"), epoch as i64));
            }
            on_time.advance_to(epochs);
            labels.advance_to(epochs);
            for _ in 0..50 {
                worker.step();
            }
            // Epochs 1 to MAX_FROZEN learned ahead (one copy each), then learning waits: the
            // records of epochs up to MAX_FROZEN + 1 are predicted, the later ones wait.
            assert_eq!(frozen.get(), MAX_FROZEN as i64);
            assert_eq!(predicted.borrow().len(), MAX_FROZEN + 2);
            // The states' frontier is the learned frontier, not the labels' frontier (`epochs`).
            let through = MAX_FROZEN as u64 + 1;
            assert_eq!(learned.with_frontier(|f| f.first().copied()), Some(through));
            let (at, labels_learned) = states.borrow().last().cloned().expect("a state");
            assert_eq!((at, labels_learned.split(',').count() as u64), (through, through));
            late.send(record("late", 99));
            late.close();
            on_time.close();
            labels.close();
            while worker.step() {}
            let predicted = predicted.borrow();
            assert_eq!(predicted.len(), epochs as usize + 1);
            assert!(predicted.iter().all(|(e, id, version, _)| *version == if id == "late" { 1 } else { *e }));
            assert_eq!(frozen.get(), 0);
            let (at, labels_learned) = states.borrow().last().cloned().expect("a state");
            assert_eq!((at, labels_learned.split(',').count() as u64), (Epoch::MAX, epochs));
            assert!(learned.done());
        });
    }
}
