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
//! nothing changes but when). After each activation the head is told
//! the frontier its state corresponds to ([`Head::learned_through`]), which is what
//! checkpoints are cut at.

use crate::metrics::LearnPredictMetrics;
use crate::records::{ClassScore, Epoch, Featured, LabelledExample, Prediction};
use std::collections::BTreeMap;
use std::time::Instant;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

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
    /// Says that the head has now learned every example of the epochs before `frontier` and
    /// none of later epochs: its state is the state after those epochs (what a checkpoint at
    /// `frontier` holds). Called after each activation; `frontier` never decreases, and is
    /// `Epoch::MAX` once the labelled input is done and learned.
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
        // The head as it was before learning epoch l, under l, while records of epoch l or
        // earlier may still come.
        let mut frozen: BTreeMap<Epoch, H::Frozen> = BTreeMap::new();
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
            // Epochs below `labels_done` have all their labelled examples here; records of
            // epochs at or after `records_done` may still come.
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
                        // Learned past e already (the records came late): the copy of the head
                        // of the epochs before e.
                        let predictor: &mut dyn Predict = match frozen.range_mut(e..).next() {
                            Some((_, copy)) => copy,
                            None => &mut head,
                        };
                        let version = predictor.version();
                        let now = crate::records::now_ms();
                        let mut session = output.session(&cap);
                        for record in batch {
                            let top_k = predictor.predict(&record, top_k);
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
                // Examples of epoch l: once complete, once the records of epochs <= l that are
                // here are predicted, and while a copy may still be kept for records to come.
                if let Some(l) = next_examples {
                    let may_learn_ahead = records_done > l || frozen.len() < MAX_FROZEN;
                    if l < labels_done && next_records.is_none_or(|e| e > l) && may_learn_ahead {
                        if records_done <= l {
                            frozen.insert(l, head.freeze());
                        }
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
            // A record still to come has an epoch of at least `records_done`: it needs no copy
            // kept under an earlier epoch.
            frozen = frozen.split_off(&records_done);
            let pending = examples.keys().next().copied().unwrap_or(Epoch::MAX);
            head.learned_through(labels_done.min(pending));
            metrics.waiting.set(records.values().map(|(_, r)| r.len() as i64).sum());
            metrics.frozen.set(frozen.len() as i64);
        }
    })
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
}

impl<H: Head> Head for std::rc::Rc<std::cell::RefCell<H>> {
    type Frozen = H::Frozen;

    fn freeze(&self) -> H::Frozen {
        self.borrow().freeze()
    }

    fn learn(&mut self, epoch: Epoch, examples: &[LabelledExample]) {
        self.borrow_mut().learn(epoch, examples)
    }

    fn learned_through(&mut self, frontier: Epoch) {
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
    /// use dlpipe_operators::{ClassScore, Epoch, Featured, Head, ImageRecord, LabelledExample, LearnPredict, Predict};
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
    /// }
    /// impl Head for Latest {
    ///     type Frozen = Latest;
    ///     fn freeze(&self) -> Latest {
    ///         self.clone()
    ///     }
    ///     fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
    ///         self.0.extend(examples.iter().map(|x| x.label.clone()));
    ///     }
    /// }
    ///
    /// timely::example(|scope| {
    ///     let featured = |offset: i64| Featured {
    ///         record: ImageRecord {
    ///             id: offset.to_string(), uri: "mem://x".into(), label: None, partition: 0, offset, kafka_ts_ms: None,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LearnPredictMetrics;
    use crate::records::ImageRecord;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::{Concat, Inspect};
    use timely::dataflow::{InputHandle, InputHandleVec};

    /// A head whose predictions name its version: the labels it has learned, in order.
    struct Labels(Vec<String>);

    impl Predict for Labels {
        fn predict(&mut self, _record: &Featured, _k: usize) -> Vec<ClassScore> {
            vec![ClassScore { class: self.0.join(","), probability: 1.0 }]
        }

        fn version(&self) -> u64 {
            self.0.len() as u64
        }
    }

    impl Head for Labels {
        type Frozen = Labels;

        fn freeze(&self) -> Labels {
            Labels(self.0.clone())
        }

        fn learn(&mut self, _epoch: Epoch, examples: &[LabelledExample]) {
            self.0.extend(examples.iter().map(|x| x.label.clone()));
        }
    }

    fn record(id: &str, offset: i64) -> Featured {
        let record =
            ImageRecord { id: id.into(), uri: format!("u/{id}"), label: None, partition: 0, offset, kafka_ts_ms: None };
        Featured { record, features: vec![0.0], logits: None }
    }

    /// A prediction as (epoch, id, model version, the classifier's labels).
    type Seen = (Epoch, String, u64, String);

    fn example(label: &str, offset: i64) -> LabelledExample {
        LabelledExample { partition: 1, offset, label: label.into(), features: vec![0.0] }
    }

    /// `learn_predict` with a `Labels` head, fed by three inputs: records on time, records that
    /// come late, and labelled examples; what it predicts, and its gauge of frozen copies.
    struct Harness {
        on_time: InputHandleVec<Epoch, Featured>,
        late: InputHandleVec<Epoch, Featured>,
        labels: InputHandleVec<Epoch, LabelledExample>,
        predicted: Rc<RefCell<Vec<Seen>>>,
        frozen: prometheus::IntGauge,
    }

    fn harness(worker: &mut timely::worker::Worker) -> Harness {
        let (mut on_time, mut late, mut labels) = (InputHandle::new(), InputHandle::new(), InputHandle::new());
        let predicted: Rc<RefCell<Vec<Seen>>> = Rc::default();
        let metrics = LearnPredictMetrics::default();
        let frozen = metrics.frozen.clone();
        let seen = Rc::clone(&predicted);
        worker.dataflow::<Epoch, _, _>(|scope| {
            let records = on_time.to_stream(scope).concat(late.to_stream(scope));
            learn_predict(records, labels.to_stream(scope), Labels(Vec::new()), 1, metrics).inspect_core(
                move |event| {
                    let Ok((stamp, batch)) = event else { return };
                    let epoch = *stamp.least().expect("a stamped batch");
                    for p in batch {
                        let class = p.top_k.first().map(|c| c.class.clone()).unwrap_or_default();
                        seen.borrow_mut().push((epoch, p.record.id.clone(), p.model_version, class));
                    }
                },
            );
        });
        Harness { on_time, late, labels, predicted, frozen }
    }

    #[test]
    fn a_late_record_holds_back_no_other_prediction_and_is_predicted_by_the_classifier_of_its_epoch() {
        timely::execute_directly(|worker| {
            let Harness { mut on_time, mut late, mut labels, predicted, frozen } = harness(worker);
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
            let Harness { mut on_time, mut late, mut labels, predicted, frozen } = harness(worker);
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
            late.send(record("late", 99));
            late.close();
            on_time.close();
            labels.close();
            while worker.step() {}
            let predicted = predicted.borrow();
            assert_eq!(predicted.len(), epochs as usize + 1);
            assert!(predicted.iter().all(|(e, id, version, _)| *version == if id == "late" { 1 } else { *e }));
            assert_eq!(frozen.get(), 0);
        });
    }
}
