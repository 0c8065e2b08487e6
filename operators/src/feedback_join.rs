//! `feedback_join`: labels that arrive after (or before) their images, joined to the images'
//! features on the record id with differential dataflow.
//!
//! **In:** this worker's featured records that carry no inline label (first input), and
//! feedback records `{"id","label","ts"?}` from the feedback topic (second input), each at
//! its epoch. **Out:** a [`LabelledExample`] at epoch e for every (image, label) pair that is
//! in force at the end of e and was not at the end of e - 1: the pairs that became complete
//! in e, or whose label was corrected in e. The learner learns them in e, in the (partition,
//! offset) order of the image record, like inline labels.
//!
//! **Collections** (differential, time = epoch): each image's id and coordinates (partition,
//! offset, and the worker that read it), from its epoch until `retention` epochs later; each
//! feedback record, keyed by id, for as long; the label in force per id, the feedback with the
//! greatest (ts, partition, offset) (so an identical duplicate changes nothing, and a
//! correction replaces the label); their join, consolidated per epoch. Retention is an update
//! at a later time given at the record's own epoch, so memory is bounded by what `retention`
//! epochs bring in. The features themselves never enter differential: the worker that read an
//! image keeps them (once, not in every arrangement) for as long, and the join's pairs are sent
//! to it to become labelled examples.
//!
//! **Feedback that joins nothing** becomes a dead letter, once: `label_too_late` when it
//! arrives after its image's features were dropped (an image seen up to `2 x retention` epochs
//! before it), at its own epoch; `unknown_id` when its own retention ends with no image of that
//! id seen from `2 x retention` epochs before it to its end, at that epoch. Both look up
//! id-only collections kept `2 x` and `3 x retention` epochs (ids, not features: small).
//!
//! **Corrections** add an update: online SGD steps cannot be subtracted exactly, so the pair
//! with the corrected label is learned as a new example and the earlier one stays learned.
//!
//! **Progress:** outputs for epoch e appear once both inputs' frontiers have passed e (the
//! consolidation waits for the epoch to close), which is also when the learner needs them.

use crate::metrics::FeedbackJoinMetrics;
use crate::records::{DeadLetter, Epoch, Featured, Feedback, LabelledExample};
use differential_dataflow::AsCollection;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Concat};
use timely::dataflow::StreamVec;

/// An image as the differential collections hold it: where it is, not its features (those
/// stay on the worker that read it, in [`attach_features`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
struct ImageRow {
    partition: i32,
    offset: i64,
    /// The image record's Kafka timestamp (0 if it had none), for the label delay.
    ts_ms: i64,
    /// The worker that holds the image's features.
    worker: u64,
}

/// A pair to learn, on its way to the worker that holds the image's features.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Pair {
    worker: u64,
    partition: i32,
    offset: i64,
    label: String,
}

/// What orders the labels of one id: the later one wins; the label last breaks ties.
type LabelOrder = (i64, i32, i64, String);

/// What `feedback_join` gives: the pairs to learn, and the feedback that joined nothing.
pub struct Joined<'scope> {
    pub examples: StreamVec<'scope, Epoch, LabelledExample>,
    pub dead_letters: StreamVec<'scope, Epoch, DeadLetter>,
}

/// Each record of `stream` as `(key, value)` from its epoch `from` epochs on, for `span` epochs.
fn window<
    'scope,
    D: timely::ExchangeData,
    K: differential_dataflow::ExchangeData,
    V: differential_dataflow::ExchangeData,
>(
    stream: StreamVec<'scope, Epoch, D>,
    name: &str,
    from: Epoch,
    span: Epoch,
    mut key_value: impl FnMut(&D) -> (K, V) + 'static,
) -> differential_dataflow::VecCollection<'scope, Epoch, (K, V), isize> {
    stream
        .unary::<timely::container::CapacityContainerBuilder<Vec<_>>, _, _, _>(Pipeline, name, move |_, _| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let start = cap.time().saturating_add(from);
                    let mut session = output.session(&cap);
                    for batch in data {
                        for record in batch.drain(..) {
                            let kv = key_value(&record);
                            session.give((kv.clone(), start.saturating_add(span), -1isize));
                            session.give((kv, start, 1isize));
                        }
                    }
                });
            }
        })
        .as_collection()
}

