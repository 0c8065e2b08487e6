//! `learn_predict`: featured records in, predictions out, while a classifier learns from the
//! labelled ones (test-then-train).
//!
//! **In:** this worker's `Featured` records (first input), and every worker's labelled
//! examples, broadcast, so each worker holds the same classifier (second input).
//! **Out:** one `Prediction` per featured record, at the record's epoch.
//! **Progress and determinism:** a record of epoch e is predicted with the classifier that has
//! learned every labelled example of the epochs before e and nothing of e or later. Epoch e's
//! examples are applied once both input frontiers have passed e, sorted by (partition, offset),
//! after every record of epochs <= e has been predicted. The classifier after epoch e therefore
//! depends only on the input records and the epoch boundaries, not on the number of workers,
//! on which worker read which partition, or on timing. Records of epoch e are held (with a
//! capability) only until the frontier of the labelled input reaches e. After each activation
//! the head is told the frontier its state corresponds to ([`Head::learned_through`]), which
//! is what checkpoints are cut at.

use crate::metrics::LearnPredictMetrics;
use crate::records::{ClassScore, Epoch, Featured, LabelledExample, Prediction};
use std::collections::BTreeMap;
use std::time::Instant;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// The classifier behind `learn_predict`: the online logistic regression, or a pretrained
/// model's own classes.
pub trait Head: 'static {
    /// The `k` most probable classes of one record.
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore>;
    /// Learns one epoch's labelled examples, given in (partition, offset) order.
    fn learn(&mut self, epoch: Epoch, examples: &[LabelledExample]);
    /// The model version predictions report: updates applied so far.
    fn version(&self) -> u64;
    /// Says that the head has now learned every example of the epochs before `frontier` and
    /// none of later epochs: its state is the state after those epochs (what a checkpoint at
    /// `frontier` holds). Called after each activation; `frontier` never decreases, and is
    /// `Epoch::MAX` once both inputs are done.
    fn learned_through(&mut self, _frontier: Epoch) {}
}

/// `metrics` counts predictions, times each epoch's predictions and learning, and gauges the
/// records held for their epoch's labels.
pub fn learn_predict<'scope, H: Head>(
    featured: StreamVec<'scope, Epoch, Featured>,
    labelled: StreamVec<'scope, Epoch, LabelledExample>,
    mut head: H,
    top_k: usize,
    metrics: LearnPredictMetrics,
) -> StreamVec<'scope, Epoch, Prediction> {
    featured.binary_frontier(labelled, Pipeline, Pipeline, "LearnPredict", move |_default_cap, _info| {
        let mut records: BTreeMap<Epoch, (Capability<Epoch>, Vec<Featured>)> = BTreeMap::new();
        let mut examples: BTreeMap<Epoch, Vec<LabelledExample>> = BTreeMap::new();
        move |(input1, frontier1), (input2, frontier2), output| {
            input1.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let entry = records.entry(*cap.time()).or_insert_with(|| (cap, Vec::new()));
                for batch in data {
                    entry.1.append(batch);
                }
            });
            input2.for_each_stamp(|cap, data| {
                let Some(&epoch) = cap.least() else { return };
                let entry = examples.entry(epoch).or_default();
                for batch in data {
                    entry.append(batch);
                }
            });
            // Epochs below `labels_done` have all their labelled examples here; epochs below
            // `records_done` have all their records here.
            let labels_done = frontier2.frontier().first().copied().unwrap_or(Epoch::MAX);
            let records_done = frontier1.frontier().first().copied().unwrap_or(Epoch::MAX);
            loop {
                let next_records = records.keys().next().copied();
                let next_examples = examples.keys().next().copied();
                // Records of epoch e: once every earlier epoch's examples are in and applied.
                if let Some(e) = next_records {
                    if e <= labels_done && next_examples.is_none_or(|l| l >= e) {
                        let (cap, batch) = records.remove(&e).expect("key exists");
                        let started = Instant::now();
                        metrics.predicted.inc_by(batch.len() as u64);
                        let version = head.version();
                        let now = crate::records::now_ms();
                        let mut session = output.session(&cap);
                        for record in batch {
                            let top_k = head.predict(&record, top_k);
                            session.give(Prediction {
                                record: record.record,
                                top_k,
                                model_version: version,
                                predicted_at_ms: now,
                                features: record.features,
                            });
                        }
                        metrics.predict_seconds.observe(started.elapsed().as_secs_f64());
                        continue;
                    }
                }
                // Examples of epoch l: once complete, and once no record of epoch <= l can
                // still arrive or wait here.
                if let Some(l) = next_examples {
                    if l < labels_done && l < records_done && next_records.is_none_or(|e| e > l) {
                        let mut batch = examples.remove(&l).expect("key exists");
                        batch.sort_by_key(|x| (x.partition, x.offset));
                        let started = Instant::now();
                        head.learn(l, &batch);
                        metrics.learn_seconds.observe(started.elapsed().as_secs_f64());
                        continue;
                    }
                }
                break;
            }
            let pending = examples.keys().next().copied().unwrap_or(Epoch::MAX);
            head.learned_through(labels_done.min(records_done).min(pending));
            metrics.waiting.set(records.values().map(|(_, r)| r.len() as i64).sum());
        }
    })
}

/// A head shared with the code that built the dataflow (to read its metrics, snapshot it at
/// shutdown); the worker thread owns both, so a `RefCell` suffices.
impl<H: Head> Head for std::rc::Rc<std::cell::RefCell<H>> {
    fn predict(&mut self, record: &Featured, k: usize) -> Vec<ClassScore> {
        self.borrow_mut().predict(record, k)
    }

    fn learn(&mut self, epoch: Epoch, examples: &[LabelledExample]) {
        self.borrow_mut().learn(epoch, examples)
    }

    fn version(&self) -> u64 {
        self.borrow().version()
    }

    fn learned_through(&mut self, frontier: Epoch) {
        self.borrow_mut().learned_through(frontier)
    }
}
