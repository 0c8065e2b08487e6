//! `checkpoint`: partition positions in, the checkpointed frontier out.
//!
//! **In:** the [`Position`]s every worker's `kafka_sink` reports as its epochs retire (each
//! worker's sink reports its own partitions), all exchanged to worker 0, the worker whose
//! learner is written (every worker's learner is the same). **Out:** nothing but progress: the
//! writing worker holds one capability, at the frontier of the last checkpoint written, and
//! drops it once the final one (at `Epoch::MAX`, when everything is learned and published) is
//! written; so the operator's output frontier is the *checkpointed* frontier, and a dataflow
//! probed there completes only after its last checkpoint. The other workers hold nothing.
//!
//! **Cuts:** the input frontier A is the frontier acknowledged by every worker: every output of
//! the epochs before A is published. The store offers learner states at learned frontiers F
//! ([`CheckpointStore::due`]); one at F <= A is cut as (the learner after the epochs before
//! F, the positions of the epochs before F as *learned* offsets, the positions of the epochs
//! before A as *published* offsets). A restart that resumes learning at the learned offsets
//! and publishing at the published offsets learns every labelled record exactly once, and
//! republishes nothing that was acknowledged before the checkpoint. A write that fails for
//! good sets `fatal`, which stops the worker.

use crate::records::{Epoch, Position};
use crate::Fatal;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// Where checkpoints come from and go: the learner's states, and the durable store.
pub trait CheckpointStore: 'static {
    /// Whether this worker writes checkpoints (and so holds the checkpointed frontier).
    fn writes(&self) -> bool {
        true
    }
    /// The newest learned frontier at most `acknowledged` at which a checkpoint is due, if
    /// any (older ones are of no more use and are dropped).
    fn due(&mut self, acknowledged: Epoch) -> Option<Epoch>;
    /// Writes the checkpoint at `frontier`, a frontier `due` returned, with the offsets of
    /// each partition.
    fn write(
        &mut self,
        frontier: Epoch,
        learned: &BTreeMap<i32, i64>,
        published: &BTreeMap<i32, i64>,
    ) -> Result<(), WriteError>;
}

/// Why a checkpoint was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// Worth another try (the broker is unavailable, say): retried a second later.
    Retry(String),
    /// Never will be (another pipeline of the same group took over): the worker stops.
    Fatal(String),
}

/// A store for the workers that write no checkpoints (all but worker 0): nothing is due.
impl<S: CheckpointStore> CheckpointStore for Option<S> {
    fn writes(&self) -> bool {
        self.as_ref().is_some_and(S::writes)
    }

    fn due(&mut self, acknowledged: Epoch) -> Option<Epoch> {
        self.as_mut().and_then(|s| s.due(acknowledged))
    }

    fn write(
        &mut self,
        frontier: Epoch,
        learned: &BTreeMap<i32, i64>,
        published: &BTreeMap<i32, i64>,
    ) -> Result<(), WriteError> {
        match self {
            Some(s) => s.write(frontier, learned, published),
            None => Ok(()),
        }
    }
}

/// How often the operator looks again for a due checkpoint while positions wait for one (the
/// learner reaches a frontier without telling this operator).
const RECHECK: Duration = Duration::from_millis(20);
/// How long a failed write waits before the next try.
const RETRY: Duration = Duration::from_secs(1);

pub fn checkpoint<'scope, S: CheckpointStore>(
    positions: StreamVec<'scope, Epoch, Position>,
    mut store: S,
    fatal: Fatal,
) -> StreamVec<'scope, Epoch, ()> {
    let scope = positions.scope();
    positions.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &Position| 0u64),
        "Checkpoint",
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut hold: Option<Capability<Epoch>> = store.writes().then_some(default_cap);
            // Positions of epochs not yet in a checkpoint's learned offsets.
            let mut pending: BTreeMap<Epoch, Vec<Position>> = BTreeMap::new();
            let mut learned: BTreeMap<i32, i64> = BTreeMap::new();
            let mut published: BTreeMap<i32, i64> = BTreeMap::new();
            let mut retry_at: Option<Instant> = None;
            move |(input, frontier), _output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&epoch) = cap.least() else { return };
                    let entry = pending.entry(epoch).or_default();
                    for batch in data {
                        entry.append(batch);
                    }
                });
                let acknowledged = frontier.frontier().first().copied().unwrap_or(Epoch::MAX);
                for positions in pending.range(..acknowledged).map(|(_, p)| p) {
                    merge(&mut published, positions.iter().map(|p| (p.partition, p.published)));
                }
                if retry_at.is_none_or(|at| Instant::now() >= at) {
                    if let Some(cut) = store.due(acknowledged).filter(|cut| *cut > 0) {
                        let mut cut_learned = learned.clone();
                        for positions in pending.range(..cut).map(|(_, p)| p) {
                            merge(&mut cut_learned, positions.iter().map(|p| (p.partition, p.learned)));
                        }
                        match store.write(cut, &cut_learned, &published) {
                            Ok(()) => {
                                learned = cut_learned;
                                pending = pending.split_off(&cut);
                                retry_at = None;
                                if cut == Epoch::MAX {
                                    hold = None;
                                } else if let Some(hold) = hold.as_mut() {
                                    hold.downgrade(&cut);
                                }
                            }
                            Err(WriteError::Retry(error)) => {
                                tracing::warn!(%error, frontier = cut, "cannot write a checkpoint; retrying");
                                retry_at = Some(Instant::now() + RETRY);
                            }
                            Err(WriteError::Fatal(error)) => {
                                *fatal.borrow_mut() = Some(crate::error::OperatorError::Checkpoint(error));
                                retry_at = Some(Instant::now() + RETRY);
                            }
                        }
                    }
                }
                // The learner reaches a frontier without telling this operator: look again while
                // positions wait for a cut, and at the end until the final checkpoint is written.
                if hold.is_some() && (!pending.is_empty() || acknowledged == Epoch::MAX) {
                    activator.activate_after(RECHECK);
                }
            }
        },
    )
}

/// Raises each partition's offset in `into` to the given one where that is higher.
fn merge(into: &mut BTreeMap<i32, i64>, offsets: impl Iterator<Item = (i32, i64)>) {
    for (partition, offset) in offsets {
        let at = into.entry(partition).or_insert(offset);
        *at = (*at).max(offset);
    }
}