/// The positive updates of `collection`, as records at the epoch of each update.
fn additions<'scope, D: differential_dataflow::ExchangeData, O: timely::ExchangeData>(
    collection: differential_dataflow::VecCollection<'scope, Epoch, D, isize>,
    name: &str,
    mut out: impl FnMut(D) -> O + 'static,
) -> StreamVec<'scope, Epoch, O> {
    collection.inner.unary::<timely::container::CapacityContainerBuilder<Vec<O>>, _, _, _>(
        Pipeline,
        name,
        move |_, _| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    for batch in data {
                        for (record, at, diff) in batch.drain(..) {
                            if diff > 0 {
                                output.session(&cap.delayed(&at, 0)).give(out(record));
                            }
                        }
                    }
                });
            }
        },
    )
}

/// The features of this worker's unlabelled images, kept from their epoch t until no pair for
/// them can come (the pairs' frontier has passed t + retention - 1), and the pairs that come for
/// them, as labelled examples at the pair's epoch. A pair of epoch e waits until every image of
/// epochs up to e is here (the images' frontier has passed e), which the join's own output
/// waits for anyway. Features are held once, here: the join itself moves ids and offsets.
fn attach_features<'scope>(
    featured: StreamVec<'scope, Epoch, Featured>,
    pairs: StreamVec<'scope, Epoch, Pair>,
    retention: Epoch,
    metrics: &FeedbackJoinMetrics,
) -> StreamVec<'scope, Epoch, LabelledExample> {
    let (rows_gauge, bytes_gauge) = (metrics.retained_images.clone(), metrics.retained_bytes.clone());
    let to_holder = timely::dataflow::channels::pact::Exchange::new(|pair: &Pair| pair.worker);
    featured.binary_frontier::<_, CapacityContainerBuilder<Vec<LabelledExample>>, _, _, _, _>(
        pairs,
        Pipeline,
        to_holder,
        "AttachFeatures",
        move |_, _| {
            let mut features: HashMap<(i32, i64), Vec<f32>> = HashMap::new();
            let mut by_epoch: BTreeMap<Epoch, Vec<(i32, i64)>> = BTreeMap::new();
            let mut waiting: BTreeMap<Epoch, (Capability<Epoch>, Vec<Pair>)> = BTreeMap::new();
            move |(images, images_frontier), (input, pairs_frontier), output| {
                images.for_each_stamp(|cap, data| {
                    let Some(&epoch) = cap.least() else { return };
                    for batch in data {
                        for f in batch.drain(..) {
                            let key = (f.record.partition, f.record.offset);
                            rows_gauge.inc();
                            bytes_gauge.add((f.features.len() * 4) as i64);
                            if let Some(old) = features.insert(key, f.features) {
                                // A record read twice in one run (it is not): count it once.
                                rows_gauge.dec();
                                bytes_gauge.sub((old.len() * 4) as i64);
                            }
                            by_epoch.entry(epoch).or_default().push(key);
                        }
                    }
                });
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(0) else { return };
                    let entry = waiting.entry(*cap.time()).or_insert_with(|| (cap, Vec::new()));
                    for batch in data {
                        entry.1.append(batch);
                    }
                });
                while let Some(entry) = waiting.first_entry().filter(|e| !images_frontier.less_equal(e.key())) {
                    let (cap, pairs) = entry.remove();
                    let mut session = output.session(&cap);
                    for pair in pairs {
                        match features.get(&(pair.partition, pair.offset)) {
                            Some(x) => session.give(LabelledExample {
                                partition: pair.partition,
                                offset: pair.offset,
                                label: pair.label,
                                features: x.clone(),
                            }),
                            None => tracing::error!(
                                partition = pair.partition,
                                offset = pair.offset,
                                "a joined label's image has no features on the worker that read it (a bug)"
                            ),
                        }
                    }
                }
                // Images of epoch t get pairs at epochs below t + retention only.
                let first_waiting = waiting.keys().next().copied().unwrap_or(Epoch::MAX);
                while let Some(entry) = by_epoch.first_entry().filter(|e| {
                    let end = e.key().saturating_add(retention);
                    !pairs_frontier.less_than(&end) && first_waiting >= end
                }) {
                    for key in entry.remove() {
                        if let Some(x) = features.remove(&key) {
                            rows_gauge.dec();
                            bytes_gauge.sub((x.len() * 4) as i64);
                        }
                    }
                }
            }
        },
    )
}

