//! The sink's per-epoch ledger: for each epoch still open on the sink's output, what holds it
//! open, the messages not yet handed to the producer, how many are in flight, and the highest
//! input offset of each partition; and when an epoch retires, the positions it reports.
//!
//! A plain type, generic over the hold (a timely `Capability` in the operator, `()` in tests),
//! so its bookkeeping is tested without a broker or a dataflow.

use super::messages::Outgoing;
use crate::backlog::Backlog;
use crate::records::{Epoch, Position};
use std::collections::{BTreeMap, VecDeque};

/// One epoch's entry.
pub(crate) struct EpochEntry<H> {
    /// Keeps the epoch open on the sink's output until it retires; its positions are given at it.
    pub(crate) hold: H,
    /// Messages not yet handed to the producer (at-least-once), or not yet in a committed
    /// transaction (exactly-once), in the order they came.
    pub(crate) waiting: VecDeque<Outgoing>,
    /// Messages handed to the producer and not yet acknowledged (at-least-once).
    pub(crate) in_flight: usize,
    /// Highest offset per partition among the epoch's input records.
    pub(crate) offsets: BTreeMap<i32, i64>,
}

/// The epochs a sink has not retired, oldest first.
pub(crate) struct Ledger<H> {
    pub(crate) epochs: BTreeMap<Epoch, EpochEntry<H>>,
    /// Per partition, where this run starts publishing: records before it were published by an
    /// earlier run and are read again for the learner only.
    published_from: BTreeMap<i32, i64>,
}

impl<H> Ledger<H> {
    /// A ledger for a run that starts its partitions at `starts`.
    pub(crate) fn new(starts: &[Position]) -> Ledger<H> {
        Ledger { epochs: BTreeMap::new(), published_from: starts.iter().map(|s| (s.partition, s.published)).collect() }
    }

    /// The entry of `epoch`, opened with the hold `hold` makes if it is new.
    pub(crate) fn entry(&mut self, epoch: Epoch, hold: impl FnOnce() -> H) -> &mut EpochEntry<H> {
        self.epochs.entry(epoch).or_insert_with(|| EpochEntry {
            hold: hold(),
            waiting: VecDeque::new(),
            in_flight: 0,
            offsets: BTreeMap::new(),
        })
    }

    /// Records the input offset of an outcome of `epoch` (the highest per partition), and says whether
    /// it is a replay: a record before its partition's publishing start, which is not sent again
    /// (its backlog slot is freed here). Feedback dead letters have no input offset and are
    /// never replays.
    pub(crate) fn record(&mut self, epoch: Epoch, input: Option<(i32, i64)>, backlog: &mut Backlog) -> bool {
        let Some((partition, offset)) = input else { return false };
        let entry = self.epochs.get_mut(&epoch).expect("the epoch's entry is open");
        let max = entry.offsets.entry(partition).or_insert(offset);
        *max = (*max).max(offset);
        let replay = self.published_from.get(&partition).is_some_and(|from| offset < *from);
        if replay {
            backlog.done(partition, offset);
        }
        replay
    }

    /// The epochs the input frontier has passed (`open(e)` is false), oldest first: no more
    /// outcomes of them can come.
    pub(crate) fn closed(&self, open: impl Fn(&Epoch) -> bool) -> Vec<Epoch> {
        self.epochs.keys().copied().take_while(|e| !open(e)).collect()
    }

    /// Messages waiting in all epochs.
    pub(crate) fn waiting(&self) -> usize {
        self.epochs.values().map(|e| e.waiting.len()).sum()
    }

    /// Retires epochs from the oldest while each is closed and has nothing waiting or in flight:
    /// each with its positions (at-least-once).
    pub(crate) fn retire_acknowledged(&mut self, open: impl Fn(&Epoch) -> bool) -> Vec<(H, Vec<Position>)> {
        let mut retired = Vec::new();
        while let Some(entry) = self.epochs.first_entry() {
            let e = entry.get();
            if open(entry.key()) || e.in_flight > 0 || !e.waiting.is_empty() {
                break;
            }
            let entry = entry.remove();
            retired.push((entry.hold, self.positions(entry.offsets)));
        }
        retired
    }

    /// Retires the given epochs, whatever they hold (their transaction committed): each with
    /// its positions (exactly-once).
    pub(crate) fn retire(&mut self, epochs: &[Epoch]) -> Vec<(H, Vec<Position>, VecDeque<Outgoing>)> {
        let mut retired = Vec::new();
        for epoch in epochs {
            let entry = self.epochs.remove(epoch).expect("an open epoch");
            retired.push((entry.hold, self.positions(entry.offsets), entry.waiting));
        }
        retired
    }

