//! `checkpoint`: partition positions and the learner's states in, the checkpointed frontier
//! out.
//!
//! **In:** the [`Position`]s every worker's `kafka_sink` reports as its epochs retire (each
//! worker's sink reports its own partitions), all exchanged to worker 0, the worker whose
//! learner is written; and the states of the worker's own learner (every worker's learner is
//! the same), each at its learned frontier F ([`learn_predict_states`]). **Out:** nothing but
//! progress: the writing worker holds one capability, at the frontier of the last checkpoint
//! written, and drops it once the final one (at `Epoch::MAX`, when everything is learned and
//! published) is written, or once no state can come and none is kept; so the operator's
//! output frontier is the *checkpointed* frontier, and a dataflow probed there completes only
//! after its last checkpoint. The other workers hold and keep nothing.
//!
//! [`learn_predict_states`]: crate::learn_predict_states
//!
//! **Cuts:** the positions' frontier A is the frontier acknowledged by every worker: every
//! output of the epochs before A is published. A state at F <= A, the newest such, is cut as
//! (the learner after the epochs before F, the positions of the epochs before F as *learned*
//! offsets, the positions of the epochs before A as *published* offsets); older states are of
//! no more use and are dropped. A restart that resumes learning at the learned offsets and
//! publishing at the published offsets learns every labelled record exactly once, and
//! republishes nothing that was acknowledged before the checkpoint. The operator runs when
//! positions, states or either frontier arrive: a cut becomes possible only then.
//!
//! **Memory:** at most [`MAX_PENDING_STATES`] states are kept (a learner far ahead of the
//! acknowledged frontier would otherwise pile them up); later ones are dropped until one is
//! written, except the final one at `Epoch::MAX`, which is always kept.
//!
//! **Failures:** a write that may succeed later ([`WriteError::Retry`]) is tried again a
//! second later; one that fails for good, or whose transaction the broker aborted as expired,
//! sets `fatal`, which stops the worker.

use crate::records::{Epoch, Position};
use crate::Fatal;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

/// Where checkpoints go: the durable store.
pub trait CheckpointStore: 'static {
    /// The learner's state a checkpoint holds.
    type State: Clone + 'static;
    /// Whether this worker writes checkpoints (and so holds the checkpointed frontier).
    fn writes(&self) -> bool {
        true
    }
    /// Writes the checkpoint of `state`, the learner's state at the learned `frontier`, with
    /// the offsets of each partition.
    fn write(
        &mut self,
        state: &Self::State,
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
    /// The broker aborted the write's transaction, open past `transaction.timeout.ms`: the
    /// worker stops for a restart to go on ([`OperatorError::TransactionExpired`]).
    ///
    /// [`OperatorError::TransactionExpired`]: crate::error::OperatorError::TransactionExpired
    Expired(String),
}

/// A store for the workers that write no checkpoints (all but worker 0).
impl<S: CheckpointStore> CheckpointStore for Option<S> {
    type State = S::State;

    fn writes(&self) -> bool {
        self.as_ref().is_some_and(S::writes)
    }

    fn write(
        &mut self,
        state: &S::State,
        frontier: Epoch,
        learned: &BTreeMap<i32, i64>,
        published: &BTreeMap<i32, i64>,
    ) -> Result<(), WriteError> {
        match self {
            Some(s) => s.write(state, frontier, learned, published),
            None => Ok(()),
        }
    }
}

/// Learner states kept at most, besides the final one.
pub const MAX_PENDING_STATES: usize = 4;
/// How long a failed write waits before the next try.
const RETRY: Duration = Duration::from_secs(1);