/// Sets what the join's arrangements need of a timely worker: merging their batches while the
/// worker is otherwise idle, so that retracted features are compacted away even when no new
/// records arrive (without it, memory after a retention waits for the next traffic).
pub fn configure(worker: &mut timely::WorkerConfig) {
    differential_dataflow::configure(worker, &differential_dataflow::Config::default().idle_merge_effort(Some(1000)));
}

/// Joins `featured` records (those without an inline label) to `feedback` on id; see the
/// module docs. `retention` is in epochs (at least 1).
pub fn feedback_join<'scope>(
    featured: StreamVec<'scope, Epoch, Featured>,
    feedback: StreamVec<'scope, Epoch, Feedback>,
    retention: Epoch,
    metrics: FeedbackJoinMetrics,
) -> Joined<'scope> {
    let retention = retention.max(1);
    let worker = featured.scope().index() as u64;
    let images = window(featured.clone(), "RetainImages", 0, retention, move |f: &Featured| {
        let row = ImageRow {
            partition: f.record.partition,
            offset: f.record.offset,
            ts_ms: f.record.kafka_ts_ms.unwrap_or(0),
            worker,
        };
        (f.record.id.clone(), row)
    });
    // The label in force: of the feedback retained for this id, the latest. Only the label:
    // a duplicate (same label, later ts) must change nothing.
    let labels = window(feedback.clone(), "RetainFeedback", 0, retention, |fb: &Feedback| {
        (fb.id.clone(), (fb.ts_ms, fb.partition, fb.offset, fb.label.clone()))
    })
    .reduce(|_id, input: &[(&LabelOrder, isize)], output: &mut Vec<(String, isize)>| {
        if let Some((latest, _)) = input.iter().rev().find(|(_, count)| *count > 0) {
            output.push((latest.3.clone(), 1));
        }
    });
    let present = images.clone().map(|(id, _)| id).distinct();
    let (joined, label_delay) = (metrics.joined.clone(), metrics.label_delay_seconds.clone());
    let pairs = additions(images.join(labels).consolidate(), "NewPairs", move |(_id, (row, label))| {
        joined.inc();
        // How long after its image the image became learnable (whenever its label came).
        if row.ts_ms > 0 {
            label_delay.observe((crate::records::now_ms() - row.ts_ms).max(0) as f64 / 1000.0);
        }
        Pair { worker: row.worker, partition: row.partition, offset: row.offset, label }
    });
    let examples = attach_features(featured.clone(), pairs, retention, &metrics);

    // Feedback that joins nothing. Ids of images, without their features, kept longer.
    let seen = |span: Epoch| {
        window(featured.clone(), "RetainIds", 0, span, |f: &Featured| (f.record.id.clone(), ()))
            .map(|(id, ())| id)
            .distinct()
    };
    let arrivals = window(feedback.clone(), "FeedbackArrives", 0, 1, |fb: &Feedback| (fb.id.clone(), fb.clone()));
    let too_late = arrivals.semijoin(seen(retention.saturating_mul(2))).antijoin(present).consolidate();
    let expiries = window(feedback, "FeedbackExpires", retention, 1, |fb: &Feedback| (fb.id.clone(), fb.clone()));
    let unknown = expiries.antijoin(seen(retention.saturating_mul(3))).consolidate();
    let late = additions(too_late, "TooLate", move |(_id, fb): (String, Feedback)| {
        let error = format!(
            "feedback at {}:{} labels id {:?}, whose image's features were dropped {retention} epochs after it \
             arrived: raise the feedback retention to learn from labels this late",
            fb.partition, fb.offset, fb.id
        );
        fb.dead_letter("label_too_late", error)
    });
    let never = additions(unknown, "UnknownId", move |(_id, fb): (String, Feedback)| {
        let error = format!(
            "feedback at {}:{} labels id {:?}, but no image with that id arrived within {retention} epochs of it",
            fb.partition, fb.offset, fb.id
        );
        fb.dead_letter("unknown_id", error)
    });
    Joined { examples, dead_letters: late.concat(never) }
}

