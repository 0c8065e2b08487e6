//! [`Backlog`]: the records one worker has read from Kafka and not yet published.
//!
//! The source adds each record as it emits it ([`Backlog::read`]); the sink removes it once its
//! output is acknowledged (at-least-once) or committed (exactly-once), or at once when it is a
//! replay that is not published again ([`Backlog::done`]). Three things read it:
//! - its size is the pipeline's backpressure: at `max_backlog` the source reads only the
//!   records its oldest epoch still needs;
//! - per partition, the least offset still in it bounds what the exactly-once sink may commit
//!   before a whole epoch is done (everything below it is published);
//! - its oldest records, and the partitions the source still has to read, say what a stalled
//!   worker waits for.
//!
//! One per worker, shared by its source and sink (one thread) as a [`SharedBacklog`].

use crate::records::Epoch;
use std::collections::BTreeMap;
use std::fmt;

/// A worker's backlog, shared by its source and its sink.
pub type SharedBacklog = std::rc::Rc<std::cell::RefCell<Backlog>>;

/// Records read and not yet published, by partition and offset, with their epochs.
#[derive(Debug, Default)]
pub struct Backlog {
    records: BTreeMap<i32, BTreeMap<i64, Epoch>>,
    len: usize,
    /// Partitions the source still has to read in its least open epoch, at their next offset.
    unread: Vec<Unread>,
}

/// A partition whose records of the source's least open epoch are not all read yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unread {
    pub partition: i32,
    pub next_offset: i64,
    pub epoch: Epoch,
}

/// What a worker whose frontier stands still at `epoch` waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Records of the epoch (partition, offset) read and not yet published: somewhere
    /// between fetching and the broker's acknowledgement.
    Records { epoch: Epoch, records: Vec<(i32, i64)> },
    /// Partitions whose records of the epoch have not been read from Kafka.
    Unread { epoch: Epoch, partitions: Vec<Unread> },
}

impl Backlog {
    /// The source emitted the record at `offset` of `partition`, at `epoch`.
    pub fn read(&mut self, partition: i32, offset: i64, epoch: Epoch) {
        if self.records.entry(partition).or_default().insert(offset, epoch).is_none() {
            self.len += 1;
        }
    }

    /// The record's output is published (or need not be): it leaves the backlog.
    pub fn done(&mut self, partition: i32, offset: i64) {
        let Some(offsets) = self.records.get_mut(&partition) else { return };
        if offsets.remove(&offset).is_some() {
            self.len -= 1;
        }
        if offsets.is_empty() {
            self.records.remove(&partition);
        }
    }

    /// Records read and not yet published.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The least epoch of the records in the backlog (each partition's records are in epoch
    /// order: epochs only grow with offsets).
    pub fn oldest_epoch(&self) -> Option<Epoch> {
        self.records.values().filter_map(|offsets| offsets.values().next().copied()).min()
    }

    /// The offsets of `partition` in the backlog, least first.
    pub fn offsets(&self, partition: i32) -> impl Iterator<Item = i64> + '_ {
        self.records.get(&partition).into_iter().flat_map(|offsets| offsets.keys().copied())
    }

    /// The source says which partitions it has not read past its least open epoch.
    pub fn set_unread(&mut self, unread: Vec<Unread>) {
        self.unread = unread;
    }

    /// What a frontier standing at `epoch` waits for: this worker's records of epochs up to
    /// it (the least offset of each partition), else its partitions not read past it; `None`
    /// when neither (another worker, or an operator fed by another source, holds it).
    pub fn waiting_at(&self, epoch: Epoch) -> Option<Waiting> {
        let records: Vec<(i32, i64)> = self
            .records
            .iter()
            .filter_map(|(partition, offsets)| {
                offsets.iter().find(|(_, e)| **e <= epoch).map(|(offset, _)| (*partition, *offset))
            })
            .collect();
        if !records.is_empty() {
            return Some(Waiting::Records { epoch, records });
        }
        let partitions: Vec<Unread> = self.unread.iter().copied().filter(|u| u.epoch <= epoch).collect();
        (!partitions.is_empty()).then_some(Waiting::Unread { epoch, partitions })
    }
}

impl fmt::Display for Waiting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waiting::Records { epoch, records } => {
                write!(f, "epoch {epoch}: records read and not yet published:")?;
                for (partition, offset) in records {
                    write!(f, " partition {partition} offset {offset};")?;
                }
                Ok(())
            }
            Waiting::Unread { epoch, partitions } => {
                write!(f, "epoch {epoch}: partitions not yet read past it:")?;
                for u in partitions {
                    write!(f, " partition {} from offset {};", u.partition, u.next_offset)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_record_once_and_keeps_offsets_in_order() {
        let mut backlog = Backlog::default();
        backlog.read(1, 7, 0);
        backlog.read(1, 5, 0);
        backlog.read(1, 5, 0); // a re-delivery is not a second record
        backlog.read(0, 2, 1);
        assert_eq!(backlog.len(), 3);
        assert_eq!(backlog.offsets(1).collect::<Vec<_>>(), vec![5, 7]);
        assert_eq!(backlog.oldest_epoch(), Some(0));
        backlog.done(1, 5);
        backlog.done(1, 5);
        backlog.done(3, 0); // never read: nothing to remove
        assert_eq!(backlog.len(), 2);
        assert_eq!(backlog.offsets(1).collect::<Vec<_>>(), vec![7]);
        backlog.done(1, 7);
        assert_eq!(backlog.oldest_epoch(), Some(1));
        backlog.done(0, 2);
        assert!(backlog.is_empty());
        assert_eq!(backlog.oldest_epoch(), None);
        assert_eq!(backlog.offsets(1).count(), 0);
    }

    #[test]
    fn names_the_oldest_records_of_each_partition_then_the_unread_partitions() {
        let mut backlog = Backlog::default();
        backlog.set_unread(vec![Unread { partition: 3, next_offset: 130, epoch: 2 }]);
        backlog.read(0, 9, 2);
        backlog.read(0, 12, 3);
        backlog.read(1, 40, 3);
        assert_eq!(backlog.waiting_at(2), Some(Waiting::Records { epoch: 2, records: vec![(0, 9)] }));
        assert_eq!(backlog.waiting_at(3), Some(Waiting::Records { epoch: 3, records: vec![(0, 9), (1, 40)] }));
        backlog.done(0, 9);
        let waiting = backlog.waiting_at(2).unwrap();
        assert_eq!(
            waiting,
            Waiting::Unread { epoch: 2, partitions: vec![Unread { partition: 3, next_offset: 130, epoch: 2 }] }
        );
        assert_eq!(waiting.to_string(), "epoch 2: partitions not yet read past it: partition 3 from offset 130;");
        assert_eq!(backlog.waiting_at(1), None);
    }
}