/// Writes checkpoints of a learner's states with the positions a sink reports; see the module doc.
pub trait WriteCheckpoints<'scope> {
    /// Cuts checkpoints of `states` at the positions' acknowledged frontier into `store`;
    /// returns the checkpointed frontier.
    ///
    /// ```
    /// use dlpipe_operators::{CheckpointStore, Position, WriteCheckpoints, WriteError};
    /// use std::collections::BTreeMap;
    /// use std::sync::{Arc, Mutex};
    /// use timely::dataflow::operators::Input;
    /// use timely::dataflow::InputHandle;
    ///
    /// type Offsets = BTreeMap<i32, i64>;
    /// /// Checkpoints kept in memory: (state, learned frontier, learned, published offsets).
    /// #[derive(Clone, Default)]
    /// struct Memory(Arc<Mutex<Vec<(String, u64, Offsets, Offsets)>>>);
    ///
    /// impl CheckpointStore for Memory {
    ///     type State = String;
    ///     fn write(&mut self, state: &String, frontier: u64, learned: &Offsets, published: &Offsets) -> Result<(), WriteError> {
    ///         self.0.lock().unwrap().push((state.clone(), frontier, learned.clone(), published.clone()));
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let memory = Memory::default();
    /// let store = memory.clone();
    /// timely::execute_directly(move |worker| {
    ///     let (mut positions, mut states) = (InputHandle::new(), InputHandle::new());
    ///     worker.dataflow::<u64, _, _>(|scope| {
    ///         let states = scope.input_from(&mut states);
    ///         scope.input_from(&mut positions).checkpoint(states, store, Default::default());
    ///     });
    ///     // Epoch 1 read partition 0 up to offset 9, epoch 2 up to 19; both are published.
    ///     positions.advance_to(1);
    ///     positions.send(Position { partition: 0, learned: 10, published: 10 });
    ///     positions.advance_to(2);
    ///     positions.send(Position { partition: 0, learned: 20, published: 20 });
    ///     positions.advance_to(3);
    ///     // The learner after epoch 1: its state at the learned frontier 2.
    ///     states.advance_to(2);
    ///     states.send("learned epochs 0 and 1".to_string());
    /// });
    /// // Learning resumes after epoch 1's records; publishing after epoch 2's.
    /// let written = memory.0.lock().unwrap();
    /// let learned = BTreeMap::from([(0, 10)]);
    /// let published = BTreeMap::from([(0, 20)]);
    /// assert_eq!(written[0], ("learned epochs 0 and 1".to_string(), 2, learned, published));
    /// ```
    fn checkpoint<S: CheckpointStore>(
        self,
        states: StreamVec<'scope, Epoch, S::State>,
        store: S,
        fatal: Fatal,
    ) -> StreamVec<'scope, Epoch, ()>;
}

impl<'scope> WriteCheckpoints<'scope> for StreamVec<'scope, Epoch, Position> {
    fn checkpoint<S: CheckpointStore>(
        self,
        states: StreamVec<'scope, Epoch, S::State>,
        store: S,
        fatal: Fatal,
    ) -> StreamVec<'scope, Epoch, ()> {
        checkpoint(self, states, store, fatal)
    }
}

pub fn checkpoint<'scope, S: CheckpointStore>(
    positions: StreamVec<'scope, Epoch, Position>,
    states: StreamVec<'scope, Epoch, S::State>,
    mut store: S,
    fatal: Fatal,
) -> StreamVec<'scope, Epoch, ()> {
    let scope = positions.scope();
    let to_worker_0 = Exchange::new(|_: &Position| 0u64);
    positions.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
        states,
        to_worker_0,
        Pipeline,
        "Checkpoint",
        move |default_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut hold: Option<Capability<Epoch>> = store.writes().then_some(default_cap);
            let mut kept = Kept::new();
            let mut retry_at: Option<Instant> = None;
            move |(positions, acknowledged), (states, learned), _output| {
                positions.for_each_stamp(|cap, data| {
                    let (Some(&epoch), Some(_)) = (cap.least(), &hold) else { return };
                    let entry = kept.positions.entry(epoch).or_default();
                    for batch in data {
                        entry.append(batch);
                    }
                });
                states.for_each_stamp(|cap, data| {
                    let (Some(&frontier), Some(_)) = (cap.least(), &hold) else { return };
                    for state in data.flat_map(|batch| batch.drain(..)) {
                        kept.keep(frontier, state);
                    }
                });
                let acknowledged = acknowledged.frontier().first().copied().unwrap_or(Epoch::MAX);
                kept.publish(acknowledged);
                if hold.is_some() && retry_at.is_none_or(|at| Instant::now() >= at) {
                    match kept.cut(acknowledged, &mut store) {
                        None => {}
                        Some((frontier, Ok(()))) => {
                            retry_at = None;
                            if frontier == Epoch::MAX {
                                hold = None;
                            } else if let Some(hold) = hold.as_mut() {
                                hold.downgrade(&frontier);
                            }
                        }
                        Some((frontier, Err(WriteError::Retry(error)))) => {
                            tracing::warn!(%error, frontier, "cannot write a checkpoint; retrying");
                            retry_at = Some(Instant::now() + RETRY);
                            activator.activate_after(RETRY);
                        }
                        Some((_, Err(WriteError::Fatal(error)))) => {
                            *fatal.borrow_mut() = Some(crate::error::OperatorError::Checkpoint(error));
                            retry_at = Some(Instant::now() + RETRY);
                        }
                        Some((_, Err(WriteError::Expired(error)))) => {
                            *fatal.borrow_mut() = Some(crate::error::OperatorError::TransactionExpired(error));
                            retry_at = Some(Instant::now() + RETRY);
                        }
                    }
                }
                // No state will come and none is kept (a learner that gave no final one): no
                // checkpoint is left to write.
                if learned.frontier().is_empty() && kept.states.is_empty() {
                    hold = None;
                }
            }
        },
    )
}