/// Joins unlabelled featured records to their labels from a feedback stream; see the module doc.
pub trait FeedbackJoin<'scope> {
    /// Each record labelled by `feedback` within `retention` epochs (either way) as a labelled
    /// example; feedback too late, or for an id never seen, as dead letters.
    ///
    /// ```
    /// use dlpipe_operators::{Featured, Feedback, FeedbackJoin, ImageRecord};
    /// use timely::dataflow::operators::capture::{Capture, Event};
    /// use timely::dataflow::operators::vec::ToStream;
    /// use timely::dataflow::operators::Inspect;
    ///
    /// let examples = timely::example(|scope| {
    ///     let record = ImageRecord {
    ///         id: "cat-1".into(), uri: "mem://cat".into(), label: None, partition: 0, offset: 7, kafka_ts_ms: None, image: None,
    ///     };
    ///     let featured = vec![Featured { record, features: vec![0.5, 0.25], logits: None }].to_stream(scope);
    ///     let label = Feedback { id: "cat-1".into(), label: "cat".into(), ts_ms: 1, partition: 0, offset: 0 };
    ///     let feedback = vec![label].to_stream(scope);
    ///     let joined = featured.feedback_join(feedback, 4, Default::default());
    ///     joined.dead_letters.inspect(|d| panic!("nothing is late or unknown: {d:?}"));
    ///     joined.examples.capture()
    /// });
    /// let labelled: Vec<_> = examples
    ///     .try_iter()
    ///     .flat_map(|event| if let Event::Messages(_, x) = event { x } else { Vec::new() })
    ///     .collect();
    /// assert_eq!(labelled.len(), 1);
    /// assert_eq!((labelled[0].label.as_str(), labelled[0].offset), ("cat", 7));
    /// ```
    fn feedback_join(
        self,
        feedback: StreamVec<'scope, Epoch, Feedback>,
        retention: Epoch,
        metrics: FeedbackJoinMetrics,
    ) -> Joined<'scope>;
}

