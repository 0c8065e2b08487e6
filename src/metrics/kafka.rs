//! Consumer lag from librdkafka's own statistics: the input consumer of each worker is created
//! with [`LagContext`], which turns each statistics report (`statistics.interval.ms`) into the
//! `dlpipe_consumer_lag_records` gauge: per assigned partition, the high watermark minus the
//! offset of the next record the worker takes (the committed offset would not do: with
//! checkpoints only worker 0 commits, for every partition, and only every few epochs).
//!
//! The reports arrive on the worker thread, during the source's non-blocking polls, so nothing
//! here waits on the network. A partition appears once its first fetch has answered.

use prometheus::IntGaugeVec;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

/// How often librdkafka reports statistics, in milliseconds (a librdkafka property value).
pub const STATISTICS_INTERVAL_MS: &str = "1000";

/// A consumer context that exports the lag of one worker's assigned partitions.
pub struct LagContext {
    pub lag: IntGaugeVec,
    pub worker: String,
    pub topic: String,
}

impl ClientContext for LagContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else { return };
        for (partition, p) in &topic.partitions {
            // Partitions of the topic this consumer is not assigned have no fetch state; -1 is
            // librdkafka's "unknown". The next record taken is the application offset once one
            // was, else the next offset to fetch.
            let next = if p.app_offset >= 0 { p.app_offset } else { p.next_offset };
            if *partition < 0 || p.fetch_state == "none" || p.hi_offset < 0 || next < 0 {
                continue;
            }
            let lag = (p.hi_offset - next).max(0);
            self.lag.with_label_values(&[&self.worker, &self.topic, &partition.to_string()]).set(lag);
        }
    }
}

impl ConsumerContext for LagContext {}