/// What the writing worker keeps between activations.
struct Kept<T> {
    /// Positions of epochs not yet in a checkpoint's learned offsets.
    positions: BTreeMap<Epoch, Vec<Position>>,
    /// Learner states not yet written, by learned frontier.
    states: BTreeMap<Epoch, T>,
    /// The learned offsets of the last checkpoint written.
    learned: BTreeMap<i32, i64>,
    /// The offsets of the acknowledged epochs.
    published: BTreeMap<i32, i64>,
}

impl<T> Kept<T> {
    fn new() -> Kept<T> {
        Kept {
            positions: BTreeMap::new(),
            states: BTreeMap::new(),
            learned: BTreeMap::new(),
            published: BTreeMap::new(),
        }
    }

    /// Keeps the state at the learned `frontier`, unless [`MAX_PENDING_STATES`] are kept
    /// already (the final one always is).
    fn keep(&mut self, frontier: Epoch, state: T) {
        if self.states.len() < MAX_PENDING_STATES || frontier == Epoch::MAX {
            self.states.insert(frontier, state);
        }
    }

    /// Raises the published offsets to the positions of the epochs before `acknowledged`.
    fn publish(&mut self, acknowledged: Epoch) {
        for positions in self.positions.range(..acknowledged).map(|(_, p)| p) {
            merge(&mut self.published, positions.iter().map(|p| (p.partition, p.published)));
        }
    }

    /// Writes the checkpoint of the newest state at most `acknowledged`, if there is one
    /// (dropping older ones); its frontier and how the write went. A state not written stays.
    fn cut<S>(&mut self, acknowledged: Epoch, store: &mut S) -> Option<(Epoch, Result<(), WriteError>)>
    where
        S: CheckpointStore<State = T>,
    {
        let frontier = *self.states.range(..=acknowledged).next_back()?.0;
        self.states = self.states.split_off(&frontier);
        let mut learned = self.learned.clone();
        for positions in self.positions.range(..frontier).map(|(_, p)| p) {
            merge(&mut learned, positions.iter().map(|p| (p.partition, p.learned)));
        }
        let written = store.write(&self.states[&frontier], frontier, &learned, &self.published);
        if written.is_ok() {
            self.states.remove(&frontier);
            self.positions = self.positions.split_off(&frontier);
            self.learned = learned;
        }
        Some((frontier, written))
    }
}

