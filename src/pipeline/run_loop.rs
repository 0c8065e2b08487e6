//! The step loop of one worker: steps the dataflow until it is done, stops on a fatal error
//! (its own or another local worker's), and about once a second refreshes the worker's
//! telemetry (in-flight records, frontier lags, stall detection, the learner's quality); the
//! first worker of each process logs the status line every `status_interval_secs`.

use super::dataflow::Probes;
use super::heads::OnlineLrHead;
use super::stall::{self, StallWatch};
use super::PipelineError;
use super::Shared;
use crate::config::Config;
use crate::metrics::Metrics;
use dlpipe_operators::{Epoch, EpochPolicy, Fatal, SharedBacklog};
use prometheus::core::Collector;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What the loop watches besides the dataflow.
pub(super) struct Watched<'a> {
    pub backlog: SharedBacklog,
    pub fatal: Fatal,
    pub online: Option<Rc<RefCell<OnlineLrHead>>>,
    pub model_name: &'a str,
}

/// Steps `worker` until its dataflow is done (the last probe).
pub(super) fn run(
    worker: &mut timely::worker::Worker,
    config: &Config,
    probes: &Probes,
    watched: Watched,
    shared: &Shared,
) -> Result<(), PipelineError> {
    let index = worker.index();
    let label = index.to_string();
    let (metrics, p) = (shared.metrics, &config.pipeline);
    let done = &probes.last().expect("the sink's probe at least").1;
    let mut telemetry = Telemetry {
        frontier_clock: FrontierClock::new(p.epochs),
        stall_watch: StallWatch::new(p.stall_after_secs, Instant::now()),
        in_flight: metrics.in_flight.with_label_values(&[&label]),
        model_version: metrics.model_version.with_label_values(&[&label, watched.model_name]),
        stalled_seconds: metrics.pipeline_stalled.with_label_values(&[&label]),
        label,
    };
    let status_every = Duration::from_secs(p.status_interval_secs.max(1));
    let (mut last_status, mut last_refresh) = (Instant::now(), Instant::now() - Duration::from_secs(1));
    // The first worker of each process logs the process's status line.
    let logs_status = index.is_multiple_of(shared.local_workers.max(1));
    let mut published_at_last_status = 0.0;
    while !done.done() {
        worker.step_or_park(Some(Duration::from_millis(20)));
        if let Some(error) = watched.fatal.borrow().clone() {
            return Err(PipelineError::Worker { index, error });
        }
        if shared.failed.load(Ordering::SeqCst) {
            return Err(PipelineError::AnotherWorkerFailed { index });
        }
        // A peer that closed its connections cleanly before the dataflow was done (it stopped
        // on an error of its own) leaves this worker waiting for progress that will not come.
        if let Some(loss) = shared.peers.and_then(|(watch, timeout)| watch.lost_for(timeout)) {
            return Err(PipelineError::lost(loss));
        }
        if last_refresh.elapsed() >= Duration::from_secs(1) {
            last_refresh = Instant::now();
            telemetry.refresh(index, probes, &watched, shared);
        }
        if logs_status && last_status.elapsed() >= status_every {
            let seconds = last_status.elapsed().as_secs_f64();
            last_status = Instant::now();
            let published = sum_of(&metrics.messages_published);
            let throughput = format!("{:.1}/s", (published - published_at_last_status) / seconds);
            published_at_last_status = published;
            log_status(done.with_frontier(|f| f.first().copied()), throughput, &watched, shared);
        }
    }
    for (name, _) in probes {
        metrics.frontier_lag.with_label_values(&[telemetry.label.as_str(), name]).set(0.0);
    }
    telemetry.stalled_seconds.set(0.0);
    shared.readiness.set_stalled(index, None);
    Ok(())
}

/// The worker's gauges and what computes them.
struct Telemetry {
    frontier_clock: FrontierClock,
    stall_watch: StallWatch,
    in_flight: prometheus::IntGauge,
    model_version: prometheus::IntGauge,
    stalled_seconds: prometheus::Gauge,
    label: String,
}

