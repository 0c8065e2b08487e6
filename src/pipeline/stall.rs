//! Stall detection: a worker whose published frontier stands still while it has records in
//! flight. Liveness is checked as safety is: a stalled worker is not silent. The step loop
//! observes the sink's frontier about once a second; past `pipeline.stall_after_secs` the
//! worker exports `dlpipe_pipeline_stalled_seconds`, `/readyz` answers 503, and the status line
//! says what it waits for (from the worker's [`Backlog`]).

use dlpipe_operators::{Backlog, Epoch};
use std::time::{Duration, Instant};

/// Watches one worker's published frontier.
pub(crate) struct StallWatch {
    after: Option<Duration>,
    frontier: Option<Epoch>,
    since: Instant,
}

impl StallWatch {
    /// `after_secs` = 0 never reports a stall.
    pub(crate) fn new(after_secs: u64, now: Instant) -> StallWatch {
        let after = (after_secs > 0).then(|| Duration::from_secs(after_secs));
        StallWatch { after, frontier: None, since: now }
    }

    /// How long the frontier has stood still with records in flight, once that is at least
    /// the limit; `None` while it moves, or while nothing is in flight (an idle stream).
    pub(crate) fn observe(&mut self, frontier: Option<Epoch>, in_flight: usize, now: Instant) -> Option<Duration> {
        if frontier != self.frontier || in_flight == 0 {
            self.frontier = frontier;
            self.since = now;
            return None;
        }
        let still = now.saturating_duration_since(self.since);
        self.after.filter(|after| still >= *after).map(|_| still)
    }
}

/// What a worker stalled at `frontier` waits for, in words: its own records or unread
/// partitions of that epoch (from its backlog), else the first operator whose frontier stands
/// there (records of another worker hold it).
pub(crate) fn waiting_for(backlog: &Backlog, frontier: Epoch, operators: &[(&str, Option<Epoch>)]) -> String {
    match backlog.waiting_at(frontier) {
        Some(waiting) => waiting.to_string(),
        None => {
            let held = operators.iter().find(|(_, f)| *f == Some(frontier)).map_or("the dataflow", |(name, _)| name);
            format!("epoch {frontier}: held in {held} by records of another worker")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frontier_standing_still_with_records_in_flight_is_a_stall_once_past_the_limit() {
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut watch = StallWatch::new(60, t0);
        assert_eq!(watch.observe(Some(3), 10, at(0)), None);
        assert_eq!(watch.observe(Some(3), 10, at(59)), None);
        assert_eq!(watch.observe(Some(3), 10, at(61)), Some(Duration::from_secs(61)));
        // The frontier moves: the clock starts again.
        assert_eq!(watch.observe(Some(4), 10, at(62)), None);
        assert_eq!(watch.observe(Some(4), 10, at(100)), None);
        assert_eq!(watch.observe(Some(4), 10, at(125)), Some(Duration::from_secs(63)));
        // Nothing in flight: an idle stream, not a stall.
        assert_eq!(watch.observe(Some(4), 0, at(200)), None);
        assert_eq!(watch.observe(Some(4), 1, at(230)), None);
        // Turned off.
        let mut off = StallWatch::new(0, t0);
        off.observe(Some(1), 5, at(0));
        assert_eq!(off.observe(Some(1), 5, at(10_000)), None);
    }

    #[test]
    fn names_the_records_or_partitions_or_operator_it_waits_for() {
        let mut backlog = Backlog::default();
        backlog.read(2, 17, 4);
        let operators = [("kafka_source", Some(5)), ("fetch_decode", Some(4)), ("kafka_sink", Some(4))];
        assert_eq!(
            waiting_for(&backlog, 4, &operators),
            "epoch 4: records read and not yet published: partition 2 offset 17;"
        );
        backlog.done(2, 17);
        assert_eq!(waiting_for(&backlog, 4, &operators), "epoch 4: held in fetch_decode by records of another worker");
    }
}