/// Raises each partition's offset in `into` to the given one where that is higher.
fn merge(into: &mut BTreeMap<i32, i64>, offsets: impl Iterator<Item = (i32, i64)>) {
    for (partition, offset) in offsets {
        let at = into.entry(partition).or_insert(offset);
        *at = (*at).max(offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OperatorError;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;
    use timely::dataflow::operators::probe::Handle as ProbeHandle;
    use timely::dataflow::operators::Probe;
    use timely::dataflow::{InputHandle, InputHandleVec};

    /// A checkpoint written: the state, its frontier, the learned and published offsets.
    type Written = (String, Epoch, BTreeMap<i32, i64>, BTreeMap<i32, i64>);

    /// A store in memory: records each write, and fails those `failures` says (in order).
    #[derive(Clone, Default)]
    struct Memory {
        written: Rc<RefCell<Vec<Written>>>,
        failures: Rc<RefCell<VecDeque<WriteError>>>,
        attempts: Rc<RefCell<usize>>,
    }

    impl CheckpointStore for Memory {
        type State = String;

        fn write(
            &mut self,
            state: &String,
            frontier: Epoch,
            learned: &BTreeMap<i32, i64>,
            published: &BTreeMap<i32, i64>,
        ) -> Result<(), WriteError> {
            *self.attempts.borrow_mut() += 1;
            if let Some(error) = self.failures.borrow_mut().pop_front() {
                return Err(error);
            }
            self.written.borrow_mut().push((state.clone(), frontier, learned.clone(), published.clone()));
            Ok(())
        }
    }

    /// `checkpoint` into `store`, fed positions and states; its output probed.
    struct Harness {
        positions: InputHandleVec<Epoch, Position>,
        states: InputHandleVec<Epoch, String>,
        checkpointed: ProbeHandle<Epoch>,
        fatal: Fatal,
    }

    /// A probed frontier (`None` once empty).
    fn frontier(probe: &ProbeHandle<Epoch>) -> Option<Epoch> {
        probe.with_frontier(|f| f.first().copied())
    }

    fn harness<S: CheckpointStore<State = String>>(worker: &mut timely::worker::Worker, store: S) -> Harness {
        let (mut positions, mut states) = (InputHandle::new(), InputHandle::new());
        let fatal = Fatal::default();
        let checkpointed = worker.dataflow::<Epoch, _, _>(|scope| {
            checkpoint(positions.to_stream(scope), states.to_stream(scope), store, Rc::clone(&fatal)).probe().0
        });
        Harness { positions, states, checkpointed, fatal }
    }

    fn at(partition: i32, learned: i64, published: i64) -> Position {
        Position { partition, learned, published }
    }

    fn offsets(of: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        of.iter().copied().collect()
    }

    fn steps(worker: &mut timely::worker::Worker) {
        for _ in 0..10 {
            worker.step();
        }
    }

    #[test]
    fn a_checkpoint_cuts_the_newest_state_acknowledged_with_its_learned_and_the_acknowledged_published_offsets() {
        timely::execute_directly(|worker| {
            let store = Memory::default();
            let mut h = harness(worker, store.clone());
            // States at learned frontiers 1, 2 and 4; positions of epoch 0, not acknowledged.
            h.states.advance_to(1);
            h.states.send("s1".to_owned());
            h.states.advance_to(2);
            h.states.send("s2".to_owned());
            h.states.advance_to(4);
            h.states.send("s4".to_owned());
            h.states.advance_to(5);
            h.positions.send(at(0, 10, 10));
            steps(worker);
            assert_eq!(*store.written.borrow(), Vec::<Written>::new(), "nothing acknowledged, nothing cut");
            assert_eq!(frontier(&h.checkpointed), Some(0));
            // Acknowledged through 3 (every epoch before it): s2 is the newest state at most 3.
            h.positions.advance_to(1);
            h.positions.send(at(0, 20, 20));
            h.positions.send(at(1, 5, 5));
            h.positions.advance_to(2);
            h.positions.send(at(0, 30, 30));
            h.positions.send(at(1, 7, 6));
            h.positions.advance_to(3);
            h.positions.send(at(0, 40, 40));
            steps(worker);
            let cut = ("s2".to_owned(), 2, offsets(&[(0, 20), (1, 5)]), offsets(&[(0, 30), (1, 6)]));
            assert_eq!(*store.written.borrow(), vec![cut]);
            assert_eq!(frontier(&h.checkpointed), Some(2));
            // Through 4: s4, learned from the epochs before 4, published from as many.
            h.positions.advance_to(4);
            steps(worker);
            let cut = ("s4".to_owned(), 4, offsets(&[(0, 40), (1, 7)]), offsets(&[(0, 40), (1, 6)]));
            assert_eq!(store.written.borrow().last(), Some(&cut));
            assert_eq!(store.written.borrow().len(), 2, "s1 is older than a state cut: dropped");
            assert_eq!(frontier(&h.checkpointed), Some(4));
            // The end: the final state, once every position is acknowledged; then the output's
            // frontier is empty and the dataflow completes.
            h.states.advance_to(Epoch::MAX);
            h.states.send("final".to_owned());
            h.states.close();
            h.positions.send(at(1, 9, 9));
            steps(worker);
            assert_eq!(store.written.borrow().len(), 2, "the final state waits for its positions");
            assert_eq!(frontier(&h.checkpointed), Some(4));
            h.positions.close();
            while worker.step() {}
            let last = ("final".to_owned(), Epoch::MAX, offsets(&[(0, 40), (1, 9)]), offsets(&[(0, 40), (1, 9)]));
            assert_eq!(store.written.borrow().last(), Some(&last));
            assert_eq!(frontier(&h.checkpointed), None);
            assert_eq!(*h.fatal.borrow(), None);
        });
    }

    #[test]
    fn at_most_max_pending_states_are_kept_and_the_final_one_always_is() {
        timely::execute_directly(|worker| {
            let store = Memory::default();
            let mut h = harness(worker, store.clone());
            for frontier in 1..=MAX_PENDING_STATES as u64 + 2 {
                h.states.advance_to(frontier);
                h.states.send(format!("s{frontier}"));
            }
            h.states.advance_to(Epoch::MAX);
            h.states.send("final".to_owned());
            h.states.close();
            h.positions.advance_to(10);
            steps(worker);
            let frontiers: Vec<Epoch> = store.written.borrow().iter().map(|w| w.1).collect();
            assert_eq!(frontiers, vec![MAX_PENDING_STATES as u64], "the newest kept, not the newest given");
            h.positions.close();
            while worker.step() {}
            let frontiers: Vec<Epoch> = store.written.borrow().iter().map(|w| w.1).collect();
            assert_eq!(frontiers, vec![MAX_PENDING_STATES as u64, Epoch::MAX]);
            assert_eq!(frontier(&h.checkpointed), None);
        });
    }

    #[test]
    fn a_write_to_retry_is_tried_again_and_a_fatal_one_sets_fatal() {
        timely::execute_directly(|worker| {
            let store = Memory::default();
            store.failures.borrow_mut().push_back(WriteError::Retry("not now".into()));
            let mut h = harness(worker, store.clone());
            h.states.advance_to(1);
            h.states.send("s1".to_owned());
            h.states.advance_to(2);
            h.positions.send(at(0, 10, 10));
            h.positions.advance_to(1);
            steps(worker);
            assert_eq!((*store.attempts.borrow(), store.written.borrow().len()), (1, 0));
            assert_eq!(frontier(&h.checkpointed), Some(0), "not written: the frontier stays");
            // Tried again a second later, by the operator's own timer (no input changes).
            let deadline = Instant::now() + RETRY * 5;
            while store.written.borrow().is_empty() && Instant::now() < deadline {
                worker.step_or_park(Some(Duration::from_millis(10)));
            }
            steps(worker);
            assert_eq!((*store.attempts.borrow(), store.written.borrow().len()), (2, 1));
            assert_eq!(frontier(&h.checkpointed), Some(1));
            assert_eq!(*h.fatal.borrow(), None);
            // A write that never will succeed stops the worker.
            store.failures.borrow_mut().push_back(WriteError::Fatal("fenced".into()));
            h.states.send("s2".to_owned());
            h.states.advance_to(3);
            h.positions.advance_to(2);
            steps(worker);
            assert_eq!(*h.fatal.borrow(), Some(OperatorError::Checkpoint("fenced".to_owned())));
            assert_eq!(store.written.borrow().len(), 1);
            assert_eq!(frontier(&h.checkpointed), Some(1));
            // The worker stops, as `dlpipe run`'s does: its dataflow is dropped.
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
        });
    }

    #[test]
    fn a_worker_that_writes_none_holds_nothing() {
        timely::execute_directly(|worker| {
            let mut h = harness(worker, None::<Memory>);
            h.states.advance_to(1);
            h.states.send("s1".to_owned());
            h.states.advance_to(3);
            h.positions.send(at(0, 10, 10));
            h.positions.advance_to(3);
            steps(worker);
            assert_eq!(frontier(&h.checkpointed), Some(3), "the inputs' frontier, held back by nothing");
            h.states.close();
            h.positions.close();
            while worker.step() {}
            assert_eq!(frontier(&h.checkpointed), None);
        });
    }
}