impl Telemetry {
    fn refresh(&mut self, index: usize, probes: &Probes, watched: &Watched, shared: &Shared) {
        let metrics = shared.metrics;
        let backlog = watched.backlog.borrow();
        self.in_flight.set(backlog.len() as i64);
        let frontiers: Vec<(&str, Option<Epoch>)> =
            probes.iter().map(|(name, probe)| (*name, probe.with_frontier(|f| f.first().copied()))).collect();
        for (name, lag) in self.frontier_clock.lags(&frontiers, dlpipe_operators::records::now_ms()) {
            metrics.frontier_lag.with_label_values(&[&self.label, name]).set(lag);
        }
        // The published frontier: the sink's.
        let published = frontiers.iter().find(|(name, _)| *name == "kafka_sink").and_then(|(_, f)| *f);
        let stalled = self.stall_watch.observe(published, backlog.len(), Instant::now());
        self.stalled_seconds.set(stalled.map_or(0.0, |d| d.as_secs_f64()));
        let waiting = stalled.zip(published).map(|(_, f)| stall::waiting_for(&backlog, f, &frontiers));
        match (&waiting, shared.readiness.stalled(index)) {
            (Some(waiting), None) => tracing::warn!(
                worker = index,
                seconds = stalled.map(|d| d.as_secs()),
                "stalled: the published frontier has not moved with records in flight; waiting for {waiting}"
            ),
            (None, Some(_)) => tracing::info!(worker = index, "no longer stalled: the published frontier moves"),
            _ => {}
        }
        shared.readiness.set_stalled(index, waiting);
        if let Some(head) = &watched.online {
            export_learner(metrics, &self.label, &head.borrow());
        }
        self.model_version.set(watched.online.as_ref().map_or(0, |h| h.borrow().model.updates()) as i64);
    }
}

/// The process's status line.
fn log_status(acked: Option<Epoch>, throughput: String, watched: &Watched, shared: &Shared) {
    let metrics = shared.metrics;
    let lag = sum_of(&metrics.consumer_lag) as i64;
    let in_flight = sum_of(&metrics.in_flight) as i64;
    let stalled = shared.readiness.first_stalled().unwrap_or_else(|| "no".into());
    match &watched.online {
        Some(head) => {
            let head = head.borrow();
            tracing::info!(
                acked_epoch = ?acked,
                throughput,
                lag,
                in_flight,
                updates = head.model.updates(),
                classes = head.model.num_classes(),
                accuracy = ?head.metrics.accuracy().map(|a| format!("{a:.3}")),
                window_accuracy = ?head.metrics.window_accuracy().map(|a| format!("{a:.3}")),
                stalled,
                "status"
            );
        }
        None => tracing::info!(acked_epoch = ?acked, throughput, lag, in_flight, stalled, "status"),
    }
}

/// Exports the online classifier's quality and size, and its shadow's quality.
fn export_learner(metrics: &Metrics, worker: &str, head: &OnlineLrHead) {
    let shadow = head.shadow.as_ref().map(|s| ("shadow", &s.metrics));
    for (model, prequential) in [("champion", &head.metrics)].into_iter().chain(shadow) {
        let windows = [
            ("prequential", prequential.accuracy(), prequential.mean_log_loss()),
            ("recent", prequential.window_accuracy(), prequential.window_mean_log_loss()),
        ];
        for (window, accuracy, loss) in windows {
            if let Some(a) = accuracy {
                metrics.online_accuracy.with_label_values(&[worker, window, model]).set(a);
            }
            if let Some(l) = loss {
                metrics.online_log_loss.with_label_values(&[worker, window, model]).set(l);
            }
        }
    }
    metrics.learner_classes.with_label_values(&[worker]).set(head.model.num_classes() as i64);
}

/// The sum of every series of a counter or gauge family (this process's share).
fn sum_of(family: &impl Collector) -> f64 {
    family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        // Metrics hold a default (zero) value of the types they are not.
        .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
        .sum()
}