impl<'scope> FeedbackJoin<'scope> for StreamVec<'scope, Epoch, Featured> {
    fn feedback_join(
        self,
        feedback: StreamVec<'scope, Epoch, Feedback>,
        retention: Epoch,
        metrics: FeedbackJoinMetrics,
    ) -> Joined<'scope> {
        feedback_join(self, feedback, retention, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::ImageRecord;
    use std::collections::BTreeSet;
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::InputHandle;

    /// What arrives at which epoch: images (id, partition, offset) and feedback (id, label, ts).
    enum At {
        Image(&'static str, i32, i64),
        Label(&'static str, &'static str, i64),
    }

    fn image(id: &str, partition: i32, offset: i64) -> Featured {
        let record = ImageRecord {
            id: id.into(),
            uri: format!("u/{id}"),
            label: None,
            partition,
            offset,
            kafka_ts_ms: None,
            image: None,
        };
        Featured { record, features: vec![offset as f32, -0.5, f32::MIN_POSITIVE], logits: None }
    }

    /// Runs `events` (by epoch) through `feedback_join` on `workers` timely workers; returns
    /// the examples as (epoch, image offset, label), checking their features, and the dead
    /// letters as (epoch, id, kind).
    #[allow(clippy::type_complexity)]
    fn join(
        workers: usize,
        retention: Epoch,
        events: &[(Epoch, At)],
    ) -> (BTreeSet<(Epoch, i64, String)>, BTreeSet<(Epoch, String, String)>) {
        let events: Vec<(Epoch, At)> = events
            .iter()
            .map(|(e, a)| {
                (
                    *e,
                    match a {
                        At::Image(id, p, o) => At::Image(id, *p, *o),
                        At::Label(id, l, ts) => At::Label(id, l, *ts),
                    },
                )
            })
            .collect();
        let events = std::sync::Arc::new(std::sync::Mutex::new(events));
        let (tx, rx) = std::sync::mpsc::channel();
        let (dead_tx, dead_rx) = std::sync::mpsc::channel();
        let senders = std::sync::Mutex::new((tx, dead_tx));
        timely::execute(timely::Config::process(workers), move |worker| {
            let mut images = InputHandle::new();
            let mut labels = InputHandle::new();
            let (tx, dead_tx) = senders.lock().unwrap().clone();
            worker.dataflow::<Epoch, _, _>(|scope| {
                let joined =
                    feedback_join(images.to_stream(scope), labels.to_stream(scope), retention, Default::default());
                joined.examples.capture_into(tx);
                joined.dead_letters.capture_into(dead_tx);
            });
            // Worker 0 feeds everything: the join exchanges by id, whoever reads.
            if worker.index() == 0 {
                let events = events.lock().unwrap();
                let mut offset = 0;
                for (epoch, at) in events.iter() {
                    images.advance_to(*epoch);
                    labels.advance_to(*epoch);
                    match at {
                        At::Image(id, p, o) => images.send(image(id, *p, *o)),
                        At::Label(id, l, ts) => {
                            offset += 1;
                            labels.send(Feedback {
                                id: (*id).into(),
                                label: (*l).into(),
                                ts_ms: *ts,
                                partition: 0,
                                offset,
                            })
                        }
                    }
                }
            }
        })
        .unwrap();
        fn at_epochs<D>(rx: std::sync::mpsc::Receiver<Event<Epoch, Vec<D>>>) -> Vec<(Epoch, D)> {
            rx.try_iter()
                .flat_map(|e| match e {
                    Event::Messages(stamp, data) => {
                        let epoch = *stamp.least().expect("messages have a time");
                        data.into_iter().map(move |x| (epoch, x)).collect()
                    }
                    Event::Progress(_) => Vec::new(),
                })
                .collect()
        }
        let examples = at_epochs(rx)
            .into_iter()
            .map(|(epoch, x)| {
                assert_eq!(x.features, vec![x.offset as f32, -0.5, f32::MIN_POSITIVE], "features travel exactly");
                (epoch, x.offset, x.label)
            })
            .collect();
        let dead = at_epochs(dead_rx)
            .into_iter()
            .map(|(epoch, d)| {
                assert!(d.error.contains(d.id.as_deref().unwrap()), "{}", d.error);
                (epoch, d.id.unwrap(), d.error_kind)
            })
            .collect();
        (examples, dead)
    }

    #[test]
    fn feedback_records_parse_or_become_dead_letters_naming_the_cause() {
        let fb = Feedback::parse(Some(br#"{"id":"a1","label":"cat","ts":5}"#), None, 2, 7, Some(9)).unwrap();
        assert_eq!(fb, Feedback { id: "a1".into(), label: "cat".into(), ts_ms: 5, partition: 2, offset: 7 });
        // The key stands in for the id, numbers for strings, the Kafka timestamp for ts.
        let fb = Feedback::parse(Some(br#"{"label":3}"#), Some(b"k9"), 0, 1, Some(9)).unwrap();
        assert_eq!((fb.id.as_str(), fb.label.as_str(), fb.ts_ms), ("k9", "3", 9));
        for (payload, key, kind) in [
            (&b"not json"[..], None, "malformed_json"),
            (br#"{"label":"cat"}"#, None, "missing_id"),
            (br#"{"id":"a"}"#, None, "invalid_label"),
            (br#"{"id":"a","label":"  "}"#, None, "invalid_label"),
        ] {
            let d = Feedback::parse(Some(payload), key, 1, 4, None).unwrap_err();
            assert_eq!(d.error_kind, kind, "{}", d.error);
            assert!(d.error.contains("1:4"), "{}", d.error);
        }
        // A float ts is milliseconds too; a ts that is no number falls back to the Kafka timestamp.
        let fb = Feedback::parse(Some(br#"{"id":"a","label":"cat","ts":1.7e12}"#), None, 0, 0, Some(9)).unwrap();
        assert_eq!(fb.ts_ms, 1_700_000_000_000);
        let fb = Feedback::parse(Some(br#"{"id":"a","label":"cat","ts":"soon"}"#), None, 0, 0, Some(9)).unwrap();
        assert_eq!(fb.ts_ms, 9);
        let long = format!(r#"{{"id":"{}","label":"cat"}}"#, "i".repeat(crate::records::MAX_ID_BYTES + 1));
        let d = Feedback::parse(Some(long.as_bytes()), None, 0, 0, None).unwrap_err();
        assert_eq!(d.error_kind, "id_too_long");
        assert!(d.to_json().len() < 8 * 1024);
    }

    fn ex(epoch: Epoch, offset: i64, label: &str) -> (Epoch, i64, String) {
        (epoch, offset, label.into())
    }

    #[test]
    fn labels_before_after_twice_corrected_never_too_late_and_for_unknown_ids() {
        use At::{Image, Label};
        let events = [
            // a: the label comes two epochs after the image.
            (0, Image("a", 0, 1)),
            (2, Label("a", "cat", 10)),
            // b: the label comes first.
            (1, Label("b", "dog", 11)),
            (3, Image("b", 1, 2)),
            // c: the same label twice: learned once.
            (0, Image("c", 0, 3)),
            (1, Label("c", "cat", 12)),
            (3, Label("c", "cat", 13)),
            // d: a correction in a later epoch: learned again with the new label.
            (0, Image("d", 1, 4)),
            (1, Label("d", "cat", 14)),
            (3, Label("d", "dog", 15)),
            // e: two labels in one epoch: the later one is in force when the epoch ends.
            (2, Image("e", 0, 5)),
            (2, Label("e", "cat", 17)),
            (2, Label("e", "dog", 16)),
            // f: never labelled.
            (1, Image("f", 0, 6)),
            // g: the label comes after the image's retention (4 epochs); h: the image after the label's.
            (0, Image("g", 0, 7)),
            (4, Label("g", "cat", 18)),
            (1, Label("h", "cat", 19)),
            (6, Image("h", 1, 8)),
            // z: no image ever.
            (2, Label("z", "cat", 20)),
        ];
        let mut sorted: Vec<_> = events.into_iter().collect();
        sorted.sort_by_key(|(e, _)| *e);
        let want = BTreeSet::from([
            ex(2, 1, "cat"),
            ex(3, 2, "dog"),
            ex(1, 3, "cat"),
            ex(1, 4, "cat"),
            ex(3, 4, "dog"),
            ex(2, 5, "cat"),
        ]);
        // g's label comes too late, at its own epoch; h's and z's labels expire unjoined.
        let dead = BTreeSet::from([
            (4, "g".to_string(), "label_too_late".to_string()),
            (5, "h".into(), "unknown_id".into()),
            (6, "z".into(), "unknown_id".into()),
        ]);
        assert_eq!(join(1, 4, &sorted), (want.clone(), dead.clone()));
        // The same pairs at the same epochs on two workers (the join exchanges by id).
        assert_eq!(join(2, 4, &sorted), (want, dead));
    }
}
