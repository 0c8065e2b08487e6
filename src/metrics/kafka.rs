//! Consumer lag from librdkafka's own statistics: the input consumer of each worker is created
//! with [`LagContext`], which turns the per-partition `consumer_lag` of every statistics report
//! (high watermark minus committed offset; `statistics.interval.ms`) into the
//! `dlpipe_consumer_lag_records` gauge.
//!
//! The reports arrive on the worker thread, during the source's non-blocking polls, so nothing
//! here waits on the network. A partition appears once the group has committed an offset for it.

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
            // Partitions of the topic this consumer is not assigned have no fetch state and no
            // committed offset; -1 is librdkafka's "unknown".
            if *partition < 0 || p.fetch_state == "none" || p.consumer_lag < 0 {
                continue;
            }
            self.lag.with_label_values(&[&self.worker, &self.topic, &partition.to_string()]).set(p.consumer_lag);
        }
    }
}

impl ConsumerContext for LagContext {}