    /// An epoch's positions: per partition, the offset after its highest record, learned and
    /// published; published never below where this run started publishing (a replayed epoch
    /// must not move a partition's published position back).
    fn positions(&self, offsets: BTreeMap<i32, i64>) -> Vec<Position> {
        let positions = offsets.into_iter().map(|(partition, offset)| {
            let published = self.published_from.get(&partition).map_or(offset + 1, |from| (offset + 1).max(*from));
            Position { partition, learned: offset + 1, published }
        });
        positions.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka_sink::messages::{MessageKind, Sent};
    use crate::records::{DeadLetter, Outcome};

    fn outcome(partition: i32, offset: i64) -> Outcome {
        Outcome::Dead(DeadLetter::of_message("test", "a test outcome", b"{}", Some(b"r"), partition, offset))
    }

    fn receive(ledger: &mut Ledger<Epoch>, epoch: Epoch, partition: i32, offset: i64, backlog: &mut Backlog) -> bool {
        backlog.read(partition, offset, epoch);
        ledger.entry(epoch, || epoch);
        ledger.record(epoch, outcome(partition, offset).input_position(), backlog)
    }

    #[test]
    fn an_epoch_retires_once_closed_and_acknowledged_and_never_before_an_older_one() {
        let mut backlog = Backlog::default();
        let mut ledger = Ledger::<Epoch>::new(&[]);
        for (epoch, partition, offset) in [(1, 0, 10), (1, 0, 12), (1, 1, 3), (2, 0, 13)] {
            assert!(!receive(&mut ledger, epoch, partition, offset, &mut backlog));
        }
        ledger.epochs.get_mut(&1).unwrap().in_flight = 1;
        // Epoch 2 is acknowledged and closed, but epoch 1 has a message in flight.
        assert!(ledger.retire_acknowledged(|e| *e >= 3).is_empty());
        ledger.epochs.get_mut(&1).unwrap().in_flight = 0;
        // Both are acknowledged; epoch 2 is still open on the input.
        let retired = ledger.retire_acknowledged(|e| *e >= 2);
        assert_eq!(retired.len(), 1);
        let (hold, positions) = &retired[0];
        assert_eq!(*hold, 1);
        assert_eq!(
            positions,
            &vec![
                Position { partition: 0, learned: 13, published: 13 },
                Position { partition: 1, learned: 4, published: 4 }
            ]
        );
        assert_eq!(ledger.closed(|e| *e >= 2), Vec::<Epoch>::new());
        assert_eq!(ledger.closed(|e| *e >= 3), vec![2]);
    }

    #[test]
    fn a_replay_is_not_sent_and_never_moves_the_published_position_back() {
        let mut backlog = Backlog::default();
        // An earlier run published partition 0 up to 20 and learned up to 15.
        let mut ledger = Ledger::<Epoch>::new(&[Position { partition: 0, learned: 15, published: 20 }]);
        assert!(receive(&mut ledger, 1, 0, 15, &mut backlog));
        assert!(receive(&mut ledger, 1, 0, 19, &mut backlog));
        assert!(!receive(&mut ledger, 2, 0, 20, &mut backlog));
        // Replays leave the backlog at once; the record to publish stays.
        assert_eq!(backlog.offsets(0).collect::<Vec<_>>(), vec![20]);
        let retired = ledger.retire(&[1, 2]);
        assert_eq!(retired[0].1, vec![Position { partition: 0, learned: 20, published: 20 }]);
        assert_eq!(retired[1].1, vec![Position { partition: 0, learned: 21, published: 21 }]);
    }

    #[test]
    fn waiting_messages_hold_an_acknowledged_epoch_open() {
        let mut backlog = Backlog::default();
        let mut ledger = Ledger::<Epoch>::new(&[]);
        receive(&mut ledger, 1, 0, 1, &mut backlog);
        let sent = Sent {
            epoch: 1,
            kind: MessageKind::DeadLetter,
            key: "r1".into(),
            partition: 0,
            offset: 1,
            replacement: false,
        };
        let message = Outgoing { sent, payload: "{}".into() };
        ledger.epochs.get_mut(&1).unwrap().waiting.push_back(message);
        assert_eq!(ledger.waiting(), 1);
        assert!(ledger.retire_acknowledged(|_| false).is_empty());
        ledger.epochs.get_mut(&1).unwrap().waiting.clear();
        assert_eq!(ledger.retire_acknowledged(|_| false).len(), 1);
        assert!(ledger.epochs.is_empty());
    }
}