/// Maps operator frontiers to wall-clock lag. With time epochs an epoch starts at
/// `epoch × millis`; with offset epochs, at the moment the source's frontier first reached it
/// (so on an idle offset-epoch stream the lag grows: such epochs have no wall-clock meaning).
struct FrontierClock {
    policy: EpochPolicy,
    first_seen: BTreeMap<Epoch, i64>,
    /// When the clock was first read: no frontier trails by more than the run has lasted (at
    /// start-up every frontier is still at epoch 0, which time epochs would date to 1970).
    origin_ms: Option<i64>,
}

impl FrontierClock {
    fn new(policy: EpochPolicy) -> FrontierClock {
        FrontierClock { policy, first_seen: BTreeMap::new(), origin_ms: None }
    }

    /// Seconds each operator's frontier trails `now_ms`; the first frontier is the source's.
    fn lags<'a>(&mut self, frontiers: &[(&'a str, Option<Epoch>)], now_ms: i64) -> Vec<(&'a str, f64)> {
        let origin_ms = *self.origin_ms.get_or_insert(now_ms);
        if let Some((_, Some(source))) = frontiers.first() {
            self.first_seen.entry(*source).or_insert(now_ms);
        }
        let lags = frontiers
            .iter()
            .map(|(name, frontier)| {
                let started_ms = match (frontier, self.policy) {
                    (None, _) => now_ms,
                    (Some(e), EpochPolicy::Time { millis }) => ((*e).saturating_mul(millis) as i64).max(origin_ms),
                    (Some(e), EpochPolicy::Offsets { .. }) => {
                        // The newest epoch seen at or before e (e itself unless the source skipped past it).
                        self.first_seen.range(..=*e).next_back().map_or(now_ms, |(_, t)| *t)
                    }
                };
                (*name, (now_ms - started_ms).max(0) as f64 / 1000.0)
            })
            .collect();
        // Epochs below every frontier are of no more use.
        if let Some(least) = frontiers.iter().filter_map(|(_, f)| *f).min() {
            let keep = self.first_seen.range(..=least).next_back().map(|(e, _)| *e);
            self.first_seen.retain(|e, _| Some(*e) >= keep);
        }
        lags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontier_lag_counts_from_the_epochs_start_or_from_when_the_source_reached_it() {
        // Time epochs of 1 s: epoch 100 starts at 100 000 ms; a done operator trails by nothing.
        let mut clock = FrontierClock::new(EpochPolicy::Time { millis: 1000 });
        // At start-up every frontier is at epoch 0: the lag counts from the start, not 1970.
        let lags = clock.lags(&[("kafka_source", Some(0)), ("featurize", Some(0))], 98_000);
        assert_eq!(lags, vec![("kafka_source", 0.0), ("featurize", 0.0)]);
        let lags = clock.lags(&[("kafka_source", Some(0)), ("featurize", Some(0))], 99_000);
        assert_eq!(lags, vec![("kafka_source", 1.0), ("featurize", 1.0)]);
        let lags = clock.lags(&[("kafka_source", Some(102)), ("featurize", Some(100)), ("kafka_sink", None)], 102_500);
        assert_eq!(lags, vec![("kafka_source", 0.5), ("featurize", 2.5), ("kafka_sink", 0.0)]);

        // Offset epochs: from when the source's frontier first reached the epoch.
        let mut clock = FrontierClock::new(EpochPolicy::Offsets { records: 10 });
        clock.lags(&[("kafka_source", Some(3)), ("featurize", Some(3))], 1_000);
        clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(3))], 4_000);
        let lags = clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(4))], 6_000);
        // featurize at 4: the source never stood at 4; epoch 3, reached at 1 s, is the newest before it.
        assert_eq!(lags, vec![("kafka_source", 2.0), ("featurize", 5.0)]);
        // Once every frontier passed epoch 3, only what is still needed is kept.
        clock.lags(&[("kafka_source", Some(5)), ("featurize", Some(5))], 7_000);
        assert_eq!(clock.first_seen.keys().copied().collect::<Vec<_>>(), vec![5]);
    }
}
